"""Calibration: the fits recover known parameters, a quick CPU calibration writes a profile that the
simulator reads, and the CLI reports bad input as one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.replay.calibrate import (
    calibrate,
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
    path = write_profile(profile, tmp_path / "p.json")
    assert load_hardware(str(path)) == hw
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # atomic: no temporary left behind


def test_cli_calibrate_writes_profile(tmp_path):
    out = tmp_path / "cpu.json"
    res = CliRunner().invoke(cli, ["calibrate", "--device", "cpu", "-o", str(out), "--hidden-size", "128",
                                   "--intermediate-size", "256"])
    assert res.exit_code == 0, res.output
    assert "host->device" in res.output and "wrote" in res.output
    data = json.loads(out.read_text())
    assert set(data) == {"hardware", "measurements"}
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
