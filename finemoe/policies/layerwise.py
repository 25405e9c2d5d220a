"""DeepSpeed-Inference-style layer-wise offload: while a layer computes, fetch every expert of the
next layer (the first layer of the next step after the last); LRU eviction."""

from __future__ import annotations

from finemoe.policies.base import Policy, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


@register
class LayerwisePolicy(Policy):
    name = "layerwise"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.order = LRUOrder()
        self.L = ctx.geometry.num_layers
        self.J = ctx.geometry.num_experts

    def _layer(self, step: int, layer: int):
        return [Prefetch(1.0, step, layer, e) for e in range(self.J)]

    def on_step_start(self, step):
        return self._layer(step.step, 0)

    def on_layer_routed(self, routing):
        nxt = routing.layer + 1
        if nxt < self.L:
            return self._layer(routing.step.step, nxt)
        return self._layer(routing.step.step + 1, 0)

    def on_access(self, layer, expert, hit, now_s) -> None:
        if hit:
            self.order.touch((layer, expert))

    def on_loaded(self, key, now_s) -> None:
        self.order.loaded(key)

    def on_evicted(self, key, now_s) -> None:
        self.order.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.order.victim(evictable)
