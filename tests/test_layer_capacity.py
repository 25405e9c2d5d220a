"""Per-layer capacities: the splits (hand-computed), the cache keeping each layer to its share, and
`--layer-capacity` end to end."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sim_cache import Recording, drain

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.policies.registry import make_policy, policy_names
from finemoe.sim.cache import ExpertCache, PolicyError
from finemoe.sim.config import MemoryConfig, SimConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.layer_capacity import best_split, from_file, lru_hit_curve, proportional, resolve
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.offline import loads
from finemoe.sim.run import simulate
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def test_lru_hit_curve_by_stack_distance():
    # 0 1 | 0 2 | 1 0: the second 0 has 1 expert used since its last use, the second 1 and third 0 two.
    curve = lru_hit_curve(np.array([[0, 1], [0, 2], [1, 0]]), 3)
    assert curve.tolist() == [0, 0, 1, 3]


def test_best_split_maximises_the_total_hits():
    flat = np.array([0, 10, 10, 10, 10])  # saturates at one slot
    steep = np.array([0, 1, 2, 9, 9])  # pays at three
    assert best_split([flat, steep], 4, 1, 4) == (1, 3)
    # Slots the hits leave unused go to the lowest layers with room.
    assert best_split([flat, flat], 6, 1, 4) == (4, 2)


def test_proportional_and_uniform_splits():
    assert proportional(np.array([1.0, 3.0]), 8, 1, 8) == (2, 6)
    assert proportional(np.array([1.0, 30.0]), 8, 2, 5) == (3, 5)  # capped at the layer's experts
    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=8, top_k=2), num_requests=2, seed=0)
    assert resolve("uniform", trace, [], 10, 1) == (4, 3, 3)
    assert resolve("shared", trace, [], 10, 1) is None
    assert resolve("dp", trace, [], 30, 1) == (8, 8, 8)  # everything fits
    with pytest.raises(ConfigError, match="5 expert slots cannot give each of 3 layers the 2"):
        resolve("uniform", trace, [], 5, 1)
    with pytest.raises(ConfigError, match="needs at once|from the history split"):
        resolve("demand", trace, [], 10, 1)


def test_a_file_of_sizes(tmp_path):
    good = tmp_path / "caps.txt"
    good.write_text("4 3\n3\n")
    assert from_file(str(good), 3, 10, 2, 8) == (4, 3, 3)
    (tmp_path / "caps.json").write_text("[2, 2, 6]")
    assert from_file(str(tmp_path / "caps.json"), 3, 10, 2, 8) == (2, 2, 6)
    for text, words in (("4 3", "2 sizes for a model of 3 layers"), ("4 4 4", "12 slots in all"),
                        ("1 4 4", "each layer needs 2 to 8"), ("a b c", "not a list of whole numbers")):
        good.write_text(text)
        with pytest.raises(ConfigError, match=words):
            from_file(str(good), 3, 10, 2, 8)


def test_the_cache_evicts_within_the_layer_that_is_full():
    pol = Recording()
    cache = ExpertCache(3, pol, MetricsRecorder(num_layers=2), 100, layer_capacity=(2, 1))
    for layer, expert in ((0, 0), (0, 1), (1, 0)):
        cache.access(layer, expert, 0.0)
        drain(cache)
    # Layer 1 is full: its miss evicts its own (1, 0), not the least recently used (0, 0).
    cache.access(1, 1, 1.0)
    assert [k for k, _ in drain(cache, 1.0)] == [(1, 1)]
    assert cache.resident == {(0, 0), (0, 1), (1, 1)}
    # A policy that answers with another layer's expert is refused.
    bad = ExpertCache(2, Recording(bad_victim=(0, 0)), MetricsRecorder(num_layers=2), 100, layer_capacity=(1, 1))
    bad.access(0, 0, 0.0)
    drain(bad)
    bad.access(1, 0, 0.0)
    drain(bad)
    bad.access(1, 1, 0.0)
    with pytest.raises(PolicyError, match="for a slot of layer 1"):
        drain(bad)


def _copy_policies(trace):
    return [p for p in policy_names() if p not in ("no-offload",) and not p.startswith("test-")
            and not make_policy(p).executes_on_cpu and not make_policy(p).lossy
            and all(getattr(trace, f, None) is not None for f in make_policy(p).needs)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
          database=None)
@given(L=st.integers(1, 3), J=st.integers(3, 6), K=st.integers(1, 2), spare=st.integers(0, 6),
       mode=st.sampled_from(["uniform", "demand", "dp"]), batch=st.integers(1, 2), seed=st.integers(0, 999))
def test_every_policy_keeps_each_layer_to_its_share(L, J, K, spare, mode, batch, seed):
    """Whatever the policy, no layer ever holds more than its share, and the shared pool's lower
    bound on loads still holds (a split only restricts it)."""
    g = tiny_geometry(num_layers=L, num_experts=J, top_k=K)
    trace = synthetic_trace(g, num_requests=4, prompt_tokens=(1, 3), generated_tokens=(2, 5), seed=seed)
    low = min(J, K * batch)
    slots = min(L * J, L * low + spare)
    complete, landed = ExpertCache.complete, ExpertCache.complete_landed

    def check(cache):
        if cache.layer_capacity is not None:
            for layer, cap in enumerate(cache.layer_capacity):
                assert cache._held(layer) <= cap

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExpertCache, "complete", lambda self, *a: (complete(self, *a), check(self)))
        mp.setattr(ExpertCache, "complete_landed", lambda self, *a: (landed(self, *a), check(self)))
        _run_all(trace, slots, mode, batch, seed, L)


def _run_all(trace, slots, mode, batch, seed, L):
    from finemoe.sim.config import WorkloadConfig

    for policy in _copy_policies(trace):
        cfg = SimConfig("t", policy, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots,
                                                                              layer_capacity=mode),
                        workload=WorkloadConfig(max_batch=batch, history_fraction=0.5), seed=seed, timeline_steps=0)
        r = simulate(trace, cfg)
        assert loads(r) >= r.summary["bound_loads"], policy
        assert len(r.config["memory_plan"]["layer_capacity"]) == L
        assert sum(r.config["memory_plan"]["layer_capacity"]) <= slots


def test_cli_sweeps_layer_splits(tmp_path):
    path = tmp_path / "syn.parquet"
    write_trace(synthetic_trace(num_requests=6, generated_tokens=6, seed=2), path)
    run = CliRunner().invoke(cli, ["simulate", str(path), "--policy", "lru", "--expert-cache", "16",
                                   "--layer-capacity", "shared,uniform,dp", "-o", str(tmp_path / "r"), "-q"],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    header, *rows = [line for line in run.output.splitlines() if line.startswith(("policy", "lru"))]
    assert "layers" in header and len(rows) == 3
    assert {r.split()[1] for r in rows} == {"shared", "uniform", "dp"}
    # A budget that cannot give every layer its share is skipped with one line; the rest runs.
    mixed = CliRunner().invoke(cli, ["simulate", str(path), "--policy", "lru", "--expert-cache", "2,16",
                                     "--layer-capacity", "uniform", "-o", str(tmp_path / "m"), "-q"])
    assert mixed.exit_code == 0 and "skipped lru-2slots" in mixed.output and "cannot give each of" in mixed.output
    assert len(list((tmp_path / "m").glob("*.parquet"))) == 1
    for bad, words in ((["--layer-capacity", "greedy"], "'greedy' is none of shared, uniform, demand, dp"),
                       (["--layer-capacity", "uniform", "--expert-cache", "2"], "cannot give each of")):
        res = CliRunner().invoke(cli, ["simulate", str(path), "-q", "-o", str(tmp_path / "b"), *bad])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output
