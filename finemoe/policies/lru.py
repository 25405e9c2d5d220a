"""On-demand loading with least-recently-used eviction: what most offloading runtimes do."""

from __future__ import annotations

from finemoe.policies.base import Policy
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


@register
class LRUPolicy(Policy):
    """No prediction; a miss loads the expert, the least recently used evictable expert makes room."""

    name = "lru"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.order = LRUOrder()
        self._move = self.order._move
        # Loads and evictions (one each per miss) change the order's dict here, not through a second call.
        self._recency = self.order._order

    def on_access(self, layer, expert, hit, now_s) -> None:
        if hit:  # the hot path of every simulation: one dict operation (`LRUOrder.touch`, inlined)
            try:
                self._move((layer, expert))
            except KeyError:
                pass

    def on_loaded(self, key, now_s) -> None:
        self._recency[key] = None  # `LRUOrder.loaded`
        self._recency.move_to_end(key)

    def on_evicted(self, key, now_s) -> None:
        self._recency.pop(key, None)  # `LRUOrder.evicted`

    def choose_victim(self, evictable, for_prefetch, now_s):
        for key in self._recency:  # `LRUOrder.victim`: once per miss, so without a second call
            if evictable(key):
                return key
        return None
