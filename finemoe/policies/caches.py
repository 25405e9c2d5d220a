"""Cache orderings shared by policies: LRU order and LFU counts over the resident experts, and the
base class of the predictive policies whose cache is one of them.

Both orderings track residency through the policy notifications (`on_loaded`, `on_evicted`,
`on_access`) and answer one question: which evictable resident expert goes first. The `lru` and
`lfu` policies use them directly; MoE-Infinity, ProMoE and Mixtral-Offloading through
`TrackedCachePolicy`, so their victims are chosen exactly as on-demand LRU and LFU would choose them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch


class LRUOrder:
    """Resident experts from least to most recently used (loads and accesses count as uses)."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()
        self._move = self._order.move_to_end

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._order

    def loaded(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: ExpertKey) -> None:
        try:
            self._move(key)
        except KeyError:
            pass

    def evicted(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        for key in self._order:
            if evictable(key):
                return key
        return None

    def keys(self) -> list[ExpertKey]:
        """Least recently used first."""
        return list(self._order)


class LFUCounts:
    """Use counts per expert (kept across evictions); the least used resident goes first, the least
    recently used among equals.

    Residents sit in one bucket per count, each in recency order (a touch moves its key to the end
    of the next bucket, a load to the end of its own), with a heap of the counts that have a bucket:
    the victim is the first evictable key of the lowest buckets, found without a pass over every
    resident. The same victim as taking, over the residents in LRU order, the first of the least used.
    """

    def __init__(self) -> None:
        self.counts: dict[ExpertKey, int] = {}
        self._buckets: dict[int, OrderedDict[ExpertKey, None]] = {}  # count -> residents, least recent first
        self._heap: list[int] = []  # counts with a bucket (an emptied bucket is dropped lazily)
        self._in_heap: set[int] = set()  # the counts on the heap, each once, so it stays small

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _put(self, key: ExpertKey, count: int) -> None:
        bucket = self._buckets.get(count)
        if bucket is None:
            bucket = self._buckets[count] = OrderedDict()
            if count not in self._in_heap:
                self._in_heap.add(count)
                heapq.heappush(self._heap, count)
        bucket[key] = None

    def _take(self, key: ExpertKey, count: int) -> bool:
        """Remove a resident from its bucket; False if it is not resident."""
        bucket = self._buckets.get(count)
        if bucket is None or key not in bucket:
            return False
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return True

    def loaded(self, key: ExpertKey) -> None:
        count = self.counts.setdefault(key, 0)
        self._take(key, count)
        self._put(key, count)

    def touch(self, key: ExpertKey, amount: int = 1) -> None:
        count = self.counts.get(key, 0)
        self.counts[key] = count + amount
        if self._take(key, count):
            self._put(key, count + amount)

    def evicted(self, key: ExpertKey) -> None:
        self._take(key, self.counts.get(key, 0))

    def count(self, key: ExpertKey) -> int:
        return self.counts.get(key, 0)

    def keys(self) -> list[ExpertKey]:
        """Residents in eviction order: least used first, the least recently used among equals."""
        return [key for count in sorted(self._buckets) for key in self._buckets[count]]

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The least used evictable expert, the least recently used among equals."""
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] not in buckets:
            self._in_heap.discard(heapq.heappop(heap))  # a bucket emptied since its count was pushed
        if not heap:
            return None
        for key in buckets[heap[0]]:  # the common case: the lowest bucket has an evictable key
            if evictable(key):
                return key
        for count in sorted(buckets)[1:]:
            for key in buckets[count]:
                if evictable(key):
                    return key
        return None


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

    @property
    def ordering(self) -> LRUOrder | LFUCounts:
        """The victim order (what a compiled engine path takes over)."""
        return self._cache

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
