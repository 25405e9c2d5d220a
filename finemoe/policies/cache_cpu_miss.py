"""An expert cache whose misses are computed on the CPU at once while a copy brings the expert to
the GPU for later steps (HybriMoE-style hybrid execution): a miss never stalls the GPU on a copy.

The copy is queued as a prefetch for the same layer of the next step, so one that cannot start
before that layer is routed again is dropped (the link is the bottleneck then, not the cache).
`cache`: the eviction order of the GPU's slots, `lru` or `lfu`.
"""

from __future__ import annotations

from finemoe.policies.base import CPU_AND_COPY
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
        self.cache = self.cache_order = cache  # the base class's LRU order or LFU counts
        self.params = {"cache": cache, "offload_batch": offload_batch}

    def scratch_slots(self) -> int:
        return 0  # every slot is cache

    def place(self, layer: int, expert: int, tokens: int) -> str:
        return CPU_AND_COPY
