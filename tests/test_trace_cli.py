"""`finemoe trace info/validate` end to end: good traces, and bad files as one `error:` line, exit 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.traces.io import CHECKSUM_KEY, METADATA_KEY, trace_to_table, write_trace


@pytest.fixture
def good(tmp_path, small_trace):
    return write_trace(small_trace, tmp_path / "good.parquet")


def _newer_version(tmp_path, small_trace):
    table = trace_to_table(small_trace)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["schema_version"] = 99
    md = dict(table.schema.metadata)
    md[METADATA_KEY] = json.dumps(meta).encode()
    md.pop(CHECKSUM_KEY)
    path = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


def _bad_files(tmp_path, small_trace, good):
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("this is not parquet\n")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return {
        "missing": (tmp_path / "nope.parquet", "no such trace file"),
        "not parquet": (not_parquet, "not a readable Parquet file"),
        "truncated": (truncated, "not a readable Parquet file"),
        "newer version": (_newer_version(tmp_path, small_trace), "newer than this finemoe reads"),
        "empty directory": (empty_dir, "no trace part files"),
    }


@pytest.mark.parametrize("command", ["info", "validate"])
@pytest.mark.parametrize("case", ["missing", "not parquet", "truncated", "newer version", "empty directory"])
def test_bad_files_give_one_error_line_and_exit_1(tmp_path, small_trace, good, command, case):
    path, message = _bad_files(tmp_path, small_trace, good)[case]
    res = CliRunner().invoke(cli, ["trace", command, str(path)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert str(path) in lines[0]
    assert "Traceback" not in res.output


def test_a_real_process_exits_1_without_traceback(tmp_path, small_trace, good):
    # The script beside this interpreter (a venv not on PATH), else the one on PATH.
    beside = Path(sys.executable).with_name("finemoe")
    exe = str(beside) if beside.exists() else shutil.which("finemoe")
    assert exe, "the finemoe console script is not installed (pip install -e .)"
    path, _ = _bad_files(tmp_path, small_trace, good)["truncated"]
    proc = subprocess.run([exe, "trace", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_validate_and_info_on_a_good_trace(good, small_trace):
    runner = CliRunner()
    res = runner.invoke(cli, ["trace", "validate", str(good)])
    assert res.exit_code == 0 and res.output.startswith("ok: ")
    res = runner.invoke(cli, ["trace", "info", str(good), "--per-layer"])
    assert res.exit_code == 0, res.output
    for text in ("requests     4", "usage entropy per layer", "fine (per iteration)", "coarse (per request)",
                 "distributions from router_probs", "fields       experts, weights, router_probs"):
        assert text in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("      ")]) >= small_trace.geometry.num_layers
    res = runner.invoke(cli, ["trace", "info", str(good), "--json"])
    info = json.loads(res.output)
    assert info["requests"] == 4 and info["token_rows"] == small_trace.num_tokens
    assert info["size_bytes"] == good.stat().st_size
    assert info["routing"]["source"] == "router_probs"


def test_info_on_a_directory_of_parts(tmp_path, small_trace):
    d = tmp_path / "parts"
    write_trace(small_trace.select_requests([0, 1]), d / "part-000.parquet")
    write_trace(small_trace.select_requests([2, 3]), d / "part-001.parquet")
    res = CliRunner().invoke(cli, ["trace", "info", str(d), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["files"] == 2 and info["requests"] == 4 and info["token_rows"] == small_trace.num_tokens


def test_help_defines_the_statistics():
    res = CliRunner().invoke(cli, ["trace", "info", "--help"])
    assert res.exit_code == 0
    for word in ("per-iteration", "per-request", "H(top-1 at l+1 | top-1 at l)", "router_probs"):
        assert word in res.output
