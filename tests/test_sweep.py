"""Sweep machinery: value lists and ranges, expansion into configurations, stable keys, resume,
failures, and the local process pool (with a small real function in place of the simulator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_sweep_support as support

from finemoe.errors import ConfigError
from finemoe.results import read_result, summary_frame
from finemoe.sim.executors import make_executor
from finemoe.sim.executors.work import clear_trace_cache
from finemoe.sim.hardware import PRESETS
from finemoe.sim.sweep import (
    MANIFEST_NAME,
    SweepSpec,
    expand_sweep,
    format_size,
    parse_floats,
    parse_ints,
    parse_policy_params,
    parse_size,
    parse_sizes,
    predictions_first,
    read_manifest,
    result_filename,
    run_sweep,
)
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace

G = 1024**3
KNOWN = ["lfu", "lru", "no-offload"]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "synthetic.parquet"
    write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=3), path)
    return path


def spec(trace_file, **kw) -> SweepSpec:
    kw.setdefault("policies", ["lru"])
    kw.setdefault("hardware", [PRESETS["rtx3090"]])
    return SweepSpec(trace_path=str(trace_file), **kw)


def slots_configs(trace_file, slots=(4, 8, 16), policies=("lru", "lfu"), **params):
    grid = {p: {k: [v] for k, v in params.items()} for p in policies} if params else {}
    return expand_sweep(
        spec(trace_file, policies=list(policies), expert_cache_slots=list(slots), policy_params=grid), KNOWN
    )


# --- parsing ------------------------------------------------------------------------------------


def test_sizes_single_list_and_inclusive_range():
    assert parse_size("24G") == 24 * G
    assert parse_size("24GiB") == parse_size("24g") == 24 * G
    assert parse_size("24GB") == 24 * 10**9  # decimal, as disk vendors write it
    assert parse_size("1536M") == 1536 * 1024**2
    assert parse_size("1000") == 1000
    assert parse_sizes("16G,24G,48G") == [16 * G, 24 * G, 48 * G]
    assert parse_sizes("8G:48G:4G") == [g * G for g in range(8, 49, 4)]
    assert parse_sizes("8G:46G:4G")[-1] == 44 * G  # the end is included only when a step lands on it
    assert parse_sizes("16G, 8G:16G:8G") == [16 * G, 8 * G]  # order kept, repeats dropped


@pytest.mark.parametrize(
    "text, words",
    [
        ("24Q", "invalid memory size '24Q'"),
        ("", "no value"),
        ("16G,,24G", "empty item"),
        ("8G:48G", "start:stop:step"),
        ("48G:8G:4G", "ends before it starts"),
        ("8G:48G:0G", "positive step"),
        ("0", "positive"),
        ("1:10000000000:1", "more than"),
    ],
)
def test_bad_sizes_name_the_option_and_the_problem(text, words):
    with pytest.raises(ConfigError) as err:
        parse_sizes(text, "--gpu-mem")
    assert "--gpu-mem" in str(err.value) and words in str(err.value)


def test_numbers_lists_and_ranges():
    assert parse_ints("2,4:8:2", "--copy-engines") == [2, 4, 6, 8]
    assert parse_floats("16:32:8", "--pcie-gbps") == [16.0, 24.0, 32.0]
    assert parse_floats("0.1:0.3:0.1", "--rate") == [0.1, 0.2, 0.3]  # no float drift past the end
    with pytest.raises(ConfigError, match="--copy-engines: '1.5' is not a whole number"):
        parse_ints("1.5", "--copy-engines")
    with pytest.raises(ConfigError, match="at least 1"):
        parse_ints("0,1", "--copy-engines", minimum=1)
    with pytest.raises(ConfigError, match="--pcie-gbps: 'fast' is not a valid value"):
        parse_floats("fast", "--pcie-gbps")
    with pytest.raises(ConfigError, match="positive"):
        parse_floats("-3", "--pcie-gbps")


def test_format_size_round_trips():
    for text in ("24G", "1536M", "1T", "512K"):
        assert format_size(parse_size(text)) == text


def test_policy_params():
    assert parse_policy_params(["finemoe.d=3", "finemoe.name=x", "lru.flag=true"]) == {
        "finemoe": {"d": [3], "name": ["x"]},
        "lru": {"flag": [True]},
    }
    assert parse_policy_params(["finemoe.d=2,3,6"]) == {"finemoe": {"d": [2, 3, 6]}}
    for bad in ("d=3", "finemoe.d", "finemoe.d=", ".d=3"):
        with pytest.raises(ConfigError, match="POLICY.NAME=VALUE"):
            parse_policy_params([bad])


# --- expansion ----------------------------------------------------------------------------------


def test_expansion_is_the_cartesian_product(trace_file):
    configs = expand_sweep(
        spec(
            trace_file,
            policies=["lru", "lfu"],
            hardware=[PRESETS["rtx3090"], PRESETS["a100-80gb"]],
            gpu_mem_bytes=[16 * G, 24 * G],
            hardware_overrides={"pcie_gbps": [16.0, 32.0], "copy_engines": [1]},
            seeds=[0, 1],
        ),
        KNOWN,
    )
    assert len(configs) == 2 * 2 * 2 * 2 * 2
    assert len({c.key() for c in configs}) == len(configs)
    assert [c.policy for c in configs[:16]] == ["lru"] * 16  # grouped by policy first
    assert {c.hardware.pcie_gbps for c in configs} == {16.0, 32.0}
    assert {c.hardware.copy_engines for c in configs} == {1}
    assert {c.hardware.name for c in configs} == {"rtx3090", "a100-80gb"}
    assert all(Path(c.trace_path).is_absolute() for c in configs)


def test_parallel_workers_start_each_group_of_shared_predictions_once(trace_file):
    """One configuration of each (policy, seed) group first, across memory and hardware, then
    the rest in the sweep's order."""
    configs = expand_sweep(spec(trace_file, policies=["lru", "lfu"], hardware=[PRESETS["rtx3090"], PRESETS["a100-80gb"]],
                                gpu_mem_bytes=[16 * G, 24 * G], seeds=[0, 1]), KNOWN)
    order = predictions_first(configs)
    assert sorted(order) == list(range(len(configs)))
    groups = [(configs[i].policy, configs[i].seed) for i in order[:4]]
    assert sorted(groups) == [("lfu", 0), ("lfu", 1), ("lru", 0), ("lru", 1)]
    assert order[:4] == sorted(order[:4]) and order[4:] == sorted(order[4:])
    assert predictions_first(configs[:1]) == [0] and predictions_first([]) == []


def test_policy_params_apply_to_their_policy_only(trace_file):
    configs = expand_sweep(spec(trace_file, policies=["lru", "lfu"], policy_params={"lru": {"d": [1, 2]}}), KNOWN)
    assert sorted((c.policy, json.dumps(c.policy_params)) for c in configs) == [
        ("lfu", "{}"), ("lru", '{"d": 1}'), ("lru", '{"d": 2}')]
    with pytest.raises(ConfigError, match="not in this sweep"):
        expand_sweep(spec(trace_file, policy_params={"finemoe": {"d": [3]}}), KNOWN)


def test_all_policies_and_unknown_policy(trace_file):
    assert [c.policy for c in expand_sweep(spec(trace_file, policies=["all"]), KNOWN)] == KNOWN
    with pytest.raises(ConfigError, match="unknown policy 'lruu'; known policies: lfu, lru, no-offload"):
        expand_sweep(spec(trace_file, policies=["lruu"]), KNOWN)


def test_workload_axes_and_checks(trace_file, tmp_path):
    configs = expand_sweep(spec(trace_file, arrival="poisson", rates_rps=[1.0, 2.0], max_batch=[1, 4]), KNOWN)
    assert sorted((c.workload.rate_rps, c.workload.max_batch) for c in configs) == [
        (1.0, 1), (1.0, 4), (2.0, 1), (2.0, 4)]
    problems = [
        (dict(arrival="poisson"), "needs --rate"),
        (dict(rates_rps=[1.0]), "only to --arrival poisson"),
        (dict(arrival="file"), "needs --timestamps"),
        (dict(arrival="file", timestamps_path=str(tmp_path / "nope.txt")), "not found"),
        (dict(arrival="sometimes"), "choose one of all, poisson, file"),
        (dict(history_fraction=1.0), "must be in [0, 1)"),
        (dict(gpu_mem_bytes=[G], expert_cache_slots=[4]), "not both"),
        (dict(hardware_overrides={"pcie_gbs": [1.0]}), "unknown hardware field"),
    ]
    for kw, words in problems:
        with pytest.raises(ConfigError) as err:
            expand_sweep(spec(trace_file, **kw), KNOWN)
        assert words in str(err.value), (kw, str(err.value))


def test_keys_are_stable_across_processes_and_param_order(trace_file):
    a = expand_sweep(spec(trace_file, policy_params={"lru": {"b": [2], "a": [1]}}), KNOWN)[0]
    b = expand_sweep(spec(trace_file, policy_params={"lru": {"a": [1], "b": [2]}}), KNOWN)[0]
    assert a.key() == b.key()
    code = (
        "from finemoe.sim.sweep import SweepSpec, expand_sweep; from finemoe.sim.hardware import PRESETS;"
        f"c = expand_sweep(SweepSpec(trace_path={str(trace_file)!r}, policies=['lru'], hardware=[PRESETS['rtx3090']],"
        " policy_params={'lru': {'a': [1], 'b': [2]}}), ['lru'])[0]; print(c.key())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == a.key()
    name = result_filename(a)
    assert name == f"lru-fullmem-rtx3090-{a.key()}.parquet"
    mem = expand_sweep(spec(trace_file, gpu_mem_bytes=[24 * G]), KNOWN)[0]
    assert result_filename(mem).startswith("lru-24G-rtx3090-")
    slots = slots_configs(trace_file, slots=[16], policies=["lfu"])[0]
    assert result_filename(slots).startswith("lfu-16slots-rtx3090-")


# --- running ------------------------------------------------------------------------------------


def test_run_writes_one_result_per_config_and_a_manifest(trace_file, tmp_path):
    configs = slots_configs(trace_file)
    outcome = run_sweep(configs, tmp_path, work=support.WORK, progress=False)
    assert outcome.ok and outcome.ran == 6 and outcome.skipped == 0
    assert [p.name for p in outcome.paths] == [result_filename(c) for c in configs]
    for config, path in zip(configs, outcome.paths, strict=True):
        assert read_result(path).config == config.to_dict()
    manifest = read_manifest(tmp_path)
    assert [e["key"] for e in manifest] == [c.key() for c in configs]
    hit = summary_frame(outcome.paths).set_index("memory.expert_cache_slots")["hit_rate"]
    assert hit.groupby(level=0).first().is_monotonic_increasing  # more slots, more hits: real work ran
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_skips_finished_and_redoes_corrupt_or_partial(trace_file, tmp_path):
    configs = slots_configs(trace_file)
    first = run_sweep(configs, tmp_path, work=support.WORK, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in first.paths}
    first.paths[1].write_bytes(first.paths[1].read_bytes()[:100])  # cut short, as by a crash
    first.paths[2].write_text("not parquet")
    first.paths[3].unlink()
    stale = tmp_path / f".{first.paths[3].name}.abc123.tmp"  # a killed writer's leftover
    stale.write_text("half")
    again = run_sweep(configs, tmp_path, work=support.WORK, progress=False)
    assert again.ok and again.ran == 3 and again.skipped == 3
    for i in (0, 4, 5):
        assert first.paths[i].stat().st_mtime_ns == mtimes[first.paths[i]]  # untouched
    for i in (1, 2, 3):
        assert read_result(first.paths[i]).config == configs[i].to_dict()
    assert not stale.exists()
    redo = run_sweep(configs, tmp_path, resume=False, work=support.WORK, progress=False)
    assert redo.ran == 6 and redo.skipped == 0


def test_a_failing_config_is_reported_and_the_others_complete(trace_file, tmp_path):
    configs = slots_configs(trace_file)
    outcome = run_sweep(configs, tmp_path, work=support.FAILING, progress=False)
    assert not outcome.ok
    assert [f.config.policy for f in outcome.failures] == ["lfu"] * 3
    line = outcome.failures[0].line()
    assert "lfu 4 slots rtx3090" in line and "ValueError: boom for lfu" in line and "test_sweep_support.py" in line
    assert len(outcome.paths) == 3 and all(read_result(p).config["policy"] == "lru" for p in outcome.paths)
    assert not any(f.path.exists() for f in outcome.failures)
    # fixed code, same folder: only the failed ones run
    after = run_sweep(configs, tmp_path, work=support.WORK, progress=False)
    assert after.ok and after.ran == 3 and after.skipped == 3


def test_pool_equals_serial_and_reads_the_trace_once_per_process(trace_file, tmp_path):
    log = tmp_path / "loads"
    log.mkdir()
    configs = slots_configs(trace_file, slots=(2, 4, 6, 8, 12, 16), load_log=str(log))
    clear_trace_cache()
    serial = run_sweep(configs, tmp_path / "serial", jobs=1, work=support.WORK, progress=False)
    assert len(list(log.iterdir())) == 1  # 12 configurations, one read
    for f in log.iterdir():
        f.unlink()
    pooled = run_sweep(configs, tmp_path / "pool", jobs=2, work=support.WORK, progress=False)
    assert serial.ok and pooled.ok
    loads = [f.name.split("-")[0] for f in log.iterdir()]
    assert len(loads) == len(set(loads)) <= 2  # one read per worker process, not per task
    for a, b in zip(serial.paths, pooled.paths, strict=True):
        assert a.name == b.name
        assert read_result(a).summary == read_result(b).summary


def test_pool_retries_configs_whose_worker_died(trace_file, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    configs = slots_configs(trace_file, slots=(4, 8), policies=["lru"], markers=str(markers))
    outcome = run_sweep(configs, tmp_path / "out", jobs=2, work=support.DYING, max_retries=2, progress=False)
    assert outcome.ok, [f.line() for f in outcome.failures]
    assert len(outcome.paths) == 2 and len(list(markers.iterdir())) == 2
    # with no retries allowed the dead worker's configurations are reported, not lost silently
    for m in markers.iterdir():
        m.unlink()
    none = run_sweep(configs, tmp_path / "out2", jobs=2, work=support.DYING, max_retries=0, progress=False)
    assert not none.ok and all("worker process died" in f.error for f in none.failures)


def test_bad_executor_choices(trace_file):
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="only to --executor ray"):
        make_executor("local", ray_address="auto")


def test_manifest_merges_earlier_sweeps(trace_file, tmp_path):
    run_sweep(slots_configs(trace_file, slots=[4]), tmp_path, work=support.WORK, progress=False)
    run_sweep(slots_configs(trace_file, slots=[8]), tmp_path, work=support.WORK, progress=False)
    entries = json.loads((tmp_path / MANIFEST_NAME).read_text())["configs"]
    assert sorted(e["config"]["memory"]["expert_cache_slots"] for e in entries) == [4, 4, 8, 8]
    assert all((tmp_path / e["file"]).exists() for e in entries)


def test_no_worker_process_left_behind(trace_file, tmp_path):
    import multiprocessing

    run_sweep(slots_configs(trace_file, slots=[4, 8]), tmp_path, jobs=2, work=support.WORK, progress=False)
    workers = [p for p in multiprocessing.active_children() if "ForkServer" not in type(p).__name__]
    assert not workers


def test_ray_missing_is_one_clear_sentence(trace_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'finemoe\[ray\]'"):
        run_sweep(slots_configs(trace_file, slots=[4]), tmp_path, executor="ray", work=support.WORK, progress=False)
    assert not list(tmp_path.glob("*.parquet"))
