"""`finemoe demo`: the whole pipeline end to end (reduced), and its folder handling."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli


def test_cache_slots_span_the_range_without_reaching_all_experts():
    from finemoe.cli.demo import cache_slots

    assert cache_slots(64, 2, (0.125, 0.25, 0.5, 0.75)) == [8, 16, 32, 48]
    assert cache_slots(8, 2, (0.01, 0.5, 1.0)) == [2, 4]  # at least top-k; all experts is no-offload's
    assert cache_slots(4, 2, (0.9,)) == [3]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "not written by finemoe demo" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_prepare_replaces_only_the_demo_s_own_files(tmp_path):
    from finemoe.cli.demo import MARKER, prepare_out_dir

    (tmp_path / MARKER).write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.parquet").write_text("stale")
    (tmp_path / "notes.txt").write_text("the user's")
    prepare_out_dir(tmp_path)
    assert not (tmp_path / "results").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's"


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for stage in ("[1/6] collect", "[2/6] simulate", "[3/6] replay", "[4/6] plan", "[5/6] plot", "[6/6] report"):
        assert stage in result.output
    assert "run " in result.output and "llama.cpp's way" in result.output  # the plan's recommendation
    made = json.loads((out / "demo.json").read_text())
    from finemoe.results import read_result
    from finemoe.traces.io import read_trace

    trace = read_trace(out / "trace.parquet")
    assert len(trace.requests) == made["plan"]["prompts"]
    assert trace.router_probs is not None and trace.semantic_key is not None
    assert trace.metadata["source"]["kind"] == "collect"
    assert trace.metadata["collector"]["prompts"] == "sharegpt"
    assert trace.geometry.model_name == "finemoe-demo-moe"
    engines = {read_result(p).config["engine"] for p in (out / "results").glob("*.parquet")}
    assert engines == {"sim", "replay"}
    figures = {f.rsplit("/", 1)[-1] for f in made["figures"]}
    assert figures >= {"latency_memory.png", "hit_rate_memory.png", "latency_bars.png", "routing_entropy.png",
                       "sim_vs_replay.png", "engine_timeline.png", "prefetch_distance.png"}
    html = (out / "report.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", html)) == len(made["figures"]) + 1  # and the plan's
    assert "Plan: what to run" in html
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["recommendation"]["strategy"] in html
    assert set(made["timings_s"]) >= {"collect", "simulate", "replay", "plan", "plot", "report"}  # (times: not asserted)
