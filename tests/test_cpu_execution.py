"""Experts computed on the CPU (docs/cpu-execution.md): each cost term by hand, the overlap of the
CPU and GPU sides of a layer, the placement policies, and their sanity relations on real routing.

The hand cases reuse test_sim_engine_timing's geometry and GPU (dense 0.5 ms, a GPU expert
1.000008 ms, a copy 1.25 ms) with a CPU whose numbers are as round:
  CPU expert, one token: (1,000,000 weight bytes + 8 activation bytes) / 0.5 GB/s = 2.000016 ms;
  one direction of the hand-off: 0.25 ms latency + 4 bytes / 1 GB/s = 0.250004 ms;
  synchronisation per layer with CPU work: 0.1 ms.
"""

from __future__ import annotations

import math

import pytest
from test_sim_engine_timing import DENSE, EXPERT, MS, hardware, make_trace

from finemoe.errors import ConfigError
from finemoe.policies.base import COPY_ONCE, CPU, Policy
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import POLICIES, make_policy
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.costs import CostModel
from finemoe.sim.cpu import CPU_PRESETS, CpuSpec, load_cpu
from finemoe.sim.run import simulate
from finemoe.traces.geometry import Geometry

CPU_EXPERT = 2.000016 * MS
HANDOFF = 0.250004 * MS
SYNC = 0.1 * MS


def hand_cpu(**kw) -> CpuSpec:
    base = dict(mem_gbps=0.5, flops=1e15, memory_efficiency=1.0, compute_efficiency=1.0, expert_overhead_s=0.0,
                sync_s=0.1e-3)
    base.update(kw)
    return CpuSpec("hand-cpu", **base)


def run_cpu(trace, policy, slots, cpu=None, **params):
    cfg = SimConfig("hand", policy, hardware(), policy_params=params, memory=MemoryConfig(expert_cache_slots=slots),
                    workload=WorkloadConfig(history_fraction=0.0), timeline_steps=100, cpu=cpu or hand_cpu())
    return simulate(trace, cfg)


# --- the cost terms -------------------------------------------------------------------------------


def mixtral_like() -> Geometry:
    return Geometry("m", 32, 8, 2, 0, hidden_size=4096, expert_intermediate_size=14336, dtype="bfloat16",
                    bytes_per_expert=3 * 4096 * 14336 * 2, dense_bytes=1, kv_bytes_per_token=0)


def test_a_cpu_expert_is_memory_bound_at_one_token_and_compute_bound_at_64():
    cpu = CpuSpec("c", mem_gbps=100.0, flops=2e12, memory_efficiency=0.5, compute_efficiency=0.5,
                  expert_overhead_s=1e-6, sync_s=0.0)
    g = mixtral_like()
    costs = CostModel(hardware(), g, cpu)
    weights = 3 * 4096 * 14336 * 2  # 352,321,536 bytes
    one = 1e-6 + (weights + 2 * 4096 * 2) / 50e9  # 50 GB/s achieved; 0.35 GFLOP at 1 TFLOP/s is 0.35 ms
    assert costs.cpu_expert_s(1) == pytest.approx(one, rel=1e-12)
    assert one == pytest.approx(7.046e-3, rel=1e-3)
    flops_64 = 64 * 6 * 4096 * 14336  # 22.5 GFLOP at 1 TFLOP/s = 22.5 ms > 7.05 ms of reading
    assert costs.cpu_expert_s(64) == pytest.approx(1e-6 + flops_64 / 1e12, rel=1e-12)


def test_the_activation_hand_off_and_a_cpu_layer_by_hand():
    g = make_trace([[[[(0, 1)]]]], 1, 2, 2).geometry
    costs = CostModel(hardware(), g, hand_cpu())
    assert costs.activation_copy_s(1) == pytest.approx(HANDOFF, rel=1e-12)
    assert costs.activation_copy_s(64) == pytest.approx(0.25e-3 + 64 * 4 / 1e9, rel=1e-12)
    assert costs.cpu_expert_s(1) == pytest.approx(CPU_EXPERT, rel=1e-12)
    assert costs.cpu.sync_s == pytest.approx(SYNC, rel=1e-12)  # a whole CPU layer: the engine tests below


def test_a_cost_model_without_a_cpu_says_so():
    costs = CostModel(hardware(), mixtral_like())
    with pytest.raises(ValueError, match="no CPU profile"):
        costs.cpu_expert_s(1)


# --- the engine: CPU side, GPU side, overlap ---------------------------------------------------------


def test_cpu_all_runs_each_expert_on_the_cpu_after_the_hand_off():
    trace = make_trace([[[[(0, 1)]]]], num_layers=1, num_experts=2, top_k=2)  # one token, one layer
    r = run_cpu(trace, "cpu-all", slots=2)
    s = r.summary
    assert s["makespan_s"] == pytest.approx(DENSE + HANDOFF + 2 * CPU_EXPERT + HANDOFF + SYNC, abs=1e-12)
    assert (s["ran_gpu_resident"], s["ran_gpu_copied"], s["ran_cpu"]) == (0, 0, 2)
    assert s["bytes_h2d"] == 0 and s["bytes_d2h"] == 4 and s["bytes_h2d_activations"] == 4
    assert s["cpu_busy_s"] == pytest.approx(2 * CPU_EXPERT, abs=1e-12)
    assert s["cpu_wait_s"] == pytest.approx(2 * HANDOFF + 2 * CPU_EXPERT + SYNC, abs=1e-12)
    lanes = sorted((e["lane"], e["expert"]) for e in r.timeline if e["kind"] == "expert")
    assert lanes == [("cpu", 0), ("cpu", 1)]


class OneOnGpu(Policy):
    """Expert 0 of layer 0 resident from the start; every miss on the CPU."""

    name = "test-one-on-gpu"
    executes_on_cpu = True

    def bind(self, ctx):
        super().bind(ctx)
        self.order = LRUOrder()

    def initial_residents(self):
        return [(0, 0)]

    def place_misses(self, layer, misses, tokens, step_tokens, now_s):
        return dict.fromkeys(misses, CPU)

    def on_loaded(self, key, now_s):
        self.order.loaded(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.order.victim(evictable)


@pytest.fixture
def one_on_gpu():
    POLICIES[OneOnGpu.name] = OneOnGpu
    yield OneOnGpu.name
    del POLICIES[OneOnGpu.name]


def test_the_gpu_computes_its_experts_while_the_cpu_computes_the_rest(one_on_gpu):
    trace = make_trace([[[[(0, 1)]]]], num_layers=1, num_experts=2, top_k=2)
    s = run_cpu(trace, one_on_gpu, slots=2).summary
    cpu_side = HANDOFF + CPU_EXPERT + HANDOFF + SYNC  # 2.600024 ms, longer than the GPU's 1.000008
    assert s["makespan_s"] == pytest.approx(DENSE + cpu_side, abs=1e-12)
    assert s["cpu_wait_s"] == pytest.approx(cpu_side - EXPERT, abs=1e-12)
    # A CPU fast enough that the GPU's expert is the longer side: the layer takes the GPU's time.
    fast = hand_cpu(mem_gbps=1000.0, sync_s=0.0)
    cpu_fast = 2 * HANDOFF + (1_000_000 + 8) / 1e12
    assert cpu_fast < EXPERT
    s = run_cpu(trace, one_on_gpu, slots=2, cpu=fast).summary
    assert s["makespan_s"] == pytest.approx(DENSE + EXPERT, abs=1e-12) and s["cpu_wait_s"] == 0


def test_the_next_layer_waits_for_the_cpu(one_on_gpu):
    trace = make_trace([[[[(0, 1), (0, 1)]]]], num_layers=2, num_experts=2, top_k=2)
    s = run_cpu(trace, one_on_gpu, slots=2).summary
    layer0 = DENSE + HANDOFF + CPU_EXPERT + HANDOFF + SYNC  # expert 0 on the GPU alongside
    layer1 = DENSE + HANDOFF + 2 * CPU_EXPERT + HANDOFF + SYNC  # layer 1 has nothing resident
    assert s["makespan_s"] == pytest.approx(layer0 + layer1, abs=1e-12)


def test_static_placement_by_layers_first_and_last():
    trace = make_trace([[[[(0, 1), (0, 1), (0, 1)]]]], num_layers=3, num_experts=2, top_k=2)
    full_gpu_layer = DENSE + 2 * EXPERT
    cpu_layer = DENSE + 2 * HANDOFF + 2 * CPU_EXPERT + SYNC
    for placement in ("first", "last"):
        s = run_cpu(trace, "static", slots=4, placement=placement).summary  # fit: one layer on the CPU
        assert s["makespan_s"] == pytest.approx(2 * full_gpu_layer + cpu_layer, abs=1e-12)
        assert (s["ran_gpu_resident"], s["ran_cpu"]) == (4, 2)
    r = run_cpu(trace, "static", slots=6, placement="first", cpu_layers=2)
    assert r.summary["ran_cpu"] == 4
    assert sorted({e["layer"] for e in r.timeline if e["lane"] == "cpu"}) == [0, 1]
    r = run_cpu(trace, "static", slots=6, placement="last", cpu_layers=2)
    assert sorted({e["layer"] for e in r.timeline if e["lane"] == "cpu"}) == [1, 2]
    with pytest.raises(ConfigError, match="do not fit"):
        run_cpu(trace, "static", slots=4, cpu_layers=0)


def test_static_with_every_expert_on_the_gpu_is_no_offload_and_with_none_is_cpu_all():
    trace = make_trace([[[[(0, 1), (1, 2)]], [[(2, 3), (0, 3)]]], [[[(1, 3), (2, 0)]], [[(1, 2), (0, 3)]]]],
                       num_layers=2, num_experts=4, top_k=2)
    keep = ("makespan_s", "ttft_p50_s", "tpot_p50_s", "hits", "misses", "stall_s")
    none = run_cpu(trace, "no-offload", slots=8).summary
    every = run_cpu(trace, "static", slots=8, cpu_layers=0).summary
    assert {k: every[k] for k in keep} == {k: none[k] for k in keep}
    all_cpu = run_cpu(trace, "cpu-all", slots=8).summary
    static_none = run_cpu(trace, "static", slots=8, cpu_layers=2).summary
    assert {k: static_none[k] for k in keep + ("ran_cpu", "cpu_busy_s")} == \
        {k: all_cpu[k] for k in keep + ("ran_cpu", "cpu_busy_s")}


def test_a_prompt_as_large_as_the_offload_rule_is_copied_and_its_copies_do_not_stay():
    # One prompt of 32 tokens, each routed to (0, 1) at its one layer, then one decode token.
    prompt = [[(0, 1)]] * 32
    trace = make_trace([[prompt, [[(0, 1)]]]], num_layers=1, num_experts=2, top_k=2, prefill=True)
    r = run_cpu(trace, "cpu-all", slots=2, offload_batch="llama.cpp")
    s = r.summary
    assert s["ran_gpu_copied"] == 2 and s["ran_cpu"] == 2  # the prompt's two copied, the decode token's on the CPU
    assert s["bytes_h2d"] == 2 * 1_000_000 and s["ran_gpu_resident"] == 0  # the copies left their slots
    assert run_cpu(trace, "cpu-all", slots=2, offload_batch=33).summary["ran_gpu_copied"] == 0


def test_the_ik_llama_cpp_rule_scales_by_experts_per_token():
    from finemoe.policies.placement import offload_threshold

    assert offload_threshold("llama.cpp", 128, 8) == 32
    assert offload_threshold("ik_llama.cpp", 128, 8) == 512  # DeepSeek-like: 32 x 128 / 8
    assert offload_threshold("ik_llama.cpp", 8, 2) == 128  # Mixtral
    assert offload_threshold("off", 8, 2) is None and offload_threshold(40, 8, 2) == 40
    with pytest.raises(ConfigError, match="offload_batch"):
        make_policy("cpu-all", offload_batch="sometimes")


def test_fiddler_copies_a_miss_only_where_copying_and_the_gpu_are_sooner():
    trace = make_trace([[[[(0, 1)]]]], 1, 2, 2)
    policy = make_policy("fiddler")

    class Ctx:
        geometry = trace.geometry
        capacity_slots = 2
        costs = CostModel(hardware(), trace.geometry, hand_cpu(mem_gbps=1.0))

    policy.ctx = Ctx  # place() reads only the costs
    # one token: copy 1.25 + GPU 1.000008 = 2.250008 ms against CPU 1.000008 + hand-offs 0.500008 ms
    assert policy.place(0, 0, 1) == CPU
    # the hand CPU at 0.5 GB/s: 2.000016 + 0.500008 = 2.500024 ms, so copying is sooner
    Ctx.costs = CostModel(hardware(), trace.geometry, hand_cpu())
    assert policy.place(0, 0, 1) == COPY_ONCE


def test_cache_cpu_miss_never_stalls_and_caches_what_it_copied():
    # Two decode tokens at one layer, both routed to (0, 1): the first misses both (CPU now, copies
    # queued for the next step), the second finds them resident if the copies made it in time.
    trace = make_trace([[[[(0, 1)]], [[(0, 1)]]]], num_layers=1, num_experts=2, top_k=2)
    s = run_cpu(trace, "cache-cpu-miss", slots=2).summary
    assert s["stall_s"] == 0 and s["ran_cpu"] == 2 and s["ran_gpu_resident"] == 2
    assert s["prefetch_started"] == 2 and s["bytes_h2d"] == 2 * 1_000_000


def test_cpu_policies_carry_no_copy_on_miss_bound_and_record_their_cpu():
    trace = make_trace([[[[(0, 1)]]]], 1, 2, 2)
    r = run_cpu(trace, "cpu-all", slots=2)
    assert not any(k.startswith("bound_") for k in r.summary)  # a copy-on-miss bound would not hold
    assert r.config["cpu"]["name"] == "hand-cpu"
    lru = run_cpu(trace, "lru", slots=2)
    assert any(k.startswith("bound_") for k in lru.summary) and "cpu" in lru.config  # given, though unused


def test_cpu_presets_and_profiles(tmp_path):
    for spec in CPU_PRESETS.values():
        assert spec.source and spec.mem_bytes_per_s > 1e9
    assert CPU_PRESETS["desktop-ddr5"].mem_bytes_per_s == pytest.approx(62.7e9, rel=1e-3)  # ~63 GB/s measured
    assert CPU_PRESETS["xeon6"].mem_bytes_per_s == pytest.approx(692.7e9, rel=1e-3)  # ~690 GB/s measured
    path = tmp_path / "cpu.json"
    path.write_text('{"cpu": {"name": "here", "mem_gbps": 20.0, "flops": 1e11}}')
    assert load_cpu(str(path)).mem_gbps == 20.0
    for text, match in (('{"cpu": {"name": "x", "mem_gbps": -1, "flops": 1e11}}', "mem_gbps"),
                        ('{"hardware": {}}', "lacks"), ("not json", "not a JSON profile")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_cpu(str(path))
    with pytest.raises(ConfigError, match="unknown CPU"):
        load_cpu("pentium")
    with pytest.raises(ConfigError, match="finite"):
        CpuSpec("x", mem_gbps=math.nan, flops=1.0)


# --- properties on random traces and on the real Mixtral logs -----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_sim_properties import cases, comparable, simulate_general_path  # noqa: E402

CPU_POLICIES = (
    ("static", {}), ("static", {"placement": "last"}), ("static", {"placement": "hot"}),
    ("static", {"offload_batch": 2}), ("cpu-all", {}), ("cpu-all", {"offload_batch": "llama.cpp"}),
    ("fiddler", {}), ("cache-cpu-miss", {}), ("cache-cpu-miss", {"cache": "lfu"}),
)


def random_config(policy, params, slots, batch, hw, seed, cpu=None):
    return SimConfig("synthetic", policy, hw, policy_params=params, memory=MemoryConfig(expert_cache_slots=slots),
                     workload=WorkloadConfig(max_batch=batch, history_fraction=0.4, arrival="poisson",
                                             rate_rps=5000.0), seed=seed, timeline_steps=1000,
                     cpu=cpu or CPU_PRESETS["desktop-ddr5"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(CPU_POLICIES), st.sampled_from([None, "slow"]))
def test_cpu_policies_are_deterministic_the_fast_path_agrees_and_every_expert_runs_once(case, policy, cpu):
    trace, slots, batch, hw, seed = case
    name, params = policy
    slow = hand_cpu(mem_gbps=0.05, flops=1e9, sync_s=1e-5) if cpu == "slow" else None
    cfg = random_config(name, params, slots, batch, hw, seed, slow)
    r = simulate(trace, cfg)
    a = comparable(r)
    assert comparable(simulate(trace, cfg)) == a
    assert comparable(simulate_general_path(trace, cfg)) == a
    s = r.summary
    # Every routed expert of every step computed exactly once, on the GPU or the CPU (the timeline
    # keeps every step here), and every GPU expert not marked a miss resident while it ran.
    ran = [(e["step"], e["layer"], e["expert"]) for e in r.timeline if e["kind"] == "expert"]
    assert len(ran) == len(set(ran)) == s["hits"] + s["misses"]
    assert sum(e["lane"] == "cpu" for e in r.timeline if e["kind"] == "expert") == s["ran_cpu"]
    assert s["ran_gpu_resident"] + s["ran_gpu_copied"] + s["ran_cpu"] == s["hits"] + s["misses"]
    assert s["ran_gpu_resident"] == s["hits"] and s["ran_cpu"] >= 0 and s["ran_gpu_copied"] >= 0
    assert (s["cpu_busy_s"] > 0) == (s["ran_cpu"] > 0) and (s["bytes_d2h"] > 0) == (s["ran_cpu"] > 0)
    assert s["cpu_wait_s"] >= 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_static_spans_no_offload_to_cpu_all_on_random_traces(case):
    trace, _, batch, hw, seed = case
    g = trace.geometry
    full = g.num_layers * g.num_experts
    keep = ("makespan_s", "hits", "misses", "stall_s", "ran_cpu", "cpu_busy_s", "cpu_wait_s")
    pick = lambda r: {k: r.summary[k] for k in keep}  # noqa: E731
    none = pick(simulate(trace, random_config("no-offload", {}, full, batch, hw, seed)))
    every = pick(simulate(trace, random_config("static", {"cpu_layers": 0}, full, batch, hw, seed)))
    assert every == none
    all_cpu = pick(simulate(trace, random_config("cpu-all", {}, full, batch, hw, seed)))
    assert pick(simulate(trace, random_config("static", {"cpu_layers": g.num_layers}, full, batch, hw, seed))) == all_cpu


@pytest.mark.slow
def test_real_mixtral_static_spans_no_offload_to_cpu_all(mixtral_trace_path):
    from finemoe.sim.hardware import PRESETS
    from finemoe.traces.io import read_trace

    trace = read_trace(mixtral_trace_path)
    hw = PRESETS["rtx3090"]

    def summary(policy, slots, **params):
        cfg = SimConfig("mixtral", policy, hw, policy_params=params, memory=MemoryConfig(expert_cache_slots=slots),
                        workload=WorkloadConfig(history_fraction=0.4), cpu=CPU_PRESETS["desktop-ddr5"])
        s = simulate(trace, cfg).summary
        return {k: s[k] for k in ("makespan_s", "tpot_p50_s", "hits", "misses", "ran_cpu")}

    assert summary("static", 256, cpu_layers=0) == summary("no-offload", 256)
    assert summary("static", 48, cpu_layers=32) == summary("cpu-all", 48)
    # Between the two ends, each layer moved to the GPU saves time: TPOT falls as N falls.
    tpot = [summary("static", 256, cpu_layers=n)["tpot_p50_s"] for n in (32, 24, 16, 8, 0)]
    assert tpot == sorted(tpot, reverse=True) and tpot[0] > 10 * tpot[-1]
