"""Hardware profiles: the numbers the timing model needs, with presets for real parts.

Peak figures come from vendor datasheets (cited per preset). Real kernels and copies reach only a
fraction of peak; `compute_efficiency`, `memory_efficiency` and `pcie_efficiency` scale the peaks,
and `finemoe calibrate` measures all of them on a real machine and writes a profile (JSON) that
`finemoe simulate --hardware profile.json` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from finemoe.errors import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    gpu_mem_bytes: int
    flops: float  # peak dense bf16 FLOP/s of the GPU
    hbm_gbps: float  # peak device memory bandwidth, GB/s (1e9 bytes/s)
    pcie_gbps: float  # peak host-to-device link bandwidth, GB/s, one direction
    transfer_latency_s: float = 10e-6  # fixed cost of one host-to-device copy
    copy_engines: int = 1  # copies that can be on the wire at once (they share pcie_gbps)
    compute_efficiency: float = 0.6  # achieved / peak FLOP/s for expert-sized GEMMs
    memory_efficiency: float = 0.8  # achieved / peak HBM bandwidth
    pcie_efficiency: float = 0.8  # achieved / peak link bandwidth for pinned copies
    kernel_launch_s: float = 5e-6  # per-kernel fixed cost (dense part of a layer, each expert)
    # Host-side cost of driving the work, beyond the kernel launch: what a runtime (e.g. the
    # replayer's Python loop: policy and cache calls, locks, attention dispatch) spends per routed
    # expert and per layer. Zero for the presets; `finemoe calibrate` measures the replayer's own.
    expert_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    miss_overhead_s: float = 0.0  # host time per on-demand load, on the compute path (issue, hand-off)
    # Compute runs this many times slower while a copy is on the wire: 1.0 where copy engines are
    # separate hardware (GPUs); above 1 on a CPU, whose "copies" are memcpys by threads that take
    # cores and memory bandwidth from compute. `finemoe calibrate` measures it.
    copy_compute_slowdown: float = 1.0
    # ... and copies' bytes cross this many times slower when they start while compute runs (not
    # during a stall). 1.0 for GPUs; measured by `finemoe calibrate`.
    compute_copy_slowdown: float = 1.0
    # ... and a copy handed over while compute runs starts this much later (CPU: the copy thread
    # waits for a core the compute thread and other processes hold). 0 for GPUs; calibrated.
    copy_start_delay_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        check_hardware(self)

    @property
    def link_bytes_per_s(self) -> float:
        return self.pcie_gbps * 1e9 * self.pcie_efficiency

    @property
    def compute_flops_per_s(self) -> float:
        return self.flops * self.compute_efficiency

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9 * self.memory_efficiency

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> HardwareSpec:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown hardware field(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# The slowest link, memory and compute a profile may describe. Below these an expert's copy or
# GEMM would take longer than the engine's picosecond clock can count (1e-300 GB/s overflowed it).
MIN_BYTES_PER_S = 1e6  # 1 MB/s, after the efficiency factor
MIN_FLOPS = 1e6
MAX_FIXED_COST_S = 3600.0  # per-copy, per-kernel and per-layer fixed costs
_TIMES = ("transfer_latency_s", "kernel_launch_s", "expert_overhead_s", "layer_overhead_s", "miss_overhead_s",
          "copy_start_delay_s")
_EFFICIENCIES = ("compute_efficiency", "memory_efficiency", "pcie_efficiency")


def check_hardware(hw: HardwareSpec) -> None:
    """ConfigError naming the first field of `hw` no real machine could have (NaN, infinite, zero,
    negative, or so slow the simulation's clock would overflow), so a bad profile or override
    fails before any work starts instead of deep inside a run."""
    where = f"hardware {hw.name!r}"
    if not isinstance(hw.name, str) or not hw.name:
        raise ConfigError("a hardware profile needs a non-empty name")
    for name in ("gpu_mem_bytes", "copy_engines"):
        value = getattr(hw, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {name} must be a whole number of at least 1, got {value!r}")
    numbers = ("flops", "hbm_gbps", "pcie_gbps", *_EFFICIENCIES, *_TIMES, "copy_compute_slowdown",
               "compute_copy_slowdown")
    for name in numbers:
        value = getattr(hw, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: {name} must be a finite number, got {value!r}")
    for name in _EFFICIENCIES:
        if not 0 < getattr(hw, name) <= 1:
            raise ConfigError(f"{where}: {name} is a fraction in (0, 1], got {getattr(hw, name)!r}")
    for name in _TIMES:
        if not 0 <= getattr(hw, name) <= MAX_FIXED_COST_S:
            raise ConfigError(f"{where}: {name} must be between 0 and {MAX_FIXED_COST_S:g} s, got {getattr(hw, name)!r}")
    for name in ("copy_compute_slowdown", "compute_copy_slowdown"):
        if not 1 <= getattr(hw, name) <= 1000:
            raise ConfigError(f"{where}: {name} is a slowdown factor between 1 and 1000, got {getattr(hw, name)!r}")
    for name, rate, unit, floor in (("pcie_gbps", hw.link_bytes_per_s, "GB/s", MIN_BYTES_PER_S),
                                    ("hbm_gbps", hw.hbm_bytes_per_s, "GB/s", MIN_BYTES_PER_S),
                                    ("flops", hw.compute_flops_per_s, "FLOP/s", MIN_FLOPS)):
        if rate < floor:
            shown = f"{floor / 1e9:g} GB/s" if unit == "GB/s" else f"{floor:g} FLOP/s"
            raise ConfigError(f"{where}: {name} {getattr(hw, name)!r} (times its efficiency) is below the "
                              f"slowest supported {shown}")


PRESETS: dict[str, HardwareSpec] = {
    h.name: h
    for h in [
        # NVIDIA GeForce RTX 3090: 24 GiB GDDR6X at 936 GB/s, 71 TFLOP/s dense FP16/BF16 tensor with
        # FP32 accumulate (Ampere GA102 whitepaper, table 9). PCIe 4.0 x16: 32 GB/s per direction, the
        # figure FineMoE's paper uses for its testbed. GeForce cards expose 2 copy engines.
        HardwareSpec("rtx3090", 24 * GiB, 71e12, 936.0, 32.0, copy_engines=2,
                     source="GA102 whitepaper; PCIe 4.0 x16"),
        # NVIDIA A100 80GB PCIe: 2,039 GB/s HBM2e (SXM figure; PCIe card 1,935), 312 TFLOP/s BF16 dense
        # (A100 datasheet). PCIe 4.0 x16 at 32 GB/s.
        HardwareSpec("a100-80gb", 80 * GiB, 312e12, 1935.0, 32.0, copy_engines=3,
                     source="NVIDIA A100 datasheet (PCIe 80GB); PCIe 4.0 x16"),
        # NVIDIA H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s BF16 dense (H100 datasheet).
        # PCIe 5.0 x16 host link: 64 GB/s per direction.
        HardwareSpec("h100", 80 * GiB, 989e12, 3350.0, 64.0, copy_engines=3,
                     source="NVIDIA H100 datasheet (SXM5); PCIe 5.0 x16"),
        # NVIDIA H200 SXM: 141 GB HBM3e at 4.8 TB/s, 989 TFLOP/s BF16 dense (H200 datasheet).
        # PCIe 5.0 x16 host link: 64 GB/s per direction.
        HardwareSpec("h200", 141 * 10**9, 989e12, 4800.0, 64.0, copy_engines=3,
                     source="NVIDIA H200 datasheet; PCIe 5.0 x16"),
        # NVIDIA GH200 Grace Hopper: 96 GB HBM3 at 4 TB/s, 989 TFLOP/s BF16 dense; CPU-GPU NVLink-C2C
        # 900 GB/s total, 450 GB/s per direction (GH200 datasheet).
        HardwareSpec("gh200", 96 * 10**9, 989e12, 4000.0, 450.0, transfer_latency_s=2e-6, copy_engines=4,
                     source="NVIDIA GH200 datasheet; NVLink-C2C"),
    ]
}


def load_hardware(name_or_path: str) -> HardwareSpec:
    """A preset by name, or a JSON profile file as `finemoe calibrate` writes it."""
    key = name_or_path.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"hardware profile {path} not found")
        return hardware_from_profile(_read_profile(path), str(path))
    raise ConfigError(f"unknown hardware {name_or_path!r}; presets: {', '.join(PRESETS)}, or a profile .json file")


def _read_profile(path: Path) -> dict:
    """The JSON object in `path`; ConfigError for an unreadable, binary or non-JSON file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"hardware profile {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"hardware profile {path} is not a text file (a JSON profile from `finemoe calibrate`)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"hardware profile {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"hardware profile {path} holds a JSON {type(data).__name__}, not a profile object")
    return data


def hardware_from_profile(data: dict, where: str = "hardware profile") -> HardwareSpec:
    """A HardwareSpec from a profile as `finemoe calibrate` writes it ({"hardware": {...}, ...}) or
    from its bare "hardware" object, checked field by field."""
    data = data.get("hardware", data)
    if not isinstance(data, dict):
        raise ConfigError(f"hardware profile {where}: \"hardware\" is not an object")
    missing = {"name", "gpu_mem_bytes", "flops", "hbm_gbps", "pcie_gbps"} - set(data)
    if missing:
        raise ConfigError(f"hardware profile {where} lacks {', '.join(sorted(missing))}; is it a profile from "
                          "`finemoe calibrate`?")
    known = {f.name for f in fields(HardwareSpec)}
    try:
        return HardwareSpec(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:
        raise ConfigError(f"hardware profile {where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"hardware profile {where}: {exc}") from None
