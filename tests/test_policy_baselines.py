"""The predictive baselines: Mixtral-Offloading-style, MoE-Infinity-style and ProMoE-style."""

from __future__ import annotations

import numpy as np
import pytest
from test_policy_support import context, trace_from_probs

from finemoe.errors import ConfigError, MissingFieldError
from finemoe.policies.base import LayerRouting, Sequence, StepInfo
from finemoe.policies.moe_infinity import activation_matrix
from finemoe.policies.registry import make_policy
from finemoe.sim.predict import score_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def _bind(name, trace, **params):
    policy = make_policy(name, **params)
    policy.bind(context(trace.geometry))
    return policy


# --- Mixtral-Offloading-style ----------------------------------------------------------------------


def test_mixtral_offloading_prefetches_the_speculative_experts_of_the_next_layer():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(2, 3))
    spec = np.full((2, 3, 2), -1)
    spec[0, 0], spec[1, 0] = [3, 1], [3, 2]  # layer 1's router on layer 0's input, two tokens
    spec[0, 1], spec[1, 1] = [0, 1], [0, 1]
    trace = trace_from_probs(probs, spec=spec, iterations=[0, 0])
    policy = _bind("mixtral-offloading", trace)
    step = StepInfo(4, 0.0, (Sequence(0, 0, 0, 2),), trace)
    assert list(policy.on_step_start(step)) == []  # layer 0 is never predicted
    got = {(p.step, p.layer, p.expert): p.priority for p in policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
    assert got == pytest.approx({(4, 1, 1): 0.25, (4, 1, 2): 0.25, (4, 1, 3): 0.5})  # share of token votes
    assert {p.expert for p in policy.on_layer_routed(LayerRouting(step, 1, 0.0, trace))} == {0, 1}
    assert list(policy.on_layer_routed(LayerRouting(step, 2, 0.0, trace))) == []  # no layer 3


def test_mixtral_offloading_without_speculative_routing_names_the_field():
    trace = synthetic_trace(with_spec=False)
    ids = [r.request_id for r in trace.requests]
    with pytest.raises(MissingFieldError, match="spec_experts"):
        score_policy(make_policy("mixtral-offloading"), trace, [], ids)


def test_mixtral_offloading_evicts_least_recently_used():
    trace = synthetic_trace()
    policy = _bind("mixtral-offloading", trace)
    for key in [(0, 1), (1, 2), (2, 3)]:
        policy.on_loaded(key, 0.0)
    policy.on_access(0, 1, True, 0.0)  # (0,1) used most recently now
    assert policy.choose_victim(lambda k: True, None, 0.0) == (1, 2)
    assert policy.choose_victim(lambda k: k != (1, 2), None, 0.0) == (2, 3)
    assert policy.choose_victim(lambda k: False, None, 0.0) is None


def test_mixtral_offloading_predicts_well_on_noisy_speculation(small_trace):
    ids = [r.request_id for r in small_trace.requests]
    report = score_policy(make_policy("mixtral-offloading"), small_trace, [], ids)
    per = report.per_layer.set_index("layer")
    assert per.loc[0, "predicted"] == 0  # layer 0 never predicted
    assert report.totals["precision"] > 0.6  # truth plus noise; chance is top-k / J = 0.25


# --- MoE-Infinity-style ----------------------------------------------------------------------------


def test_activation_matrix_counts_tokens_per_layer_and_expert():
    trace = synthetic_trace(num_requests=2, seed=4)
    rows = np.flatnonzero(trace.request_id == 1)
    eam = activation_matrix(trace, rows)
    g = trace.geometry
    assert eam.shape == (g.num_layers, g.num_experts)
    assert eam.sum(axis=1).tolist() == [rows.size * g.top_k] * g.num_layers
    assert eam[2, int(trace.experts[rows[0], 2, 0])] >= 1


def test_moe_infinity_matches_the_closest_history_request():
    # Two history requests with opposite expert preferences; the measured one routes like the second.
    L = 4
    a = np.tile([0.7, 0.2, 0.05, 0.05], (L, 1))
    b = np.tile([0.05, 0.05, 0.2, 0.7], (L, 1))
    history = trace_from_probs(np.stack([a, a, b, b]), request_ids=[0, 0, 1, 1], iterations=[0, 1, 0, 1])
    measured = trace_from_probs(np.stack([b, b]), request_ids=[9, 9], iterations=[0, 1])
    policy = _bind("moe-infinity", history, distance=2)
    policy.fit(history)
    step = StepInfo(0, 0.0, (Sequence(9, 0, 0, 1),), measured)
    first = list(policy.on_step_start(step))  # nothing observed yet: popularity (a tie of a and b)
    assert {p.layer for p in first} == {0, 1} and len(first) == 4
    after = list(policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured)))
    assert {(p.layer, p.expert) for p in after} == {(1, 3), (1, 2), (2, 3), (2, 2)}
    assert max(after).layer == 1 and max(after).expert == 3  # nearer and more used first
    assert policy.describe()["stats"]["history_matrices"] == 2


def test_moe_infinity_learns_finished_requests_online():
    trace = synthetic_trace(num_requests=3)
    policy = _bind("moe-infinity", trace)
    policy.on_request_finished(1, trace)
    assert len(policy.history) == 1
    frozen = _bind("moe-infinity", trace, learn_online=False)
    frozen.on_request_finished(1, trace)
    assert frozen.history == []


def test_moe_infinity_evicts_least_frequently_used():
    trace = synthetic_trace()
    policy = _bind("moe-infinity", trace)
    for key in [(0, 1), (1, 2)]:
        policy.on_loaded(key, 0.0)
    for _ in range(3):
        policy.on_access(1, 2, True, 0.0)
    policy.on_access(0, 1, True, 0.0)
    assert policy.choose_victim(lambda k: True, None, 0.0) == (0, 1)


# --- ProMoE-style ----------------------------------------------------------------------------------


def _deterministic_trace(n_tokens: int, seed: int = 0):
    """Layer 3's experts are a fixed function of layer 0's top expert: a learnable stride pattern."""
    rng = np.random.default_rng(seed)
    L, J = 4, 8
    probs = rng.dirichlet(np.full(J, 0.5), size=(n_tokens, L))
    top0 = probs[:, 0].argmax(axis=1)
    target = np.zeros((n_tokens, J))
    target[np.arange(n_tokens), (top0 + 3) % J] = 0.6
    target[np.arange(n_tokens), (top0 + 5) % J] = 0.3
    probs[:, 3] = target + 0.1 / J
    rid = np.repeat(np.arange(n_tokens // 10), 10)
    return trace_from_probs(probs, request_ids=rid, iterations=np.tile(np.arange(10), n_tokens // 10))


def test_promoe_learns_a_stride_pattern_and_reports_training_cost():
    trace = _deterministic_trace(400)
    ids = [r.request_id for r in trace.requests]
    policy = make_policy("promoe", distance=3, epochs=200)
    report = score_policy(policy, trace, ids[:30], ids[30:])
    layer3 = report.per_layer.set_index("layer").loc[3]
    assert layer3.precision > 0.75 and layer3.recall > 0.75  # chance: 2 of 8 = 0.25
    stats = report.config["policy"]["stats"]
    assert stats["train_s"] > 0 and stats["train_tokens"] == 300 and stats["predictors"] == 1
    assert stats["inputs_used"] == "probs"


def test_promoe_online_trains_after_some_requests_and_predicts_nothing_before():
    trace = _deterministic_trace(100)
    ids = [r.request_id for r in trace.requests]
    policy = make_policy("promoe", retrain_every=2)
    report = score_policy(policy, trace, [], ids)
    stats = report.config["policy"]["stats"]
    assert stats["trainings"] == len(ids) // 2
    assert report.totals["predicted"] > 0
    untrained = _bind("promoe", trace)
    step = StepInfo(0, 0.0, (Sequence(0, 0, 0, 1),), trace)
    untrained.on_step_start(step)
    assert list(untrained.on_layer_routed(LayerRouting(step, 0, 0.0, trace))) == []


def test_promoe_uses_topk_weights_without_router_probs():
    trace = synthetic_trace(tiny_geometry(num_layers=6), num_requests=6, with_probs=False, semantic_dim=None)
    ids = [r.request_id for r in trace.requests]
    report = score_policy(make_policy("promoe", epochs=20), trace, ids[:4], ids[4:])
    assert report.config["policy"]["stats"]["inputs_used"] == "topk"
    assert report.totals["predicted"] > 0
    with pytest.raises(ConfigError):
        make_policy("promoe", inputs="hidden")
