"""HOBBIT-style mixed-precision fetching (Tang et al., "HOBBIT: A Mixed Precision Expert Offloading
System for Fast MoE Inference", 2024): a miss whose expert matters little to this step's tokens is
copied at a low precision, a quarter of the bytes at int4, and computed so.

Rule: at each layer, an expert routed to the step's tokens is *unimportant* when its largest gate
weight over them (the trace's top-k weights) is below `threshold`. An unimportant miss is fetched
at `low` (a format of traces/precision.py); an important one at full precision. A low-precision
copy serves later unimportant uses as a hit. An important use of it is a miss: the copy leaves its
slot and is reloaded in full. Eviction is LRU. Prefetches (none here) copy in full.

It is lossy: the low-precision experts change the model's outputs by an amount a routing trace
cannot tell. Results say so (`policy_info.lossy`), and so do tables and legends. The threshold's
default is ours, not the paper's: sweep it (`--policy-param hobbit.threshold=0.1,0.2,0.3`).
"""

from __future__ import annotations

from finemoe.policies.base import LayerRouting, Policy
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register
from finemoe.traces.precision import expert_format
from finemoe.traces.schema import MISSING_EXPERT


@register
class HobbitPolicy(Policy):
    """LRU with misses of low gate weight fetched at a low precision."""

    name = "hobbit"

    def __init__(self, threshold: float = 0.25, low: str = "int4") -> None:
        super().__init__()
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise TypeError(f"threshold is a gate weight in [0, 1], got {threshold}")
        fmt = expert_format(str(low))
        if not fmt.lossy:
            raise TypeError(f"low must be a format below 16 bits, got {low}")
        self.threshold, self.low_precision = threshold, fmt.name
        self.params = {"threshold": threshold, "low": fmt.name}
        self.order = LRUOrder()
        self._low: dict[int, set[int]] = {}  # per layer: this step's unimportant experts

    def on_layer_routed(self, routing: LayerRouting):
        best: dict[int, float] = {}
        for i in range(len(routing.step.sequences)):
            for experts, weights in zip(routing.experts(i), routing.weights(i), strict=True):
                for e, w in zip(experts.tolist(), weights.tolist(), strict=True):
                    if e != MISSING_EXPERT and w > best.get(e, -1.0):
                        best[e] = w
        self._low[routing.layer] = {e for e, w in best.items() if w < self.threshold}
        return ()

    def fetch_low(self, key) -> bool:
        return key[1] in self._low.get(key[0], ())

    def on_access(self, layer, expert, hit, now_s) -> None:
        if hit:
            self.order.touch((layer, expert))

    def on_loaded(self, key, now_s) -> None:
        self.order.loaded(key)

    def on_evicted(self, key, now_s) -> None:
        self.order.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.order.victim(evictable)
