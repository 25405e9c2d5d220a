"""FineMoE's rules on small hand-made stores: delta rule, redundancy replacement, priorities, eviction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_support import context, trace_from_probs

from finemoe.errors import ConfigError
from finemoe.policies.base import LayerRouting, Prefetch, Sequence, StepInfo
from finemoe.policies.expert_maps import (
    ExpertMapStore,
    prefetch_priority,
    select_by_delta,
    topk_map,
)
from finemoe.policies.registry import make_policy, policy_names
from finemoe.sim.predict import score_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

# --- the delta rule -------------------------------------------------------------------------------

ROW = np.array([0.125, 0.5, 0.125, 0.25])  # descending: experts 1 (0.5), 3 (0.25), 0, 2 (0.125 each)


@pytest.mark.parametrize(
    ("similarity", "top_k", "expected"),
    [
        (1.0, 1, [1]),  # delta 0: confident, exactly top-k
        (1.0, 2, [1, 3]),  # never fewer than top-k
        (0.5, 1, [1]),  # delta 0.5: 0.5 reaches it (>=), the smallest prefix is one expert
        (0.4, 1, [1, 3]),  # delta 0.6: 0.5 < 0.6 <= 0.75
        (0.25, 1, [1, 3]),  # delta 0.75 reached exactly by two experts
        (0.2, 1, [1, 3, 0]),  # delta 0.8: three experts (0.875)
        (0.0, 1, [1, 3, 0, 2]),  # delta 1: everything with non-zero probability
        (-3.0, 1, [1, 3, 0, 2]),  # delta clamped to 1
        (7.0, 1, [1]),  # delta clamped to 0
    ],
)
def test_delta_rule_takes_smallest_prefix_reaching_delta(similarity, top_k, expected):
    assert select_by_delta(ROW, similarity, top_k).tolist() == expected


def test_delta_rule_is_not_the_released_codes_off_by_one():
    # The released code takes the largest prefix with sum <= delta: for delta 0.6 that is [1]
    # (0.5 <= 0.6 < 0.75). The paper's rule must reach delta: [1, 3].
    assert select_by_delta(ROW, 0.4, 1).tolist() == [1, 3]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12),
    st.floats(-1.0, 1.0),
    st.integers(1, 4),
)
def test_delta_rule_properties(weights, similarity, top_k):
    row = np.asarray(weights)
    if row.sum() == 0:
        row = np.ones_like(row)
    row = row / row.sum()
    top_k = min(top_k, row.size)
    chosen = select_by_delta(row, similarity, top_k)
    delta = min(max(1 - similarity, 0.0), 1.0)
    # A prefix of the descending order, never fewer than top-k, no duplicates.
    assert len(set(chosen.tolist())) == len(chosen) >= top_k
    assert sorted(row[chosen], reverse=True) == pytest.approx(sorted(row, reverse=True)[: len(chosen)])
    mass = row[chosen].sum()
    assert mass >= delta * row.sum() * (1 - 1e-9)  # reaches delta (as a share of the row's total)
    if len(chosen) > top_k:
        assert row[chosen[:-1]].sum() < delta * row.sum()  # and one fewer would not


def test_priority_is_probability_over_distance():
    assert prefetch_priority(0.6, 3, 0) == pytest.approx(0.2)
    assert prefetch_priority(0.6, 0, -1) == pytest.approx(0.6)  # before layer 0: distance 1
    with pytest.raises(ValueError):
        prefetch_priority(0.5, 2, 2)


def test_topk_map_puts_gate_weights_on_routed_experts():
    m = topk_map(np.array([[[2, 0], [-1, -1]]]), np.array([[[0.75, 0.25], [0, 0]]]), 4)
    assert m.tolist() == [[[0.25, 0.0, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0]]]


# --- redundancy replacement ----------------------------------------------------------------------


def _two_map_store(distance: int) -> ExpertMapStore:
    store = ExpertMapStore(num_layers=4, num_experts=4, capacity=2, distance=distance, semantic_dim=2)
    store.add(np.tile([1.0, 0, 0, 0], (4, 1)), np.array([1.0, 0]))  # A: one-hot rows, key x
    store.add(np.full((4, 4), 0.25), np.array([0.0, 1]))  # B: uniform rows, key y
    return store


@pytest.mark.parametrize(("distance", "replaced"), [(2, 0), (1, 1)])
def test_full_store_replaces_most_redundant_map(distance, replaced):
    # New map N: B's map with A's key. cos(map A, map N) = 0.5, cos(map B, map N) = 1.
    # d/L = 0.5: red(A) = 0.5*1 + 0.5*0.5 = 0.75 > red(B) = 0.5  -> A goes.
    # d/L = 0.25: red(A) = 0.25 + 0.75*0.5 = 0.625 < red(B) = 0.75 -> B goes.
    store = _two_map_store(distance)
    new_map, new_key = np.full((4, 4), 0.25), np.array([1.0, 0])
    red = store.redundancy(new_map, new_key)
    w = distance / 4
    assert red.tolist() == pytest.approx([w + (1 - w) * 0.5, (1 - w) * 1.0])
    slot = store.add(new_map, new_key)
    assert slot == replaced and len(store) == 2 and store.replaced == 1
    kept = 1 - replaced
    assert np.array_equal(store.maps[kept], _two_map_store(distance).maps[kept])  # the other stays


def test_store_without_semantic_keys_uses_map_cosine_only():
    store = ExpertMapStore(2, 2, capacity=1, distance=1, semantic_dim=None)
    store.add(np.array([[1.0, 0], [0, 1]]))
    assert store.redundancy(np.array([[1.0, 0], [1, 0]]), None).tolist() == pytest.approx([0.5])
    assert store.match_semantic(np.ones(3)) is None


def test_trajectory_match_uses_only_rows_seen_so_far():
    store = ExpertMapStore(3, 2, capacity=2, distance=1, semantic_dim=None)
    store.add(np.array([[1.0, 0], [1, 0], [1, 0]]))  # agrees on layer 0, not on layer 1
    store.add(np.array([[0.6, 0.4], [0, 1], [0, 1]]))
    q = store.trajectory(1)
    first = q.best(q.observe(0, np.array([[1.0, 0]])))[0]
    assert first.index == 0 and first.similarity == pytest.approx(1.0)
    second = q.best(q.observe(1, np.array([[0.0, 1]])))[0]
    assert second.index == 1
    # cosine of [1,0,0,1] with [0.6,0.4,0,1]
    assert second.similarity == pytest.approx(1.6 / (np.sqrt(2) * np.sqrt(0.52 + 1)))
    with pytest.raises(ValueError):
        q.observe(0, np.array([[1.0, 0]]))  # layers must come in order


# --- the policy on a hand-made store --------------------------------------------------------------

M = np.array(
    [
        [0.6, 0.4, 0.0, 0.0],
        [0.7, 0.3, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.25, 0.125, 0.125],
    ]
)
KEY = np.array([[1.0, 0.0, 0.0]])


def approx16(value):
    """Traces store probabilities as float16: 0.6 comes back as 0.60009765625."""
    return pytest.approx(value, rel=1e-3)


def _bound_policy(name="finemoe", **params):
    history = trace_from_probs(M[None], KEY)
    measured = trace_from_probs(M[None], KEY, request_ids=[7])
    policy = make_policy(name, distance=2, **params)
    policy.bind(context(history.geometry))
    policy.fit(history)
    step = StepInfo(0, 0.0, (Sequence(7, 0, 0, 1),), measured)
    return policy, step, measured


def test_prefetch_priorities_are_p_over_distance_in_order():
    policy, step, measured = _bound_policy()
    first = list(policy.on_step_start(step))  # semantic phase: layers 0..d-1, similarity 1
    assert [(p.layer, p.expert) for p in first] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [p.priority for p in first] == approx16([0.6, 0.4, 0.35, 0.15])
    assert all(p.step == 0 for p in first)
    traj = list(policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured)))  # layer 0 -> layer 2
    assert [(p.layer, p.expert) for p in traj] == [(2, 3), (2, 2)]
    assert [p.priority for p in traj] == approx16([0.2, 0.15])
    traj = list(policy.on_layer_routed(LayerRouting(step, 1, 0.0, measured)))  # layer 1 -> layer 3
    assert [(p.layer, p.expert, p.priority) for p in traj] == [(3, 0, approx16(0.25)), (3, 1, approx16(0.125))]
    assert list(policy.on_layer_routed(LayerRouting(step, 2, 0.0, measured))) == []  # 2 + d is past the end


def test_search_time_stamps_predictions_with_when_the_search_thread_is_done():
    policy, step, measured = _bound_policy(search_s=1e-3)  # "exact" is the default
    first = list(policy.on_step_start(step))  # 1 semantic search at 0 s: ready at 1 ms
    assert [p.ready_s for p in first] == [pytest.approx(1e-3)] * 4
    # Layer 0 routed at 0.5 ms: the search thread is busy until 1 ms, then 1 trajectory search.
    got = list(policy.on_layer_routed(LayerRouting(step, 0, 0.5e-3, measured)))
    assert [(p.layer, p.expert) for p in got] == [(2, 3), (2, 2)]
    assert [p.ready_s for p in got] == [pytest.approx(2e-3)] * 2
    got = list(policy.on_layer_routed(LayerRouting(step, 1, 5e-3, measured)))  # the thread is idle by then
    assert [p.ready_s for p in got] == [pytest.approx(6e-3)] * 2
    stats = policy.describe()["stats"]
    assert (stats["searches"], stats["searches_abandoned"]) == (3, 0)
    assert stats["modelled_search_s"] == pytest.approx(3e-3)
    none, step2, _ = _bound_policy(search_s=1e-3, search_charge="none")
    assert [p.ready_s for p in none.on_step_start(step2)] == [0.0] * 4  # "none": at once
    with pytest.raises(ConfigError, match="search_charge must be one of exact, none"):
        make_policy("finemoe", search_charge="defer")


def ready_times(prefetches) -> list[float]:
    """The distinct ready times of a call's prefetches (one per call)."""
    return sorted({p.ready_s for p in prefetches})


def test_a_prefill_is_charged_per_token_if_asked_and_a_new_step_abandons_what_has_not_started():
    history = trace_from_probs(M[None], KEY)
    prompt = trace_from_probs(np.stack([M, M, M, M]), np.repeat(KEY, 4, axis=0), request_ids=[7] * 4,
                              iterations=[0, 0, 0, 1])
    policy = make_policy("finemoe", distance=2, search_s=1e-3, search_token_s=0.25e-3)
    policy.bind(context(history.geometry))
    policy.fit(history)
    prefill = StepInfo(0, 0.0, (Sequence(7, 0, 0, 3),), prompt)
    assert ready_times(policy.on_step_start(prefill)) == pytest.approx([1e-3])  # 1 semantic search
    # Layer 0 at 0.2 ms: 3 tokens, 1 ms + 2 x 0.25 ms after the semantic search -> ready at 2.5 ms.
    got = policy.on_layer_routed(LayerRouting(prefill, 0, 0.2e-3, prompt))
    assert ready_times(got) == pytest.approx([2.5e-3])
    got = policy.on_layer_routed(LayerRouting(prefill, 1, 0.4e-3, prompt))  # queued: 2.5 -> 4.0 ms
    assert ready_times(got) == pytest.approx([4e-3])
    # The decode step starts at 2.0 ms: layer 0's search is running (until 2.5 ms), layer 1's has
    # not started and is abandoned; the new step's semantic search follows the running one.
    decode = StepInfo(1, 2e-3, (Sequence(7, 1, 3, 4),), prompt)
    assert ready_times(policy.on_step_start(decode)) == pytest.approx([3.5e-3])
    stats = policy.describe()["stats"]
    assert (stats["searches"], stats["searches_abandoned"]) == (4, 1)
    assert stats["modelled_search_s"] == pytest.approx(1e-3 + 1.5e-3 + 1e-3)


def test_eviction_lowest_p_times_freq_with_predicted_window_protected():
    policy, step, measured = _bound_policy()
    for key in [(0, 0), (0, 2), (1, 1), (2, 3), (3, 2)]:
        policy.on_loaded(key, 0.0)
    for key, uses in {(0, 0): 1, (0, 2): 3, (1, 1): 1, (3, 2): 2}.items():
        for _ in range(uses):
            policy.on_access(*key, True, 0.0)
    policy.on_step_start(step)
    policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured))
    policy.on_layer_routed(LayerRouting(step, 1, 0.0, measured))
    # p x freq: (0,2) 0*3=0, (3,2) .125*2=.25, (0,0) .6*1 (layer 0 passed: unprotected);
    # protected (predicted this step for layers >= 1): (2,3) .4*0=0, (1,1) .3*1.
    assert policy.eviction_order() == [(0, 2), (3, 2), (0, 0), (2, 3), (1, 1)]
    every = lambda key: True  # noqa: E731
    assert policy.choose_victim(every, None, 0.0) == (0, 2)
    assert policy.choose_victim(lambda key: key != (0, 2), None, 0.0) == (3, 2)
    only_protected = lambda key: key in {(2, 3), (1, 1)}  # noqa: E731
    # A prefetch may not displace the window's predicted experts; an on-demand load must get a slot.
    assert policy.choose_victim(only_protected, Prefetch(0.9, 0, 3, 0), 0.0) is None
    assert policy.choose_victim(only_protected, None, 0.0) == (2, 3)
    policy.on_evicted((0, 2), 0.0)
    assert (0, 2) not in policy.eviction_order()


def test_lru_ablation_ignores_probabilities():
    policy, step, measured = _bound_policy("finemoe-lru")
    for key in [(0, 0), (2, 3), (3, 2)]:
        policy.on_loaded(key, 0.0)
    policy.on_access(0, 0, True, 0.0)
    policy.on_step_start(step)
    assert policy.eviction_order() == [(2, 3), (3, 2), (0, 0)]
    assert policy.describe()["params"]["cache"] == "lru"


def test_batch_predictions_are_united_with_max_priority():
    # Two sequences in one step, matching different stored maps: both predictions survive.
    m2 = M[:, [2, 3, 0, 1]]  # the same map with experts permuted
    history = trace_from_probs(np.stack([M, m2]), np.array([[1.0, 0, 0], [0, 1.0, 0]]), request_ids=[0, 1])
    measured = trace_from_probs(np.stack([M, m2]), np.array([[1.0, 0, 0], [0, 1.0, 0]]), request_ids=[5, 6])
    policy = make_policy("finemoe", distance=2)
    policy.bind(context(history.geometry))
    policy.fit(history)
    step = StepInfo(0, 0.0, (Sequence(5, 0, 0, 1), Sequence(6, 0, 1, 2)), measured)
    got = {(p.layer, p.expert): p.priority for p in policy.on_step_start(step)}
    assert got == approx16({(0, 0): 0.6, (0, 1): 0.4, (0, 2): 0.6, (0, 3): 0.4,
                                 (1, 0): 0.35, (1, 1): 0.15, (1, 2): 0.35, (1, 3): 0.15})
    layer2 = {(p.layer, p.expert) for p in policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured))}
    assert layer2 == {(2, 3), (2, 2), (2, 1), (2, 0)}


def test_no_delta_ablation_takes_exactly_top_k_on_a_poor_match():
    history = trace_from_probs(M[None], KEY)
    poor = trace_from_probs(M[None][:, :, ::-1].copy(), np.array([[0.0, 1.0, 0.0]]), request_ids=[3])
    step = StepInfo(0, 0.0, (Sequence(3, 0, 0, 1),), poor)
    counts = {}
    for name in ("finemoe", "finemoe-no-delta"):
        policy = make_policy(name, distance=2)
        policy.bind(context(history.geometry))
        policy.fit(history)
        counts[name] = len(list(policy.on_step_start(step)))  # semantic similarity 0: delta 1
    assert counts == {"finemoe": 4, "finemoe-no-delta": 4} or counts["finemoe"] > counts["finemoe-no-delta"]
    assert counts["finemoe-no-delta"] == 4  # 2 layers x top-2


def test_online_maps_enter_the_store_between_steps():
    policy, step, measured = _bound_policy()
    assert len(policy.store) == 1
    policy.on_request_finished(7, measured)
    assert len(policy.store) == 1  # not while a step may be matching
    policy.on_step_start(step)
    assert len(policy.store) == 2
    frozen, _, _ = _bound_policy(learn_online=False)
    frozen.on_request_finished(7, measured)
    frozen.on_step_start(step)
    assert len(frozen.store) == 1


def test_a_fitted_store_is_shared_until_a_run_adds_a_map_of_its_own():
    a, step, measured = _bound_policy()
    b, _, _ = _bound_policy()
    assert a.store is b.store and a.fit_maps == b.fit_maps == 1  # the same history, the same store
    other, _, _ = _bound_policy(capacity=3)
    assert other.store is not a.store  # another store size: another store
    a.on_request_finished(7, measured)
    a.on_step_start(step)
    assert a.store is not b.store and len(a.store) == 2 and len(b.store) == 1  # copied, then added to


def test_runs_on_a_shared_fitted_store_equal_runs_on_a_fresh_one(monkeypatch, tmp_path):
    import finemoe.policies.finemoe as fm
    from finemoe.policies.memo import stored_in
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.run import simulate

    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=6, top_k=2), num_requests=8,
                            prompt_tokens=(2, 5), generated_tokens=(4, 8), seed=3, semantic_dim=8)

    def run(slots):
        return simulate(trace, SimConfig("t", "finemoe", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                                         workload=WorkloadConfig(history_fraction=0.5), timeline_steps=0)).summary

    def same(got, want):
        return ({k: v for k, v in got.items() if k != "wall_s" and "per_wall" not in k} ==
                {k: v for k, v in want.items() if k != "wall_s" and "per_wall" not in k})

    monkeypatch.setattr(fm, "_FITTED", fm._FITTED.empty_like())
    shared = [run(slots) for slots in (8, 14, 8)]  # the second and third fit nothing
    assert fm._FITTED.computed == 1
    fresh = []
    for slots in (8, 14):
        monkeypatch.setattr(fm, "_FITTED", fm._FITTED.empty_like())
        fresh.append(run(slots))
    for got, want in zip(shared, fresh + fresh[:1], strict=True):
        assert same(got, want)
    # A sweep's other worker reads the store the first one kept on disk, and runs the same.
    with stored_in(tmp_path):
        monkeypatch.setattr(fm, "_FITTED", fm._FITTED.empty_like())
        run(8)
        monkeypatch.setattr(fm, "_FITTED", fm._FITTED.empty_like())
        again = run(14)
    assert fm._FITTED.computed == 0 and len(list(tmp_path.glob("finemoe-store-*.npz"))) == 1
    assert same(again, fresh[1])


def test_a_fitted_store_read_back_is_the_same_store():
    from finemoe.policies.expert_maps import ExpertMapStore

    rng = np.random.default_rng(4)
    for dim in (None, 5):
        store = ExpertMapStore(3, 4, capacity=5, distance=1, semantic_dim=dim)
        for _ in range(8):  # past its capacity: some maps replaced
            store.add(rng.random((3, 4)), None if dim is None else rng.random(dim))
        back = ExpertMapStore.from_arrays(store.to_arrays())
        assert back.digest() == store.digest() and (back.size, back.inserted, back.replaced) == (5, 8, 3)
        for name, a in store.to_arrays().items():
            assert np.array_equal(back.to_arrays()[name], a), name
        query = rng.random((2, 3, 4))
        assert all(np.array_equal(x, y) for x, y in zip(back.trajectory_matches(query, 3),
                                                         store.trajectory_matches(query, 3), strict=True))


def test_variants_registered_and_parameters_checked():
    names = set(policy_names())
    assert {"finemoe", "finemoe-semantic", "finemoe-trajectory", "finemoe-no-delta", "finemoe-lru",
            "finemoe-lfu", "finemoe-topk"} <= names
    d = make_policy("finemoe-trajectory", capacity=5).describe()
    assert d["params"]["semantic"] is False and d["params"]["capacity"] == 5
    for bad in ({"distance": 0}, {"capacity": 0}, {"cache": "fifo"}, {"bogus": 1},
                {"semantic": False, "trajectory": False}):
        with pytest.raises(ConfigError):
            make_policy("finemoe", **bad)


# --- properties on synthetic traces ----------------------------------------------------------------


def _random_trace(seed: int, layers: int, experts: int, top_k: int, max_prefill: int = 4):
    """Three requests (a 1-`max_prefill` token prefill, then 2-6 decode tokens) of random router rows.

    Dirichlet(1) rows keep every token's trajectory distinct even in float16 (the synthetic traces'
    sharply peaked rows can coincide on a prefix, and identical prefixes cannot be told apart).
    """
    rng = np.random.default_rng(seed)
    rid, it = [], []
    for r in range(3):
        prefill, decode = int(rng.integers(1, max_prefill + 1)), int(rng.integers(2, 7))
        rid += [r] * (prefill + decode)
        it += [0] * prefill + list(range(1, decode + 1))
    n = len(rid)
    probs = rng.dirichlet(np.ones(experts), size=(n, layers))
    return trace_from_probs(probs, rng.normal(size=(n, 8)), request_ids=rid, iterations=it, top_k=top_k)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.sampled_from([(6, 8, 2), (5, 16, 4)]))
def test_trajectory_match_on_a_seen_request_predicts_exactly(seed, distance, shape):
    # With every iteration of the trace in the store (C large enough), an iteration's own map
    # matches its trajectory with cosine 1, so delta = 0 and the predicted top-k of layers d.. are
    # its experts (prefills of one token here: a longer one's map is its tokens' mean).
    trace = _random_trace(seed, *shape, max_prefill=1)
    ids = [r.request_id for r in trace.requests]
    policy = make_policy("finemoe", distance=distance, capacity=trace.num_tokens, learn_online=False)
    report = score_policy(policy, trace, ids, ids)
    later = report.per_layer[report.per_layer.layer >= distance]
    assert (later.correct == later.routed).all()
    assert (later.predicted == later.routed).all()


def test_finemoe_beats_chance_on_unseen_requests(small_trace):
    trace = synthetic_trace(tiny_geometry(num_layers=8), num_requests=12, seed=3)
    ids = [r.request_id for r in trace.requests]
    report = score_policy(make_policy("finemoe"), trace, ids[:8], ids[8:])
    chance = trace.geometry.top_k / trace.geometry.num_experts
    assert report.totals["precision"] > chance + 0.1
    assert report.config["policy"]["stats"]["fit_maps"] == len(trace.select_requests(ids[:8]).iterations)

