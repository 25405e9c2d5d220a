"""FineMoE as FINEMOE.md specifies it, where the code departed from it: the paper's prefetch
distance per model, the LRU/LFU ablations keeping the window's protection, one map per iteration
(a prefill's is its tokens' mean) and a running iteration matched as one map; and pins of the delta
rule's similarity and of eviction priorities following the latest prediction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_policy_finemoe import _bound_policy
from test_policy_support import context, trace_from_probs

from finemoe.policies.base import LayerRouting, Prefetch, Sequence, StepInfo
from finemoe.policies.finemoe import paper_distance
from finemoe.policies.registry import make_policy
from finemoe.traces.synthetic import tiny_geometry


@pytest.mark.parametrize(("model", "distance"), [("mixtral-8x7b", 3), ("Qwen3-30B-A3B", 6),
                                                 ("qwen1.5-moe-a2.7b", 6), ("phi-3.5-moe", 4),
                                                 ("finemoe-demo-moe", 3)])
def test_paper_distance_by_model(model, distance):
    assert paper_distance(model) == distance


def test_distance_follows_the_model_unless_given():
    qwen = dataclasses.replace(tiny_geometry(num_layers=8), model_name="qwen3-30b-a3b")
    policy = make_policy("finemoe")
    policy.bind(context(qwen))
    assert policy.distance == 6 and policy.describe()["params"]["distance"] == 6
    given = make_policy("finemoe", distance=2)
    given.bind(context(qwen))
    assert given.distance == 2


@pytest.mark.parametrize("name", ["finemoe-lru", "finemoe-lfu"])
def test_lru_and_lfu_ablations_keep_the_windows_protection(name):
    policy, step, measured = _bound_policy(name)
    for key in [(2, 3), (1, 1), (0, 0), (0, 2), (3, 2)]:  # the predicted ones loaded first: LRU's first victims
        policy.on_loaded(key, 0.0)
    policy.on_step_start(step)
    policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured))
    policy.on_layer_routed(LayerRouting(step, 1, 0.0, measured))
    protected = {tuple(k) for k in zip(*policy.protected_mask().nonzero(), strict=True)}
    assert {(2, 3), (1, 1)} <= protected  # predicted this step for layers not yet passed
    order = policy.eviction_order()
    assert set(order[-len(protected & set(order)):]) == protected & set(order)  # protected go last
    victim = policy.choose_victim(lambda key: True, None, 0.0)
    assert victim not in protected
    only_protected = lambda key: key in {(2, 3), (1, 1)}  # noqa: E731
    assert policy.choose_victim(only_protected, Prefetch(0.9, 0, 3, 0), 0.0) is None
    assert policy.choose_victim(only_protected, None, 0.0) in {(2, 3), (1, 1)}


# --- one map per iteration, and a running iteration matched like the stored maps ------------------
# L=3, J=4, top-1, d=2. Request 0's prefill has two tokens (A, B); request 1's prefill is one token X
# that equals A at layer 0 but routes elsewhere at layer 2.
A = [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 1, 0]]
B = [[0, 1, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 1, 0]]
X = [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 1]]
KEYS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])


def _spec_history():
    return trace_from_probs(np.array([A, B, X]), KEYS, request_ids=[0, 0, 1], iterations=[0, 0, 0], top_k=1)


def test_a_prefill_is_stored_as_one_map_the_mean_of_its_tokens():
    policy = make_policy("finemoe", distance=2)
    history = _spec_history()
    policy.bind(context(history.geometry))
    policy.fit(history)
    assert policy.store.size == 2 and policy.describe()["stats"]["fit_maps"] == 2
    np.testing.assert_allclose(policy.store.maps[0], (np.array(A) + np.array(B)) / 2)
    np.testing.assert_allclose(policy.store.maps[1], X)
    np.testing.assert_allclose(policy.store.keys[0], [0.5, 0.5])  # the mean of the tokens' keys


def test_decode_iterations_are_one_map_each():
    policy = make_policy("finemoe", distance=2)
    history = trace_from_probs(np.array([A, B, X]), KEYS, request_ids=[0, 0, 0], iterations=[0, 1, 2], top_k=1)
    policy.bind(context(history.geometry))
    policy.fit(history)
    assert policy.store.size == 3


def test_a_running_prefill_is_matched_as_one_map():
    # The prompt A, B again: its mean row at layer 0 matches the stored prefill map with cosine 1,
    # so delta = 0 and layer 2's one expert is predicted. Matched token by token (the code before),
    # token A would have matched X exactly and added expert 3.
    history = _spec_history()
    measured = trace_from_probs(np.array([A, B]), KEYS[:2], request_ids=[7, 7], iterations=[0, 0], top_k=1)
    policy = make_policy("finemoe", distance=2, search_s=1e-3, search_token_s=0.0)
    policy.bind(context(history.geometry))
    policy.fit(history)
    step = StepInfo(0, 0.0, (Sequence(7, 0, 0, 2),), measured)
    policy.on_step_start(step)
    got = list(policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured)))
    assert [(p.layer, p.expert) for p in got] == [(2, 2)]
    assert got[0].priority == pytest.approx(1.0 / 2)  # p / (2 - 0)
    assert policy.describe()["stats"]["searches"] == 2  # one semantic, one trajectory: not one per token
    assert got[0].ready_s == pytest.approx(2e-3)  # two searches of 1 ms, no per-token charge


# --- delta and eviction priorities, as the spec states them ----------------------------------------
def test_delta_comes_from_the_matchs_similarity():
    # A poor semantic match (keys orthogonal to every stored key: cosine 0, delta 1) hedges with
    # every expert of non-zero probability; the exact match (cosine 1, delta 0) takes exactly top-k.
    history = _spec_history()
    measured = trace_from_probs(np.array([A]), np.array([[0.0, 0.0]]) + [[-1.0, 1.0]], request_ids=[7],
                                iterations=[0], top_k=1)
    policy = make_policy("finemoe", distance=2)
    policy.bind(context(history.geometry))
    policy.fit(history)
    step = StepInfo(0, 0.0, (Sequence(7, 0, 0, 1),), measured)
    first = {(p.layer, p.expert) for p in policy.on_step_start(step)}
    assert policy._sem[0].similarity == pytest.approx(0.0, abs=1e-6)
    # best by key: the prefill map (key [.5, .5]) at cosine 0 (ties with X go to the first stored)
    assert first == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)}


def test_eviction_priorities_follow_the_latest_prediction_not_the_highest_ever():
    # Step 0 predicts layer 2 as expert 2 (p = 1); step 1, a decode token routed like X, predicts
    # expert 3 instead. p x freq must drop for expert 2 and rise for expert 3 when step 1 predicts.
    history = _spec_history()
    measured = trace_from_probs(np.array([A, B, X]), KEYS, request_ids=[7, 7, 7], iterations=[0, 0, 1], top_k=1)
    policy = make_policy("finemoe", distance=2)
    policy.bind(context(history.geometry))
    policy.fit(history)
    for key in [(2, 2), (2, 3)]:
        policy.on_loaded(key, 0.0)
        policy.on_access(*key, True, 0.0)
    prefill = StepInfo(0, 0.0, (Sequence(7, 0, 0, 2),), measured)
    policy.on_step_start(prefill)
    policy.on_layer_routed(LayerRouting(prefill, 0, 0.0, measured))
    assert policy._p[2].tolist() == pytest.approx([0, 0, 1, 0])
    decode = StepInfo(1, 1.0, (Sequence(7, 1, 2, 3),), measured)
    policy.on_step_start(decode)
    policy.on_layer_routed(LayerRouting(decode, 0, 1.0, measured))
    assert policy._p[2].tolist() == pytest.approx([0, 0, 0, 1])
    assert policy.eviction_order()[0] == (2, 2)  # now the lower p x freq (and unprotected)
