"""On-demand loading with least-recently-used eviction: what most offloading runtimes do."""

from __future__ import annotations

from finemoe.policies.base import Policy
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


@register
class LRUPolicy(Policy):
    """No prediction; a miss loads the expert, the least recently used evictable expert makes room.
    (Long runs go through sim/compiled.py, which reproduces this order; this is its reference.)"""

    name = "lru"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.order = LRUOrder()

    def on_access(self, layer, expert, hit, now_s) -> None:
        if hit:
            self.order.touch((layer, expert))

    def on_loaded(self, key, now_s) -> None:
        self.order.loaded(key)

    def on_evicted(self, key, now_s) -> None:
        self.order.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.order.victim(evictable)
