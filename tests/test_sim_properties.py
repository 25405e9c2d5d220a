"""Properties of the simulator on random synthetic traces (hypothesis), and on the real Mixtral logs
when they can be imported. The oracle and the lower bound against every policy: test_bounds_properties.py."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.policies.registry import make_policy, policy_names
from finemoe.sim import engine as engine_mod
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

BASELINES = ("lru", "lfu", "layerwise")
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    L = draw(st.integers(1, 4))
    J = draw(st.integers(2, 6))
    K = draw(st.integers(1, min(J, 3)))
    seed = draw(st.integers(0, 10_000))
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=draw(st.integers(2, 4)),
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=seed)
    batch = draw(st.integers(1, 3))
    slots = draw(st.integers(K, L * J))
    hw = PRESETS["rtx3090"].with_overrides(copy_engines=draw(st.integers(1, 2)),
                                           pcie_gbps=draw(st.sampled_from([0.5, 4.0, 32.0])))
    return trace, slots, batch, hw, seed


def config(policy, slots, batch, hw, seed, **workload):
    return SimConfig("synthetic", policy, hw, memory=MemoryConfig(expert_cache_slots=slots),
                     workload=WorkloadConfig(max_batch=batch, history_fraction=0.4, **workload), seed=seed,
                     timeline_steps=1000)


def comparable(r):
    summary = {k: v for k, v in r.summary.items() if "wall" not in k}
    return summary, r.requests.to_dict(), sorted(r.timeline, key=lambda e: tuple(str(v) for v in e.values()))


@SETTINGS
@given(cases())
def test_lru_hits_never_drop_as_the_cache_grows(case):
    trace, _, batch, hw, seed = case
    g = trace.geometry
    hits = [simulate(trace, config("lru", s, batch, hw, seed)).summary["hits"]
            for s in range(g.top_k * batch, g.num_layers * g.num_experts + 1) if s >= g.top_k]
    assert hits == sorted(hits)


@SETTINGS
@given(cases())
def test_with_every_expert_resident_all_policies_equal_no_offload(case):
    trace, _, batch, hw, seed = case
    g = trace.geometry
    full = g.num_layers * g.num_experts
    floor = comparable(simulate(trace, config("no-offload", full, batch, hw, seed)))
    for p in BASELINES + ("oracle",):
        assert comparable(simulate(trace, config(p, full, batch, hw, seed))) == floor, p


@SETTINGS
@given(cases())
def test_latency_approaches_no_offload_as_bandwidth_grows(case):
    trace, slots, batch, hw, seed = case
    g = trace.geometry
    floor = simulate(trace, config("no-offload", g.num_layers * g.num_experts, batch, hw, seed)).summary["e2e_mean_s"]
    means = []
    for gbps in (1.0, 10.0, 100.0, 1e4, 1e7):
        fast = hw.with_overrides(pcie_gbps=gbps, transfer_latency_s=0.0)
        means.append(simulate(trace, config("lru", slots, batch, fast, seed)).summary["e2e_mean_s"])
    assert means == sorted(means, reverse=True)
    assert means[-1] == pytest.approx(floor, rel=1e-3)


CPU_HOST_TERMS = (  # HardwareSpec terms of a CPU host (all default to no effect on the GPU presets)
    {},
    {"copy_compute_slowdown": 2.0},
    {"copy_compute_slowdown": 3.0, "compute_copy_slowdown": 2.0, "copy_start_delay_s": 3e-6,
     "miss_overhead_s": 2e-5, "expert_overhead_s": 1e-6, "layer_overhead_s": 4e-6},
)


def simulate_general_path(trace, cfg):
    """The same run with the compute process synced to SimPy at every layer and expert (no fast path)."""
    original = engine_mod.SimEngine.__init__

    def always_sync(self, *args, **kw):
        original(self, *args, **{**kw, "fast_path": False})

    engine_mod.SimEngine.__init__ = always_sync
    try:
        return simulate(trace, cfg)
    finally:
        engine_mod.SimEngine.__init__ = original


@SETTINGS
@given(cases(), st.sampled_from(BASELINES + ("oracle",)), st.sampled_from(CPU_HOST_TERMS))
def test_same_seed_same_result_and_fast_path_equals_general_path(case, policy, cpu_terms):
    trace, slots, batch, hw, seed = case
    hw = hw.with_overrides(**cpu_terms)
    cfg = config(policy, slots, batch, hw, seed, arrival="poisson", rate_rps=5000.0)
    a = comparable(simulate(trace, cfg))
    assert comparable(simulate(trace, cfg)) == a
    assert comparable(simulate_general_path(trace, cfg)) == a
    # A timeline of the first step only: the later steps take the inline miss path and whole quiet steps.
    cfg = dataclasses.replace(cfg, timeline_steps=1)
    assert comparable(simulate(trace, cfg)) == comparable(simulate_general_path(trace, cfg))


@pytest.fixture(scope="module")
def mixtral_trace(mixtral_trace_path):
    from finemoe.traces.io import read_trace

    return read_trace(mixtral_trace_path)  # 4 requests, decode only


def real_config(policy, slots, pcie_gbps=32.0, **kw):
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=pcie_gbps)
    return SimConfig("mixtral", policy, hw, memory=MemoryConfig(expert_cache_slots=slots),
                     workload=WorkloadConfig(history_fraction=0.4, **kw), seed=0, timeline_steps=4)


def _is_ablation(name: str) -> bool:
    """`finemoe-lru`, `cost-aware-no-gate`, ...: a registered policy's name plus a variant suffix
    (finemoe-topk is kept: it is the FineMoE that traces without router probabilities can run)."""
    names = set(policy_names())
    return name != "finemoe-topk" and any(name.startswith(base + "-") for base in names if base != name)


@pytest.mark.slow
def test_real_mixtral_oracle_bounds_every_policy_and_lru_grows(mixtral_trace):
    rates = {}
    for slots in (48,):
        for p in policy_names():
            if p in ("no-offload",) or p.startswith("test-") or _is_ablation(p) or make_policy(p).executes_on_cpu:
                continue  # (a CPU placement starts from its load-time placement, not cold as the oracle)  # ablations are variants of a policy run here; the synthetic property test runs them all
            if any(getattr(mixtral_trace, f) is None for f in make_policy(p).needs):
                continue  # e.g. FineMoE needs router probabilities, which these logs lack
            rates[(p, slots)] = simulate(mixtral_trace, real_config(p, slots)).summary["hit_rate"]
        assert all(rates[(p, s)] <= rates[("oracle", slots)] + 1e-12 for (p, s) in rates if s == slots), rates
    lru = [simulate(mixtral_trace, real_config("lru", s)).summary["hits"] for s in (16, 64, 128, 192, 255)]
    assert lru == sorted(lru)
    full = comparable(simulate(mixtral_trace, real_config("no-offload", 256)))
    assert comparable(simulate(mixtral_trace, real_config("lru", 256))) == full


@pytest.mark.slow
def test_real_mixtral_fast_path_equals_general_path(mixtral_trace):
    cfg = real_config("layerwise", 96, max_batch=2, arrival="poisson", rate_rps=20.0)
    a = comparable(simulate(mixtral_trace, cfg))
    assert comparable(simulate_general_path(mixtral_trace, cfg)) == a
