"""Predictions computed once for a whole offline run (`Policy.prepare`: FineMoE's map matches,
policies/map_matches.py; ProMoE's predictors' outputs) are what the incremental path computes as the
run goes, bit for bit: per query on random stores, and as whole runs of every FineMoE variant and
ProMoE on random workloads and on the real Mixtral logs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.policies import map_matches
from finemoe.policies.expert_maps import ExpertMapStore
from finemoe.policies.registry import make_policy
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import load_trace_for, simulate_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

VARIANTS = ("finemoe", "finemoe-trajectory", "finemoe-semantic", "finemoe-no-delta", "finemoe-lru", "finemoe-topk",
            "promoe", "moe-infinity")


def _store(rng, L: int, J: int, maps: int, dim: int | None) -> ExpertMapStore:
    store = ExpertMapStore(L, J, capacity=max(1, maps - 2), distance=1, semantic_dim=dim)
    for _ in range(maps):  # a few more than it holds: replacement too
        m = rng.random((L, J)).astype(np.float32)
        m[rng.random((L, J)) < 0.3] = 0.0  # zero rows and prefixes
        store.add(m, None if dim is None else rng.random(dim).astype(np.float32))
    return store


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.sampled_from([2, 5, 8, 9, 16, 64]), st.integers(1, 40), st.integers(0, 10_000))
def test_batched_trajectory_matches_are_the_incremental_ones(L, J, maps, seed):
    rng = np.random.default_rng(seed)
    store = _store(rng, L, J, maps, None)
    rows = rng.random((7, L, J))  # full float64 mantissas: sums of products round, in an order
    rows[0] = 0.0  # a query whose rows are all zero
    rows[1, 0] = 0.0
    best, cos = store.trajectory_matches(rows, L)
    for n in range(rows.shape[0]):
        q = store.trajectory(1)
        for layer in range(L):
            c = q.observe(layer, rows[n, layer][None, :])[0]
            assert best[n, layer] == int(c.argmax())
            assert cos[n, layer] == float(c[int(c.argmax())])


def _incremental(policy):
    policy.prepare = lambda trace, measure: None  # the searches as the run goes
    return policy


PLANNED = ("searches_planned", "predictions_planned", "matches_planned")  # what differs: how many were read, not searched
TIMED = ("train_s",)


def _assert_same(a, b) -> None:
    for key, value in a.summary.items():
        if "wall" in key:
            continue
        got = b.summary[key]
        assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), key
    assert a.requests.equals(b.requests)
    assert a.timeline == b.timeline
    ran, searched = a.config["policy_info"]["stats"], b.config["policy_info"]["stats"]
    drop = lambda stats: {k: v for k, v in stats.items() if k not in PLANNED + TIMED}  # noqa: E731
    assert drop(ran) == drop(searched)
    assert strip(a.config) == strip(b.config)
    planned = [k for k in PLANNED if k in ran]
    assert planned and all(searched[k] == 0 for k in planned)
    if "searches" in ran:
        assert ran["searches_planned"] == ran["searches"]  # every search read the table
    elif ran.get("predictors") or ran.get("history_matrices"):
        assert ran[planned[0]] > 0


def strip(config: dict) -> dict:
    """`config` without the policy's stats."""
    return {**config, "policy_info": {k: v for k, v in config["policy_info"].items() if k != "stats"}}


def _recording(policy, calls: list):
    """`policy`, its every prefetch list recorded (priority and ready time too: the predictions
    themselves, not only what they did to the run)."""
    def recording(call):
        def recorded(arg):
            out = list(call(arg))
            calls.append([(p.priority, p.step, p.layer, p.expert, p.ready_s) for p in out])
            return out
        return recorded

    for hook in ("on_step_start", "on_layer_routed"):
        setattr(policy, hook, recording(getattr(policy, hook)))
    return policy


def _runs(trace, config):
    asked, searched_asked = [], []
    # On the reference engine: the compiled path would read planned asks, not call the recorded hooks.
    planned = simulate_policy(trace, config, _recording(make_policy(config.policy, **dict(config.policy_params)), asked),
                              compiled=False)
    searched = simulate_policy(trace, config, _recording(
        _incremental(make_policy(config.policy, **dict(config.policy_params))), searched_asked), compiled=False)
    assert asked == searched_asked
    return planned, searched


@st.composite
def workloads(draw):
    L, J = draw(st.integers(2, 5)), draw(st.sampled_from([3, 8, 9, 12]))
    K = draw(st.integers(1, min(J, 3)))
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=draw(st.integers(3, 7)),
                            prompt_tokens=(1, 5), generated_tokens=(1, 8), seed=draw(st.integers(0, 10_000)),
                            semantic_dim=draw(st.sampled_from([None, 6])))
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=draw(st.sampled_from([0.5, 32.0])))
    arrival = draw(st.sampled_from(["all", "poisson"]))
    wl = WorkloadConfig(max_batch=draw(st.integers(1, 3)), history_fraction=0.5, arrival=arrival, rate_rps=300.0)
    policy = draw(st.sampled_from(VARIANTS))
    params = {"distance": draw(st.integers(1, L))} if draw(st.booleans()) else {}
    if policy == "promoe":
        params.update(epochs=5, inputs=draw(st.sampled_from(["auto", "topk"])), window=draw(st.integers(1, 3)))
    config = SimConfig("synthetic", policy, hw, memory=MemoryConfig(expert_cache_slots=draw(st.integers(J, L * J))),
                       workload=wl, seed=draw(st.integers(0, 20)), timeline_steps=2, policy_params=params)
    return trace, config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_runs_with_matches_computed_once_are_the_searched_runs(case):
    trace, config = case
    if config.policy.startswith("finemoe") and config.policy not in ("finemoe-topk", "finemoe-trajectory") \
            and trace.semantic_key is None:
        config = SimConfig(config.trace_path, "finemoe-trajectory", config.hardware, memory=config.memory,
                           workload=config.workload, seed=config.seed, timeline_steps=config.timeline_steps,
                           policy_params=config.policy_params)
    planned, searched = _runs(trace, config)
    _assert_same(planned, searched)


def test_matches_are_computed_once_per_store_and_iterations(monkeypatch):
    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=8, top_k=2), num_requests=8,
                            prompt_tokens=(2, 4), generated_tokens=(3, 6), seed=3, semantic_dim=6)
    computed = []
    real = map_matches.compute_matches
    monkeypatch.setattr(map_matches, "compute_matches", lambda *a: computed.append(1) or real(*a))
    map_matches._MATCHES.clear()
    wl = WorkloadConfig(history_fraction=0.5)
    for slots in (8, 12, 20):  # a budget sweep: one table
        simulate_policy(trace, SimConfig("t", "finemoe", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                                         workload=wl), make_policy("finemoe"))
    assert len(computed) == 1
    # Another history (a store with other maps) is another table.
    simulate_policy(trace, SimConfig("t", "finemoe", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=8),
                                     workload=wl, seed=5), make_policy("finemoe"))
    assert len(computed) == 2
    # Online runs learn as they go: no table.
    online = WorkloadConfig(history_fraction=0.5, online=True)
    simulate_policy(trace, SimConfig("t", "finemoe", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=8),
                                     workload=online), make_policy("finemoe"))
    assert len(computed) == 2


@pytest.mark.parametrize("policy", ["finemoe-topk", "promoe", "moe-infinity"])
@pytest.mark.parametrize("slots", [24, 64, 160])
def test_real_mixtral_logs_give_the_searched_runs(mixtral_trace_path, slots, policy):
    config = SimConfig(str(mixtral_trace_path), policy, PRESETS["rtx3090"],
                       memory=MemoryConfig(expert_cache_slots=slots), workload=WorkloadConfig(history_fraction=0.5),
                       timeline_steps=4)
    planned, searched = _runs(load_trace_for(config), config)
    _assert_same(planned, searched)


def test_promoe_ties_go_to_the_lower_id_either_way(monkeypatch):
    """Predictors that ignore their input (zero weights) and give each expert one of two
    likelihoods (a random half the higher one): which K a token predicts rests on the tie rule."""
    from finemoe.policies import promoe

    def two_valued(x, y, **kw):
        high = np.random.default_rng(kw["seed"]).random(y.shape[1]) < 0.5
        return np.zeros((x.shape[1], y.shape[1])), np.where(high, 1.0, 0.0)

    monkeypatch.setattr(promoe, "train_logistic", two_valued)
    for memo in ("_MODELS", "_PREDICTIONS"):  # none of these predictors may reach another test
        monkeypatch.setattr(promoe, memo, getattr(promoe, memo).empty_like())
    trace = synthetic_trace(tiny_geometry(num_layers=5, num_experts=40, top_k=2), num_requests=6, prompt_tokens=(1, 4),
                            generated_tokens=(2, 6), seed=4)
    config = SimConfig("t", "promoe", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=60),
                       workload=WorkloadConfig(history_fraction=0.5, max_batch=2), policy_params={"distance": 1})
    planned, searched = _runs(trace, config)
    _assert_same(planned, searched)


def _memos():
    from finemoe.policies import finemoe, moe_infinity, promoe
    return [finemoe._FITTED, map_matches._MATCHES, finemoe._PLANNED, promoe._MODELS, promoe._PREDICTIONS,
            moe_infinity._MATCHES]


def test_a_sweep_keeps_its_predictions_beside_its_results_and_reads_them_again(tmp_path, monkeypatch):
    """Each value is computed once for the sweep and kept in `predictions/`; a later sweep into the
    same folder (with nothing in memory) reads them and gets the same results; a corrupt file is
    computed again; a folder it cannot write to only costs the sharing."""
    from finemoe.results import read_result
    from finemoe.sim import compiled_prefetch

    # The compiled path whatever ran in this process before (it plans FineMoE's hooks; these runs
    # are too small to start it cold: SimEngine._compiled_pays).
    monkeypatch.setattr(compiled_prefetch, "warm", True)
    from finemoe.sim.sweep import PREDICTIONS_DIR, run_sweep

    trace_path = tmp_path / "t.parquet"
    from finemoe.traces.io import write_trace
    write_trace(synthetic_trace(tiny_geometry(num_layers=4, num_experts=8, top_k=2), num_requests=8,
                                prompt_tokens=(2, 4), generated_tokens=(3, 6), seed=3, semantic_dim=6), trace_path)
    configs = [SimConfig(str(trace_path), p, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                         workload=WorkloadConfig(history_fraction=0.5), policy_params={"epochs": 5} if p == "promoe" else {})
               for p in ("finemoe", "promoe", "moe-infinity") for slots in (8, 16)]

    def sweep(out):
        for memo in _memos():
            memo.clear()
        before = [m.computed for m in _memos()]
        done = run_sweep(configs, out, progress=False, resume=False)
        assert done.ok, done.failures
        return [m.computed - b for m, b in zip(_memos(), before, strict=True)], \
            [read_result(p).summary["tpot_mean_s"] for p in done.paths]

    computed, first = sweep(tmp_path / "a")
    assert computed == [1] * 6  # once each for the two budgets
    kept = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "a" / PREDICTIONS_DIR).glob("*.npz"))
    assert kept == ["finemoe-hooks", "finemoe-matches", "finemoe-store", "moe-infinity-matches", "promoe-models",
                    "promoe-predictions"]
    computed, again = sweep(tmp_path / "a")
    assert computed == [0] * 6 and again == first
    for path in (tmp_path / "a" / PREDICTIONS_DIR).glob("*.npz"):
        path.write_bytes(b"not an npz")
    computed, again = sweep(tmp_path / "a")
    assert computed == [1] * 6 and again == first
    computed, again = sweep(tmp_path / "a")
    assert computed == [0] * 6 and again == first  # the corrupt files were replaced
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / PREDICTIONS_DIR).write_text("a file where the folder would go")
    computed, again = sweep(tmp_path / "b")
    assert computed == [1] * 6 and again == first  # shared in memory only
