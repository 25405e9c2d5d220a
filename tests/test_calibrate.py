"""Calibration: the fits recover known parameters, a quick CPU calibration writes a profile that the
simulator reads, and the CLI reports bad input as one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.replay.calibrate import (
    calibrate,
    fit_dispatch,
    fit_hardware,
    fit_line,
    fit_link,
    pick_copy_engines,
    predict_expert_s,
    write_profile,
)
from finemoe.replay.compute import ExpertShape
from finemoe.sim.hardware import HardwareSpec, load_hardware

needs_cuda = pytest.mark.gpu


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_fit_line_exact():
    a, b = fit_line([0, 1, 2, 3], [1, 3, 5, 7])
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)


def test_fit_link_recovers_latency_and_bandwidth():
    rows = [{"bytes": n, "time_s": 12e-6 + n / 25e9} for n in (4096, 65536, 1 << 20, 16 << 20, 64 << 20)]
    latency, bps = fit_link(rows)
    assert latency == pytest.approx(12e-6, rel=1e-6)
    assert bps == pytest.approx(25e9, rel=1e-6)


def test_fit_link_clamps_negative_latency():
    rows = [{"bytes": n, "time_s": n / 10e9 - 1e-7} for n in (1 << 20, 4 << 20, 16 << 20)]
    latency, bps = fit_link(rows)
    assert latency == 0.0 and bps > 0


def test_pick_copy_engines_fewest_within_tolerance():
    rows = [{"engines": 1, "aggregate_gbps": 10.0}, {"engines": 2, "aggregate_gbps": 19.5},
            {"engines": 3, "aggregate_gbps": 20.0}, {"engines": 4, "aggregate_gbps": 19.9}]
    assert pick_copy_engines(rows) == 2
    assert pick_copy_engines([{"engines": 1, "aggregate_gbps": 5.0}, {"engines": 2, "aggregate_gbps": 5.1}]) == 1


def test_fit_hardware_reproduces_both_roofline_ends():
    shape, elem = ExpertShape(1024, 2048), 2
    launch, weight_bps, fps = 20e-6, 50e9, 30e12
    nbytes = shape.numel * elem

    def t(tokens):
        return launch + max(nbytes / weight_bps, 6 * 1024 * 2048 * tokens / fps)

    experts = [{"tokens": n, "time_s": t(n)} for n in (1, 2, 4, 16, 64, 4096)]
    link = [{"bytes": n, "time_s": 5e-6 + n / 20e9} for n in (1 << 16, 1 << 20, 1 << 24)]
    overlap = [{"engines": 1, "aggregate_gbps": 20.0}, {"engines": 2, "aggregate_gbps": 20.1}]
    hw, fit = fit_hardware("test", "cpu", 10**10, link, overlap, experts, shape, elem, launch, 80.0, 40e12)
    assert hw.copy_engines == 1
    assert hw.link_bytes_per_s == pytest.approx(20e9, rel=1e-6)
    assert hw.transfer_latency_s == pytest.approx(5e-6, rel=1e-6)
    assert hw.hbm_bytes_per_s == pytest.approx(weight_bps, rel=1e-6)
    assert hw.compute_flops_per_s == pytest.approx(fps, rel=1e-6)
    for n in (1, 4096):
        assert predict_expert_s(hw, shape, elem, n) == pytest.approx(t(n), rel=1e-6)
    assert {"residuals"} <= set(fit)


def test_quick_cpu_calibration_writes_a_profile_simulate_reads(tmp_path):
    profile = calibrate("cpu", shape=ExpertShape(128, 256), dtype="float32")
    hw = HardwareSpec(**profile["hardware"])
    assert hw.pcie_gbps > 0 and hw.flops > 0 and hw.hbm_gbps > 0 and hw.copy_engines >= 1
    assert 0 < hw.compute_efficiency <= 1 and 0 < hw.memory_efficiency <= 1
    m = profile["measurements"]
    assert m["device"] == "cpu" and m["dtype"] == "float32" and m["cpu_threads"] >= 1
    assert len(m["copy"]["pageable"]) >= 4 and "pinned" not in m["copy"]
    assert [r["tokens"] for r in m["expert_gemm"]] == sorted(r["tokens"] for r in m["expert_gemm"])
    # The replayer's own costs and the copy/compute interference, measured and recorded.
    assert hw.layer_overhead_s >= 0 and hw.expert_overhead_s >= 0 and hw.miss_overhead_s >= 0
    assert hw.copy_compute_slowdown >= 1 and hw.compute_copy_slowdown >= 1 and hw.copy_start_delay_s >= 0
    probes = m["replayer_dispatch"]["probes"]
    assert {(p["top_k"], p["slots_per_layer"]) for p in probes} == {(1, 8), (4, 8), (2, 2), (4, 4)}
    assert all(p["misses"] == 0 for p in probes if p["slots_per_layer"] == 8)
    assert all(p["misses"] > 0 and p["outside_s"] > 0 for p in probes if p["slots_per_layer"] < 8)
    assert m["copy_interference"]["engines"] == hw.copy_engines
    path = write_profile(profile, tmp_path / "p.json")
    assert load_hardware(str(path)) == hw
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # atomic: no temporary left behind
    # The host CPU (--cpu), measured through the replayer's CPU thread: its own rows, its fit.
    from finemoe.sim.costs import CostModel
    from finemoe.sim.cpu import load_cpu
    from finemoe.traces.geometry import Geometry

    cpu = load_cpu(str(path))
    side = m["cpu_side"]
    assert [r["tokens"] for r in side["expert"]] == [r["tokens"] for r in m["expert_gemm"]]
    assert cpu.expert_overhead_s == side["expert_fixed_cost_s"] and 0 <= cpu.sync_s <= side["round_trip_s"]
    g = Geometry("c", 1, 8, 2, 0, hidden_size=128, expert_intermediate_size=256, dtype="float32",
                 bytes_per_expert=3 * 128 * 256 * 4, dense_bytes=1, kv_bytes_per_token=0)
    one = CostModel(hw, g, cpu)
    few = [r["time_s"] for r in side["expert"] if r["tokens"] <= 4]
    assert min(few) * 0.5 <= one.cpu_expert_s(1) <= max(few) * 2  # the fit goes through the rows it came from


def test_cli_calibrate_writes_profile(tmp_path):
    out = tmp_path / "cpu.json"
    res = CliRunner().invoke(cli, ["calibrate", "--device", "cpu", "-o", str(out), "--hidden-size", "128",
                                   "--intermediate-size", "256"])
    assert res.exit_code == 0, res.output
    assert "host->device" in res.output and "wrote" in res.output
    data = json.loads(out.read_text())
    assert set(data) == {"hardware", "measurements", "cpu", "warnings"}
    assert isinstance(data["warnings"], list)
    assert load_hardware(str(out)).name.startswith("cpu-")


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "unknown device"),
    (["--hidden-size", "0"], "must be positive"),
    (["--dtype", "int4"], "computes in"),
])
def test_cli_calibrate_bad_input_is_one_line(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["calibrate", "-o", str(tmp_path / "p.json"), *args])
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "p.json").exists()


def test_cli_calibrate_cuda_without_gpu_is_an_error(tmp_path):
    if _cuda():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(cli, ["calibrate", "--device", "cuda", "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and "torch sees none" in res.output


@needs_cuda
def test_cuda_calibration_pinned_beats_pageable(tmp_path):
    if not _cuda():
        pytest.skip("no CUDA device")
    profile = calibrate("cuda", shape=ExpertShape(1024, 2048))
    m = profile["measurements"]
    pinned = max(r["gbps"] for r in m["copy"]["pinned"])
    pageable = max(r["gbps"] for r in m["copy"]["pageable"])
    assert pinned > pageable
    assert profile["hardware"]["gpu_mem_bytes"] > 10**9


def test_fit_dispatch_recovers_per_layer_expert_and_miss_costs():
    layer, expert, miss = 9e-6, 4e-6, 12e-6
    rows = [{"layer_steps": ls, "kernels": k, "misses": m, "outside_s": ls * layer + k * expert + m * miss}
            for ls, k, m in [(192, 192, 0), (192, 768, 0), (192, 384, 210), (192, 768, 290), (96, 96, 40)]]
    fit = fit_dispatch(rows)
    assert fit["layer_overhead_s"] == pytest.approx(layer, rel=1e-6)
    assert fit["expert_overhead_s"] == pytest.approx(expert, rel=1e-6)
    assert fit["miss_overhead_s"] == pytest.approx(miss, rel=1e-6)
    # A cost that comes out negative on a noisy machine is clamped: time is never given back.
    rows = [dict(r, outside_s=r["layer_steps"] * layer) for r in rows]
    rows[2]["outside_s"] *= 0.5
    assert min(fit_dispatch(rows).values()) >= 0


def _sim(hw, slots=6, policy="lru"):
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.run import simulate
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    trace = synthetic_trace(tiny_geometry(), num_requests=3, generated_tokens=12, seed=3)
    cfg = SimConfig(trace_path="t", policy=policy, hardware=hw, memory=MemoryConfig(expert_cache_slots=slots),
                    workload=WorkloadConfig(online=True))
    return simulate(trace, cfg).summary


def test_cpu_cost_terms_default_to_nothing_and_each_costs_time():
    from dataclasses import replace

    from finemoe.sim.costs import CostModel
    from finemoe.sim.hardware import PRESETS
    from finemoe.traces.synthetic import tiny_geometry

    base = PRESETS["rtx3090"]
    assert (base.expert_overhead_s, base.layer_overhead_s, base.miss_overhead_s) == (0.0, 0.0, 0.0)
    assert base.copy_compute_slowdown == 1.0 and base.compute_copy_slowdown == 1.0 and base.copy_start_delay_s == 0
    g = tiny_geometry()
    plain, extra = CostModel(base, g), CostModel(replace(base, expert_overhead_s=7e-6, layer_overhead_s=3e-6), g)
    assert extra.expert_compute_s(4) == pytest.approx(plain.expert_compute_s(4) + 7e-6, abs=1e-15)
    assert extra.dense_layer_s(1, 10) == pytest.approx(plain.dense_layer_s(1, 10) + 3e-6, abs=1e-15)
    # Copies about as long as compute, so that they overlap it.
    hw = replace(base, kernel_launch_s=20e-6)
    ref = _sim(hw)
    assert ref["hit_rate"] < 1
    for field, value in (("copy_compute_slowdown", 2.0), ("compute_copy_slowdown", 2.0), ("copy_start_delay_s", 30e-6)):
        got = _sim(replace(hw, **{field: value}))
        assert got["hit_rate"] == ref["hit_rate"], field  # a demand-only policy: timing moves no decision
        assert got["makespan_s"] > ref["makespan_s"], field
    # Host time per miss delays compute; on a fast link (little to hide it under) by up to its sum.
    fast = _sim(base)
    got = _sim(replace(base, miss_overhead_s=20e-6))
    assert fast["misses"] > 0
    assert fast["makespan_s"] < got["makespan_s"] <= fast["makespan_s"] + fast["misses"] * 20e-6 + 1e-12
    # With every expert resident nothing is copied: only the per-layer and per-expert terms count.
    allres = _sim(hw, slots=32)
    assert _sim(replace(hw, miss_overhead_s=1e-3, copy_compute_slowdown=3.0, compute_copy_slowdown=3.0,
                        copy_start_delay_s=1e-3), slots=32)["makespan_s"] == allres["makespan_s"]


def test_cpu_copy_engines_capped_at_the_copy_cores():
    """On a CPU, the 5% rule may pick two engines from noise; with one core for copy threads there
    is one engine (two threads on one core only take turns)."""
    link = [{"bytes": b, "time_s": 1e-5 + b / 5e9} for b in (2**16, 2**20, 2**24)]
    overlap = [{"engines": 1, "aggregate_gbps": 5.0}, {"engines": 2, "aggregate_gbps": 5.5}]
    shape = ExpertShape(64, 128)
    experts = [{"tokens": n, "time_s": 1e-4 * n} for n in (1, 2, 4, 16, 64, 256)]
    args = ("t", "cpu", 10**10, link, overlap, experts, shape, 2, 1e-5, 80.0, 40e12)
    assert fit_hardware(*args)[0].copy_engines == 2
    assert fit_hardware(*args, copy_cores=1)[0].copy_engines == 1
    assert fit_hardware(*("t", "cuda", *args[2:]), copy_cores=1)[0].copy_engines == 2  # hardware engines
    # With a lane timed back to back (CPU), the link is the lane's, not the line or the aggregate.
    lane = {"bytes": 1 << 20, "copies": 200, "copy_s": 2.5e-4, "gap_s": 4e-5, "gbps": (1 << 20) / 2.5e-4 / 1e9}
    hw = fit_hardware(*args, lane=lane)[0]
    assert hw.copy_engines == 2 and hw.transfer_latency_s == 4e-5
    assert hw.link_bytes_per_s == pytest.approx((1 << 20) / 2.5e-4)


def test_lane_times_back_to_back_copies_of_one_size():
    from finemoe.replay.calibrate import measure_lane

    r = measure_lane("cpu", 1 << 16, 1 << 20, 1 << 18, copies=20)
    assert r["copies"] == 20 and r["bytes"] == 1 << 16
    assert 0 < r["copy_s"] < 0.1 and 0 <= r["gap_s"] < 0.1
    assert r["gbps"] == pytest.approx((1 << 16) / r["copy_s"] / 1e9)


@pytest.mark.parametrize("enough_s, n, expected", [(float("inf"), 512, 512), (0.0, 512, 256), (0.0, 128, 128)])
def test_peak_gemm_grows_only_while_a_gemm_is_short(monkeypatch, enough_s, n, expected):
    """The square GEMM doubles from 256 towards the plan's size only while one GEMM is quicker than
    the threshold: a dtype without fast hardware is measured small instead of for tens of seconds."""
    import finemoe.replay.calibrate as cal

    monkeypatch.setattr(cal, "PEAK_GEMM_ENOUGH_S", enough_s)
    size, flops = cal.measure_peak_flops("cpu", "float32", n, 3)
    assert size == expected and flops > 0
