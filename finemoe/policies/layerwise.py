"""DeepSpeed-Inference-style layer-wise offload: while a layer computes, fetch every expert of the
next layer (the first layer of the next step after the last); LRU eviction."""

from __future__ import annotations

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
