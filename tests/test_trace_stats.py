"""Routing statistics on hand-built traces whose every figure can be worked out on paper."""

from __future__ import annotations

import numpy as np
import pytest

from finemoe.traces.schema import MISSING_EXPERT, RequestInfo, Trace
from finemoe.traces.stats import entropy_bits, routing_stats, summarize, usage_entropy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def hand_trace(with_probs: bool = False) -> Trace:
    """4 decode tokens, 2 layers, 4 experts, top-2.

    layer 0: tokens route to {0,1}, {2,3}, {0,1}, {2,3}, weights 0.5/0.5
    layer 1: token t routes to (t, t+1 mod 4) with weights 0.75/0.25
    """
    g = tiny_geometry(2, 4, 2)
    experts = np.zeros((4, 2, 2), np.int16)
    weights = np.zeros((4, 2, 2), np.float16)
    for t in range(4):
        experts[t, 0] = [0, 1] if t % 2 == 0 else [2, 3]
        weights[t, 0] = [0.5, 0.5]
        experts[t, 1] = [t, (t + 1) % 4]
        weights[t, 1] = [0.75, 0.25]
    probs = np.full((4, 2, 4), 0.25, np.float16) if with_probs else None
    return Trace(g, (RequestInfo(0, 5, 4, False, label="hand/0"),), np.zeros(4, np.int32),
                 np.arange(1, 5, dtype=np.int32), np.arange(5, 9, dtype=np.int32), experts, weights,
                 router_probs=probs)


H_075 = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))  # 0.811 bits


def test_entropy_of_known_distributions():
    assert entropy_bits(np.array([1, 1, 1, 1])) == pytest.approx(2.0)
    assert entropy_bits(np.array([3, 1])) == pytest.approx(H_075)
    assert entropy_bits(np.array([0, 0])) == 0.0


def test_hand_trace_figures():
    s = routing_stats(hand_trace())
    assert s.source == "top-k weights" and s.max_entropy_bits == 2.0
    np.testing.assert_allclose(s.usage_entropy_bits, [2.0, 2.0])  # every expert chosen twice per layer
    # fine: each decode token alone; layer 0 is 0.5/0.5 (1 bit), layer 1 is 0.75/0.25
    np.testing.assert_allclose(s.fine_entropy_per_layer_bits, [1.0, H_075], rtol=1e-6)
    assert s.fine_entropy_bits == pytest.approx((1.0 + H_075) / 2)
    # coarse: over the request, both layers spread evenly over 4 experts
    np.testing.assert_allclose(s.coarse_entropy_per_layer_bits, [2.0, 2.0])
    # top-1 at layer 0 is 0,2,0,2; at layer 1 it is 0,1,2,3: knowing the first halves the choices
    np.testing.assert_allclose(s.next_top1_entropy_bits, [2.0])
    np.testing.assert_allclose(s.next_top1_cond_entropy_bits, [1.0])
    assert s.top1_weight_share == pytest.approx((0.5 + 0.75) / 2)


def test_full_router_probabilities_are_used_when_present():
    s = routing_stats(hand_trace(with_probs=True))
    assert s.source == "router_probs"
    assert s.fine_entropy_bits == pytest.approx(2.0)  # uniform softmax over 4 experts


def test_missing_records_are_left_out():
    t = hand_trace()
    t.experts[1, 0] = MISSING_EXPERT  # token 1 no longer counts at layer 0
    t.weights[1, 0] = 0
    counts = np.array([2, 2, 1, 1])  # experts 0,1 twice; 2,3 once
    assert usage_entropy(t)[0] == pytest.approx(entropy_bits(counts))
    s = routing_stats(t)
    assert s.fine_entropy_per_layer_bits[0] == pytest.approx(1.0)
    # layer 0 -> 1 pairs: only tokens 0, 2, 3 count
    assert s.next_top1_cond_entropy_bits[0] == pytest.approx(2 / 3 * 1.0)


def test_a_prefill_iteration_is_one_distribution_over_its_tokens():
    g = tiny_geometry(1, 4, 1)
    experts = np.array([[[0]], [[1]], [[2]]], np.int16)  # prefill: 2 tokens on experts 0 and 1; decode: 2
    weights = np.ones((3, 1, 1), np.float16)
    t = Trace(g, (RequestInfo(0, 2, 1, True),), np.zeros(3, np.int32), np.array([0, 0, 1], np.int32),
              np.array([0, 1, 2], np.int32), experts, weights)
    s = routing_stats(t)
    assert s.fine_entropy_bits == pytest.approx((1.0 + 0.0) / 2)  # prefill: 1 bit; decode token: 0
    assert s.coarse_entropy_bits == pytest.approx(np.log2(3))
    assert routing_stats(t, decode_only=True).tokens_used == 1


def test_summary_counts(small_trace):
    s = summarize(small_trace)
    assert s["requests"] == 4 and s["token_rows"] == small_trace.num_tokens
    assert s["generated_tokens"] == sum(r.generated_tokens for r in small_trace.requests)
    assert s["iterations"] == len(small_trace.iterations)
    assert s["missing_records"] == 0 and "router_probs" in s["optional_fields"]


def test_synthetic_structure_shows_in_the_statistics():
    t = synthetic_trace(tiny_geometry(6, 16, 2), num_requests=3, generated_tokens=60, with_probs=False, seed=2)
    s = routing_stats(t)
    # the generator chains each layer's top-1 to the next: conditioning must lower the entropy
    assert (s.next_top1_cond_entropy_bits < s.next_top1_entropy_bits).all()
    assert s.fine_entropy_bits < s.coarse_entropy_bits
