"""Mixtral-Offloading-style (Eliseev & Mazur, 2023): LRU expert cache plus speculative next-layer prefetch.

While layer l runs, layer l+1's router is applied to layer l's input (the trace's `spec_experts`,
recorded by the collector) and the experts it picks are prefetched for layer l+1. Layer 0 of a step
is never predicted. The original keeps k experts per layer in its LRU; we run one LRU over the whole
budget so every policy gets the same slots (noted in docs/policies.md).
"""

from __future__ import annotations

from collections.abc import Iterable

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

