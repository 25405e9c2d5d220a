"""`finemoe validate`'s mechanics on small inputs: what it records, counts and writes. Its figures
are measurements of this machine and are never checked against a threshold here."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.replay.compare import COMPARE_METRICS
from finemoe.replay.validate import Case, CaseResult, summarise, verdict
from finemoe.sim.config import SimConfig
from finemoe.sim.hardware import PRESETS
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


@pytest.fixture
def trace_file(tmp_path):
    h, i = 32, 64
    g = tiny_geometry(num_layers=2, num_experts=8, hidden_size=h, expert_intermediate_size=i, dtype="float32",
                      bytes_per_expert=3 * h * i * 4, dense_bytes=4 * h * h * 4 * 2, kv_bytes_per_token=4 * 2 * h * 4)
    return str(write_trace(synthetic_trace(g, num_requests=4, prompt_tokens=4, generated_tokens=4, seed=1),
                           tmp_path / "t.parquet"))


def run(*args):
    return CliRunner().invoke(cli, ["validate", *args])


def test_validate_counts_its_rounds_and_writes_the_report(tmp_path, trace_file):
    out = tmp_path / "v.json"
    res = run(trace_file, "--policy", "lru,lfu", "--rounds", "2", "--expert-cache", "6", "--hardware", "rtx3090",
              "-o", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report) >= {"version", "started_utc", "load_average", "configuration", "cases", "verdict"}
    assert len(report["load_average"]["start"]) == 3 and len(report["load_average"]["end"]) == 3
    assert set(report["cases"]) == {"t/lru", "t/lfu"}
    conf = report["configuration"]
    assert conf["rounds"] == 2 and conf["hardware"] == "rtx3090" and conf["policies"] == ["lru", "lfu"]
    assert [c["sim_config"]["policy"] for c in conf["cases"]] == ["lru", "lfu"]
    assert conf["cases"][0]["sim_config"]["memory"]["expert_cache_slots"] == 6
    for case in report["cases"].values():
        assert case["rounds"] == 2 and len(case["replay_s"]) == 2
        assert set(case["metrics"]) == {m for m, _, _ in COMPARE_METRICS}
        tpot = case["metrics"]["tpot_p50_s"]
        assert len(tpot["errors"]) == 2 and tpot["error_min"] <= tpot["error_median"] <= tpot["error_max"]
    # One progress line per replay on stderr, the table and the verdict on stdout.
    assert res.output.count("] round ") == 4 and "[4/4]" in res.output
    assert "time per output token p50" in res.output and "load average" in res.output and "verdict: " in res.output
    assert report["verdict"]["text"] in res.output


def test_validate_json_on_stdout(tmp_path, trace_file):
    out = tmp_path / "v.json"
    res = CliRunner().invoke(cli, ["validate", trace_file, "--policy", "lru", "--rounds", "1",
                                                   "--expert-cache", "6", "--hardware", "rtx3090", "--json",
                                                   "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed["cases"]["t/lru"]["rounds"] == 1 and printed == json.loads(out.read_text())
    assert "[1/1]" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds"),
    (["--policy", "nope"], "unknown policy"),
    (["--tolerance", "0"], "--tolerance"),
    (["--policy", ","], "--policy"),
])
def test_validate_bad_input_is_one_line_and_writes_nothing(tmp_path, trace_file, args, message):
    out = tmp_path / "v.json"
    res = run(trace_file, "--hardware", "rtx3090", "--expert-cache", "6", "-o", str(out), *args)
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_validate_an_unwritable_report_is_one_line(tmp_path, trace_file, monkeypatch):
    """The disk fills while the report is written: one sentence, no report, no temporary left."""
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "v.json"
    res = run(trace_file, "--policy", "lru", "--rounds", "1", "--hardware", "rtx3090", "--expert-cache", "6",
              "-o", str(out))
    monkeypatch.setattr(os, "write", real_write)
    assert res.exit_code == 1, res.output
    assert "no space left" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [tmp_path / "t.parquet"]


def _result(errors: list[float], hit_gaps: list[float]) -> CaseResult:
    cfg = SimConfig(trace_path="t", policy="lru", hardware=PRESETS["rtx3090"])
    res = CaseResult(Case("c", None, cfg, {}))
    for e, g in zip(errors, hit_gaps, strict=True):
        res.rounds.append({
            "tpot_p50_s": {"label": "time per output token p50", "kind": "time", "replay": 1.0, "sim": 1 + e,
                           "error": e},
            "hit_rate": {"label": "expert hit rate", "kind": "rate", "replay": 0.5, "sim": 0.5, "error": g},
        })
    return res


def test_summarise_takes_medians_and_ranges_over_the_rounds():
    s = summarise(_result([0.10, -0.20, 0.05], [1.0, 3.0, 2.0]))
    assert s["tpot_p50_s"]["error_median"] == pytest.approx(0.05)
    assert (s["tpot_p50_s"]["error_min"], s["tpot_p50_s"]["error_max"]) == (-0.20, 0.10)
    assert s["tpot_p50_s"]["sim_median"] == pytest.approx(1.05) and s["tpot_p50_s"]["replay_median"] == 1.0
    assert s["hit_rate"]["error_median"] == 2.0 and s["hit_rate"]["kind"] == "rate"
    nan = summarise(_result([math.nan, math.nan], [0.0, 0.0]))["tpot_p50_s"]
    assert nan["error_median"] is None and nan["errors"] == [None, None]


def test_verdict_names_the_configurations_outside_the_tolerance():
    inside = {"a": summarise(_result([0.1, 0.12], [0, 0]))}
    got = verdict(inside, 0.15)
    assert got["within"] and got["text"].startswith("within 15% on TPOT p50")
    both = inside | {"b": summarise(_result([-0.3, -0.2], [0, 0]))}
    got = verdict(both, 0.15)
    assert not got["within"] and got["outside"] == ["b"] and "outside 15%" in got["text"] and "b (-25.0%)" in got["text"]
