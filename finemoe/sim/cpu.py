"""CPU profiles: what computing an expert on the host costs, for policies that run misses there
(llama.cpp's `--n-cpu-moe`, ktransformers, Fiddler, HybriMoE; docs/cpu-execution.md).

An expert's FFN on the CPU is a roofline like the GPU's: its weights read once from host memory at
`mem_gbps x memory_efficiency`, or its FLOPs at `flops x compute_efficiency`, whichever binds, plus
a fixed dispatch cost. Decode (one token per expert) is bound by memory bandwidth on every CPU;
prefill (many tokens per expert) by compute. Presets cite the parts they describe; `finemoe
calibrate --device cpu` measures this machine's figures into a profile `--cpu` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from finemoe.errors import ConfigError


@dataclass(frozen=True)
class CpuSpec:
    name: str
    mem_gbps: float  # peak host memory bandwidth, GB/s (1e9 bytes/s), all channels
    flops: float  # peak bf16 FLOP/s of all cores (vector or matrix units)
    memory_efficiency: float = 0.7  # achieved / peak bandwidth of an all-core streaming read
    compute_efficiency: float = 0.5  # achieved / peak FLOP/s for expert-sized GEMMs
    expert_overhead_s: float = 5e-6  # per expert computed: dispatching the kernel to the cores
    sync_s: float = 20e-6  # per MoE layer with CPU work: the GPU waits on the CPU's result (event, hand-off)
    source: str = ""

    def __post_init__(self) -> None:
        check_cpu(self)

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_gbps * 1e9 * self.memory_efficiency

    @property
    def compute_flops_per_s(self) -> float:
        return self.flops * self.compute_efficiency

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> CpuSpec:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown CPU field(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def check_cpu(cpu: CpuSpec) -> None:
    """ConfigError naming the first field no real CPU could have, before any work starts."""
    where = f"CPU {cpu.name!r}"
    if not isinstance(cpu.name, str) or not cpu.name:
        raise ConfigError("a CPU profile needs a non-empty name")
    for name in ("mem_gbps", "flops", "memory_efficiency", "compute_efficiency", "expert_overhead_s", "sync_s"):
        value = getattr(cpu, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    for name in ("memory_efficiency", "compute_efficiency"):
        if not 0 < getattr(cpu, name) <= 1:
            raise ConfigError(f"{where}: {name} is a fraction in (0, 1], got {getattr(cpu, name)!r}")
    for name in ("expert_overhead_s", "sync_s"):
        if not 0 <= getattr(cpu, name) <= 3600:
            raise ConfigError(f"{where}: {name} must be between 0 and 3600 s, got {getattr(cpu, name)!r}")
    if cpu.mem_bytes_per_s < 1e6:
        raise ConfigError(f"{where}: mem_gbps {cpu.mem_gbps!r} (times its efficiency) is below the slowest supported 0.001 GB/s")
    if cpu.compute_flops_per_s < 1e6:
        raise ConfigError(f"{where}: flops {cpu.flops!r} (times its efficiency) is below the slowest supported 1e+06 FLOP/s")


DEFAULT_CPU = "desktop-ddr5"

CPU_PRESETS: dict[str, CpuSpec] = {
    c.name: c
    for c in [
        # A desktop with dual-channel DDR5-5600: 2 x 8 bytes x 5,600 MT/s = 89.6 GB/s peak; an all-core
        # read reaches about 63 GB/s (the figure the CPU-execution issue quotes), hence 0.70. Compute:
        # a 16-core Zen 4 part (Ryzen 9 7950X, AMD product page), two 256-bit FMA pipes per core at an
        # all-core ~4.8 GHz = 2.46 TFLOP/s FP32, doubled by AVX512_BF16 dot products = 4.9 TFLOP/s.
        CpuSpec("desktop-ddr5", 89.6, 4.9e12, memory_efficiency=0.70, compute_efficiency=0.5,
                source="dual-channel DDR5-5600 (89.6 GB/s peak, ~63 GB/s all-core); Ryzen 9 7950X class, AVX512_BF16"),
        # A server socket with 8 channels of DDR5-4800: 8 x 8 bytes x 4,800 MT/s = 307 GB/s peak (Intel
        # Xeon Platinum 8480+, ark.intel.com); STREAM-like reads reach about three quarters of it. 56
        # cores with AMX (Intel: 1,024 bf16 operations per cycle per core) at 2.0 GHz = 115 TFLOP/s peak,
        # of which expert GEMMs reach a small part (0.2 assumed, not measured).
        CpuSpec("server-8ch-ddr5", 307.2, 115e12, memory_efficiency=0.75, compute_efficiency=0.2,
                source="Xeon Platinum 8480+ (8 x DDR5-4800, 307 GB/s peak; 56 cores, AMX bf16)"),
        # A Xeon 6 class socket (Xeon 6980P): 12 channels of MRDIMM-8800 = 845 GB/s peak, about 690 GB/s
        # measured (the figure the CPU-execution issue quotes), hence 0.82. 128 cores with AMX at 2.0 GHz:
        # 262 TFLOP/s bf16 peak, 0.2 of it assumed for expert GEMMs as above.
        CpuSpec("xeon6", 844.8, 262e12, memory_efficiency=0.82, compute_efficiency=0.2,
                source="Xeon 6980P (12 x MRDIMM-8800, 845 GB/s peak, ~690 GB/s measured; 128 cores, AMX bf16)"),
    ]
}


def load_cpu(name_or_path: str) -> CpuSpec:
    """A preset by name, or a profile .json from `finemoe calibrate --device cpu` (its "cpu" object)."""
    key = name_or_path.strip().lower()
    if key in CPU_PRESETS:
        return CPU_PRESETS[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"CPU profile {path} not found")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise ConfigError(f"CPU profile {path} cannot be read ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"CPU profile {path} is not a JSON profile from `finemoe calibrate --device cpu`") from None
        return cpu_from_profile(data, str(path))
    raise ConfigError(f"unknown CPU {name_or_path!r}; presets: {', '.join(CPU_PRESETS)}, or a profile .json file")


def cpu_from_profile(data, where: str = "CPU profile") -> CpuSpec:
    """A CpuSpec from a profile ({"cpu": {...}, ...}) or its bare "cpu" object, checked field by field."""
    data = data.get("cpu", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"CPU profile {where} holds no \"cpu\" object; write one with `finemoe calibrate --device cpu`")
    missing = {"name", "mem_gbps", "flops"} - set(data)
    if missing:
        raise ConfigError(f"CPU profile {where} lacks {', '.join(sorted(missing))}; write one with "
                          "`finemoe calibrate --device cpu`")
    known = {f.name for f in fields(CpuSpec)}
    try:
        return CpuSpec(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"CPU profile {where}: {exc}") from None
