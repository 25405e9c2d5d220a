"""The storage format of the routed experts: how many bytes an expert is resident, copied and read in.

Local serving keeps experts quantised (GGUF Q4/Q8, FP8, MXFP4), which moves every crossover: an
int4 expert takes a quarter of a bf16 one's slot and of its copy. `--expert-dtype` re-sizes a
trace's experts to one of these formats; everything else about the model (dense weights,
activations, the KV cache, FLOPs) stays as the trace says. Bits per weight count the formats' own
scales (GGUF's block layouts, ggml-common.h; OCP MX v1.0 for MXFP4), so a Q4_0 expert is 4.5 bits
per weight, not 4. Dequantisation is not charged: on GPUs the quantised GEMV kernels of decode stay
bound by the bytes they read, which is what the roofline charges.

A format with fewer bits than 16 changes the model's outputs: it is lossy, and every table,
figure and report says so next to it (`label`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from finemoe.errors import ConfigError
from finemoe.traces.geometry import DTYPE_BYTES, Geometry


@dataclass(frozen=True)
class ExpertFormat:
    name: str
    bits_per_weight: float  # block scales included
    lossy: bool
    layout: str  # where the bits come from

    @property
    def label(self) -> str:
        return f"{self.name} experts" + (" (lossy)" if self.lossy else "")


EXPERT_FORMATS: dict[str, ExpertFormat] = {f.name: f for f in (
    ExpertFormat("bf16", 16.0, False, "bfloat16, as most checkpoints ship"),
    ExpertFormat("fp16", 16.0, False, "float16"),
    ExpertFormat("fp8", 8.0, True, "FP8 E4M3 with one scale per tensor (vLLM/SGLang fp8 checkpoints)"),
    ExpertFormat("int8", 8.5, True, "GGUF Q8_0: blocks of 32 int8 weights with an fp16 scale (34 bytes)"),
    ExpertFormat("q6_k", 6.5625, True, "GGUF Q6_K: super-blocks of 256 weights in 210 bytes"),
    ExpertFormat("int4", 4.5, True, "GGUF Q4_0: blocks of 32 4-bit weights with an fp16 scale (18 bytes)"),
    ExpertFormat("q4_k", 4.5, True, "GGUF Q4_K: super-blocks of 256 weights in 144 bytes"),
    ExpertFormat("mxfp4", 4.25, True, "OCP MXFP4: 32 FP4 values with one 8-bit scale (GPT-OSS experts)"),
)}


def expert_format(name: str) -> ExpertFormat:
    try:
        return EXPERT_FORMATS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown expert dtype {name!r}; known: {', '.join(EXPERT_FORMATS)}") from None


def with_expert_format(geometry: Geometry, name: str) -> Geometry:
    """`geometry` with each routed expert stored as `name`: the same weights (the trace's bytes per
    expert over its dtype's bytes per weight) at the format's bits per weight."""
    fmt = expert_format(name)
    weights = geometry.bytes_per_expert / DTYPE_BYTES.get(geometry.dtype, 2.0)
    return replace(geometry, bytes_per_expert=int(round(weights * fmt.bits_per_weight / 8)))
