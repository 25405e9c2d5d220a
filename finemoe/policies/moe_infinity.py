"""MoE-Infinity-style (Xue et al., 2024): request-level expert activation matrices, LFU cache.

An expert activation matrix (EAM) counts, per layer and expert, the tokens a request routed there.
History keeps one EAM per request. While a request runs, its partial EAM (all iterations so far,
the current one up to the layer just routed) is matched by cosine to the stored EAMs; the best
match's rows for the next `distance` layers name the experts to prefetch (its `num_prefetch` most
used per layer, priority = activation ratio / layers ahead). A request with nothing observed yet
matches the sum of all history (plain popularity). Coarse-grained by design: FINEMOE.md explains
why request-level statistics predict little when routing is balanced over a request.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from finemoe.policies.base import LayerRouting, PolicyContext, Prefetch, StepInfo
from finemoe.policies.registry import register
from finemoe.policies.usage import TrackedCachePolicy


def activation_matrix(trace, rows: np.ndarray) -> np.ndarray:
    """float [L, J]: tokens routed to each expert over `rows` of `trace` (missing records skipped)."""
    g = trace.geometry
    eam = np.zeros((g.num_layers, g.num_experts))
    ex = trace.experts[rows]  # [n, L, K]
    layer_idx = np.broadcast_to(np.arange(g.num_layers)[None, :, None], ex.shape)
    valid = ex >= 0
    np.add.at(eam, (layer_idx[valid], ex[valid].astype(np.int64)), 1.0)
    return eam


@register
class MoEInfinity(TrackedCachePolicy):
    cache_order = "lfu"
    name = "moe-infinity"
    uses_history = True

    def __init__(self, distance: int = 3, num_prefetch: int | None = None, learn_online: bool = True) -> None:
        super().__init__()
        if int(distance) < 1:
            raise TypeError(f"distance must be at least 1 layer, got {distance}")
        if num_prefetch is not None and int(num_prefetch) < 1:
            raise TypeError(f"num_prefetch must be at least 1, got {num_prefetch}")
        self.distance = int(distance)
        self.num_prefetch = None if num_prefetch is None else int(num_prefetch)
        self.learn_online = bool(learn_online)
        self.params = dict(distance=self.distance, num_prefetch=self.num_prefetch, learn_online=self.learn_online)
        self.history: list[np.ndarray] = []

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.n_pref = min(self.num_prefetch or g.top_k, g.num_experts)
        self._partial: dict[int, np.ndarray] = {}  # request id -> EAM so far
        self._step: StepInfo | None = None
        self._refresh()

    def _refresh(self) -> None:
        if self.history:
            stack = np.stack(self.history)
            self._flat = stack.reshape(len(self.history), -1)
            self._norms = np.linalg.norm(self._flat, axis=1)
            self._popular = stack.sum(axis=0)
        else:
            self._flat, self._norms, self._popular = None, None, None

    def fit(self, history) -> None:
        for its in history.iterations_by_request.values():
            if its:
                self.history.append(activation_matrix(history, np.arange(its[0].start, its[-1].stop)))
        self._refresh()

    def on_request_finished(self, request_id: int, trace) -> None:
        self._partial.pop(request_id, None)
        if self.learn_online:
            rows = np.flatnonzero(trace.request_id == request_id)
            if rows.size:
                self.history.append(activation_matrix(trace, rows))
                self._refresh()

    def _match(self, partial: np.ndarray) -> np.ndarray | None:
        """The stored EAM most similar (cosine) to `partial`; popularity if nothing observed yet."""
        if self._flat is None:
            return None
        q = partial.reshape(-1)
        qn = float(np.linalg.norm(q))
        if qn == 0.0:
            return self._popular
        cos = (self._flat @ q) / np.maximum(self._norms * qn, 1e-12)
        return self._flat[int(np.argmax(cos))].reshape(self.L, self.J)

    def _predict(self, out: dict, step: int, current: int, eam: np.ndarray | None) -> None:
        if eam is None:
            return
        for target in range(current + 1, min(current + 1 + self.distance, self.L)):
            row = eam[target]
            total = row.sum()
            if total <= 0:
                continue
            for e in np.argsort(-row, kind="stable")[: self.n_pref].tolist():
                prio = float(row[e] / total) / (target - current)
                if (target, e) not in out or out[(target, e)].priority < prio:
                    out[(target, e)] = Prefetch(prio, step, target, e)

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        self._step = step
        out: dict = {}
        for s in step.sequences:
            partial = self._partial.setdefault(s.request_id, np.zeros((self.L, self.J)))
            self._predict(out, step.step, -1, self._match(partial))
        return sorted(out.values(), reverse=True)

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        out: dict = {}
        layer = routing.layer
        for i, s in enumerate(routing.step.sequences):
            partial = self._partial.setdefault(s.request_id, np.zeros((self.L, self.J)))
            ex = routing.experts(i)
            ids, counts = np.unique(ex[ex >= 0], return_counts=True)
            partial[layer, ids.astype(np.int64)] += counts
            if layer + 1 < self.L:
                self._predict(out, routing.step.step, layer, self._match(partial))
        return sorted(out.values(), reverse=True)

    def describe(self) -> dict:
        d = super().describe()
        d["stats"] = {"history_matrices": len(self.history)}
        return d
