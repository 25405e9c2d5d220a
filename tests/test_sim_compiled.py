"""The compiled path (sim/compiled.py) gives the reference engine's results, field by field: on
random workloads (hypothesis) and on the real Mixtral logs, for LRU and LFU."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.policies.registry import make_policy
from finemoe.sim import compiled
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import load_trace_for, simulate_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

pytestmark = pytest.mark.skipif(compiled.numba is None, reason="numba is not importable here")
_STAMPS = Path(tempfile.mkdtemp(prefix="finemoe-compiled-"))


def _both(trace, config):
    """(reference, compiled) results of one configuration."""
    ref = simulate_policy(trace, config, make_policy(config.policy), compiled=False)
    fast = simulate_policy(trace, config, make_policy(config.policy), compiled=True)
    return ref, fast


def assert_same(ref, fast) -> None:
    """Every summary field, every request's times and the configuration agree, but wall-clock ones."""
    assert ref.config["engine_path"] == "reference"
    timed = {k for k in ref.summary if "wall" in k}
    for key, value in ref.summary.items():
        if key in timed:
            continue
        got = fast.summary[key]
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), key
    assert set(fast.summary) == set(ref.summary)
    assert ref.requests.equals(fast.requests)
    assert ref.timeline == fast.timeline
    strip = lambda c: {k: v for k, v in c.items() if k != "engine_path"}  # noqa: E731
    assert strip(ref.config) == strip(fast.config)


@st.composite
def workloads(draw, policies=("lru", "lfu"), room_for_copies=False):
    """A random workload of one of `policies`; `room_for_copies`: at least a layer's experts plus
    one slot per copy engine (what sim/compiled_prefetch.py needs), else a layer's experts."""
    L, J = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    K = draw(st.integers(1, min(J, 3)))
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K),
                            num_requests=draw(st.integers(2, 6)), prompt_tokens=(1, 4), generated_tokens=(1, 6),
                            seed=draw(st.integers(0, 10_000)))
    engines = draw(st.integers(1, 3))
    hw = PRESETS["rtx3090"].with_overrides(
        pcie_gbps=draw(st.sampled_from([0.25, 4.0, 32.0, 1000.0])), copy_engines=engines,
        miss_overhead_s=draw(st.sampled_from([0.0, 2e-6])), copy_start_delay_s=draw(st.sampled_from([0.0, 1e-6])),
        compute_copy_slowdown=draw(st.sampled_from([1.0, 1.5])))
    arrival = draw(st.sampled_from(["all", "poisson", "file"]))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 50))
    if arrival == "file":
        path = _STAMPS / f"stamps-{seed}.txt"
        path.write_text("\n".join(f"{0.001 * i * (1 + seed % 3):.6f}" for i in range(len(trace.requests))) + "\n")
        wl = WorkloadConfig(max_batch=batch, history_fraction=0.4, arrival="file", timestamps_path=str(path))
    else:
        wl = WorkloadConfig(max_batch=batch, history_fraction=0.4, arrival=arrival, rate_rps=300.0,
                            online=draw(st.booleans()))
    least = J + engines if room_for_copies else J
    config = SimConfig("synthetic", draw(st.sampled_from(policies)), hw,
                       memory=MemoryConfig(expert_cache_slots=draw(st.integers(least, max(least, L * J + 1)))),
                       workload=wl, seed=seed, timeline_steps=draw(st.sampled_from([0, 2, 8])))
    return trace, config


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_compiled_path_gives_the_reference_results_on_random_workloads(case):
    trace, config = case
    ref, fast = _both(trace, config)
    assert_same(ref, fast)
    steps = fast.summary["steps"] if "steps" in fast.summary else None
    if config.timeline_steps == 0 or (steps is not None and steps > config.timeline_steps):
        assert fast.config["engine_path"] == "compiled"


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_compiled_path_gives_the_reference_results_on_the_real_mixtral_logs(mixtral_trace_path, policy):
    for gpu_mem in ("12G", "24G", "48G", "64G"):
        for seed in (0, 3):
            from finemoe.sim.memory import parse_size

            config = SimConfig(str(mixtral_trace_path), policy, PRESETS["rtx3090"],
                               memory=MemoryConfig(gpu_mem_bytes=parse_size(gpu_mem)), seed=seed,
                               workload=WorkloadConfig(history_fraction=0.0))
            ref, fast = _both(load_trace_for(config), config)
            assert fast.config["engine_path"] == "compiled"
            assert_same(ref, fast)


def test_outside_its_rules_the_reference_runs():
    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=6, top_k=2), num_requests=3, seed=1)

    def path(policy="lru", slots=6, **hw):
        config = SimConfig("synthetic", policy, PRESETS["rtx3090"].with_overrides(**hw),
                           memory=MemoryConfig(expert_cache_slots=slots), timeline_steps=0)
        return simulate_policy(trace, config, make_policy(policy), compiled=True).config["engine_path"]

    assert path() == "compiled"
    assert path(slots=5) == "reference"  # a prefill may need all 6 experts of a layer at once
    assert path(policy="slru") == "reference"  # not a policy the kernel reproduces
    assert path(copy_compute_slowdown=2.0) == "reference"  # copies stretch the compute


def test_without_numba_the_reference_runs(monkeypatch):
    monkeypatch.setattr(compiled, "numba", None)
    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=4, top_k=2), num_requests=3, seed=2)
    config = SimConfig("synthetic", "lfu", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=6),
                       timeline_steps=0)
    assert simulate_policy(trace, config, make_policy("lfu"), compiled=True).config["engine_path"] == "reference"


@pytest.mark.parametrize("policy, threshold, slots", [("lru", "COMPILED_MIN_LAYER_STEPS", 6),
                                                      ("layerwise", "COMPILED_PREFETCH_MIN_LAYER_STEPS", 8)])
def test_by_default_it_starts_where_it_pays(monkeypatch, policy, threshold, slots):
    """Cold (numba not yet run in this process) only for a run of enough layer-steps; warm, always.
    (On-demand LRU's path here, sim/compiled_prefetch.py's for a prefetching policy.)"""
    from finemoe.sim import compiled_prefetch, engine

    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=4, top_k=2), num_requests=3, seed=2)
    config = SimConfig("synthetic", policy, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                       timeline_steps=0)
    layer_steps = 2 * sum(len(its) for its in trace.iterations_by_request.values())

    def path():
        return simulate_policy(trace, config, make_policy(policy)).config["engine_path"]

    monkeypatch.setattr(compiled, "warm", False)
    monkeypatch.setattr(compiled_prefetch, "warm", False)  # (either path's run loads numba for both)
    monkeypatch.setattr(engine, threshold, layer_steps + 1)
    assert path() == "reference"
    monkeypatch.setattr(engine, threshold, 1)
    assert path() == "compiled" and (compiled.warm or compiled_prefetch.warm)
    monkeypatch.setattr(engine, threshold, layer_steps + 1)
    assert path() == "compiled"  # warm now


def test_planned_steps_are_built_once_for_runs_of_one_workload(monkeypatch):
    """The runs of a sweep share the planned steps (`StepPlanner.plan`), and their ticks come from
    each run's own hardware: every run still gives the reference's results."""
    built = []
    steps = compiled.StepPlanner._steps
    monkeypatch.setattr(compiled.StepPlanner, "_steps", lambda self, t: built.append(1) or steps(self, t))
    monkeypatch.setattr(compiled, "_PLANS", type(compiled._PLANS)())
    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=6, top_k=2), num_requests=5,
                            prompt_tokens=(2, 4), generated_tokens=(3, 8), seed=7)
    for policy, slots, hw in (("lru", 6, "rtx3090"), ("lfu", 9, "rtx3090"), ("lru", 6, "a100-80gb"), ("layerwise", 9, "a100-80gb")):
        config = SimConfig("synthetic", policy, PRESETS[hw], memory=MemoryConfig(expert_cache_slots=slots),
                           workload=WorkloadConfig(max_batch=2, history_fraction=0.0), timeline_steps=0)
        ref, fast = _both(trace, config)
        assert fast.config["engine_path"] == "compiled"
        assert_same(ref, fast)
    assert len(built) == 1
