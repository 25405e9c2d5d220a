"""DeepSpeed-Inference-style layer-wise offload: while a layer computes, fetch every expert of the
next layer (the first layer of the next step after the last); LRU eviction."""

from __future__ import annotations

import numpy as np

from finemoe.policies.asks import PlannedAsks
from finemoe.policies.base import Prefetch
from finemoe.policies.lru import LRUPolicy
from finemoe.policies.registry import register


@register
class LayerwisePolicy(LRUPolicy):
    """LRU's cache, plus a prefetch of the whole next layer."""

    name = "layerwise"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.L = ctx.geometry.num_layers
        self.J = ctx.geometry.num_experts

    def layers_ahead(self) -> int:
        return 1  # the whole next layer

    def _layer(self, step: int, layer: int):
        return [Prefetch(1.0, step, layer, e) for e in range(self.J)]

    def on_step_start(self, step):
        return self._layer(step.step, 0)

    def on_layer_routed(self, routing):
        nxt = routing.layer + 1
        if nxt < self.L:
            return self._layer(routing.step.step, nxt)
        return self._layer(routing.step.step + 1, 0)

    def plans_asks(self) -> bool:
        """Whether `planned_asks` can stand for the hooks in this run: always (routing alone)."""
        return True

    def planned_asks(self, trace, steps, first_step: int) -> PlannedAsks:
        """The hooks' asks for planned steps (`steps[s]` is engine step first_step + s): each asks
        for the whole next layer, one slice per layer shared by every step."""
        n, L, J = len(steps), self.L, self.J
        number = first_step + np.arange(n, dtype=np.int64)[:, None]
        hook = np.arange(L + 1, dtype=np.int64)[None, :]
        step = np.where(hook < L, number, number + 1)  # after the last layer: the next step's first
        target = np.where(np.arange(L + 1) < L, np.arange(L + 1), 0)  # hook h asks for layer h (L: 0)
        lo = np.broadcast_to((target * J)[None, :], (n, L + 1))
        return PlannedAsks(np.ascontiguousarray(lo), np.ascontiguousarray(lo + J), np.ascontiguousarray(step),
                           np.repeat(np.arange(L, dtype=np.int64), J), np.tile(np.arange(J, dtype=np.int64), L),
                           np.ones(L * J), wants_step=True)
