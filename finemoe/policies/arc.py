"""ARC, the adaptive replacement cache (Megiddo & Modha, FAST '03; used by colibri's route simulator
and by Fate), over the expert slots.

T1 holds residents used once since they were loaded, T2 residents used again; B1 and B2 remember
(without weights) the experts recently evicted from each. A miss on an expert in B1 says T1 was
too small and raises the target size p of T1 by max(1, |B2|/|B1|); a miss in B2 lowers it by
max(1, |B1|/|B2|). The victim is T1's least recent expert when |T1| > p (or |T1| = p and the miss
was in B2), else T2's. Ghost lists are trimmed so |T1|+|B1| <= c and all four lists hold <= 2c.
The engine reports a miss (`on_access`, hit False) before the load it starts, so the victim choice
knows which list the missed expert was in, as ARC's REPLACE needs.
"""

from __future__ import annotations

from collections.abc import Callable

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


@register
class ARCPolicy(Policy):
    """No prediction; recency (T1) and frequency (T2) lists balanced by ghost hits."""

    name = "arc"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.c = ctx.capacity_slots
        self.t1, self.t2, self.b1, self.b2 = LRUOrder(), LRUOrder(), LRUOrder(), LRUOrder()
        self.p = 0.0
        self._to_t2: set[ExpertKey] = set()  # missed experts found in a ghost list, loading into T2
        self._miss_in_b2 = False

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        key = (layer, expert)
        if key in self.t1:
            self.t1.evicted(key)
            self.t2.loaded(key)
        elif key in self.t2:
            self.t2.touch(key)
        elif not hit:
            self._miss(key)

    def _miss(self, key: ExpertKey) -> None:
        """ARC's cases II and III (a ghost hit adapts p) or IV (a new expert)."""
        b1, b2 = len(self.b1), len(self.b2)
        self._miss_in_b2 = key in self.b2
        if key in self.b1:
            self.p = min(float(self.c), self.p + max(1.0, b2 / b1))
            self.b1.evicted(key)
            self._to_t2.add(key)
        elif key in self.b2:
            self.p = max(0.0, self.p - max(1.0, b1 / b2))
            self.b2.evicted(key)
            self._to_t2.add(key)

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        if key in self.t1 or key in self.t2:
            return
        if key in self._to_t2:
            self._to_t2.discard(key)
            self.t2.loaded(key)
        else:  # a new expert (or a prefetch): no ghost adaptation
            self.b1.evicted(key)
            self.b2.evicted(key)
            self.t1.loaded(key)
        self._trim()

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        if key in self.t1:
            self.t1.evicted(key)
            self.b1.loaded(key)
        elif key in self.t2:
            self.t2.evicted(key)
            self.b2.loaded(key)
        self._trim()

    def _trim(self) -> None:
        while self.b1 and len(self.t1) + len(self.b1) > self.c:
            self.b1.evicted(self.b1.victim(_any))
        while self.b2 and len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * self.c:
            self.b2.evicted(self.b2.victim(_any))

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        t1 = len(self.t1)
        from_t1 = t1 > 0 and (t1 > self.p or (self._miss_in_b2 and t1 == self.p))
        first, second = (self.t1, self.t2) if from_t1 else (self.t2, self.t1)
        victim = first.victim(evictable)
        return victim if victim is not None else second.victim(evictable)


def _any(key: ExpertKey) -> bool:
    return True
