"""`--executor ray` on a local Ray instance: same files and summaries as the local executor,
failures reported, killed workers retried. One Ray instance for the whole module (start-up costs
seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray  # the Makefile installs the ray extra: a missing Ray fails here, it never skips
import test_sweep_support as support

from finemoe.results import read_result
from finemoe.sim.hardware import PRESETS
from finemoe.sim.sweep import SweepSpec, expand_sweep, run_sweep
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        # Test helpers live in tests/, which Ray workers cannot import: ship them by value.
        ray.cloudpickle.register_pickle_by_value(support)
        # Ray starts its workers at nice 15 (its `worker_niceness`): beside busy processes they get
        # a few percent of a core, and this module took 70 s instead of 7 beside two busy loops.
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _system_config={"worker_niceness": 0})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "synthetic.parquet"
    write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=5), path)
    return path


def configs(trace_file, policies=("lru", "lfu"), slots=(4, 8, 16), **params):
    grid = {p: {k: [v] for k, v in params.items()} for p in policies} if params else {}
    spec = SweepSpec(trace_path=str(trace_file), policies=list(policies), hardware=[PRESETS["rtx3090"]],
                     expert_cache_slots=list(slots), policy_params=grid)
    return expand_sweep(spec, ["lfu", "lru"])


def summaries(paths):
    out = {}
    for p in paths:
        s = dict(read_result(p).summary)
        s.pop("wall_s", None)
        out[p.name] = s
    return out


@pytest.mark.parametrize("transport", ["object-store", "path"])
def test_ray_results_equal_local_results(ray_session, trace_file, tmp_path, transport):
    cs = configs(trace_file)
    local = run_sweep(cs, tmp_path / "local", work=support.WORK, progress=False)
    remote = run_sweep(cs, tmp_path / "ray", executor="ray", work=support.WORK, progress=False,
                       ray_trace_transport=transport)
    assert local.ok and remote.ok
    assert [p.name for p in local.paths] == [p.name for p in remote.paths]
    assert same(summaries(local.paths), summaries(remote.paths))
    for a, b in zip(local.paths, remote.paths, strict=True):
        assert read_result(a).config == read_result(b).config
        assert read_result(a).requests.equals(read_result(b).requests)


def test_a_sweep_started_locally_finishes_on_ray(ray_session, trace_file, tmp_path):
    cs = configs(trace_file)
    run_sweep(cs[:2], tmp_path, work=support.WORK, progress=False)
    rest = run_sweep(cs, tmp_path, executor="ray", work=support.WORK, progress=False)
    assert rest.ok and rest.skipped == 2 and rest.ran == len(cs) - 2 and len(rest.paths) == len(cs)


def test_ray_reports_failures_and_keeps_the_rest(ray_session, trace_file, tmp_path):
    outcome = run_sweep(configs(trace_file), tmp_path, executor="ray", work=support.FAILING, progress=False)
    assert [f.config.policy for f in outcome.failures] == ["lfu"] * 3
    assert all("ValueError: boom for lfu" in f.error for f in outcome.failures)
    assert len(outcome.paths) == 3


def test_ray_retries_a_killed_worker(ray_session, trace_file, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    cs = configs(trace_file, policies=["lru"], slots=(4, 8), markers=str(markers))
    outcome = run_sweep(cs, tmp_path / "out", executor="ray", work=support.DYING, max_retries=2, progress=False)
    assert outcome.ok, [f.line() for f in outcome.failures]
    assert len(list(markers.iterdir())) == 2 and len(outcome.paths) == 2  # each died once, then ran
    for m in markers.iterdir():
        m.unlink()
    none = run_sweep(cs, tmp_path / "out2", executor="ray", work=support.DYING, max_retries=0, progress=False)
    assert not none.ok and len(none.failures) == 2
    assert all("Ray task failed" in f.error for f in none.failures)


def test_real_simulator_on_ray_equals_local_and_cli_works(ray_session, trace_file, tmp_path):
    from click.testing import CliRunner

    from finemoe.cli.main import cli

    args = ["simulate", str(trace_file), "--policy", "lru,finemoe", "--expert-cache", "6,12", "--max-requests", "2",
            "-q"]
    runner = CliRunner()
    local = runner.invoke(cli, [*args, "--jobs", "1", "-o", str(tmp_path / "local")], catch_exceptions=False)
    remote = runner.invoke(cli, [*args, "--executor", "ray", "-o", str(tmp_path / "ray")], catch_exceptions=False)
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    a, b = sorted((tmp_path / "local").glob("*.parquet")), sorted((tmp_path / "ray").glob("*.parquet"))
    assert len(a) == 4 and [p.name for p in a] == [p.name for p in b]
    skip = {"wall_s", "layer_steps_per_wall_s"}
    for pa, pb in zip(a, b, strict=True):
        ra, rb = read_result(pa), read_result(pb)
        # compared as JSON text so that NaN (a layer never reached, a one-token request) equals NaN
        assert same({k: v for k, v in ra.summary.items() if k not in skip},
                    {k: v for k, v in rb.summary.items() if k not in skip})
        assert ra.config == rb.config and ra.requests.equals(rb.requests)
        assert same(ra.per_layer_hit_rate, rb.per_layer_hit_rate) and same(ra.timeline, rb.timeline)


def same(a, b) -> bool:
    import json

    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
