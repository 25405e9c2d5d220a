"""One simulation (or replay) configuration: everything that determines a run, recorded with its result."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from finemoe.sim.cpu import CpuSpec
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.storage import StorageSpec


@dataclass(frozen=True)
class MemoryConfig:
    """GPU memory: either a budget split into dense weights, KV cache, reserve and expert slots,
    or an explicit number of expert slots (`expert_cache_slots`)."""

    gpu_mem_bytes: int | None = None  # None: the hardware's memory
    expert_cache_slots: int | None = None  # set directly, overriding the budget arithmetic
    reserve_bytes: int = 512 * 1024**2  # activations, allocator slack, CUDA context
    kv_tokens: int | None = None  # KV cache sized for this many tokens; None: batch x longest request
    # How the slots split between layers (sim/layer_capacity.py: uniform, demand, dp or a file);
    # None: one pool shared by every layer
    layer_capacity: str | None = None


@dataclass(frozen=True)
class WorkloadConfig:
    arrival: str = "all"  # "all" (all at time 0), "poisson", or "file"
    rate_rps: float | None = None  # requests per second, for poisson
    timestamps_path: str | None = None  # one arrival time (s) per line, for file
    max_batch: int = 1  # sequences decoded together (continuous batching)
    history_fraction: float = 0.7  # share of requests for history (policies' fit), by request
    online: bool = False  # start with empty history; policies learn as requests finish
    max_requests: int | None = None  # cap on measured requests (for quick runs)


@dataclass(frozen=True)
class SimConfig:
    trace_path: str
    policy: str
    hardware: HardwareSpec
    policy_params: dict = field(default_factory=dict)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    model_profile: str | None = None  # project the trace onto this profile's geometry
    seed: int = 0
    timeline_steps: int = 8  # engine steps whose events are kept for the timeline plot
    layers_as_consecutive: bool = False  # a partial-layer trace's logged layers run as layers 0..n-1
    cpu: CpuSpec | None = None  # the host CPU, for policies that compute experts there (None: the default preset)
    expert_dtype: str | None = None  # routed experts stored in this format (traces/precision.py); None: the trace's
    # Host memory for experts, the rest on `storage` (sim/storage.py); None: every expert in host RAM
    host_mem_bytes: int | None = None
    storage: StorageSpec | None = None

    def to_dict(self) -> dict:
        """Every field; `layers_as_consecutive`, `cpu`, `expert_dtype`, `memory.layer_capacity`,
        `host_mem_bytes` and `storage` only when set, so the keys
        of other configurations (and the result files of earlier sweeps) stay what they were."""
        out = asdict(self)
        if self.expert_dtype is None:
            del out["expert_dtype"]
        if self.memory.layer_capacity is None:
            del out["memory"]["layer_capacity"]
        for name in ("host_mem_bytes", "storage"):
            if getattr(self, name) is None:
                del out[name]
        if not self.layers_as_consecutive:
            del out["layers_as_consecutive"]
        if self.cpu is None:
            del out["cpu"]
        return out

    def run_geometry(self, geometry):
        """The geometry this configuration runs: `geometry` with its experts in `expert_dtype`."""
        if self.expert_dtype is None:
            return geometry
        from finemoe.traces.precision import with_expert_format

        return with_expert_format(geometry, self.expert_dtype)

    def key(self) -> str:
        """Stable id of this configuration: names its result file, so sweeps can resume."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]
