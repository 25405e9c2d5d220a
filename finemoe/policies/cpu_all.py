"""Every routed expert computed on the CPU, attention and shared experts on the GPU: ktransformers'
design (routed experts on AMX/AVX-512 kernels over host memory). The GPU's memory holds the dense
weights and the KV cache; its expert slots stay empty."""

from __future__ import annotations

from finemoe.policies.placement import CpuExecutingPolicy
from finemoe.policies.registry import register


@register
class CpuAllPolicy(CpuExecutingPolicy):
    """No expert on the GPU: each one runs on the CPU (or, with offload_batch, a large batch's on the GPU)."""

    name = "cpu-all"
