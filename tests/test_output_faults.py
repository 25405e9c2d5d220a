"""Output and process faults: unwritable folders, full disks, paths under a regular file, signals to
`collect` and `simulate --jobs 2`, two sweeps into one folder, and the umask.

The suite runs as root, where chmod 0o500 does not stop a write, and mounting a tiny tmpfs needs a
mount namespace the test process is not in; so a full disk and a denied folder are injected (the
write or the open of the temporary raises ENOSPC / EACCES, as the kernel would), and "a path under
a regular file" is real: it fails for root too. Nothing here asserts how fast anything runs; the
subprocess tests poll for a state with a generous limit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from finemoe import files
from finemoe.cli.main import cli
from finemoe.errors import OutputError
from finemoe.traces.io import read_trace, write_trace
from finemoe.traces.synthetic import synthetic_trace

FINEMOE = str(Path(sys.executable).with_name("finemoe"))
PATIENCE_S = 120  # for polls only: how long a state may take to appear on a very busy machine


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    return write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=3),
                       tmp_path_factory.mktemp("trace") / "syn.parquet")


@pytest.fixture(scope="module")
def results_dir(trace_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    res = CliRunner().invoke(cli, ["simulate", str(trace_file), "--policy", "lru", "--expert-cache", "8,16",
                                   "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries (`.<name>.<random>.tmp`, partial folders) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


# --- the helper module ------------------------------------------------------------------------


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_outputs_follow_the_umask(tmp_path, mask, file_mode, dir_mode, small_trace):
    old = os.umask(mask)
    try:
        text = files.atomic_write_text(tmp_path / "a.json", "{}")
        trace = write_trace(small_trace, tmp_path / "t.parquet")
        folder = files.make_temp_dir(tmp_path, "d-")
        with files.atomic_dir(tmp_path / "model") as tmp:
            files.atomic_write_text(tmp / "config.json", "{}")
    finally:
        os.umask(old)
    assert (text.stat().st_mode & 0o777, trace.stat().st_mode & 0o777) == (file_mode, file_mode)
    assert folder.stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == file_mode


def test_a_full_disk_leaves_no_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "sweep.json"
    target.write_text("old")
    real_write = os.write

    def full_after_two_bytes(fd, data):
        real_write(fd, bytes(data[:2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_after_two_bytes)
    with pytest.raises(OutputError, match=f"cannot write {target}: no space left on the device"):
        files.atomic_write_json(target, {"configs": list(range(100))})
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_full_disk_inside_pyarrow_is_named_too(tmp_path, monkeypatch, small_trace):
    """pyarrow's IOError carries the errno only in its text."""
    import pyarrow.parquet as pq

    def partial_then_full(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", partial_then_full)
    with pytest.raises(OutputError, match="t.parquet: no space left on the device"):
        write_trace(small_trace, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_denied_folder_is_one_sentence(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args, **kw):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match=f"^cannot write {tmp_path / 'r.json'}: permission denied$"):
        files.atomic_write_text(tmp_path / "r.json", "x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["out.json", "a/b/out.json"])
def test_a_path_under_a_regular_file_names_that_file(tmp_path, below):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
        files.atomic_write_text(blocker / below, "x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        files.check_writable(blocker / "sub")


def test_an_interrupt_while_writing_removes_the_temporary(tmp_path):
    with pytest.raises(KeyboardInterrupt), files.atomic_path(tmp_path / "fig.png") as tmp:
        tmp.write_bytes(b"half a figure")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --- every command that writes ------------------------------------------------------------------


def _commands(trace: Path, results: Path, blocker: Path, prompts: Path) -> dict[str, list[str]]:
    t, r, b = str(trace), str(results), str(blocker)
    return {
        "simulate": ["simulate", t, "--policy", "lru", "--expert-cache", "8", "-o", f"{b}/out", "-q"],
        "predict": ["predict", t, "--policy", "lru", "-o", f"{b}/p.json"],
        "plot": ["plot", r, "-o", f"{b}/figs"],
        "report": ["report", r, "-o", f"{b}/r.html"],
        "replay": ["replay", t, "--policy", "lru", "--expert-cache", "12", "--hardware", "rtx3090",
                   "-o", f"{b}/r", "--no-progress"],
        "calibrate": ["calibrate", "-o", f"{b}/cpu.json"],
        "demo": ["demo", "--quick", "-o", f"{b}/demo"],
        "train-demo-model": ["train-demo-model", "-o", f"{b}/moe"],
        "collect": ["collect", "--prompts", str(prompts), "--max-new-tokens", "2", "--quiet",
                    "-o", f"{b}/t.parquet"],
        "import": ["import", str(prompts.with_name("log.jsonl")), "--model-profile", "mixtral-8x7b",
                   "--request-key", "request_id", "-o", f"{b}/t.parquet"],
        "validate": ["validate", t, "--policy", "lru", "--expert-cache", "12", "--rounds", "1",
                     "-o", f"{b}/v.json", "-q"],
    }


@pytest.mark.parametrize("command", ["simulate", "predict", "plot", "report", "replay", "calibrate", "demo",
                                     "train-demo-model", "collect", "import", "validate"])
def test_every_writing_command_refuses_a_path_under_a_file(tmp_path, trace_file, results_dir, command):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a folder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")
    (tmp_path / "log.jsonl").write_text("".join(
        json.dumps({"request_id": 0, "token_idx": 0, "layer": layer, "experts": [1, 2], "gating_probs": [0.6, 0.4]})
        + "\n" for layer in range(32)))
    args = _commands(trace_file, results_dir, blocker, prompts)[command]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert errors and str(blocker) in errors[-1] and "is a file, not a folder" in errors[-1], res.output
    assert blocker.read_text() == "not a folder"


def test_simulate_on_a_full_disk_exits_1_and_leaves_no_temporary(tmp_path, trace_file, monkeypatch):
    import pyarrow.parquet as pq

    real = pq.write_table

    def full(table, where, **kw):
        if Path(where).name.startswith(".lru-"):
            Path(where).write_bytes(b"PAR1")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full)
    res = CliRunner().invoke(cli, ["simulate", str(trace_file), "--policy", "lru", "--expert-cache", "8",
                                   "-o", str(tmp_path), "-q"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("error: cannot write") and "no space left on the device" in res.output
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".parquet"] == []
    assert leftovers(tmp_path) == []


# --- collect: SIGTERM keeps finished requests, stale partial folders ----------------------------


def _dead_pid() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1 if Path("/proc/sys/kernel/pid_max").exists() \
        else 2**22 + 1


def test_a_new_writer_removes_partial_folders_of_dead_writers_only(tmp_path):
    from finemoe.traces.parts import PartWriter

    target = tmp_path / "t.parquet"
    dead = tmp_path / f".t.parquet.partial-{_dead_pid()}-0a1b2c3d"
    old_style = tmp_path / ".t.parquet.partial-k3j4h5g6"  # named by mkdtemp before the owner's pid
    live = tmp_path / f".t.parquet.partial-{os.getppid()}-0a1b2c3d"
    other = tmp_path / f".u.parquet.partial-{_dead_pid()}-0a1b2c3d"
    for d in (dead, old_style, live, other):
        d.mkdir()
        (d / "part-00000.parquet").write_bytes(b"x")
    writer = PartWriter(target)
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and other.exists()
    assert writer.tmpdir.name.startswith(f".t.parquet.partial-{os.getpid()}-")
    writer.discard()


def _proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc (no psutil)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - out
        out |= frontier
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[-120:]
    except OSError:
        return f"{pid} (gone)"


def _poll(condition, what):
    """Wait for `condition()`; `what` (text, or a function giving it) says what failed to happen."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what() if callable(what) else what} after {PATIENCE_S} s")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.slow  # about 10 s: a model load and one request
def test_sigterm_during_collect_keeps_the_finished_requests(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i} about the weather" for i in range(40)) + "\n")
    out = tmp_path / "t.parquet"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen([FINEMOE, "collect", "--prompts", str(prompts), "--limit", "0",
                                 "--max-new-tokens", "48", "--threads", "1", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=tmp_path)
    try:
        _poll(lambda: " 1/40 " in log.read_text(errors="replace") or proc.poll() is not None,
              "the first request to finish")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert rc == 143, log.read_text()
    assert last.startswith("terminated (SIGTERM): kept ") and "marked incomplete" in last
    trace = read_trace(out)
    kept = int(last.split("kept ")[1].split()[0])
    assert 1 <= kept < 40 and len(trace.requests) == kept
    assert trace.metadata["complete"] is False
    assert leftovers(tmp_path) == []


# --- simulate: workers die with the sweep, finished configurations kept ------------------------


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_a_parallel_sweep_leaves_no_worker(tmp_path, sig):
    from finemoe.results import read_result

    trace = write_trace(synthetic_trace(num_requests=12, generated_tokens=24, seed=1), tmp_path / "t.parquet")
    out = tmp_path / "res"
    proc = subprocess.Popen([FINEMOE, "simulate", str(trace), "--policy", "all", "--expert-cache", "4:60:2",
                             "--jobs", "2", "-o", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    try:
        # the fork server and two workers below the sweep, and one configuration finished
        _poll(lambda: proc.poll() is not None or (len(_descendants(proc.pid)) >= 3 and any(out.glob("*.parquet"))),
              "two workers and a first result")
        assert proc.poll() is None, proc.stderr.read().decode()
        below = _descendants(proc.pid)
        proc.send_signal(sig)
        rc = proc.wait(timeout=PATIENCE_S)
        _poll(lambda: not any(_proc_alive(pid) for pid in below),
              lambda: f"these to exit: {[_cmdline(pid) for pid in below if _proc_alive(pid)]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode()
    if sig == signal.SIGTERM:
        assert rc == 143, stderr
        # (the line may not be the last: the resource tracker, exiting after the sweep, may warn)
        assert "terminated (SIGTERM); finished work is kept" in stderr.splitlines(), stderr
        assert "Traceback" not in stderr, stderr
        assert [p for p in out.iterdir() if p.name.endswith(".tmp")] == []
    else:
        assert rc == -signal.SIGKILL
    finished = sorted(out.glob("*.parquet"))
    assert finished and all(read_result(p).summary for p in finished)


# --- two sweeps into one folder ----------------------------------------------------------------


def test_two_sweeps_started_together_keep_every_manifest_entry(tmp_path, trace_file):
    out = tmp_path / "res"
    procs = [subprocess.Popen([FINEMOE, "simulate", str(trace_file), "--policy", policy, "--expert-cache", "4:16:4",
                               "-o", str(out), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
             for policy in ("lru", "lfu")]
    for p in procs:
        assert p.wait(timeout=PATIENCE_S) == 0, p.stderr.read().decode()
    entries = json.loads((out / "sweep.json").read_text())["configs"]
    assert sorted((e["config"]["policy"], e["config"]["memory"]["expert_cache_slots"]) for e in entries) == \
        sorted((p, s) for p in ("lru", "lfu") for s in (4, 8, 12, 16))
    assert all((out / e["file"]).exists() for e in entries)


def test_a_manifest_writer_waits_for_the_one_holding_the_lock(tmp_path, trace_file):
    """Deterministic form of the race: while one writer holds the lock between its read and its
    write, another must not read the old manifest (it would drop the first one's entries)."""
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.sweep import SweepSpec, expand_sweep, write_manifest

    def configs(policy):
        spec = SweepSpec(trace_path=str(trace_file), policies=[policy], hardware=[PRESETS["rtx3090"]],
                         expert_cache_slots=[4, 8])
        return expand_sweep(spec, [policy])

    first, second = configs("lru"), configs("lfu")
    manifest = tmp_path / "sweep.json"
    with files.locked(tmp_path / ".sweep.json.lock"):
        other = threading.Thread(target=write_manifest, args=(second, tmp_path))
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive()  # blocked on the lock (were it not, it would be done by now or soon)
        files.atomic_write_json(manifest, {"finemoe_sweep": 1, "configs": [
            {"key": c.key(), "file": "x", "config": c.to_dict()} for c in first]})
    other.join(timeout=PATIENCE_S)
    keys = {e["key"] for e in json.loads(manifest.read_text())["configs"]}
    assert keys == {c.key() for c in first + second}
