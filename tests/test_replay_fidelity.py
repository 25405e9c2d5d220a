"""Fidelity: calibrate this machine, replay a configuration for real, simulate the same one with the
calibrated profile, and compare (what `finemoe replay --compare` does).

Hit rates must agree within 2 points (the policy and cache code are the same, only timing differs;
measured after the CPU cost terms: LRU 0-0.8, FineMoE 0.3-1.4 points, where FineMoE reached 3.0
before). Time per output token is asserted within a factor of 2.5: with the replayer's own costs
and the copy/compute interference calibrated, the measured sim/replay ratios were 0.74 to 0.98 with
the final code (load average 3.3-3.9) and 0.57 to 1.22 with earlier versions of the terms (load
1.8-2.9), on this 2-core machine shared with six other jobs (docs/replay.md), whose speed changes
2-3x within a minute; 15% is met in most runs here, not reliably.
"""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.replay.executor import ReplayOptions
from finemoe.replay.run import prepare_trace, run_replay
from finemoe.results import read_result
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS

TPOT_FACTOR = 2.5
HIT_POINTS = {"lru": 2.0, "finemoe": 2.0}


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    """A trace collected from the embedded demo model (real learned routing) over ShareGPT prompts."""
    out = tmp_path_factory.mktemp("demo") / "demo.parquet"
    res = CliRunner().invoke(cli, ["collect", "--limit", "6", "--max-new-tokens", "24", "--batch-size", "6",
                                   "--threads", "1", "--quiet", "-o", str(out)])
    assert res.exit_code == 0, res.output
    from finemoe.traces.io import read_trace

    return read_trace(out)


def check(outcome, points: float) -> dict:
    rows = {r["metric"]: r for r in outcome.rows}
    hit = rows["hit_rate"]
    assert abs(hit["error"]) <= points, f"hit rates differ by {hit['error']:.2f} points"
    tpot = rows["tpot_p50_s"]
    ratio = tpot["sim"] / tpot["replay"]
    assert math.isfinite(ratio) and 1 / TPOT_FACTOR <= ratio <= TPOT_FACTOR, f"sim/replay TPOT = {ratio:.2f}"
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "finemoe"])
def test_demo_model_trace_fidelity(tmp_path, policy, demo_trace):
    trace = demo_trace
    # Experts scaled up x4 (0.6 MB each in bf16) so that kernels, not dispatch, dominate a step.
    trace = prepare_trace(trace, model_profile=None, expert_scale=4.0, dtype="bfloat16")
    cfg = SimConfig(trace_path="demo", policy=policy, hardware=PRESETS["rtx3090"],
                    memory=MemoryConfig(expert_cache_slots=20), workload=WorkloadConfig())
    out = run_replay(trace, cfg, ReplayOptions(), hardware=None, compare=True, out_dir=tmp_path)
    check(out, HIT_POINTS[policy])
    rep = read_result(next(tmp_path.glob("replay-*.parquet")))
    assert rep.config["hardware"]["name"].startswith("cpu-")  # simulated with the calibrated profile
    assert rep.summary["sim_hit_rate"] == out.simulated.summary["hit_rate"]


@pytest.mark.slow
@pytest.mark.shared
def test_real_mixtral_trace_scaled_fidelity(tmp_path, mixtral_logs):
    trace_path = tmp_path / "gsm8k.parquet"
    res = CliRunner().invoke(cli, ["import", str(mixtral_logs / "gsm8k_2_routing.jsonl"), "--model-profile",
                                   "mixtral-8x7b", "-o", str(trace_path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [
        "replay", str(trace_path), "--policy", "lru", "--expert-cache", "96", "--expert-scale", "0.05",
        "--history-fraction", "0.5", "--compare", "-o", str(tmp_path / "res"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "time per output token p50" in res.output
    rep = read_result(next((tmp_path / "res").glob("replay-*.parquet")))
    sim = read_result(next((tmp_path / "res").glob("sim-*.parquet")))
    assert rep.config["geometry"]["hidden_size"] == 205 and sim.config["geometry"] == rep.config["geometry"]
    assert abs(rep.summary["hit_rate"] - sim.summary["hit_rate"]) <= 0.02
    ratio = sim.summary["tpot_p50_s"] / rep.summary["tpot_p50_s"]
    assert 1 / TPOT_FACTOR <= ratio <= TPOT_FACTOR, f"sim/replay TPOT = {ratio:.2f}"
