"""Mixtral-Offloading-style (Eliseev & Mazur, 2023): LRU expert cache plus speculative next-layer prefetch.

While layer l runs, layer l+1's router is applied to layer l's input (the trace's `spec_experts`,
recorded by the collector) and the experts it picks are prefetched for layer l+1. Layer 0 of a step
is never predicted. The original keeps k experts per layer in its LRU; we run one LRU over the whole
budget so every policy gets the same slots (noted in docs/policies.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from finemoe.policies.asks import PlannedAsks
from finemoe.policies.base import LayerRouting, PolicyContext, Prefetch
from finemoe.policies.caches import TrackedCachePolicy
from finemoe.policies.registry import register


@register
class MixtralOffloading(TrackedCachePolicy):
    name = "mixtral-offloading"
    needs = ("spec_experts",)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L = g.num_layers

    def layers_ahead(self) -> int:
        return 1  # the speculative gate of the next layer

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        target = routing.layer + 1
        if target >= self.L:
            return []
        votes: dict[int, int] = {}
        for i in range(len(routing.step.sequences)):
            spec = routing.spec_experts(i)
            if spec is None:
                continue
            for e in spec.ravel().tolist():  # a decode token has top-k ids: a loop beats np.unique
                if e >= 0:
                    votes[e] = votes.get(e, 0) + 1
        total = sum(votes.values()) or 1
        # Priority: share of the batch's tokens whose speculative router picked the expert.
        return [Prefetch(c / total, routing.step.step, target, e) for e, c in sorted(votes.items())]

    def plans_asks(self) -> bool:
        """Whether `planned_asks` can stand for the hooks in this run: always (routing alone)."""
        return True

    def planned_asks(self, trace, steps, first_step: int) -> PlannedAsks:
        """The hook's asks for planned steps (`steps[s]` is engine step first_step + s), from the
        votes of every step's tokens at once: per (step, layer) the experts voted for, ascending,
        each at its share of the votes."""
        n, L = len(steps), self.L
        J = self.ctx.geometry.num_experts
        spec = trace.spec_experts
        owner = np.concatenate([np.full(q.stop - q.start, s, np.int64) for s, seqs in enumerate(steps) for q in seqs])
        rows = np.concatenate([np.arange(q.start, q.stop) for seqs in steps for q in seqs])
        picks = spec[rows].astype(np.int64)  # [tokens, layers, k]
        valid = picks >= 0
        tok, lay, _ = np.nonzero(valid)
        votes = np.zeros((n, L, J), np.int64)
        np.add.at(votes, (owner[tok], lay, picks[valid]), 1)
        votes[:, L - 1, :] = 0  # the last layer predicts nothing
        total = votes.sum(axis=2, keepdims=True)
        s_idx, l_idx, experts = np.nonzero(votes)  # in (step, layer, expert) order: the hook's order
        priority = votes[s_idx, l_idx, experts] / np.maximum(total, 1)[s_idx, l_idx, 0]
        per_group = np.zeros((n, L + 1), np.int64)
        per_group[:, 1:] = (votes > 0).sum(axis=2)
        hi = np.cumsum(per_group.ravel()).reshape(n, L + 1)
        lo = hi - per_group
        step = np.broadcast_to(first_step + np.arange(n, dtype=np.int64)[:, None], (n, L + 1))
        return PlannedAsks(lo, hi, np.ascontiguousarray(step), (l_idx + 1).astype(np.int64), experts.astype(np.int64),
                           priority.astype(np.float64), wants_step=False)
