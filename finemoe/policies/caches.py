"""Cache orderings shared by policies: LRU order and LFU counts over the resident experts, and the
base class of the predictive policies whose cache is one of them.

Both orderings track residency through the policy notifications (`on_loaded`, `on_evicted`,
`on_access`) and answer one question: which evictable resident expert goes first. The `lru` and
`lfu` policies use them directly; MoE-Infinity, ProMoE and Mixtral-Offloading through
`TrackedCachePolicy`, so their victims are chosen exactly as on-demand LRU and LFU would choose them.
"""

from __future__ import annotations

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
    """Use counts per expert (kept across evictions) with an LRU order to break ties."""

    def __init__(self) -> None:
        self.counts: dict[ExpertKey, int] = {}
        self.lru = LRUOrder()

    def loaded(self, key: ExpertKey) -> None:
        self.counts.setdefault(key, 0)  # every resident expert has a count (`victim`'s first try)
        self.lru.loaded(key)

    def touch(self, key: ExpertKey, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount
        self.lru.touch(key)

    def evicted(self, key: ExpertKey) -> None:
        self.lru.evicted(key)

    def count(self, key: ExpertKey) -> int:
        return self.counts.get(key, 0)

    def victim(self, evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The least used evictable expert, the least recently used among equals."""
        order, counts = self.lru._order, self.counts
        if order:
            # First try, without a Python loop: the first least used of all (every earlier one is
            # used more), which is the answer unless it is pinned.
            first = min(order, key=counts.__getitem__)
            if evictable(first):
                return first
        best, best_count = None, None
        for key in order:  # least recently used first, so the first minimum wins ties
            if not evictable(key):
                continue
            c = counts.get(key, 0)
            if best_count is None or c < best_count:
                best, best_count = key, c
                if c == 0:
                    break
        return best


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
