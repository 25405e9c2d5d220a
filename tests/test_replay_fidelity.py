"""Fidelity: calibrate this machine, replay a configuration for real, simulate the same one with the
calibrated profile, and compare (what `finemoe replay --compare` does).

Hit rates must agree within 2 points (the policy and cache code are the same, only timing differs).
On the demo trace the test replays three times and checks the median gap: on this 2-core machine,
shared with other jobs, one replay in ten of FineMoE's configuration measured a gap above 2 points
at load average 2.1-2.7 (+2.3, against a mean of 0.85; docs/replay.md), always in a run whose
calibration picked one copy engine instead of two, so a single replay tests the machine's load as
much as the simulator. Time per output token is asserted within a factor of 2.5: the measured
simulation errors are -16% to -36% on this machine (docs/replay.md), beyond the issue's 15%, which
is why that goal stays open.
"""

from __future__ import annotations

import math
import statistics

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
REPLAYS = 3  # per configuration of the demo trace; the median is checked


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    """A trace collected from the embedded demo model (real learned routing) over ShareGPT prompts."""
    out = tmp_path_factory.mktemp("demo") / "demo.parquet"
    res = CliRunner().invoke(cli, ["collect", "--limit", "6", "--max-new-tokens", "24", "--batch-size", "6",
                                   "--threads", "1", "--quiet", "-o", str(out)])
    assert res.exit_code == 0, res.output
    from finemoe.traces.io import read_trace

    return read_trace(out)


def check(outcomes, points: float) -> None:
    """The median over replays of the hit-rate gap (points) and of the sim/replay TPOT ratio."""
    rows = [{r["metric"]: r for r in o.rows} for o in outcomes]
    gaps = [r["hit_rate"]["error"] for r in rows]
    gap = statistics.median(gaps)
    assert abs(gap) <= points, f"hit rates differ by {gap:.2f} points (median of {[round(g, 2) for g in gaps]})"
    ratio = statistics.median(r["tpot_p50_s"]["sim"] / r["tpot_p50_s"]["replay"] for r in rows)
    assert math.isfinite(ratio) and 1 / TPOT_FACTOR <= ratio <= TPOT_FACTOR, f"sim/replay TPOT = {ratio:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["lru", "finemoe"])
def test_demo_model_trace_fidelity(tmp_path, policy, demo_trace):
    trace = demo_trace
    # Experts scaled up x4 (2.4 MB each in bf16) so that kernels, not dispatch, dominate a step.
    trace = prepare_trace(trace, model_profile=None, expert_scale=4.0, dtype="bfloat16")
    cfg = SimConfig(trace_path="demo", policy=policy, hardware=PRESETS["rtx3090"],
                    memory=MemoryConfig(expert_cache_slots=20), workload=WorkloadConfig())
    outcomes = [run_replay(trace, cfg, ReplayOptions(), hardware=None, compare=True, out_dir=tmp_path / str(i))
                for i in range(REPLAYS)]
    check(outcomes, HIT_POINTS[policy])
    rep = read_result(next((tmp_path / "0").glob("replay-*.parquet")))
    assert rep.config["hardware"]["name"].startswith("cpu-")  # simulated with the calibrated profile
    assert rep.summary["sim_hit_rate"] == outcomes[0].simulated.summary["hit_rate"]


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
