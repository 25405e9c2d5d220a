"""The cache half of the predictive policies that keep a plain LRU or LFU cache (MoE-Infinity,
ProMoE, Mixtral-Offloading): the same orderings as the `lru` and `lfu` policies (`caches.py`), so
their victims are chosen exactly as on-demand LRU and LFU would choose them, at the same cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch
from finemoe.policies.caches import LFUCounts, LRUOrder


class TrackedCachePolicy(Policy):
    """A predictive policy whose cache is plain LRU or LFU (`cache_order`); loads count as uses,
    LFU counts every access (kept across evictions) and breaks ties by recency.

    Subclasses add prediction; this owns the cache notifications and the victim choice.
    """

    cache_order: ClassVar[str] = "lru"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        if self.cache_order == "lru":
            self._cache: LRUOrder | LFUCounts = LRUOrder()
        elif self.cache_order == "lfu":
            self._cache = LFUCounts()
        else:
            raise ValueError(f"unknown cache order {self.cache_order!r}")
        self._touch, self._loaded, self._evicted = self._cache.touch, self._cache.loaded, self._cache.evicted

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self._touch((layer, expert))

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self._loaded(key)

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self._evicted(key)

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        return self._cache.victim(evictable)
