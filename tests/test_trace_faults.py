"""Trace input faults (issue #16, item 5): bad traces and bad routing logs get one `error:` line, exit 1.

Each bad file is built in tmp_path from a good synthetic trace (one column corrupted with pyarrow)
or a small hand-written routing log. Commands that could block (a FIFO) or allocate without bound
(a huge token index) run in a child process with a timeout and a memory limit, so a regression
fails instead of hanging or eating the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import TraceError
from finemoe.traces.io import read_trace, trace_to_table, validate, write_trace
from finemoe.traces.schema import Trace
from finemoe.traces.synthetic import synthetic_trace

ROW, LAYER, SLOT = 5, 2, 1  # where a value is corrupted
CHILD_TIMEOUT_S = 300  # far above a normal run even on a loaded machine; only a hang reaches it


@pytest.fixture
def trace() -> Trace:
    return synthetic_trace(seed=0)  # 4 layers x 8 experts, top-2, router_probs, semantic_key (16), spec


@pytest.fixture
def good(tmp_path, trace):
    return write_trace(trace, tmp_path / "good.parquet")


def _one_error(res, *needles: str) -> str:
    """The single `error:` line of a failed command, checked to contain every needle."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _set_value(good, dest, column: str, flat_index: int, value: float):
    """`good` with one value of a list column replaced, written raw (as a buggy or foreign writer would)."""
    table = pq.read_table(good)
    col = table.column(column).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).copy()
    values[flat_index] = value
    new = pa.FixedSizeListArray.from_arrays(pa.array(values, type=col.type.value_type), col.type.list_size)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, new), dest)
    return dest


def _flat_index(trace: Trace, column: str) -> int:
    arr = getattr(trace, column)
    if arr.ndim == 2:  # semantic_key [n, D]
        return ROW * arr.shape[1] + SLOT
    return (ROW * arr.shape[1] + LAYER) * arr.shape[2] + SLOT


def _raw(trace: Trace, dest):
    """Write without write_trace's validation."""
    pq.write_table(trace_to_table(trace), dest)
    return dest


def _without_rows_of(trace: Trace, keep: list[int]) -> Trace:
    """All requests still listed, rows only of `keep`."""
    part = trace.select_requests(keep)
    return Trace(**{**part.__dict__, "requests": trace.requests})


def _run_child(args: list[str], *, memory_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`finemoe ARGS` in a child process, killed after CHILD_TIMEOUT_S (a hang fails the test)."""
    def limit():
        if memory_bytes is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run([sys.executable, "-c", "from finemoe.cli.main import cli; cli()", *args],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, preexec_fn=limit,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _child_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert proc.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------
# non-finite, negative and out-of-range values


@pytest.mark.parametrize("column, value, why", [
    ("router_probs", np.nan, "router probabilities must be finite and within [0, 1]"),
    ("router_probs", -0.5, "router probabilities must be finite and within [0, 1]"),
    ("router_probs", np.inf, "router probabilities must be finite and within [0, 1]"),
    ("router_probs", 1.5, "router probabilities must be finite and within [0, 1]"),
    ("spec_weights", np.nan, "speculative gate weights must be finite and non-negative"),
    ("spec_weights", -0.5, "speculative gate weights must be finite and non-negative"),
    ("spec_weights", -np.inf, "speculative gate weights must be finite and non-negative"),
    ("semantic_key", np.nan, "semantic keys must be finite"),
    ("semantic_key", np.inf, "semantic keys must be finite"),
    ("weights", np.nan, "negative or non-finite gate weight"),
    ("weights", -0.5, "negative or non-finite gate weight"),
    ("weights", np.inf, "negative or non-finite gate weight"),
])
def test_bad_values_are_rejected_naming_column_and_row(tmp_path, trace, good, column, value, why):
    bad = _set_value(good, tmp_path / "bad.parquet", column, _flat_index(trace, column), value)
    place = f"token row {ROW}" if column == "semantic_key" else f"token row {ROW} layer {LAYER}"
    res = CliRunner().invoke(cli, ["trace", "validate", str(bad)])
    _one_error(res, str(bad), f"column {column}, {place}", why)
    with pytest.raises(TraceError, match="column " + column):
        read_trace(bad)


@pytest.mark.parametrize("command", ["simulate", "replay"])
def test_a_nan_router_probability_is_one_sentence_before_any_work(tmp_path, trace, good, command):
    """Not one failure per configuration from the workers: refused before the sweep or replay starts."""
    bad = _set_value(good, tmp_path / "bad.parquet", "router_probs", _flat_index(trace, "router_probs"), np.nan)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, COMMANDS[command](str(bad), str(out)))
    _one_error(res, str(bad), "column router_probs", "must be finite")
    assert not out.exists()


def test_negative_semantic_keys_and_probabilities_of_exactly_one_are_valid(tmp_path, trace, good):
    """An embedding projection is signed; a softmax rounded to float16 may be exactly 1 (or -0.0)."""
    path = _set_value(good, tmp_path / "a.parquet", "semantic_key", _flat_index(trace, "semantic_key"), -3.25)
    assert CliRunner().invoke(cli, ["trace", "validate", str(path)]).exit_code == 0
    path = _set_value(good, tmp_path / "b.parquet", "router_probs", _flat_index(trace, "router_probs"), 1.0)
    path = _set_value(path, tmp_path / "c.parquet", "router_probs", 0, -0.0)
    assert CliRunner().invoke(cli, ["trace", "validate", str(path)]).exit_code == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_value_rules_hold_for_float16_bits_and_plain_floats(trace, dtype):
    """The float16 bit tests and the float path agree: 1.0 passes, the next float16 above it does not."""
    above_one = float(np.nextafter(np.float16(1), np.float16(2)))  # 1.0009765625
    cases = [(0.0, True), (-0.0, True), (1.0, True), (0.25, True), (above_one, False), (-2.0**-24, False),
             (np.inf, False), (-np.inf, False), (np.nan, False)]
    for value, ok in cases:
        probs = trace.router_probs.astype(dtype)
        probs[ROW, LAYER, SLOT] = value
        t = Trace(**{**trace.__dict__, "router_probs": probs})
        if ok:
            validate(t)
        else:
            with pytest.raises(TraceError, match=f"column router_probs, token row {ROW} layer {LAYER}"):
                validate(t)


def test_write_refuses_what_read_would_reject(tmp_path, trace):
    trace.spec_weights[ROW, LAYER, SLOT] = np.nan
    with pytest.raises(TraceError, match="column spec_weights"):
        write_trace(trace, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_speculative_expert_id_out_of_range(tmp_path, trace, good):
    bad = _set_value(good, tmp_path / "bad.parquet", "spec_experts", _flat_index(trace, "spec_experts"), 99)
    _one_error(CliRunner().invoke(cli, ["trace", "validate", str(bad)]), str(bad),
               "speculative expert id 99 out of range for 8 experts")


# ---------------------------------------------------------------------------------------------
# empty traces and requests without rows, through every command that reads a trace


def _bad_traces(tmp_path, trace, good) -> dict:
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    table = pq.read_table(good)
    wrong = tmp_path / "wrong-column.parquet"
    renamed = table.rename_columns(["gate" if c == "weights" else c for c in table.column_names])
    pq.write_table(renamed.replace_schema_metadata(table.schema.metadata), wrong)
    return {
        "zero rows": (_raw(trace.select_requests([]), tmp_path / "zero.parquet"), "holds no token rows"),
        "requests without rows": (_raw(_without_rows_of(trace, [0, 1]), tmp_path / "norows.parquet"),
                                  "request 2 (synthetic/2) is listed in the requests table but has no token rows"),
        "missing": (tmp_path / "nope.parquet", "no such trace file"),
        "corrupt": (corrupt, "not a readable Parquet file"),
        "truncated": (truncated, "not a readable Parquet file"),
        "wrong column": (wrong, "required column(s) weights missing"),
    }


COMMANDS = {
    "trace info": lambda path, out: ["trace", "info", path],
    "trace validate": lambda path, out: ["trace", "validate", path],
    "simulate": lambda path, out: ["simulate", path, "--gpu-mem", "1G", "--policy", "lru", "-o", out, "-q"],
    "replay": lambda path, out: ["replay", path, "--policy", "lru", "--gpu-mem", "1G", "-o", out, "-q"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["zero rows", "requests without rows", "missing", "corrupt", "truncated",
                                  "wrong column"])
def test_bad_traces_are_one_sentence_in_every_command(tmp_path, trace, good, command, case):
    path, message = _bad_traces(tmp_path, trace, good)[case]
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, COMMANDS[command](str(path), str(out)))
    _one_error(res, str(path), message)
    assert not out.exists()  # nothing started, nothing half-written


def test_a_trace_part_without_rows_is_refused(tmp_path, trace):
    d = tmp_path / "parts"
    write_trace(trace.select_requests([0, 1]), d / "part-00000.parquet")
    _raw(_without_rows_of(trace.select_requests([2, 3]), [2]), d / "part-00001.parquet")
    with pytest.raises(TraceError, match="request 3 .* has no token rows"):
        read_trace(d)


def test_write_refuses_an_empty_trace(tmp_path, trace):
    with pytest.raises(TraceError, match="no token rows"):
        write_trace(trace.select_requests([]), tmp_path / "t.parquet")
    with pytest.raises(TraceError, match="request 3 .* has no token rows"):
        write_trace(_without_rows_of(trace, [0, 1, 2]), tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# files that are not regular files


def test_a_device_is_refused(tmp_path):
    if not os.path.exists(os.devnull):
        pytest.skip("no null device")
    _one_error(CliRunner().invoke(cli, ["trace", "validate", os.devnull]), os.devnull, "is a device")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_fifo_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "trace.parquet"
    os.mkfifo(fifo)  # nobody writes: opening it for reading would block forever
    out = tmp_path / "out"
    _child_error(_run_child(COMMANDS[command](str(fifo), str(out))), str(fifo), "named pipe (FIFO)")
    assert not out.exists()


def test_a_fifo_among_part_files_is_refused(tmp_path, trace):
    d = tmp_path / "parts"
    write_trace(trace.select_requests([0, 1]), d / "part-00000.parquet")
    os.mkfifo(d / "part-00001.parquet")
    _child_error(_run_child(["trace", "validate", str(d)]), "part-00001.parquet", "named pipe (FIFO)")


def test_a_fifo_routing_log_is_refused(tmp_path):
    fifo = tmp_path / "log.jsonl"
    os.mkfifo(fifo)
    _child_error(_run_child(["import", str(fifo), "--model-profile", "mixtral-8x7b", "-o", str(tmp_path / "t.parquet")]),
                 str(fifo), "not a regular file")
    assert not (tmp_path / "t.parquet").exists()


# ---------------------------------------------------------------------------------------------
# routing logs for `finemoe import`

GEOMETRY = ["--num-layers", "2", "--num-experts", "4", "--top-k", "2", "--hidden-size", "8",
            "--expert-intermediate-size", "8"]


def _record(token: int, layer: int) -> bytes:
    return (json.dumps({"dataset": "d", "problem_id": 0, "layer": layer, "token_idx": token,
                        "experts": [1, 2], "gating_probs": [0.6, 0.4]}) + "\n").encode()


def _log(tmp_path, name: str, *chunks: bytes):
    path = tmp_path / name
    path.write_bytes(b"".join(chunks))
    return path


def _good_records() -> list[bytes]:
    return [_record(t, layer) for t in range(3) for layer in range(2)]  # 6 records, 3 tokens x 2 layers


def _import(path, out):
    return CliRunner().invoke(cli, ["import", str(path), *GEOMETRY, "-o", str(out)])


def test_a_token_index_of_10_to_the_12_fails_fast_naming_line_and_record(tmp_path):
    # a blank first line: the record is the 7th, on line 8
    log = _log(tmp_path, "huge.jsonl", b"\n", *_good_records(), _record(10**12, 0))
    out = tmp_path / "t.parquet"
    _one_error(_import(log, out), str(log), "line 8 (record 7)", "'token_idx' 1,000,000,000,000",
               "request d/0 has 7 record(s)", "at most 14 token rows")
    assert not out.exists()


def test_a_token_index_of_3_billion_fails_within_a_memory_limit(tmp_path):
    """Before the bound this allocated rows for every index below 3e9 (24 GB); 2 GiB must do now."""
    pytest.importorskip("resource")
    log = _log(tmp_path, "3e9.jsonl", *_good_records(), _record(3_000_000_000, 1))
    out = tmp_path / "t.parquet"
    proc = _run_child(["import", str(log), *GEOMETRY, "-o", str(out)], memory_bytes=2 << 30)
    _child_error(proc, str(log), "line 7 (record 7)", "'token_idx' 3,000,000,000")
    assert not out.exists()


def test_a_log_with_a_few_absent_tokens_still_imports(tmp_path):
    """The bound leaves room for gaps: 6 records of tokens 0, 1 and 5 span 6 rows (at most 12)."""
    records = [_record(t, layer) for t in (0, 1, 5) for layer in range(2)]
    out = tmp_path / "t.parquet"
    res = _import(_log(tmp_path, "gaps.jsonl", *records), out)
    assert res.exit_code == 0, res.output
    assert read_trace(out).num_tokens == 6


@pytest.mark.parametrize("case, chunks, message", [
    ("non-UTF-8 line", [*_good_records()[:3],
                        b'{"dataset": "\xff\xfe", "problem_id": 0, "layer": 0, "token_idx": 1, "experts": [1, 2], '
                        b'"gating_probs": [0.6, 0.4]}\n',
                        *_good_records()[3:]], "line 4 is not valid JSON"),
    ("garbage line", [*_good_records()[:2], b"\x00\x01 garbage \xff\n", *_good_records()[2:]],
     "line 3 is not valid JSON"),
    ("empty file", [], "file holds no records"),
    ("blank lines only", [b"\n \n\t\n"], "file holds no records"),
])
def test_bad_routing_logs_are_one_sentence_naming_the_file(tmp_path, case, chunks, message):
    log = _log(tmp_path, "log.jsonl", *chunks)
    out = tmp_path / "t.parquet"
    _one_error(_import(log, out), str(log), message)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--prompt-tokens", "1000000000000"), ("--prompt-tokens", "d/0=3000000000"),
                                           ("--prompt-tokens", "-5")])
def test_a_prompt_length_positions_cannot_hold_is_one_sentence(tmp_path, option, value):
    """Positions are int32: 10^12 prompt tokens used to end in numpy's OverflowError."""
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(cli, ["import", str(_log(tmp_path, "d.jsonl", *_good_records())), *GEOMETRY,
                                   f"{option}={value}", "-o", str(out)])
    _one_error(res, option, "is not a length this format stores (0 to 2,147,483,647)")
    assert not out.exists()


def test_a_missing_routing_log(tmp_path):
    log = tmp_path / "absent.jsonl"
    _one_error(_import(log, tmp_path / "t.parquet"), str(log), "no such routing log")


# ---------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("command", ["info", "validate"])
def test_trace_commands_show_examples(command):
    res = CliRunner().invoke(cli, ["trace", command, "--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output and f"  finemoe trace {command} trace.parquet\n" in res.output
