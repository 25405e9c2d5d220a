"""Hand-computable traces: exact simulated times of misses, prefetch overlap, copy engines, batching.

Hardware and geometry are chosen so every duration is a round number:
  dense part of a layer: 500,000 bytes / 1 GB/s = 0.5 ms (memory-bound);
  expert compute, one token: (1,000,000 weight bytes + 8 activation bytes) / 1 GB/s = 1.000008 ms;
  one copy: 0.25 ms latency + 1,000,000 bytes / 1 GB/s = 1.25 ms.
"""

from __future__ import annotations

import numpy as np
import pytest

from finemoe.policies.base import Policy, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.policies.registry import POLICIES
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.run import simulate
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import RequestInfo, Trace

MS = 1e-3
DENSE = 0.5 * MS
EXPERT = 1.000008 * MS
COPY = 1.25 * MS


def hardware(latency_s: float = 0.25e-3, copy_engines: int = 1) -> HardwareSpec:
    return HardwareSpec("test", gpu_mem_bytes=10**12, flops=1e15, hbm_gbps=1.0, pcie_gbps=1.0,
                        transfer_latency_s=latency_s, copy_engines=copy_engines, compute_efficiency=1.0,
                        memory_efficiency=1.0, pcie_efficiency=1.0, kernel_launch_s=0.0)


def make_trace(requests: list[list[list[list[tuple[int, ...]]]]], num_layers: int, num_experts: int,
               top_k: int, prefill: bool = False) -> Trace:
    """requests[r][iteration][token][layer] = tuple of top-k experts. Iterations are numbered from
    0 if `prefill` (the first is the prompt), else from 1."""
    g = Geometry("hand", num_layers, num_experts, top_k, 0, hidden_size=1, expert_intermediate_size=1,
                 dtype="float32", bytes_per_expert=1_000_000, dense_bytes=num_layers * 500_000, kv_bytes_per_token=0)
    rid, its, pos, experts, infos = [], [], [], [], []
    for r, iterations in enumerate(requests):
        p = 0
        prompt = len(iterations[0]) if prefill else 1
        for i, tokens in enumerate(iterations):
            for tok in tokens:
                rid.append(r)
                its.append(i if prefill else i + 1)
                pos.append(p)
                p += 1
                experts.append(tok)
        infos.append(RequestInfo(r, prompt, len(iterations) - (1 if prefill else 0), prefill))
    e = np.asarray(experts, dtype=np.int16).reshape(len(experts), num_layers, top_k)
    return Trace(g, tuple(infos), np.asarray(rid, np.int32), np.asarray(its, np.int32), np.asarray(pos, np.int32),
                 e, np.full(e.shape, 1.0 / top_k, np.float16))


def run(trace: Trace, policy: str, slots: int, hw: HardwareSpec | None = None, **workload):
    cfg = SimConfig("hand", policy, hw or hardware(), memory=MemoryConfig(expert_cache_slots=slots),
                    workload=WorkloadConfig(history_fraction=0.0, **workload), timeline_steps=100)
    return simulate(trace, cfg)


class ScriptedPolicy(Policy):
    """Test policy: residents and prefetches given by class attributes; LRU eviction."""

    name = "test-scripted"
    residents: list = []
    at_step_start: list = []  # Prefetches returned at the first step's start
    at_layer: dict = {}  # layer -> Prefetches returned once that layer is routed (first step)

    def bind(self, ctx):
        super().bind(ctx)
        self.order = LRUOrder()

    def initial_residents(self):
        return list(self.residents)

    def on_step_start(self, step):
        return list(self.at_step_start) if step.step == 0 else []

    def on_layer_routed(self, routing):
        return list(self.at_layer.get(routing.layer, [])) if routing.step.step == 0 else []

    def on_loaded(self, key, now_s):
        self.order.loaded(key)

    def on_evicted(self, key, now_s):
        self.order.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return self.order.victim(evictable)


@pytest.fixture
def scripted():
    """Registered for the test only, so `--policy all` elsewhere never sees it."""
    POLICIES[ScriptedPolicy.name] = ScriptedPolicy
    yield ScriptedPolicy
    POLICIES.pop(ScriptedPolicy.name, None)
    ScriptedPolicy.residents, ScriptedPolicy.at_step_start, ScriptedPolicy.at_layer = [], [], {}


TWO_LAYERS = [[[[(0,), (1,)]]]]  # one request, one decode token: layer 0 -> expert 0, layer 1 -> expert 1


def test_a_miss_costs_latency_plus_bytes_over_bandwidth():
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "lru", slots=2)
    s = r.summary
    assert r.requests["e2e_s"][0] == pytest.approx(2 * (DENSE + COPY + EXPERT), rel=1e-12)
    assert s["stall_s"] == pytest.approx(2 * COPY, rel=1e-12)
    assert (s["hits"], s["misses"], s["ondemand_loads"], s["bytes_h2d"]) == (0, 2, 2, 2_000_000)
    copies = [e for e in r.timeline if e["lane"] == "copy0"]
    assert [(c["layer"], c["expert"], c["kind"]) for c in copies] == [(0, 0, "demand"), (1, 1, "demand")]
    assert copies[0]["start_s"] == pytest.approx(DENSE) and copies[0]["end_s"] == pytest.approx(DENSE + COPY)


def test_all_resident_is_the_floor():
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "no-offload", slots=4)
    assert r.requests["e2e_s"][0] == pytest.approx(2 * (DENSE + EXPERT), rel=1e-12)
    assert r.summary["hit_rate"] == 1.0 and r.summary["bytes_h2d"] == 0


def test_prefetch_issued_during_compute_hides_its_transfer(scripted):
    scripted.residents = [(0, 0)]
    scripted.at_layer = {0: [Prefetch(1.0, 0, 1, 1)]}  # issued at 0.5 ms, lands at 1.75 ms < 2.000008 ms
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "test-scripted", slots=2)
    s = r.summary
    assert r.requests["e2e_s"][0] == pytest.approx(2 * (DENSE + EXPERT), rel=1e-12)
    assert (s["hits"], s["misses"], s["stall_s"]) == (2, 0, 0.0)
    assert (s["prefetch_issued"], s["prefetch_in_time"], s["prefetch_late"]) == (1, 1, 0)


def test_late_prefetch_is_a_miss_and_stalls_only_the_remainder(scripted):
    scripted.residents = [(0, 0)]
    scripted.at_layer = {0: [Prefetch(1.0, 0, 1, 1)]}
    hw = hardware(latency_s=1e-3)  # the copy now takes 2 ms: lands at 2.5 ms, needed at 2.000008 ms
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "test-scripted", slots=2, hw=hw)
    s = r.summary
    needed_at = DENSE + EXPERT + DENSE
    assert s["stall_s"] == pytest.approx(DENSE + 2 * MS - needed_at, rel=1e-9)
    assert r.requests["e2e_s"][0] == pytest.approx(DENSE + 2 * MS + EXPERT, rel=1e-12)
    assert (s["hits"], s["misses"], s["ondemand_loads"], s["prefetch_late"]) == (1, 1, 0, 1)


@pytest.mark.parametrize("ready_ms, hit", [
    (0.7, True),  # starts at 0.7 ms, lands at 1.95 ms < 2.000008 ms, when layer 1 is routed
    (0.9, False),  # starts at 0.9 ms, lands at 2.15 ms: late by 0.149992 ms
])
def test_a_prefetch_starts_when_its_prediction_is_ready(scripted, ready_ms, hit):
    scripted.residents = [(0, 0)]
    scripted.at_layer = {0: [Prefetch(1.0, 0, 1, 1, ready_s=ready_ms * MS)]}  # predicted at 0.5 ms
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "test-scripted", slots=2)
    copy = next(e for e in r.timeline if e["lane"] == "copy0")
    assert copy["start_s"] == pytest.approx(ready_ms * MS, rel=1e-12) and copy["kind"] == "prefetch"
    landed = ready_ms * MS + COPY
    expected = 2 * (DENSE + EXPERT) + max(0.0, landed - (2 * DENSE + EXPERT))
    assert r.requests["e2e_s"][0] == pytest.approx(expected, rel=1e-12)
    s = r.summary
    assert (s["prefetch_in_time"], s["prefetch_late"]) == ((1, 0) if hit else (0, 1))


def test_a_prediction_ready_after_its_layer_is_dropped(scripted):
    scripted.residents = [(0, 0)]
    scripted.at_layer = {0: [Prefetch(1.0, 0, 1, 1, ready_s=3 * MS)]}  # layer 1 is routed at 2.000008 ms
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "test-scripted", slots=2)
    s = r.summary
    assert (s["prefetch_issued"], s["prefetch_started"], s["ondemand_loads"]) == (0, 0, 1)
    assert r.requests["e2e_s"][0] == pytest.approx(2 * (DENSE + EXPERT) + COPY, rel=1e-12)


def test_a_copy_on_the_wire_is_not_preempted(scripted):
    scripted.at_step_start = [Prefetch(1.0, 0, 1, 1)]  # on the wire 0 -> 1.25 ms
    r = run(make_trace(TWO_LAYERS, 2, 2, 1), "test-scripted", slots=2)
    # Layer 0's on-demand load (needed at 0.5 ms) waits for the prefetch: 1.25 -> 2.5 ms.
    layer1_routed = 2 * COPY + EXPERT + DENSE
    assert r.requests["e2e_s"][0] == pytest.approx(layer1_routed + EXPERT, rel=1e-12)
    assert r.summary["prefetch_in_time"] == 1 and r.summary["hits"] == 1


def test_only_a_copy_handed_to_a_sleeping_engine_waits_the_hand_off(scripted):
    """`copy_start_delay_s` is the wake-up of a sleeping copy engine (a CPU copy thread): the first
    prefetch is handed over at 0 and starts its latency 0.1 ms late; the engine takes the second
    itself the moment the first lands, with no hand-off."""
    import dataclasses

    scripted.residents = [(0, 0), (1, 1)]
    scripted.at_step_start = [Prefetch(2.0, 0, 1, 2), Prefetch(1.0, 0, 1, 3)]
    hw = dataclasses.replace(hardware(), copy_start_delay_s=0.1 * MS)
    r = run(make_trace(TWO_LAYERS, 2, 4, 1), "test-scripted", slots=4, hw=hw)
    ends = sorted(e["end_s"] for e in r.timeline if e["lane"] == "copy0")
    assert ends == pytest.approx([0.1 * MS + COPY, 0.1 * MS + 2 * COPY], rel=1e-12)


def test_ondemand_loads_go_before_queued_prefetches(scripted):
    # Two prefetches queued at step start, one copy engine: the first goes on the wire at once, the
    # second waits; layer 0's miss at 0.5 ms jumps ahead of it.
    scripted.at_step_start = [Prefetch(2.0, 0, 1, 1), Prefetch(1.0, 0, 1, 0)]
    r = run(make_trace([[[[(0,), (1,)]]]], 2, 2, 1), "test-scripted", slots=3)
    copies = sorted((e["start_s"], e["layer"], e["expert"], e["kind"]) for e in r.timeline if e["lane"] == "copy0")
    assert [c[1:] for c in copies] == [(1, 1, "prefetch"), (0, 0, "demand"), (1, 0, "prefetch")]


@pytest.mark.parametrize("engines, expected_e2e, expected_stall", [
    # one engine: copies back to back; expert 1 lands at 3.0 ms, after expert 0's compute.
    (1, 2 * COPY + DENSE + EXPERT, COPY + (2 * COPY - COPY - EXPERT)),
    # two engines share the link's bandwidth: only the latencies overlap, so the second copy lands
    # one latency earlier (2.75 ms), just before expert 0's compute ends (2.750008 ms).
    (2, DENSE + COPY + 2 * EXPERT, COPY),
])
def test_two_copy_engines_overlap_latency_not_bandwidth(engines, expected_e2e, expected_stall):
    trace = make_trace([[[[(0, 1)]]]], 1, 3, 2)  # 3 experts, 2 slots: not all resident
    r = run(trace, "lru", slots=2, hw=hardware(copy_engines=engines))
    assert r.requests["e2e_s"][0] == pytest.approx(expected_e2e, rel=1e-12)
    assert r.summary["stall_s"] == pytest.approx(expected_stall, rel=1e-9)


def test_prefill_routes_many_tokens_to_one_expert_and_ends_with_the_first_token():
    # Three prompt tokens, all to expert 0 at the single layer; then one decode token to expert 1.
    trace = make_trace([[[[(0,)], [(0,)], [(0,)]], [[(1,)]]]], 1, 2, 1, prefill=True)
    r = run(trace, "no-offload", slots=2)
    expert3 = (1_000_000 + 3 * 8) / 1e9
    row = r.requests.iloc[0]
    assert row["first_token_s"] == pytest.approx(DENSE + expert3, rel=1e-12)
    assert row["finish_s"] == pytest.approx(DENSE + expert3 + DENSE + EXPERT, rel=1e-12)
    assert row["tpot_s"] == pytest.approx(DENSE + EXPERT, rel=1e-12)


def test_continuous_batching_queues_then_joins():
    one = [[[(0,)]], [[(0,)]]]  # two decode iterations, layer 0 -> expert 0
    trace = make_trace([one, one], 1, 1, 1)
    step = DENSE + EXPERT
    alone = run(trace, "no-offload", slots=1, max_batch=1)
    assert list(alone.requests["finish_s"]) == pytest.approx([2 * step, 4 * step], rel=1e-12)
    assert list(alone.requests["ttft_s"]) == pytest.approx([step, 3 * step], rel=1e-12)
    together = run(trace, "no-offload", slots=1, max_batch=2)
    # Both sequences in one step: the dense part reads its weights once, the expert runs over 2 tokens.
    step2 = DENSE + (1_000_000 + 2 * 8) / 1e9
    assert list(together.requests["finish_s"]) == pytest.approx([2 * step2, 2 * step2], rel=1e-12)
    assert together.summary["layer_steps"] == 4 and together.summary["steps"] == 2


def test_arrivals_from_a_file_delay_the_start(tmp_path):
    one = [[[(0,)]]]
    trace = make_trace([one, one], 1, 1, 1)
    f = tmp_path / "arrivals.txt"
    f.write_text("0.0\n0.1\n")
    r = run(trace, "no-offload", slots=1, arrival="file", timestamps_path=str(f))
    step = DENSE + EXPERT
    assert list(r.requests["arrival_s"]) == [0.0, 0.1]
    assert list(r.requests["finish_s"]) == pytest.approx([step, 0.1 + step], rel=1e-12)
    assert list(r.requests["e2e_s"]) == pytest.approx([step, step], rel=1e-9)


def test_more_distinct_experts_than_slots_still_completes():
    # A prefill routes 3 tokens to 3 different experts of one layer with only 1... 2 slots (top-2).
    trace = make_trace([[[[(0, 1)], [(2, 3)], [(1, 2)]], [[(0, 3)]]]], 1, 4, 2, prefill=True)
    r = run(trace, "lru", slots=2)
    assert r.summary["misses"] >= 4 and np.isfinite(r.requests["finish_s"][0])
