"""On-demand loading with least-frequently-used eviction (ties: least recently used)."""

from __future__ import annotations

from finemoe.policies.base import Policy
from finemoe.policies.caches import LFUCounts
from finemoe.policies.registry import register


@register
class LFUPolicy(Policy):
    """No prediction; evicts the evictable resident expert used least often in this run so far."""

    name = "lfu"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        self.lfu = LFUCounts()

    def on_access(self, layer, expert, hit, now_s) -> None:
        self.lfu.touch((layer, expert))

    def on_loaded(self, key, now_s) -> None:
        self.lfu.loaded(key)

    def on_evicted(self, key, now_s) -> None:
        self.lfu.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.lfu.victim(evictable)
