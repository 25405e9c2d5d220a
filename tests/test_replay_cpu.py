"""Replay of CPU expert execution: the replayer's CPU side (a host thread computing the misses a
policy places on the CPU) must make the simulator's decisions exactly on a modelled clock, run for
real on this machine, and be calibrated through the same thread. Wall-clock agreement is measured
by `finemoe validate`, never asserted here."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_replay_mechanics import EXACT, HW, HW_CPU_LIKE, TIMES, config, geometry

from finemoe.replay.executor import ReplayOptions, replay
from finemoe.sim.cpu import CPU_PRESETS
from finemoe.sim.run import simulate

CPU = CPU_PRESETS["desktop-ddr5"]
SLOW_LINK = replace(HW_CPU_LIKE, pcie_gbps=0.3)  # copying costs more than computing on the CPU: fiddler computes
CPU_COUNTS = ("ran_cpu", "ran_gpu_copied", "ran_gpu_resident", "bytes_d2h", "bytes_h2d_activations")


@pytest.fixture(scope="module")
def trace():
    from finemoe.traces.synthetic import synthetic_trace

    return synthetic_trace(geometry(), num_requests=6, prompt_tokens=6, generated_tokens=10, seed=3)


def cpu_config(policy: str, params: dict, slots: int, max_batch: int, hw=HW):
    return replace(config(policy, slots, max_batch, hw), policy_params=params, cpu=CPU)


@pytest.mark.parametrize("policy, params, hw", [
    ("static", {}, HW), ("static", {"placement": "hot"}, HW_CPU_LIKE), ("cpu-all", {}, HW),
    ("fiddler", {}, SLOW_LINK), ("fiddler", {}, HW), ("cache-cpu-miss", {}, HW_CPU_LIKE),
    ("cache-cpu-miss", {"cache": "lfu"}, HW), ("static", {"offload_batch": 4}, HW),
    ("cache-cpu-miss", {"offload_batch": 4}, SLOW_LINK), ("fiddler", {"offload_batch": 4}, SLOW_LINK),
])
@pytest.mark.parametrize("slots, max_batch", [(12, 1), (12, 2), (4, 2)])
def test_a_modelled_cpu_replay_is_the_simulation(trace, policy, params, hw, slots, max_batch):
    """Every count (where each expert ran, bytes each way) and time equals the simulator's: the
    CPU side's start, the copies for later (cpu+copy), temporary copies (copy-once) and the wait."""
    cfg = cpu_config(policy, params, slots, max_batch, hw)
    rep, sim = replay(trace, cfg, ReplayOptions(timing="modelled")), simulate(trace, cfg)
    for key in EXACT + CPU_COUNTS:
        assert rep.summary.get(key) == sim.summary.get(key), key
    for key in TIMES + ("cpu_busy_s", "cpu_wait_s"):
        assert rep.summary[key] == pytest.approx(sim.summary[key], rel=1e-9, abs=1e-15), key
    if policy != "fiddler" or hw is SLOW_LINK:
        assert sim.summary["ran_cpu"] > 0  # the CPU path was exercised


@pytest.mark.parametrize("policy, params, hw", [("static", {}, HW), ("cpu-all", {}, HW), ("fiddler", {}, SLOW_LINK),
                                                ("static", {"offload_batch": 4}, HW)])
def test_a_measured_cpu_replay_runs_the_policys_placement(trace, policy, params, hw):
    """For real, on a host thread: where each expert ran is the simulator's (these placements do
    not depend on timing), the CPU was busy, and the timeline shows its experts."""
    cfg = replace(cpu_config(policy, params, 12, 2, hw), timeline_steps=3)
    rep, sim = replay(trace, cfg, ReplayOptions()), simulate(trace, cfg)
    for key in ("hits", "misses") + CPU_COUNTS:
        assert rep.summary[key] == sim.summary[key], key
    assert rep.summary["ran_cpu"] > 0 and rep.summary["cpu_busy_s"] > 0 and rep.summary["cpu_wait_s"] >= 0
    on_cpu = [e for e in rep.timeline if e["lane"] == "cpu"]
    assert on_cpu and all(e["end_s"] >= e["start_s"] for e in on_cpu)
    info = rep.config["replay"]  # each measured job's hand-off (the warm-up job is not one)
    assert info["cpu_handoffs"] == info["cpu_jobs"] - 1 and info["cpu_handoff_mean_s"] > 0


def test_a_cpu_jobs_hand_off_is_what_it_cost_the_device_beyond_its_experts():
    from finemoe.replay.cpu_worker import CpuJob

    # Posted at 0, experts 1-3 and 3-4, output back at 5: 2 s of the worker's own (wake-up, copies);
    # the compute thread waiting since 2 and running again at 6 adds its 1 s wake-up.
    job = CpuJob([((0, 1), 1), ((0, 2), 1)], 1, posted_s=0.0, start_s=0.5, spans=[(1.0, 3.0), (3.0, 4.0)],
                 end_s=5.0, waited_s=2.0, resumed_s=6.0)
    assert job.handoff_s == pytest.approx(3.0)
    # A compute thread that came for it after it was done did not wait to be woken.
    assert replace(job, waited_s=7.0, resumed_s=7.1).handoff_s == pytest.approx(2.0)


def test_the_comparison_charges_the_cpu_hand_off_the_replay_measured():
    from types import SimpleNamespace

    from finemoe.replay.run import with_policy_time
    from finemoe.sim.config import SimConfig
    from finemoe.sim.costs import CostModel

    g = geometry()
    cfg = SimConfig(trace_path="t", policy="cpu-all", hardware=HW, cpu=CPU_PRESETS["desktop-ddr5"])
    info = {"device": "cpu", "policy_s": 0.003, "cpu_handoffs": 100, "cpu_handoff_mean_s": 4e-4,
            "cpu_handoff_tokens_mean": 2.2}
    got = with_policy_time(cfg, SimpleNamespace(config={"replay": info, "geometry": g.to_dict()},
                                                summary={"layer_steps": 300}))
    act = CostModel(got.hardware, g).activation_copy_s(2)
    assert got.cpu.sync_s == pytest.approx(4e-4 - 2 * act) and "hand-offs" in got.cpu.source
    # Without CPU jobs the CPU is left as it was.
    none = with_policy_time(cfg, SimpleNamespace(config={"replay": {**info, "cpu_handoffs": 0}, "geometry": g.to_dict()},
                                                 summary={"layer_steps": 300}))
    assert none.cpu == cfg.cpu


def test_a_cache_cpu_miss_replay_copies_for_later(trace):
    cfg = cpu_config("cache-cpu-miss", {}, 12, 2)
    s = replay(trace, cfg, ReplayOptions()).summary
    assert s["ran_cpu"] > 0 and s["hits"] > 0 and s["bytes_h2d"] > 0  # misses ran on the CPU and were copied


def test_the_cpu_worker_computes_each_expert_from_host_weights():
    import torch

    from finemoe.replay.compute import ExpertShape, expert_ffn
    from finemoe.replay.cpu_worker import CpuJob, CpuWorker

    shape = ExpertShape(8, 16)
    weights = torch.randn((2, 3, shape.numel), generator=torch.Generator().manual_seed(0))
    x = torch.randn((4, 8), generator=torch.Generator().manual_seed(1))
    out = torch.zeros_like(x)
    ticks = iter(range(100))
    worker = CpuWorker(lambda la, e: weights[la, e], shape, x, out, lambda: float(next(ticks)))
    try:
        job = CpuJob([((1, 2), 3)], step_tokens=4)
        worker.start(job)
        assert worker.finish() is job
        # The last expert's output for its tokens came back to the device buffer.
        torch.testing.assert_close(out[:3], expert_ffn(x[:3], weights[1, 2], shape))
        assert len(job.spans) == 1 and job.start_s < job.spans[0][0] < job.spans[0][1] < job.end_s
        assert job.posted_s < job.start_s and job.end_s < job.resumed_s and job.handoff_s > 0
        assert worker.busy_s == job.end_s - job.start_s and worker.jobs == 1
        worker.start(CpuJob([((5, 0), 1)], step_tokens=1))  # no such layer: the thread's error surfaces
        with pytest.raises(RuntimeError, match="CPU expert thread failed"):
            worker.finish()
    finally:
        worker.close()


def test_a_temporary_copy_frees_its_slot():
    import torch

    from finemoe.replay.slots import SlotPool

    pool = SlotPool(2, 4, torch.float32, "cpu")
    a = pool.assign((0, 1), None)
    pool.release((0, 1))
    assert (0, 1) not in pool.slot_of and pool.assign((0, 2), None) == a


def test_fit_cpu_recovers_a_known_roofline():
    """Rows made from a known CPU (20 GB/s of weights, 1 TFLOP/s, 10 us per expert, a 100 us round
    trip with 2 x 30 us of activation copies) are fitted back to it."""
    from finemoe.replay.calibrate_cpu import fit_cpu
    from finemoe.replay.compute import ExpertShape
    from finemoe.sim.costs import CostModel

    shape = ExpertShape(256, 512)
    nbytes, flops_per_token = shape.numel * 2, 2.0 * shape.numel

    def t(tokens):
        return 10e-6 + max(nbytes / 20e9, tokens * flops_per_token / 1e12)

    rows = [{"tokens": n, "time_s": t(n)} for n in (1, 2, 4, 16, 64, 512)]
    measured = {"expert": rows, "expert_fixed_cost_s": 10e-6, "round_trip_s": 100e-6}
    cpu = fit_cpu("test", measured, shape, 2, 40.0, 2e12, 30e-6, "test")
    assert cpu.mem_bytes_per_s == pytest.approx(20e9) and cpu.memory_efficiency == pytest.approx(0.5)
    assert cpu.compute_flops_per_s == pytest.approx(1e12) and cpu.compute_efficiency == pytest.approx(0.5)
    assert cpu.expert_overhead_s == 10e-6 and cpu.sync_s == pytest.approx(40e-6)
    from finemoe.traces.synthetic import tiny_geometry

    g = tiny_geometry(hidden_size=256, expert_intermediate_size=512, dtype="bfloat16", bytes_per_expert=nbytes)
    costs = CostModel(HW, g, cpu)
    assert costs.cpu_expert_s(1) == pytest.approx(t(1), rel=0.01)


def test_calibration_measures_the_cpu_side_through_the_worker():
    from finemoe.replay.calibrate_cpu import measure_cpu_side
    from finemoe.replay.compute import ExpertShape

    m = measure_cpu_side("cpu", "float32", ExpertShape(32, 64), (1, 16), 3, 10**5)
    assert [r["tokens"] for r in m["expert"]] == [1, 16]
    assert all(r["time_s"] > 0 for r in m["expert"]) and m["round_trip_s"] > 0 and m["expert_fixed_cost_s"] >= 0


def test_cli_replay_compare_of_a_cpu_placement(tmp_path):
    from click.testing import CliRunner

    from finemoe.cli.main import cli
    from finemoe.results import read_result
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    path = tmp_path / "t.parquet"
    write_trace(synthetic_trace(tiny_geometry(), num_requests=2, seed=0), path)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["replay", str(path), "--policy", "static", "--expert-cache", "8", "--compare",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "on the CPU" in res.output and "experts run on the CPU" in res.output
    (replayed,) = out.glob("replay-*.parquet")
    r = read_result(replayed)
    assert r.summary["ran_cpu"] > 0 and r.summary["sim_ran_cpu"] == r.summary["ran_cpu"]
    assert "measured" in r.config["cpu"]["name"]  # the CPU the replay ran on, calibrated through its thread


def test_a_hardware_profile_without_a_cpu_is_one_sentence(tmp_path):
    from click.testing import CliRunner

    from finemoe.cli.main import cli
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    path = tmp_path / "t.parquet"
    write_trace(synthetic_trace(tiny_geometry(), num_requests=2, seed=0), path)
    res = CliRunner().invoke(cli, ["replay", str(path), "--policy", "cpu-all", "--expert-cache", "8",
                                   "--hardware", "rtx3090", "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "holds no measured CPU" in res.output and "Traceback" not in res.output
