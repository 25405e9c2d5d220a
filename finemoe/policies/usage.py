"""Residency, use counts and recency of every expert, as numpy arrays, for the predictive policies' caches.

Victim choice by LRU (least recently used) or LFU (least frequently used, ties by recency), with
an optional mask of experts a prefetch may not displace. Vectorised so that a choice costs one
argmin over L x J values, not a Python loop over residents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch


class UsageTracker:
    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.J = num_layers, num_experts
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)
        self.freq = np.zeros((num_layers, num_experts))
        self.last = np.zeros((num_layers, num_experts))
        self.clock = 0

    def accessed(self, layer: int, expert: int) -> None:
        self.clock += 1
        self.freq[layer, expert] += 1
        self.last[layer, expert] = self.clock

    def loaded(self, key: ExpertKey) -> None:
        # A fresh load counts as recent (else a prefetched expert would be the first LRU victim).
        self.clock += 1
        self.resident[key] = True
        self.last[key] = self.clock

    def evicted(self, key: ExpertKey) -> None:
        self.resident[key] = False

    def recency(self) -> np.ndarray:
        """last use scaled into [0, 1): a tie-break that never outweighs one use count."""
        return self.last / (self.clock + 1.0)

    def sort_key(self, kind: str) -> np.ndarray:
        """float [L, J], lowest evicted first; +inf where not resident."""
        if kind == "lru":
            key = self.recency()
        elif kind == "lfu":
            key = self.freq + self.recency()
        else:
            raise ValueError(f"unknown cache order {kind!r}")
        return np.where(self.resident, key, np.inf)

    def choose(
        self,
        key: np.ndarray,
        evictable: Callable[[ExpertKey], bool],
        blocked: np.ndarray | None = None,
    ) -> ExpertKey | None:
        """The lowest-key resident expert that is evictable and not `blocked`; None if there is none."""
        if blocked is not None:
            key = np.where(blocked, np.inf, key)
        first = int(np.argmin(key))
        if not np.isfinite(key.flat[first]):
            return None
        victim = divmod(first, self.J)
        if evictable(victim):
            return victim
        for flat in np.argsort(key, axis=None, kind="stable").tolist():
            if not np.isfinite(key.flat[flat]):
                break
            victim = divmod(flat, self.J)
            if evictable(victim):
                return victim
        return None


class TrackedCachePolicy(Policy):
    """A predictive policy whose cache is plain LRU or LFU over a `UsageTracker` (`cache_order`).

    Subclasses add prediction; this owns the cache notifications and the victim choice.
    """

    cache_order: ClassVar[str] = "lru"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.usage = UsageTracker(ctx.geometry.num_layers, ctx.geometry.num_experts)

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self.usage.accessed(layer, expert)

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self.usage.loaded(key)

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self.usage.evicted(key)

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        return self.usage.choose(self.usage.sort_key(self.cache_order), evictable)
