"""The engine's inline miss path (`SimEngine._misses_inline`) plays a layer's copies out without
SimPy; it must give exactly what the SimPy copy engines give: times, counts, per-request tables."""

from __future__ import annotations

import dataclasses

import pytest

from finemoe.sim import engine as engine_mod
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

TRACE = synthetic_trace(tiny_geometry(num_layers=6, num_experts=8), num_requests=10, prompt_tokens=(4, 9),
                        generated_tokens=(8, 20), seed=5)
HW_FIELDS = {f.name for f in dataclasses.fields(PRESETS["rtx3090"])}
CPU_TERMS = (  # the cost terms of a CPU host (calibrate), which the inline path must follow too
    {},
    {"compute_copy_slowdown": 3.0},
    {"copy_start_delay_s": 7e-6, "miss_overhead_s": 2e-5},
    {"miss_overhead_s": 1e-4, "copy_compute_slowdown": 2.0, "compute_copy_slowdown": 2.0, "copy_start_delay_s": 3e-6},
    {"copy_compute_slowdown": 2.0},
    {"copy_compute_slowdown": 3.0, "expert_overhead_s": 1e-6, "layer_overhead_s": 4e-6, "miss_overhead_s": 2e-5},
)


def _run(cfg: SimConfig, inline: bool, counter: list[int], fast_path: bool = True) -> tuple:
    """Simulate with the inline miss path on or off; `counter[0]` counts the layers it played out
    (`_lands_inline` in the common shape, `_misses_inline_heap` otherwise)."""
    cls = engine_mod.SimEngine
    original, lands, heap = cls.__init__, cls._lands_inline, cls._misses_inline_heap

    def init(self, *args, **kw):
        # The reference's own paths (sim/compiled.py, which would take these runs over, has its tests).
        original(self, *args, **{**kw, "inline_misses": inline, "fast_path": fast_path, "compiled": False})

    def counted(method):
        def call(self, *args):
            counter[0] += 1
            return method(self, *args)
        return call

    cls.__init__, cls._lands_inline, cls._misses_inline_heap = init, counted(lands), counted(heap)
    try:
        r = simulate(TRACE, cfg)
    finally:
        cls.__init__, cls._lands_inline, cls._misses_inline_heap = original, lands, heap
    summary = {k: v for k, v in r.summary.items() if k not in ("wall_s", "layer_steps_per_wall_s")}
    timeline = sorted(r.timeline, key=lambda e: tuple(str(v) for v in e.values()))  # the paths append in other orders
    return repr(summary), repr(r.requests.to_dict("list")), repr(r.per_layer_hit_rate), repr(timeline)


@pytest.mark.parametrize("cpu_terms", range(len(CPU_TERMS)))
@pytest.mark.parametrize("copy_engines", [1, 2, 3])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_inline_misses_equal_simpy_copies(policy, copy_engines, cpu_terms):
    extra = {k: v for k, v in CPU_TERMS[cpu_terms].items() if k in HW_FIELDS}
    hw = dataclasses.replace(PRESETS["rtx3090"], copy_engines=copy_engines, **extra)
    used = [0]
    for slots, batch in ((8, 1), (14, 3), (30, 2)):
        cfg = SimConfig(trace_path="x", policy=policy, hardware=hw, memory=MemoryConfig(expert_cache_slots=slots),
                        workload=WorkloadConfig(max_batch=batch, history_fraction=0.3), timeline_steps=0)
        assert _run(cfg, True, used) == _run(cfg, False, [0])
    assert used[0] > 0  # the inline path was exercised, not skipped


@pytest.mark.parametrize("copy_engines", [1, 2, 3])
@pytest.mark.parametrize("stretch", [1.0, 2.0])
def test_heap_only_for_more_misses_than_copy_engines_or_a_stretch(copy_engines, stretch):
    """The inline path computes the times itself (`_lands_inline`) when every miss has an idle copy
    engine and compute is not stretched (a decode step's top-2 on two copy engines), and leaves the
    rest to `_misses_inline_heap`; the results equal SimPy's copy engines either way."""
    extra = {"copy_compute_slowdown": stretch} if "copy_compute_slowdown" in HW_FIELDS else {}
    hw = dataclasses.replace(PRESETS["rtx3090"], copy_engines=copy_engines, **extra)
    cfg = SimConfig(trace_path="x", policy="lru", hardware=hw, memory=MemoryConfig(expert_cache_slots=8),
                    workload=WorkloadConfig(max_batch=1, history_fraction=0.3), timeline_steps=0)
    heap_misses = []  # per call of the heap version: how many misses its layer had
    original = engine_mod.SimEngine._misses_inline_heap

    def counted(self, layer, experts, ticks, misses, *rest):
        heap_misses.append(len(misses))
        return original(self, layer, experts, ticks, misses, *rest)

    used = [0]  # layers played out inline, by either version
    engine_mod.SimEngine._misses_inline_heap = counted
    try:
        inline = _run(cfg, True, used)
    finally:
        engine_mod.SimEngine._misses_inline_heap = original
    assert inline == _run(cfg, False, [0])
    if stretch != 1.0 and extra:
        assert len(heap_misses) == used[0] > 0
    else:
        assert all(k > copy_engines for k in heap_misses)  # the heap only where a miss lacks an engine
        if copy_engines >= 2:  # top-2: a decode step's misses have an engine each
            assert used[0] > len(heap_misses)


# The oracle is a dozen clairvoyant candidate schedules, each an engine run of its own (the ensemble
# only picks among them): two of them, the one that prefetches into prefills and the one that leaves
# the nearest layer to its demand load, get the two rows that hold every CPU term between them; the
# cheap policies every row.
ORACLE_CANDIDATES = ({"prefetch": "decode-first", "lookahead_layers": 10**9},
                     {"prefetch": "aggressive", "lookahead_layers": 10**9, "min_ahead": 2})


@pytest.mark.parametrize("policy, params, copy_engines, cpu_terms", [
    *((p, {}, c, t) for p in ("lru", "finemoe") for c in (1, 2) for t in range(len(CPU_TERMS))),
    *(("oracle", params, c, t) for params in ORACLE_CANDIDATES for c in (1, 2) for t in (3, 5)),
])
def test_fast_path_equals_general_path_with_cpu_terms(policy, params, copy_engines, cpu_terms):
    """The fast path (clock synced only when another event is due) and the general path (synced at
    every step) give identical results with every CPU-host term; `copy_compute_slowdown` once differed:
    the fast path stretched compute by a wire reservation that missed copies started by then."""
    extra = {k: v for k, v in CPU_TERMS[cpu_terms].items() if k in HW_FIELDS}
    hw = dataclasses.replace(PRESETS["rtx3090"], copy_engines=copy_engines, pcie_gbps=4.0, **extra)
    for slots, batch, arrival in ((8, 1, "all"), (14, 3, "poisson"), (30, 2, "poisson")):
        wl = WorkloadConfig(max_batch=batch, history_fraction=0.3, arrival=arrival, rate_rps=3000.0)
        cfg = SimConfig(trace_path="x", policy=policy, hardware=hw, memory=MemoryConfig(expert_cache_slots=slots),
                        workload=wl, timeline_steps=0, policy_params=params)
        general = _run(cfg, False, [0], fast_path=False)
        assert _run(cfg, True, [0]) == general
        assert _run(cfg, False, [0]) == general


@pytest.mark.parametrize("cpu_terms", [0, 2])
@pytest.mark.parametrize("copy_engines", [1, 2, 3])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_quiet_steps_equal_general_path(policy, copy_engines, cpu_terms):
    """`_quiet_step` (a whole step of a policy without step or layer hooks while nothing is queued or
    on the wire) gives what the general path gives (synced at every layer and expert, every copy a
    SimPy event), with or without a timeline for the first steps, and it was used."""
    extra = {k: v for k, v in CPU_TERMS[cpu_terms].items() if k in HW_FIELDS}
    hw = dataclasses.replace(PRESETS["rtx3090"], copy_engines=copy_engines, **extra)
    original = engine_mod.SimEngine._quiet_step
    quiet = [0]

    def counted(self, *args):
        quiet[0] += 1
        return original(self, *args)

    for slots, batch, timeline in ((8, 1, 0), (14, 3, 2), (30, 2, 0), (48, 1, 3)):
        cfg = SimConfig(trace_path="x", policy=policy, hardware=hw, memory=MemoryConfig(expert_cache_slots=slots),
                        workload=WorkloadConfig(max_batch=batch, history_fraction=0.3), timeline_steps=timeline)
        engine_mod.SimEngine._quiet_step = counted
        try:
            fast = _run(cfg, True, [0])
        finally:
            engine_mod.SimEngine._quiet_step = original
        assert fast == _run(cfg, False, [0], fast_path=False)
    assert quiet[0] > 0
