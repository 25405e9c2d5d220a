"""An expert cache whose misses are computed on the CPU at once while a copy brings the expert to
the GPU for later steps (HybriMoE-style hybrid execution): a miss never stalls the GPU on a copy.

The copy is queued as a prefetch for the same layer of the next step, so one that cannot start
before that layer is routed again is dropped (the link is the bottleneck then, not the cache).
`cache`: the eviction order of the GPU's slots, `lru` or `lfu`.
"""

from __future__ import annotations

from finemoe.policies.base import CPU_AND_COPY, PolicyContext
from finemoe.policies.caches import LFUCounts
from finemoe.policies.placement import CpuExecutingPolicy
from finemoe.policies.registry import register

CACHES = ("lru", "lfu")


@register
class CacheCpuMissPolicy(CpuExecutingPolicy):
    """LRU or LFU cache on the GPU; a miss runs on the CPU now and is copied for next time."""

    name = "cache-cpu-miss"

    def __init__(self, cache: str = "lru", offload_batch="off") -> None:
        super().__init__(offload_batch)
        if cache not in CACHES:
            raise TypeError(f"cache is one of {', '.join(CACHES)}, got {cache!r}")
        self.cache = cache
        self.params = {"cache": cache, "offload_batch": offload_batch}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.lfu = LFUCounts() if self.cache == "lfu" else None

    def scratch_slots(self) -> int:
        return 0  # every slot is cache

    def place(self, layer: int, expert: int, tokens: int) -> str:
        return CPU_AND_COPY

    def on_access(self, layer, expert, hit, now_s) -> None:
        super().on_access(layer, expert, hit, now_s)
        if self.lfu is not None:
            self.lfu.touch((layer, expert))

    def on_loaded(self, key, now_s) -> None:
        super().on_loaded(key, now_s)
        if self.lfu is not None:
            self.lfu.loaded(key)

    def on_evicted(self, key, now_s) -> None:
        super().on_evicted(key, now_s)
        if self.lfu is not None:
            self.lfu.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        if self.lfu is not None:
            return self.lfu.victim(evictable)
        return self.order.victim(evictable)
