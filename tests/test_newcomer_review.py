"""Issue #16 review: bad input a newcomer or a hostile user types gets one `error:` line and exit 1,
checked before any work starts, and `-q/--quiet` where a command shows progress."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError


def _run(args: list[str]):
    return CliRunner().invoke(cli, args)


def _one_error(result, starts: str) -> str:
    """The single stderr line of a refused command (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {starts}"), lines[0]
    return lines[0]


@pytest.fixture
def trace_path(tmp_path) -> Path:
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace

    path = tmp_path / "t.parquet"
    write_trace(synthetic_trace(num_requests=6, generated_tokens=6, seed=2), path)
    return path


def test_a_value_clicks_type_refuses_is_one_error_line(tmp_path):
    line = _one_error(_run(["simulate", str(tmp_path / "t.parquet"), "--jobs", "abc"]), "Invalid value")
    assert "'abc' is not a valid integer" in line


def test_a_missing_required_output_is_one_error_line_without_the_old_spelling():
    line = _one_error(_run(["calibrate"]), "Missing option '-o' / '--output'")
    assert "--out'" not in line


def test_an_output_folder_where_a_file_is_expected(tmp_path):
    (tmp_path / "adir").mkdir()
    _one_error(_run(["report", str(tmp_path), "-o", str(tmp_path / "adir")]), "Invalid value for '-o' / '--output'")


def test_an_empty_output_path_is_refused():
    _one_error(_run(["calibrate", "-o", ""]), "-o/--output: an empty path")
    _one_error(_run(["report", "results", "-o", ""]), "-o/--output: an empty path")


def test_an_unknown_option_keeps_clicks_usage_error(tmp_path):
    result = _run(["trace", "info", str(tmp_path / "t.parquet"), "-o", "x"])
    assert result.exit_code == 2 and "No such option" in result.output


def _stop_calibrate(monkeypatch, seen: dict) -> None:
    """calibrate() records its progress callback and stops the command (no measuring in tests)."""
    import finemoe.replay.calibrate as calibration

    def fake(*_args, progress=None, **_kwargs):
        seen["progress"] = progress
        raise ConfigError("stopped before measuring")

    monkeypatch.setattr(calibration, "calibrate", fake)


def test_calibrate_checks_its_output_before_measuring(tmp_path, monkeypatch):
    seen: dict = {}
    _stop_calibrate(monkeypatch, seen)
    (tmp_path / "afile").write_text("x")
    _one_error(_run(["calibrate", "-o", str(tmp_path / "afile" / "cpu.json")]), "cannot write in")
    assert seen == {}


def test_calibrate_quiet_turns_off_its_progress_lines(tmp_path, monkeypatch):
    seen: dict = {}
    _stop_calibrate(monkeypatch, seen)
    _one_error(_run(["calibrate", "-o", str(tmp_path / "cpu.json"), "-q"]), "stopped before measuring")
    assert seen["progress"] is None
    _run(["calibrate", "-o", str(tmp_path / "cpu.json")])
    assert callable(seen["progress"])


@pytest.mark.parametrize("args, starts", [
    (["--history-fraction", "2"], "--history-fraction 2.0 must be in [0, 1)"),
    (["--history-fraction", "nan"], "--history-fraction nan must be in [0, 1)"),
    (["--max-requests", "0"], "--max-requests must be at least 1"),
    (["-o", "out.weird"], "--output out.weird: use a .parquet or .json file name"),
])
def test_predict_refuses_bad_options_before_reading_the_trace(tmp_path, args, starts):
    # the trace does not exist: the option's error must come first, before any scoring
    _one_error(_run(["predict", str(tmp_path / "missing.parquet"), *args]), starts)


def test_predict_refuses_an_output_under_a_file_before_reading_the_trace(tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_error(_run(["predict", str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "afile" / "p.json")]),
               "cannot write in")


def test_predict_quiet_and_output(trace_path, tmp_path):
    out = tmp_path / "p.json"
    result = _run(["predict", str(trace_path), "--policy", "moe-infinity,promoe", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "policies:" not in result.stderr
    assert out.is_file()


def test_demo_refuses_zero_jobs(tmp_path):
    _one_error(_run(["demo", "--jobs", "0", "-o", str(tmp_path / "d")]), "--jobs must be at least 1, got 0")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, starts", [
    (["--budget", "24Q"], "invalid memory size '24Q'"),
    (["--trace", "nope.parquet"], "nope.parquet: no such trace"),
])
def test_plot_refuses_bad_budget_or_trace_before_drawing_anything(trace_path, tmp_path, args, starts):
    results = tmp_path / "res"
    sim = _run(["simulate", str(trace_path), "--policy", "lru", "--expert-cache", "4,8", "-q", "-o", str(results)])
    assert sim.exit_code == 0, sim.output
    figs = tmp_path / "figs"
    _one_error(_run(["plot", str(results), "-o", str(figs), *args]), starts)
    assert not figs.exists() or not any(figs.iterdir())


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_collect_refuses_prompts_that_are_not_utf8(tmp_path, suffix):
    prompts = tmp_path / f"garbage{suffix}"
    prompts.write_bytes(b'{"prompt": "\xd2\xff\xfe"}\n')
    _one_error(_run(["collect", "--prompts", str(prompts), "-o", str(tmp_path / "c.parquet")]),
               f"{prompts}: not UTF-8 text")
    assert not (tmp_path / "c.parquet").exists()


@pytest.mark.parametrize("args, starts", [
    (["--policy", "nosuch"], "unknown policy 'nosuch'"),
    (["--policy", "lru", "--policy-param", "lru.bogus=3"], "policy lru:"),
])
def test_replay_refuses_an_unknown_policy_before_calibrating(trace_path, monkeypatch, args, starts):
    import finemoe.replay.calibrate as calibration

    def never(*_args, **_kwargs):
        raise AssertionError("calibrated before checking the policy")

    monkeypatch.setattr(calibration, "calibrate", never)
    _one_error(_run(["replay", str(trace_path), *args, "--expert-cache", "4", "--device", "cpu"]), starts)


def test_collect_checks_its_output_before_loading_the_model(tmp_path, monkeypatch):
    import finemoe.traces.collect.loader as loader

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "t.parquet"
    line = _one_error(_run(["collect", "--prompts", str(prompts), "-o", str(out), "-q"]), "cannot write")
    assert "is a file, not a folder" in line


def test_a_bug_or_an_unforeseen_os_error_is_still_one_sentence(tmp_path, monkeypatch, trace_path):
    import finemoe.traces.io as io

    monkeypatch.delenv("FINEMOE_DEBUG")
    monkeypatch.setattr(io, "read_trace", lambda *_a, **_k: [][1])  # a bug: IndexError
    line = _one_error(_run(["trace", "validate", str(trace_path)]), "internal error, a bug in finemoe (IndexError")
    assert "FINEMOE_DEBUG=1" in line

    def full(*_a, **_k):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(io, "read_trace", full)
    line = _one_error(_run(["trace", "validate", str(trace_path)]), f"{tmp_path / 'x'}: No space left on device")
    monkeypatch.setenv("FINEMOE_DEBUG", "1")
    monkeypatch.setattr(io, "read_trace", lambda *_a, **_k: [][1])
    assert isinstance(_run(["trace", "validate", str(trace_path)]).exception, IndexError)


@pytest.mark.parametrize("command", [["trace", "info"], ["trace", "validate"], ["simulate"]])
def test_an_empty_trace_path_says_so_not_that_the_current_folder_holds_no_parts(command, tmp_path):
    _one_error(_run([*command, "", *(["-o", str(tmp_path / "res")] if command == ["simulate"] else [])]),
               "no trace given: the path is empty")
