"""The simulator's cache beside a real engine's own cache counters, for the same size and policy.

A log that carries the engine's hit per access (route_trace v1's `residency`) is the most direct
check the simulator can get: run the simulator's policy with the engine's cache size over the same
accesses and compare hit rates per phase. The engine reports every prefill access as a miss, so the
decode phase is where the two are compared; the simulator's decode hits are its hits over the
whole trace minus those over the prefill alone (exact for LRU, whose prefill decisions do not
depend on what follows).
"""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import MissingFieldError
from finemoe.traces.schema import Trace


@dataclass(frozen=True)
class EngineCheck:
    policy: str
    capacity_bytes: int
    slots: int
    engine_decode_hits: int
    engine_decode_accesses: int
    sim_decode_hits: int
    sim_decode_accesses: int

    @property
    def engine_hit_rate(self) -> float:
        return self.engine_decode_hits / self.engine_decode_accesses

    @property
    def sim_hit_rate(self) -> float:
        return self.sim_decode_hits / self.sim_decode_accesses

    def line(self) -> str:
        return (f"engine's own {self.policy.upper()} cache ({self.capacity_bytes / 2**20:,.0f} MiB): decode hit rate "
                f"{self.engine_hit_rate:.1%} ({self.engine_decode_hits:,} of {self.engine_decode_accesses:,}); "
                f"simulator's {self.policy} at {self.slots} slots of the mean expert: {self.sim_hit_rate:.1%} "
                f"({self.sim_decode_hits:,} of {self.sim_decode_accesses:,})")


def _hits(trace: Trace, policy: str, slots: int) -> tuple[int, int]:
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.run import simulate

    config = SimConfig(trace_path="", policy=policy, hardware=load_hardware("h100"),
                       memory=MemoryConfig(expert_cache_slots=slots),
                       workload=WorkloadConfig(online=True, history_fraction=0.0))
    s = simulate(trace, config).summary
    return int(s["hits"]), int(s["hits"] + s["misses"])


def check_engine_cache(trace: Trace, capacity_bytes: int | None = None) -> EngineCheck:
    """Simulate the engine's cache policy at its size; decode hit rates of engine and simulator."""
    engine = trace.metadata.get("engine_cache")
    if not engine:
        raise MissingFieldError("this trace carries no engine cache counters (route_trace v1 logs do)")
    capacity = capacity_bytes or engine.get("capacity_bytes")
    if not capacity:
        raise MissingFieldError("the engine's cache size is not recorded; give it (--engine-cache SIZE)")
    policy = engine.get("policy", "lru")
    slots = int(capacity // trace.geometry.bytes_per_expert)
    full_h, full_n = _hits(trace, policy, slots)
    prefill = trace.select_requests([r.request_id for r in trace.requests])
    keep = prefill.iteration == 0
    pre_h = pre_n = 0
    if keep.any():
        from dataclasses import replace

        from finemoe.traces.schema import RequestInfo

        with_prefill = [r for r in trace.requests if r.has_prefill]
        only = replace(prefill, requests=tuple(RequestInfo(r.request_id, r.prompt_tokens, 1, True, r.label)
                                               for r in with_prefill),
                       request_id=prefill.request_id[keep], iteration=prefill.iteration[keep],
                       position=prefill.position[keep], experts=prefill.experts[keep],
                       weights=prefill.weights[keep])
        pre_h, pre_n = _hits(only, policy, slots)
    return EngineCheck(policy, int(capacity), slots, int(engine["hits"]["decode"]), int(engine["accesses"]["decode"]),
                       full_h - pre_h, full_n - pre_n)
