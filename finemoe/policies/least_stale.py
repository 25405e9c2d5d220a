"""Least-Stale (SpecMD, arXiv 2602.03921): evict experts not touched in the current forward pass first.

An expert used in the current engine step (one forward pass) is "current", every other resident is
"stale". The victim is the stale resident loaded earliest (FIFO); only when every evictable
resident is current does the earliest-loaded current one go. A decode step sweeps the layers in
order, so the experts of layers already passed in this step are the ones that will wait longest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch, StepInfo
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import register


@register
class LeastStalePolicy(Policy):
    """No prediction; stale before current, first loaded first within each."""

    name = "least-stale"

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.fifo = LRUOrder()  # loads only, never touched: load order
        self._touched: dict[ExpertKey, int] = {}  # expert -> engine step of its last use
        self._step = -1

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        self._step = step.step
        return ()

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self._touched[(layer, expert)] = self._step

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self.fifo.loaded(key)

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self.fifo.evicted(key)

    def is_current(self, key: ExpertKey) -> bool:
        """Whether `key` was used in the engine step now running."""
        return self._touched.get(key, -2) == self._step

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        stale = self.fifo.victim(lambda key: evictable(key) and not self.is_current(key))
        return stale if stale is not None else self.fifo.victim(evictable)
