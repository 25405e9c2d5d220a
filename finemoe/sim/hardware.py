"""Hardware profiles: the numbers the timing model needs, with presets for real parts.

Peak figures come from vendor datasheets (cited per preset). Real kernels and copies reach only a
fraction of peak; `compute_efficiency`, `memory_efficiency` and `pcie_efficiency` scale the peaks,
and `finemoe calibrate` measures all of them on a real machine and writes a profile (JSON) that
`finemoe simulate --hardware profile.json` reads.
"""

from __future__ import annotations

import json
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
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"hardware profile {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        data = data.get("hardware", data)  # calibrate writes {"hardware": {...}, "measurements": {...}}
        known = {f.name for f in fields(HardwareSpec)}
        missing = {"name", "gpu_mem_bytes", "flops", "hbm_gbps", "pcie_gbps"} - set(data)
        if missing:
            raise ConfigError(f"hardware profile {path} lacks {', '.join(sorted(missing))}")
        try:
            return HardwareSpec(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"hardware profile {path}: {exc}") from None
    raise ConfigError(f"unknown hardware {name_or_path!r}; presets: {', '.join(PRESETS)}, or a profile .json file")
