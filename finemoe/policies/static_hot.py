"""A static hot set pinned from the history split, LRU for the rest (the profile-driven expert
caches of llama.cpp forks: profile a workload, keep its most used experts on the GPU).

`fit` counts how many history tokens each (layer, expert) served; the `hot_fraction` x slots most
used ones (ties: lower layer, then lower id) are the hot set: once loaded, a hot expert is evicted
only when every other resident is pinned by the engine. The remaining slots are an on-demand LRU
cache. The run starts cold like every other policy (and the oracle): preloading the hot set would
be a start state the others do not get. Without history (`--online`) the hot set is empty and
this is plain LRU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from finemoe.policies.base import ExpertKey, Policy, PolicyContext, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.policies.moe_infinity import activation_matrix
from finemoe.policies.registry import register


def hottest(counts: np.ndarray, n: int) -> list[ExpertKey]:
    """The `n` (layer, expert) with the highest counts, most used first; ties: lower layer, lower id."""
    flat = counts.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[: max(0, n)]
    J = counts.shape[1]
    return [divmod(int(i), J) for i in order if flat[i] > 0]


@register
class StaticHotPolicy(Policy):
    """No prediction; the history's hottest experts pinned, LRU over the other slots."""

    name = "static-hot"
    uses_history = True

    def __init__(self, hot_fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= float(hot_fraction) <= 1.0:
            raise TypeError(f"hot_fraction must be in [0, 1], got {hot_fraction}")
        self.hot_fraction = float(hot_fraction)
        self.params = {"hot_fraction": self.hot_fraction}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.order = LRUOrder()
        self.hot: set[ExpertKey] = set()

    def fit(self, history) -> None:
        rows = np.arange(history.num_tokens)
        n = int(self.hot_fraction * self.ctx.capacity_slots)
        self.hot = set(hottest(activation_matrix(history, rows), n))

    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self.order.touch((layer, expert))

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self.order.loaded(key)

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self.order.evicted(key)

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        hot = self.hot
        victim = self.order.victim(lambda key: key not in hot and evictable(key))
        return victim if victim is not None else self.order.victim(evictable)
