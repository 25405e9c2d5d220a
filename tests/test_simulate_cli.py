"""`finemoe simulate` end to end on a small synthetic trace: results, table, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.results import read_result, summary_frame
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "syn.parquet"
    write_trace(synthetic_trace(num_requests=6, generated_tokens=6, seed=2), path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gpu-mem", "24Q"], "error: --gpu-mem: invalid memory size '24Q'"),
        (["--expert-cache", "8:4:1"], "error: --expert-cache: range '8:4:1' ends before it starts"),
        (["--gpu-mem", "24G", "--expert-cache", "8"], "not both"),
        (["--policy", "lruu"], "error: unknown policy 'lruu'"),
        (["--policy", "finemoe", "--policy-param", "finemoe.distnce=3"], "unexpected keyword argument 'distnce'"),
        (["--policy-param", "distance=3"], "POLICY.NAME=VALUE"),
        (["--hardware", "rtx4090"], "error: unknown hardware 'rtx4090'"),
        (["--pcie-gbps", "fast"], "error: --pcie-gbps: 'fast' is not a valid value"),
        (["--pcie-efficiency", "1.5"], "efficiency is a fraction"),
        (["--arrival", "poisson"], "needs --rate"),
        (["--model-profile", "gpt-5"], "unknown model profile 'gpt-5'"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--executor", "local", "--ray-address", "auto"], "only to --executor ray"),
    ],
)
def test_bad_options_give_one_sentence_and_exit_1(trace_file, tmp_path, args, words):
    result = invoke("simulate", trace_file, "-o", tmp_path, "-q", *args)
    assert result.exit_code == 1, result.output
    assert words in result.output
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.parquet"))


def test_missing_or_foreign_trace(tmp_path):
    result = invoke("simulate", tmp_path / "nope.parquet", "-o", tmp_path)
    assert result.exit_code == 1 and "error: " in result.output and "no such trace file" in result.output
    foreign = tmp_path / "foreign.parquet"
    foreign.write_text("not parquet")
    result = invoke("simulate", foreign, "-o", tmp_path)
    assert result.exit_code == 1 and "not a readable Parquet file" in result.output


def test_dry_run_lists_the_product(trace_file, tmp_path):
    result = invoke("simulate", trace_file, "--policy", "lru,lfu", "--gpu-mem", "8G:24G:8G", "--pcie-gbps", "16,32",
                    "-o", tmp_path, "--dry-run")
    assert result.exit_code == 0, result.output
    names = [line for line in result.output.splitlines() if line.endswith(".parquet")]
    assert len(names) == 2 * 3 * 2 and len(set(names)) == 12
    assert sum(n.startswith("lru-16G-rtx3090-") for n in names) == 2
    assert "12 configuration(s)" in result.output and not list(tmp_path.iterdir())


def test_help_teaches(trace_file):
    result = invoke("simulate", "--help")
    assert result.exit_code == 0
    for words in ("Examples:", "8G:48G:4G", "--executor ray --ray-address auto", "Policies:", "rtx3090"):
        assert words in result.output


def test_sweep_end_to_end_with_table_and_resume(trace_file, tmp_path):
    args = ["simulate", trace_file, "--policy", "lru,lfu", "--expert-cache", "4,16", "--max-requests", "2",
            "-o", tmp_path, "--jobs", "1", "-q"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    files = sorted(tmp_path.glob("*.parquet"))
    assert len(files) == 4
    manifest = json.loads((tmp_path / "sweep.json").read_text())["configs"]
    assert sorted(e["file"] for e in manifest) == [f.name for f in files]
    header = next(line for line in first.output.splitlines() if line.startswith("policy"))
    for col in ("slots", "hit rate", "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "H2D GB", "D2H GB", "copied", "on cpu", "stall s"):
        assert col in header
    df = summary_frame(files)
    assert set(df["policy"]) == {"lru", "lfu"} and (df["hit_rate"].between(0, 1)).all()
    for f in files:
        r = read_result(f)
        assert r.config["memory"]["expert_cache_slots"] in (4, 16)
    bigger = df[df["memory.expert_cache_slots"] == 16].set_index("policy")["hit_rate"]
    smaller = df[df["memory.expert_cache_slots"] == 4].set_index("policy")["hit_rate"]
    assert (bigger >= smaller).all()  # a bigger cache never hurts LRU or LFU on the same requests
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = invoke(*args)
    assert again.exit_code == 0 and "4 already there" in again.output
    assert all(f.stat().st_mtime_ns == mtimes[f] for f in files)


def test_a_failed_configuration_is_listed_and_exits_1(trace_file, tmp_path):
    # no-offload needs every expert resident (32 here); 4 slots cannot hold them, so that
    # configuration fails while LRU runs and keeps its result.
    result = invoke("simulate", trace_file, "--policy", "lru,no-offload", "--expert-cache", "4",
                    "--max-requests", "1", "-o", tmp_path, "--jobs", "1", "-q")
    assert result.exit_code == 1, result.output
    assert "failed: no-offload 4 slots rtx3090" in result.output and "needs all 32 experts" in result.output
    assert "1 of 2 configuration(s) failed" in result.output
    assert len(list(tmp_path.glob("lru-*.parquet"))) == 1


def _summaries(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.parquet")):
        r = read_result(f)
        summary = {k: v for k, v in r.summary.items() if k not in ("wall_s", "layer_steps_per_wall_s")}
        # JSON text, so that NaN (e.g. TPOT of a one-token request) compares equal to NaN
        out[f.name] = json.dumps([summary, r.requests.to_dict("list"), r.per_layer_hit_rate], sort_keys=True)
    return out


def test_pool_gives_the_same_results_as_one_process(trace_file, tmp_path):
    common = ["simulate", trace_file, "--policy", "lru,finemoe", "--gpu-mem", "1500K,2M", "--reserve", "0",
              "--max-requests", "2", "-q"]
    one = invoke(*common, "--jobs", "1", "-o", tmp_path / "one")
    two = invoke(*common, "--jobs", "2", "-o", tmp_path / "two")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    a, b = _summaries(tmp_path / "one"), _summaries(tmp_path / "two")
    assert len(a) == 4 and a == b
    # the budget reached the simulator: 2M leaves more expert slots than 1500K
    df = summary_frame([tmp_path / "one"]).set_index(["policy", "memory.gpu_mem_bytes"])
    slots = df["memory_plan.expert_cache_slots"]
    assert (slots.xs(2 * 1024**2, level=1) > slots.xs(1500 * 1024, level=1)).all()
    assert "1500K" in one.output and "2M" in one.output


def test_hardware_override_and_model_profile_reach_the_results(tmp_path):
    from finemoe.traces.synthetic import tiny_geometry

    trace_file = tmp_path / "mixtral-shaped.parquet"  # projection keeps layers, experts and top-k
    write_trace(synthetic_trace(tiny_geometry(num_layers=32), num_requests=4, generated_tokens=4, seed=1),
                trace_file)
    result = invoke("simulate", trace_file, "--policy", "lru", "--expert-cache", "8", "--pcie-gbps", "8,64",
                    "--transfer-latency-us", "20", "--model-profile", "mixtral-8x7b", "--max-requests", "2",
                    "-o", tmp_path / "out", "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output
    assert "pcie GB/s" in result.output  # a varying axis gets a column
    df = summary_frame([tmp_path / "out"]).set_index("hardware.pcie_gbps")
    assert sorted(df.index) == [8.0, 64.0]
    assert (df["hardware.transfer_latency_s"] == 20e-6).all()
    assert (df["geometry.model_name"] == "mixtral-8x7b").all()
    assert df.loc[8.0, "stall_s"] > df.loc[64.0, "stall_s"]  # a slower link stalls longer


def test_a_swept_policy_parameter_gets_a_column(trace_file, tmp_path):
    result = invoke("simulate", trace_file, "--policy", "lru,finemoe", "--policy-param",
                    "finemoe.search_charge=exact,none", "--expert-cache", "8", "-o", tmp_path, "--jobs", "1",
                    "-q")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("policy"))
    assert "search_charge" in header.split()
    rows = [line.split() for line in result.output.splitlines() if line.startswith("finemoe ")]
    assert sorted(r[1] for r in rows) == ["exact", "none"]
    assert next(line for line in result.output.splitlines() if line.startswith("lru ")).split()[1] == "-"
