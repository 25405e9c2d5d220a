"""GPU memory: parse sizes people type, and split a budget into dense weights, KV cache, reserve
and whole expert slots.

Size units (explicit, because GPU memory is sold in GiB-ish numbers):
  * `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are binary (2^10, 2^20, 2^30, 2^40): "24G" is
    an RTX 3090's 24 GiB;
  * `KB`, `MB`, `GB`, `TB` are decimal (10^3 ... 10^12), as SI and disk vendors use them;
  * a bare number or a `B` suffix is bytes. Units are case-insensitive; fractions are allowed
    ("0.5T"); the result is rounded to whole bytes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from finemoe.errors import ConfigError
from finemoe.sim.config import MemoryConfig
from finemoe.sim.hardware import HardwareSpec
from finemoe.traces.geometry import Geometry

_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]?i?b?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
GB = 10**9


def parse_size(text: str | int) -> int:
    """Bytes from '24G', '24GiB' (binary), '24GB' (decimal), '512M', '0.5T' or a plain byte count."""
    if isinstance(text, bool):
        raise ConfigError(f"invalid memory size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"invalid memory size {text!r}: must not be negative")
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(
            f"invalid memory size {text!r}: expected a number with an optional unit such as 24G, 24GiB, "
            "24GB, 512M or 0.5T"
        )
    unit = m.group("unit").lower()
    letter = unit[:1] if unit[:1] in "kmgt" else ""
    rest = unit[len(letter):]
    if rest not in ("", "b", "ib") or (rest == "ib" and not letter):
        raise ConfigError(f"invalid memory size {text!r}: unknown unit {m.group('unit')!r}")
    base = 1000 if rest == "b" and letter else 1024
    return int(round(float(m.group("num")) * base ** _POWER[letter]))


def format_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    """How GPU memory is spent; recorded with every result."""

    gpu_mem_bytes: int
    dense_bytes: int
    kv_bytes: int
    kv_tokens: int
    reserve_bytes: int
    bytes_per_expert: int
    expert_cache_bytes: int
    expert_cache_slots: int
    total_experts: int
    source: str  # "budget" (derived from GPU memory) or "explicit" (MemoryConfig.expert_cache_slots)
    # Each layer's own share of the slots (sim/layer_capacity.py); None: one pool for every layer.
    layer_capacity: tuple[int, ...] | None = None

    @property
    def all_resident(self) -> bool:
        return self.expert_cache_slots >= self.total_experts

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(
    geometry: Geometry, hardware: HardwareSpec, memory: MemoryConfig, *, max_batch: int, longest_request_tokens: int
) -> MemoryPlan:
    """Expert slots = (GPU memory - dense weights - KV cache - reserve) // bytes per expert, capped at
    layers x experts; a budget that cannot hold the dense part and one layer's top-k experts is an error."""
    g = geometry
    total = g.num_layers * g.num_experts
    kv_tokens = memory.kv_tokens if memory.kv_tokens is not None else max_batch * longest_request_tokens
    if kv_tokens < 0:
        raise ConfigError(f"kv_tokens must not be negative, got {kv_tokens}")
    kv_bytes = kv_tokens * g.kv_bytes_per_token
    gpu = memory.gpu_mem_bytes if memory.gpu_mem_bytes is not None else hardware.gpu_mem_bytes
    if gpu < 0 or memory.reserve_bytes < 0:
        raise ConfigError("GPU memory and reserve must not be negative")
    if memory.expert_cache_slots is not None:
        slots = memory.expert_cache_slots
        if slots < g.top_k:
            raise ConfigError(
                f"expert_cache_slots={slots} cannot hold one layer's top-{g.top_k} experts; use at least {g.top_k}"
            )
        slots = min(slots, total)
        return MemoryPlan(gpu, g.dense_bytes, kv_bytes, kv_tokens, memory.reserve_bytes, g.bytes_per_expert,
                          slots * g.bytes_per_expert, slots, total, "explicit")
    fixed = g.dense_bytes + kv_bytes + memory.reserve_bytes
    need = fixed + g.top_k * g.bytes_per_expert
    if gpu < need:
        raise ConfigError(
            f"a {format_gb(gpu)} GPU budget cannot hold {g.model_name}: it needs at least {format_gb(need)} "
            f"(dense weights {format_gb(g.dense_bytes)} + KV cache {format_gb(kv_bytes)} for {kv_tokens} tokens "
            f"+ reserve {format_gb(memory.reserve_bytes)} + one layer's top-{g.top_k} experts "
            f"{format_gb(g.top_k * g.bytes_per_expert)}; GB = 10^9 bytes)"
        )
    per = max(g.bytes_per_expert, 1)
    slots = min((gpu - fixed) // per, total)
    return MemoryPlan(gpu, g.dense_bytes, kv_bytes, kv_tokens, memory.reserve_bytes, g.bytes_per_expert,
                      slots * g.bytes_per_expert, int(slots), total, "budget")


def plan_for_config(geometry: Geometry, requests: list, config) -> MemoryPlan:
    """The memory plan a run of `config` (a SimConfig) gets over a trace with this geometry and
    these requests (RequestInfo): the KV cache is sized for the longest measured request. Needs no
    routing, so a sweep can refuse an impossible budget from the trace's metadata before it starts."""
    from finemoe.sim.workload import split_request_infos

    split = split_request_infos(requests, config.workload, config.seed)
    by_id = {r.request_id: r for r in requests}
    longest = max(by_id[r].prompt_tokens + by_id[r].generated_tokens for r in split.measure)
    return plan_memory(geometry, config.hardware, config.memory, max_batch=config.workload.max_batch,
                       longest_request_tokens=longest)


def budget_above_card(gpu_mem_bytes: int | None, hardware: HardwareSpec) -> str | None:
    """The sentence saying a budget exceeds the card's own memory, or None when it fits (or is
    not given). A replay refuses such a budget; a simulation may model a bigger hypothetical card."""
    if gpu_mem_bytes is None or gpu_mem_bytes <= hardware.gpu_mem_bytes:
        return None
    return (f"--gpu-mem {format_gib(gpu_mem_bytes)} is more than the {format_gib(hardware.gpu_mem_bytes)} "
            f"of memory {hardware.name} has")


def format_gib(nbytes: int) -> str:
    """Bytes as GiB with up to two decimals, the unit people type after --gpu-mem ('24G')."""
    return f"{nbytes / 1024**3:.2f}".rstrip("0").rstrip(".") + " GiB"
