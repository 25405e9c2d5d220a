"""One convention and one check for the options every command shares (issue #16, items 5 and 6):
each bad value is one `error:` line, exit code 1, no traceback and no work started; simulate
--json; calibrate's fit warning; train-demo-model's refusal of the package folder; the entropy
figure found from results that spell their trace differently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("options") / "syn.parquet"
    write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=3), path)
    return path


@pytest.fixture(scope="module")
def bad_profiles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("profiles")
    binary = folder / "binary.json"
    binary.write_bytes(bytes(range(256)) * 4)  # not UTF-8
    other = folder / "other.json"
    other.write_text(json.dumps({"model": "mixtral", "layers": 32}))
    listed = folder / "list.json"
    listed.write_text("[1, 2, 3]")
    nan = folder / "nan.json"
    nan.write_text(json.dumps({"name": "x", "gpu_mem_bytes": 2**34, "flops": 1e12, "hbm_gbps": float("nan"),
                               "pcie_gbps": 16.0}))
    return {"binary": binary, "other": other, "list": listed, "nan": nan}


def run(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_error(result, words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert words in lines[0], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- replay: every bad option refused before the trace is even prepared ------------------------


@pytest.mark.parametrize("args, words", [
    (["--expert-cache", "8", "--seed", "-1"], "--seed must be 0 or more"),
    (["--gpu-mem", ""], "--gpu-mem: invalid memory size ''"),
    (["--gpu-mem", "24Q"], "--gpu-mem: invalid memory size '24Q'"),
    (["--gpu-mem", "80G"], "--gpu-mem 80 GiB is more than the 24 GiB of memory rtx3090 has"),
    (["--gpu-mem", "2G", "--expert-cache", "8"], "not both"),
    (["--gpu-mem", "1M"], "budget cannot hold"),
    (["--expert-cache", "8", "--threads", "0"], "--threads must be at least 1"),
    (["--expert-cache", "8", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--expert-cache", "8", "--expert-scale", "nan"], "--expert-scale must be a finite positive number"),
    (["--expert-cache", "8", "--reserve", "-1G"], "--reserve: invalid memory size"),
])
def test_replay_bad_options(tmp_path, trace_file, args, words, monkeypatch):
    from finemoe.replay import run as replay_run

    monkeypatch.setattr(replay_run, "replay", lambda *a, **k: pytest.fail("the replay started"))
    out = tmp_path / "r"
    assert_one_error(run("replay", trace_file, "--policy", "lru", "--hardware", "rtx3090", "-o", out, "-q", *args),
                     words)
    assert not out.exists()


@pytest.mark.parametrize("which, words", [
    ("binary", "is not a text file"),
    ("other", "lacks flops, gpu_mem_bytes, hbm_gbps, name, pcie_gbps"),
    ("list", "holds a JSON list, not a profile object"),
    ("nan", "hbm_gbps must be a finite number"),
])
def test_hardware_files_that_are_not_profiles(tmp_path, trace_file, bad_profiles, which, words):
    for command in (["replay", trace_file, "--policy", "lru", "--gpu-mem", "2G"],
                    ["simulate", trace_file, "--policy", "lru"]):
        out = tmp_path / command[0]
        assert_one_error(run(*command, "--hardware", bad_profiles[which], "-o", out, "-q"), words)
        assert not out.exists()


# --- simulate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--gpu-mem", ""], "--gpu-mem: no value given"),
    (["--gpu-mem", "24Q"], "--gpu-mem: invalid memory size '24Q'"),
    (["--reserve", ""], "--reserve: invalid memory size ''"),
    (["--seed", "-1"], "--seed: values must be at least 0"),
    (["--pcie-gbps", "-8"], "--pcie-gbps: values must be positive"),
    (["--pcie-gbps", "0"], "--pcie-gbps: values must be positive"),
    (["--hbm-gbps", "nan"], "--hbm-gbps: values must be finite numbers"),
    (["--pcie-gbps", "inf"], "--pcie-gbps: values must be finite numbers"),
    (["--pcie-gbps", "1e-300"], "pcie_gbps 1e-300 (times its efficiency) is below the slowest supported"),
    (["--transfer-latency-us", "1e300"], "transfer_latency_s must be between 0 and 3600 s"),
    (["--expert-cache", "0"], "--expert-cache: values must be at least 1"),
    # A budget below the dense weights: one line, and before anything runs (no sweep.json).
    (["--gpu-mem", "1M,24G"], "a 0.00 GB GPU budget cannot hold synthetic-4x8"),
])
def test_simulate_bad_options(tmp_path, trace_file, args, words):
    out = tmp_path / "res"
    assert_one_error(run("simulate", trace_file, "--policy", "lru", "-o", out, "-q", "--jobs", "1", *args), words)
    assert not out.exists()


def test_simulate_warns_once_for_a_budget_above_the_card(tmp_path, trace_file):
    res = CliRunner().invoke(cli, ["simulate", str(trace_file), "--policy", "lru,lfu", "--gpu-mem", "30G",
                                   "--dry-run", "-o", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --gpu-mem 30 GiB is more than the 24 GiB of memory rtx3090 has; "
                        "simulated as a card with that much memory"]


def test_simulate_json_rows(tmp_path, trace_file):
    res = CliRunner().invoke(cli, ["simulate", str(trace_file), "--policy", "lru,lfu", "--expert-cache", "4",
                                   "--jobs", "1", "--json", "-q", "-o", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert isinstance(rows, list) and sorted(r["policy"] for r in rows) == ["lfu", "lru"]
    for row in rows:
        for key in ("path", "hit_rate", "ttft_p50_s", "tpot_p50_s", "tpot_p99_s", "bytes_h2d", "stall_s",
                    "memory_plan.expert_cache_slots"):
            assert key in row, key
        assert row["memory_plan.expert_cache_slots"] == 4
        assert 0.0 <= row["hit_rate"] <= 1.0
        assert Path(row["path"]).is_file()


def test_old_spellings_still_parse_but_are_not_shown(tmp_path, trace_file):
    res = CliRunner().invoke(cli, ["simulate", str(trace_file), "--policy", "lru", "--expert-cache", "4",
                                   "--jobs", "1", "--out", str(tmp_path / "old"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "old").glob("lru-*.parquet"))
    for command in ("simulate", "replay", "plot", "report", "predict", "collect", "demo", "calibrate",
                    "train-demo-model"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "-o, --output" in help_text, command
        assert "--out " not in help_text and "--out," not in help_text and "--no-progress" not in help_text, command
    for command in ("simulate", "replay", "collect"):
        assert "-q, --quiet" in CliRunner().invoke(cli, [command, "--help"]).output, command


# --- the shared checks themselves ----------------------------------------------------------------


def test_size_option_value():
    from finemoe.cli.options import size_option_value

    assert size_option_value(None, "--gpu-mem") is None
    assert size_option_value("2G", "--gpu-mem") == 2 * 1024**3
    assert size_option_value("0", "--reserve", positive=False) == 0
    for text in ("", "24Q", "0"):
        with pytest.raises(ConfigError, match="--gpu-mem"):
            size_option_value(text, "--gpu-mem")


def test_budget_above_card():
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.memory import budget_above_card

    card = PRESETS["rtx3090"]
    assert budget_above_card(None, card) is None
    assert budget_above_card(24 * 1024**3, card) is None
    assert budget_above_card(80 * 1024**3, card) == "--gpu-mem 80 GiB is more than the 24 GiB of memory rtx3090 has"


@pytest.mark.parametrize("field, value, words", [
    ("pcie_gbps", 1e-300, "below the slowest supported"),
    ("pcie_gbps", float("inf"), "pcie_gbps must be a finite number"),
    ("copy_engines", 0, "copy_engines must be a whole number of at least 1"),
    ("gpu_mem_bytes", 2.5, "gpu_mem_bytes must be a whole number"),
    ("pcie_efficiency", 0.0, "pcie_efficiency is a fraction in (0, 1]"),
    ("kernel_launch_s", -1e-6, "kernel_launch_s must be between 0"),
    ("copy_compute_slowdown", 0.5, "slowdown factor between 1 and 1000"),
    ("flops", "71T", "flops must be a finite number"),
])
def test_hardware_fields_are_checked(field, value, words):
    from dataclasses import replace

    from finemoe.sim.hardware import PRESETS

    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        replace(PRESETS["rtx3090"], **{field: value})


# --- calibrate's warning -----------------------------------------------------------------------


def hand_made_profile(pcie_gbps: float, copy_gbps: list[float], rel_errors: list[float]) -> dict:
    """A profile as calibrate writes it, with made-up copies and residuals."""
    from finemoe.sim.hardware import PRESETS

    hw = PRESETS["rtx3090"].to_dict() | {"pcie_gbps": pcie_gbps, "pcie_efficiency": 1.0}
    copies = [{"bytes": 2**20 * (i + 1), "gbps": g, "time_s": 2**20 * (i + 1) / (g * 1e9)}
              for i, g in enumerate(copy_gbps)]
    residuals = [{"copy_bytes": 2**20, "measured_s": 1e-3, "model_s": 1e-3 * (1 + e), "rel_error": e}
                 for e in rel_errors]
    measurements = {"device": "cuda:0", "device_name": "hand-made", "dtype": "bfloat16", "cpu_threads": 1,
                    "plan": "quick", "duration_s": 1.0, "copy": {"pageable": copies, "pinned": copies},
                    "link_fit_from": "pinned", "copy_lane": None, "fit": {"residuals": residuals}}
    return {"hardware": hw, "measurements": measurements}


def test_fit_warnings_on_hand_made_measurements():
    from finemoe.replay.calibrate import fit_warnings

    # The case: 13.7 GB/s fitted from copies whose best was 5.4, a -88% residual.
    both = fit_warnings(hand_made_profile(13.7, [3.0, 5.4, 5.1], [0.02, -0.88]))
    assert both == ["the fitted host-to-device bandwidth 13.70 GB/s exceeds the best measured copy, 5.40 GB/s",
                    "the fit misses the 1048576-byte copy by -88% (limit 25%)"]
    assert fit_warnings(hand_made_profile(5.5, [3.0, 5.4], [0.1, -0.2])) == []  # within 10% and 25%
    assert len(fit_warnings(hand_made_profile(6.0, [5.4], [0.0]))) == 1  # 11% above the best copy
    assert fit_warnings(hand_made_profile(5.4, [5.4], [0.26]))[0].endswith("by +26% (limit 25%)")
    # A CPU profile's link comes from the copy lane (expert-sized copies back to back): said so.
    cpu = hand_made_profile(5.08, [3.01], [0.0])
    cpu["measurements"]["copy_lane"] = {"gbps": 5.08}
    assert fit_warnings(cpu) == ["the fitted host-to-device bandwidth 5.08 GB/s exceeds the best measured copy, "
                                 "3.01 GB/s (the link is the 5.08 GB/s of expert-sized copies back to back)"]


def test_calibrate_prints_one_warning_and_records_it(tmp_path, monkeypatch):
    from finemoe.replay import calibrate as calibrate_module

    profile = hand_made_profile(13.7, [5.4], [-0.88])
    expert_row = {"tokens": 1, "measured_s": 1e-4, "model_s": 1e-4, "rel_error": 0.0}
    profile["measurements"]["fit"]["residuals"].append(expert_row)
    profile["warnings"] = calibrate_module.fit_warnings(profile)
    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **k: profile)
    out = tmp_path / "gpu.json"
    res = CliRunner().invoke(cli, ["calibrate", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "13.70 GB/s exceeds the best measured copy, 5.40 GB/s" in warnings[0]
    assert "-88%" in warnings[0]
    assert json.loads(out.read_text())["warnings"] == profile["warnings"]


# --- train-demo-model ----------------------------------------------------------------------------


def test_train_demo_model_refuses_the_package_folder(tmp_path, monkeypatch):
    from finemoe.demo_model import train as train_module
    from finemoe.demo_model.model import demo_model_dir

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("training started"))
    shipped = demo_model_dir()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shipped.iterdir())
    for target in (shipped, shipped.parent, shipped / "sub"):
        res = CliRunner().invoke(cli, ["train-demo-model", "-o", str(target)])
        assert_one_error(res, "inside the package's own data folder")
        assert "--force" in res.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shipped.iterdir()) == before


def test_train_demo_model_writes_a_new_folder_here_by_default(tmp_path, monkeypatch):
    from finemoe.demo_model import train as train_module

    seen = {}

    def fake_train(cfg, out_dir, log):
        seen["out"] = out_dir
        return {"final": {"heldout_loss": 1.0, "usage_entropy_bits": [3.0], "mean_top1_prob": [0.8]},
                "train_time_s": 0.0}

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["train-demo-model", "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert seen["out"] == "demo-moe"


# --- plot: the entropy figure from the trace the results name --------------------------------------


def test_plot_draws_entropy_from_simulate_and_replay_results(tmp_path, trace_file, monkeypatch):
    """simulate records the trace resolved; a replay given a relative path must name the same file,
    and a result naming the trace relative to its own folder is found from anywhere."""
    from finemoe.results import read_result, write_result

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(trace_file, work / "t.parquet")
    monkeypatch.chdir(work)
    assert run("simulate", "t.parquet", "--policy", "lru", "--expert-cache", "8", "--jobs", "1", "-q",
               "-o", "res").exit_code == 0
    res = run("replay", "t.parquet", "--policy", "lru", "--expert-cache", "8", "--hardware", "rtx3090",
              "--threads", "1", "-q", "-o", "res/")
    assert res.exit_code == 0, res.output
    assert "wrote res/replay-" in res.output and "//" not in res.output  # the folder as typed, once
    # An older result recorded the path as typed, relative to where it ran (here: beside it).
    replayed = next(Path("res").glob("replay-*.parquet"))
    old = read_result(replayed)
    old.config["trace_path"] = "../t.parquet"
    write_result(old, replayed)
    monkeypatch.chdir(tmp_path)
    res = run("plot", work / "res", "-o", tmp_path / "figs", "--only", "routing_entropy")
    assert res.exit_code == 0, res.output
    assert "skipped" not in res.output and "routing_entropy" in res.output
    assert list((tmp_path / "figs").glob("routing_entropy*.png"))
