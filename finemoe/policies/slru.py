"""Segmented LRU (Karedla et al. 1994; the route simulators of colibri and Fate use it).

Residents sit in two LRU segments. A load enters the probationary segment; a hit there promotes
the expert to the protected segment, which holds at most `protected_fraction` of the slots (its
least recently used expert is demoted back to the probationary segment's most recent end when it
overflows). Victims come from the probationary segment first, least recent first, so an expert
used once cannot push out one used repeatedly.
"""

from __future__ import annotations

from collections.abc import Callable

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


def _any(key: ExpertKey) -> bool:
    return True


@register
class SLRUPolicy(Policy):
    """No prediction; probationary LRU segment evicted before the protected one."""

    name = "slru"

    def __init__(self, protected_fraction: float = 0.8) -> None:
        super().__init__()
        if not 0.0 <= float(protected_fraction) < 1.0:
            raise TypeError(f"protected_fraction must be in [0, 1), got {protected_fraction}")
        self.protected_fraction = float(protected_fraction)
        self.params = {"protected_fraction": self.protected_fraction}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.probation = LRUOrder()
        self.protected = LRUOrder()
        self.protected_slots = int(self.protected_fraction * ctx.capacity_slots)

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        key = (layer, expert)
        if key in self.protected:
            self.protected.touch(key)
        elif hit and key in self.probation:
            self.probation.evicted(key)
            self.protected.loaded(key)
            while len(self.protected) > self.protected_slots:
                demoted = self.protected.victim(_any)
                self.protected.evicted(demoted)
                self.probation.loaded(demoted)

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        if key not in self.protected:
            self.probation.loaded(key)

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self.probation.evicted(key)
        self.protected.evicted(key)

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        victim = self.probation.victim(evictable)
        return victim if victim is not None else self.protected.victim(evictable)
