"""`--policy-file`: a user's policy class, in a file outside the package, for simulate, predict
and replay (also in the local pool's worker processes), and its faults as one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.policies import user
from finemoe.policies.registry import make_policy, policy_names
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace

# Most-recently-used eviction plus "prefetch the expert just used, one layer on": nothing built in
# does either, so results can only come from this class. Named test-* so property tests skip it.
POLICY = '''
from finemoe.policies.base import Policy, Prefetch


class MostRecentlyUsed(Policy):
    """Evicts the expert used last."""

    name = "test-mru"

    def bind(self, ctx):
        super().bind(ctx)
        self.order = []

    def on_loaded(self, key, now_s):
        self.order.append(key)

    def on_access(self, layer, expert, hit, now_s):
        if (layer, expert) in self.order:
            self.order.remove((layer, expert))
            self.order.append((layer, expert))

    def on_evicted(self, key, now_s):
        self.order.remove(key)

    def on_layer_routed(self, routing):
        if routing.layer + 1 >= routing._trace.geometry.num_layers:
            return []
        return [Prefetch(1.0, routing.step.step, routing.layer + 1, int(e))
                for e in routing.experts(0)[-1] if e >= 0]

    def choose_victim(self, evictable, for_prefetch, now_s):
        for key in reversed(self.order):
            if evictable(key):
                return key
        return None
'''


@pytest.fixture
def policy_file(tmp_path, monkeypatch):
    """The file, and a clean slate: this test's loads and environment are undone afterwards."""
    monkeypatch.setenv(user.ENV_VAR, "")
    path = tmp_path / "my_policy.py"
    path.write_text(POLICY)
    yield path
    from finemoe.policies.registry import POLICIES

    POLICIES.pop("test-mru", None)
    user._loaded.pop(str(path.resolve()), None)


@pytest.fixture
def trace_file(tmp_path):
    return str(write_trace(synthetic_trace(num_requests=4, seed=1), tmp_path / "t.parquet"))


def test_a_file_registers_its_policy_classes(policy_file):
    assert "test-mru" not in policy_names()
    assert user.load_policy_file(policy_file) == ["test-mru"]
    assert "test-mru" in policy_names()
    assert make_policy("test-mru").name == "test-mru"
    assert user.load_policy_file(policy_file) == ["test-mru"]  # once per path
    assert os.environ[user.ENV_VAR] == str(policy_file.resolve())  # what pool workers inherit


def test_simulate_with_a_policy_file_in_pool_workers(policy_file, trace_file, tmp_path):
    # A fresh interpreter, as a user runs it: the pool's workers are forked from a fork server
    # that knows only the environment, so this is the path that matters.
    out = tmp_path / "res"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(user.ENV_VAR, None)
    cmd = [sys.executable, "-c", "from finemoe.cli.main import cli; cli()", "simulate", trace_file,
           "--policy-file", str(policy_file), "--policy", "test-mru,lru", "--expert-cache", "6,12",
           "--jobs", "2", "--no-progress", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test-mru") == 2 and "4 result(s)" in done.stderr
    from finemoe.results import read_result

    mru = [read_result(p) for p in out.glob("test_mru-*.parquet")]
    lru = {r.config["memory"]["expert_cache_slots"]: r.summary for r in map(read_result, out.glob("lru-*.parquet"))}
    assert len(mru) == 2
    for r in mru:
        assert r.summary["prefetch_started"] > 0  # the file's own prefetch rule ran
        assert r.summary != lru[r.config["memory"]["expert_cache_slots"]]


def test_predict_and_replay_take_a_policy_file(policy_file, trace_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", trace_file, "--policy-file", str(policy_file), "--policy", "test-mru",
                              "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report[0]["policy"] == "test-mru" and report[0]["totals"]["predicted"] > 0
    res = runner.invoke(cli, ["replay", trace_file, "--policy-file", str(policy_file), "--policy", "test-mru",
                              "--expert-cache", "12", "--hardware", "rtx3090", "-o", str(tmp_path / "rep"), "-q"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "rep").glob("replay-*.parquet"))) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no such file"),
        ("def broken(:\n", "importing it failed \\(line 1\\): SyntaxError"),
        ("raise RuntimeError('no GPU here')\n", "importing it failed: RuntimeError: no GPU here"),
        ("X = 1\n", "defines no Policy subclass"),
        ("from finemoe.policies.base import Policy\nclass Mine(Policy):\n    name = 'lru'\n", "'lru' is taken"),
    ],
)
def test_a_bad_policy_file_is_one_sentence(tmp_path, monkeypatch, trace_file, text, message):
    monkeypatch.setenv(user.ENV_VAR, "")
    path = tmp_path / "bad.py"
    if text is not None:
        path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError, match=message):
        user.load_policy_file(path)
    res = CliRunner().invoke(cli, ["simulate", trace_file, "--policy-file", str(path), "--policy", "lru",
                                   "--expert-cache", "6", "-o", str(tmp_path / "res")])
    assert res.exit_code == 1
    assert res.output.startswith("error: --policy-file") and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert not (tmp_path / "res").exists()  # nothing started
    assert os.environ[user.ENV_VAR] == ""  # a file that failed is not handed to workers


def test_plan_takes_a_policy_file(policy_file, small_trace, tmp_path):
    """A loaded policy joins the plan as a strategy with no closed form: simulated at the budget,
    ranked with the others, and its replay command names the file."""
    trace = write_trace(small_trace, tmp_path / "syn.parquet")
    res = CliRunner().invoke(cli, ["plan", str(trace), "--policy-file", str(policy_file), "--gpu-mem", "4M",
                                   "--reserve", "0", "-o", str(tmp_path / "p"), "-q", "--json", "-j", "1"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    mine = [p for p in plan["points"] if p["strategy"] == "test-mru"]
    assert [p["source"] for p in mine] == ["simulated"] and mine[0]["budget"] == 4 * 2**20
    assert mine[0]["estimate"] is None and mine[0]["tpot_p50_s"] > 0
    from finemoe.plan.runtimes import settings
    from finemoe.plan.strategies import by_name

    rows = settings(by_name("test-mru"), cpu_layers=[], offloaded_bytes=0, trace="t", gpu_mem="4M", hardware="h")
    replay = next(r for r in rows if r["runtime"] == "finemoe replay")["args"]
    assert f"--policy test-mru --policy-file {policy_file.resolve()}" in replay
    assert "test-mru" in CliRunner().invoke(cli, ["plan", "x", "--policy-file", str(policy_file), "--list"]).output
