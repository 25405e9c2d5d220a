"""`finemoe plan` end to end, its runtime settings, and its checks on the real Mixtral logs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.plan.runtimes import layer_regex, settings
from finemoe.plan.strategies import by_name


def _plan(*args):
    res = CliRunner().invoke(cli, ["plan", *map(str, args)])
    return res


@pytest.fixture
def syn_path(small_trace, tmp_path):
    from finemoe.traces.io import write_trace

    return write_trace(small_trace, tmp_path / "syn.parquet")


def test_plan_recommends_the_fastest_simulated_strategy(syn_path, tmp_path):
    out = tmp_path / "plan"
    res = _plan(syn_path, "--gpu-mem", "4M", "--reserve", "0", "-o", out, "-q", "--json", "--oracle", "budget")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan == json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").is_file() and (out / "plan.svg").is_file()
    rec = plan["recommendation"]
    at = [p for p in plan["points"] if p["budget"] == 4 * 2**20]
    ranked = [p for p in at if p["source"] in ("simulated", "exact")]
    assert rec["tpot_p50_s"] == min(p["tpot_p50_s"] for p in ranked)
    leader = next(p for p in at if p["strategy"] == rec["strategy"])
    assert leader["source"] == "simulated" and (out / "results" / rec["result"]).is_file()
    assert rec["runner_up"]["tpot_p50_s"] >= rec["tpot_p50_s"]
    # away from the budget nothing is simulated by default; the costly strategies only with --thorough
    assert all(p["source"] != "simulated" for p in plan["points"] if p["budget"] != 4 * 2**20)
    assert not {"cost-aware", "finemoe"} & {s["name"] for s in plan["strategies"]}
    # the bound holds for every copy-on-miss strategy simulated, at every budget that has one
    bound = {b["budget"]: b["bound_tpot_p50_s"] for b in plan["brackets"]}
    assert bound[4 * 2**20] is not None and sum(v is not None for v in bound.values()) <= 5
    for p in plan["points"]:
        if p["family"] == "copy" and p["source"] == "simulated" and bound[p["budget"]] is not None:
            assert p["tpot_p50_s"] >= bound[p["budget"]] * (1 - 1e-9), p
    oracle = next(b for b in plan["brackets"] if b["budget"] == 4 * 2**20)["oracle_tpot_p50_s"]
    assert oracle >= bound[4 * 2**20] * (1 - 1e-9)
    assert {p["source"] for p in plan["points"]} <= {"simulated", "exact", "estimated"}
    assert plan["request"]["seed"] == 0 and plan["request"]["hardware"]["name"] == "rtx3090"


def test_exact_points_are_the_simulators_numbers(syn_path, tmp_path):
    """With --confirm-everywhere and a wide margin every strategy is simulated at every budget, so
    each point the plan calls exact can be checked against its simulation."""
    res = _plan(syn_path, "--curve", "2M,3M,4M", "--gpu-mem", "3M", "--reserve", "0", "-o", tmp_path / "p", "-q",
                "--json", "--confirm-everywhere", "--margin", "9", "--thorough", "-j", "1")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert {"cost-aware", "finemoe", "arc", "slru", "least-stale", "moe-infinity"} <= {s["name"] for s in plan["strategies"]}
    assert not {"oracle", "no-offload", "finemoe-topk"} & {s["name"] for s in plan["strategies"]}
    checked = 0
    for p in plan["points"]:
        e, sim = p["estimate"], p["simulated"]
        assert sim is not None, p  # everything confirmed
        if e and by_name(p["strategy"]).exact and e["ran_gpu_copied"] == 0:
            assert e["tpot_p50_s"] == pytest.approx(sim["tpot_p50_s"], rel=1e-6), p
            assert e["ttft_p50_s"] == pytest.approx(sim["ttft_p50_s"], rel=1e-6), p
            checked += 1
    assert checked >= 9  # static first, last and hot and cpu-all at three budgets at least


def test_plan_text_names_the_settings(syn_path, tmp_path):
    res = _plan(syn_path, "--gpu-mem", "4M", "--reserve", "0", "-o", tmp_path / "p", "-q",
                "--strategy", "static first,lru,stream first")
    assert res.exit_code == 0, res.output
    assert "Settings for" in res.output and "finemoe replay" in res.output
    assert "--n-cpu-moe" in res.output and "--cpu-offload-gb" in res.output
    assert "lower bound (copy-on-miss)" in res.output


@pytest.mark.parametrize("args, message", [
    (["--gpu-mem", "24Q"], "--gpu-mem"),
    (["--model-profile", "mixtral-8x7b", "--model-config", "x.json"], "one of --model-profile"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--model-profile", "qwen3-30b-a3b"], "cannot project"),
    (["--expert-dtype", "int3"], "unknown expert dtype"),
    (["--hardware", "nope"], "nope"),
])
def test_bad_input_is_one_line(syn_path, tmp_path, args, message):
    res = _plan(syn_path, "-o", tmp_path / "p", "-q", *args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") and message in res.output and "Traceback" not in res.output


def test_report_with_a_plan_section(syn_path, tmp_path):
    out = tmp_path / "p"
    assert _plan(syn_path, "--gpu-mem", "4M", "--reserve", "0", "-o", out, "-q", "--strategy", "lru,cpu-all").exit_code == 0
    for name in ("r.html", "r.md"):
        res = CliRunner().invoke(cli, ["report", str(out / "results"), "--plan", str(out / "plan.json"),
                                       "-o", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        text = (tmp_path / name).read_text()
        assert "Plan: what to run" in text and "time per output token (ms)" in text and "Settings for" in text
    res = CliRunner().invoke(cli, ["report", str(out / "results"), "--plan", str(syn_path), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 1 and "not a plan.json" in res.output


def test_missing_trace(tmp_path):
    res = _plan(tmp_path / "absent.parquet", "-o", tmp_path / "p")
    assert res.exit_code == 1 and res.output.startswith("error: ") and "no such trace" in res.output
    assert not (tmp_path / "p").exists()  # nothing written


def test_list_strategies():
    res = _plan("x", "--list")
    assert res.exit_code == 0 and "static first" in res.output and "cache-cpu-miss" in res.output


def test_llama_cpp_settings_count_blocks():
    """--n-cpu-moe counts blocks from 0, dense ones included: DeepSeek-V3's first 3 are dense."""
    got = settings(by_name("static first"), cpu_layers=[0, 1], offloaded_bytes=0, trace="t", gpu_mem="24G",
                   hardware="rtx3090", moe_blocks=list(range(3, 61)))
    llama = next(r for r in got if r["runtime"] == "llama.cpp")
    assert llama["args"] == "-ngl 999 --n-cpu-moe 5"
    assert layer_regex([3, 4]) in llama["note"]
    last = settings(by_name("static last"), cpu_layers=[30, 31], offloaded_bytes=0, trace="t", gpu_mem="24G",
                    hardware="h")
    assert next(r for r in last if r["runtime"] == "llama.cpp")["args"] == \
        r'-ngl 999 -ot "blk\.(30|31)\.ffn_(up|down|gate)_exps=CPU"'
    stream = settings(by_name("stream first"), cpu_layers=[0, 1], offloaded_bytes=int(2.5 * 2**30), trace="t",
                      gpu_mem="24G", hardware="h")
    assert next(r for r in stream if r["runtime"] == "vLLM")["args"] == "--cpu-offload-gb 2.5"
    hot = settings(by_name("static hot"), cpu_layers=[], offloaded_bytes=0, trace="t", gpu_mem="24G", hardware="h")
    assert next(r for r in hot if r["runtime"] == "llama.cpp")["args"] is None
    assert next(r for r in hot if r["runtime"] == "finemoe replay")["args"].startswith("finemoe replay t --policy static")


def test_plan_from_a_gguf_index(syn_path, tmp_path):
    """A GGUF's exact bytes replace the trace's, and the -ot rules use its block numbers."""
    from tests.test_model_sources import write_gguf

    gguf = write_gguf(tmp_path / "m.gguf", blocks=5, experts=8, top_k=2, leading_dense=1)
    res = _plan(syn_path, "--model-gguf", gguf, "--gpu-mem", "300K", "--reserve", "0", "-o", tmp_path / "p", "-q",
                "--json", "--strategy", "static first,lru")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["geometry"]["bytes_per_expert"] == 3 * 64 * 128 // 32 * 18
    assert plan["model"] == "tiny-moe"
    best = plan["recommendation"]["best_per_runtime"]["llama.cpp"]["settings"]
    # n of the 4 MoE layers on the CPU are blocks 1..n (block 0 is dense), so --n-cpu-moe counts n + 1
    n = 4 - plan["recommendation"]["slots"] // 8
    assert 0 < n < 4
    assert best["args"] == f"-ngl 999 --n-cpu-moe {n + 1}"  # (lru: no llama.cpp setting)
    assert "blk\\.(" + "|".join(str(b) for b in range(1, n + 1)) + ")\\.ffn_(down|gate|up)_exps=CPU" in best["note"]


@pytest.mark.shared
def test_mixtral_plan_brackets_every_copy_strategy(mixtral_trace_path, tmp_path):
    """The real Mixtral logs at 24G with every strategy simulated at three budgets: bound <= oracle,
    bound <= every copy-on-miss strategy, the closed forms against the simulator, and the CPU
    strategies ahead (copying an expert costs 13.8 ms, computing it on the CPU 5.6 ms)."""
    res = _plan(mixtral_trace_path, "--model-profile", "mixtral-8x7b", "--gpu-mem", "24G", "--curve", "12G,24G,48G",
                "-o", tmp_path / "p", "-q", "--json", "-j", "1", "--oracle", "budget", "--confirm-everywhere",
                "--margin", "9")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    bracket = next(b for b in plan["brackets"] if b["budget"] == 24 * 2**30)
    assert bracket["bound_tpot_p50_s"] <= bracket["oracle_tpot_p50_s"]
    bound = {b["budget"]: b["bound_tpot_p50_s"] for b in plan["brackets"]}
    for p in plan["points"]:
        if p["family"] == "copy" and p["source"] == "simulated":
            assert p["tpot_p50_s"] >= bound[p["budget"]], p
    rec = plan["recommendation"]
    assert rec["family"] == "cpu" and not rec["bound_applies"]
    assert rec["runtime_defaults"]["llama.cpp"]["settings"]["args"] == "-ngl 999 --n-cpu-moe 25"
    assert rec["runtime_defaults"]["llama.cpp"]["speedup"] >= 1.0
    # the closed forms against the simulator at 24G: LRU to 3%, the static placements exactly
    for p in plan["points"]:
        if p["budget"] == 24 * 2**30 and p["strategy"] in ("lru", "static first", "static hot"):
            rel = 0.03 if p["strategy"] == "lru" else 1e-6
            assert p["estimate"]["tpot_p50_s"] == pytest.approx(p["simulated"]["tpot_p50_s"], rel=rel)


@pytest.mark.shared
def test_mixtral_default_plan_prints_the_recommendation(mixtral_trace_path, tmp_path):
    """The plan as a user runs it first (issue #20's check): the curve over 20+ budgets, the
    recommendation at 24G confirmed by a simulation, its llama.cpp and vLLM settings, the bound."""
    res = _plan(mixtral_trace_path, "--model-profile", "mixtral-8x7b", "--hardware", "rtx3090", "--cpu", "desktop-ddr5",
                "--gpu-mem", "24G", "-o", tmp_path / "p", "-q", "-j", "1")
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(plan["brackets"]) >= 20
    rec = plan["recommendation"]
    assert (tmp_path / "p" / "results" / rec["result"]).is_file()
    assert f"At 24G ({rec['slots']} expert slots): run {rec['strategy']}" in res.output
    assert "--n-cpu-moe 25" in res.output and "--cpu-offload-gb" in res.output
    assert "the lower bound (" in res.output and "lower bound (copy-on-miss)" in res.output
    assert rec["tpot_p50_s"] <= min(p["tpot_p50_s"] for p in plan["points"]
                                    if p["budget"] == 24 * 2**30 and p["source"] != "estimated")


def _routing_log(path, layers: int, experts: int, top_k: int, requests: int = 4, tokens: int = 12, seed: int = 0):
    """A routing log in the Mixtral logs' JSON Lines shape (one record per decode token and layer),
    skewed so that placement matters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = np.arange(experts, 0, -1, dtype=float) ** 1.5
    with open(path, "w") as f:
        for r in range(requests):
            for tok in range(tokens):
                for layer in range(layers):
                    chosen = rng.choice(experts, size=top_k, replace=False, p=weights / weights.sum())
                    probs = rng.dirichlet(np.ones(top_k))
                    f.write(json.dumps({"dataset": "syn", "problem_id": r, "layer": layer, "token_idx": tok,
                                        "experts": chosen.tolist(), "gating_probs": probs.tolist()}) + "\n")
    return path


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2",
                                  "deepseek_v3", "gpt_oss"])
def test_a_config_json_and_an_imported_log_give_a_plan(arch, tmp_path):
    """All a user has is the model's config.json and an engine's routing log: import it with the
    config's sizes, then plan with the same config, at a budget holding half of the experts."""
    pytest.importorskip("transformers")
    from finemoe.traces.model_config import profile_from_config
    from tests.test_model_sources import tiny_configs

    config = tiny_configs()[arch].to_dict()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    profile = profile_from_config(str(cfg))
    g = profile.geometry()
    log = _routing_log(tmp_path / "log.jsonl", g.num_layers, g.num_experts, g.top_k)
    trace = tmp_path / "t.parquet"
    res = CliRunner().invoke(cli, ["import", str(log), "--model-config", str(cfg), "--prompt-tokens", "6",
                                   "-o", str(trace)])
    assert res.exit_code == 0, res.output
    from dataclasses import replace

    from finemoe.sim.config import MemoryConfig, SimConfig
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.memory import plan_for_config
    from finemoe.traces.io import read_trace

    t = read_trace(trace)
    assert t.geometry == g  # the log took the config's sizes
    probe = plan_for_config(g, t.requests, SimConfig(str(trace), "lru", load_hardware("rtx3090"),
                                                     memory=replace(MemoryConfig(), gpu_mem_bytes=2**62,
                                                                    reserve_bytes=0)))
    budget = probe.dense_bytes + probe.kv_bytes + (g.num_layers * g.num_experts // 2) * g.bytes_per_expert
    res = _plan(trace, "--model-config", cfg, "--gpu-mem", budget, "--reserve", "0", "-o", tmp_path / "p", "-q",
                "--json", "-j", "1")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["geometry"]["num_layers"] == g.num_layers and plan["geometry"]["bytes_per_expert"] == g.bytes_per_expert
    assert plan["model"] == profile.name
    rec = plan["recommendation"]
    assert 0 < rec["slots"] < g.num_layers * g.num_experts and rec["tpot_p50_s"] > 0
    assert (tmp_path / "p" / "results" / rec["result"]).is_file()
    # llama.cpp's --n-cpu-moe N puts blocks 0..N-1 on the CPU: DeepSeek's first block is dense, so
    # its first n MoE layers are blocks 1..n and N = n + 1
    n = g.num_layers - rec["slots"] // g.num_experts
    llama = rec["runtime_defaults"]["llama.cpp"]["settings"]["args"]
    assert llama == f"-ngl 999 --n-cpu-moe {list(profile.moe_blocks)[n - 1] + 1}"


def test_import_takes_one_model_source(tmp_path):
    log = _routing_log(tmp_path / "log.jsonl", 2, 4, 2, requests=1, tokens=2)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mixtral"}))
    res = CliRunner().invoke(cli, ["import", str(log), "--model-config", str(cfg), "--model-profile", "mixtral-8x7b",
                                   "-o", str(tmp_path / "t.parquet")])
    assert res.exit_code == 1 and "give one of --model-profile, --model-config" in res.output
    res = CliRunner().invoke(cli, ["import", str(log), "--model-config", str(cfg), "-o", str(tmp_path / "t.parquet")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "Traceback" not in res.output
    assert not (tmp_path / "t.parquet").exists()


def test_a_plan_that_fails_after_its_simulations_keeps_them(syn_path, tmp_path, monkeypatch):
    def full_disk(plan, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("finemoe.plots.plan.plan_figure", full_disk)
    out = tmp_path / "p"
    res = _plan(syn_path, "--gpu-mem", "4M", "--reserve", "0", "-o", out, "-q")
    assert res.exit_code == 1 and res.output.startswith("error: ") and "space" in res.output, res.output
    assert list((out / "results").glob("*.parquet")), "the finished simulations were removed"


def test_plan_faults_are_one_line_and_leave_nothing(small_trace, tmp_path):
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace

    syn = write_trace(small_trace, tmp_path / "syn.parquet")
    out = tmp_path / "p"
    for args, message in [(["--gpu-mem", "1K"], "cannot hold"), (["--curve", "nope"], "--curve"),
                          (["--strategy", "static hot", "--history-fraction", "0"], "learns from the history")]:
        res = _plan(syn, "--reserve", "0", "-o", out, "-q", *args)
        assert res.exit_code == 1 and res.output.startswith("error: ") and message in res.output, res.output
        assert not out.exists(), args  # a failed plan leaves no folder behind
    prompts_only = write_trace(synthetic_trace(small_trace.geometry, num_requests=4, generated_tokens=(0, 0), seed=1),
                               tmp_path / "prefill.parquet")
    res = _plan(prompts_only, "--gpu-mem", "4M", "--reserve", "0", "-o", out, "-q")
    assert res.exit_code == 1 and "no decode steps" in res.output and not out.exists(), res.output
