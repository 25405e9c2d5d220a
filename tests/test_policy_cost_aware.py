"""`cost-aware`: its learned rates, its eviction by expected next use and its prefetch gate,
on hand-made cases whose numbers can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from test_policy_support import context, trace_from_probs

from finemoe.errors import ConfigError
from finemoe.policies.base import LayerRouting, Sequence, StepInfo
from finemoe.policies.cost_aware import ReuseRates, one_hot
from finemoe.policies.registry import make_policy, policy_names
from finemoe.traces.synthetic import synthetic_trace


def _probs(routes, J=4):
    """Probability rows whose top-2 are the given expert pairs: routes[token][layer] = (a, b)."""
    probs = np.full((len(routes), len(routes[0]), J), 0.01)
    for t, layers in enumerate(routes):
        for layer, (a, b) in enumerate(layers):
            probs[t, layer, a], probs[t, layer, b] = 0.6, 0.3
    return probs


def test_one_hot_skips_missing_ids():
    assert one_hot(np.array([[2, -1], [0, 1]]), 3).tolist() == [[False, False, True], [True, True, False]]


def test_reuse_rates_count_consecutive_tokens_shrunk_toward_the_layer_rate():
    rates = ReuseRates(1, 4, 2)  # K/J = 0.5; prior worth 2 tokens at the layer's pooled rate
    before = one_hot(np.array([[[0, 1]], [[0, 1]]]), 4)
    after = one_hot(np.array([[[0, 2]], [[1, 2]]]), 4)
    rates.add_pairs(before, after)
    # pooled reuse: (2 reused + 0.5) / (4 used + 1) = 0.5; expert 0: (1 + 2 x 0.5) / (2 + 2)
    assert rates.reuse()[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5])
    # pooled cold: (2 + 0.5) / (4 + 1) = 0.5; expert 2 (2 of 2): (2 + 1) / 4, expert 3 (0 of 2): 1 / 4
    assert rates.cold()[0].tolist() == pytest.approx([0.5, 0.5, 0.75, 0.25])


def test_a_first_used_expert_gets_its_layers_reuse_rate_not_k_over_j():
    rates = ReuseRates(1, 4, 1)  # K/J = 0.25
    before = one_hot(np.array([[[0]], [[0]], [[1]]]), 4)
    after = one_hot(np.array([[[0]], [[0]], [[2]]]), 4)
    rates.add_pairs(before, after)
    pooled = (2 + 0.25) / (3 + 1)  # 2 reuses in 3 uses, K/J worth one token
    assert rates.reuse()[0].tolist() == pytest.approx(
        [(2 + 2 * pooled) / (2 + 2), (0 + 2 * pooled) / (1 + 2), pooled, pooled])
    assert pooled > 0.25  # the flat prior would have put experts 2 and 3 at 0.25
    assert ReuseRates(1, 4, 1, prior_tokens=8.0).reuse()[0, 0] == pytest.approx(0.25)  # no counts: K/J
    rates.add_tokens(one_hot(np.array([[[0]], [[0]]]), 4))
    assert rates.rate()[0].tolist() == pytest.approx([(2 + 0.5) / 4, 0.5 / 4, 0.5 / 4, 0.5 / 4])


def _fitted(routes, slots=4, **params):
    trace = trace_from_probs(_probs(routes))
    policy = make_policy("cost-aware", **params)
    policy.bind(context(trace.geometry, capacity_slots=slots))
    policy.fit(trace)
    return policy, trace


# Two layers, four experts; in the history layer 0 alternates (0,1),(2,3) token by token and
# layer 1 always uses (0,1).
HISTORY = [[(0, 1), (0, 1)], [(2, 3), (0, 1)]] * 4


def test_fit_learns_reuse_from_the_history_split():
    policy, _ = _fitted(HISTORY)
    r, c = policy.rates.reuse(), policy.rates.cold()
    # Layer 0: 14 uses with a next token, none reused: pooled reuse (0 + 0.5) / (14 + 1); expert 0
    # was used 4 times, never by the next token: (0 + 2 x pooled) / (4 + 2).
    assert r[0, 0] == pytest.approx(2 / 30 / 6)
    # 14 non-uses, all followed by a use: pooled cold 14.5 / 15; expert 0: 3 of 3
    assert c[0, 0] == pytest.approx((3 + 2 * 14.5 / 15) / (3 + 2))
    assert r[1, 0] == pytest.approx((7 + 2 * 14.5 / 15) / (7 + 2))  # layer 1: 14 of 14 reused


def test_eviction_takes_the_farthest_expected_next_use():
    policy, trace = _fitted(HISTORY)
    step = StepInfo(0, 0.0, (Sequence(0, 1, 0, 1),), trace)  # the history's first token again
    policy.on_step_start(step)
    policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))  # layer 0 used 0, 1: next token 2, 3
    for key in [(0, 0), (0, 2), (1, 0), (1, 2)]:
        policy.on_loaded(key, 0.0)
    score = policy.expected_next_use()
    # At layer 0 of the step: layer 1 comes in 1 layer, layer 0 in 2 (L = 2). Layer 0 just used
    # 0, 1: p(0, 0) is its reuse rate 0.1, p(0, 2) its cold rate 0.875; layer 1's last token used
    # 0, 1 as well (the step's sequence is request 0, whose last token the policy has seen).
    p = policy._p
    assert score[0, 0] == pytest.approx(2 + (1 - p[0, 0]) / p[0, 0] * 2)
    assert score[1, 0] == pytest.approx(1 + (1 - p[1, 0]) / p[1, 0] * 2)
    assert p[0, 0] < p[0, 2] and p[1, 2] < p[1, 0]
    assert policy.choose_victim(lambda k: True, None, 0.0) == max([(0, 0), (0, 2), (1, 0), (1, 2)],
                                                                   key=lambda k: score[k])
    assert policy.choose_victim(lambda k: True, None, 0.0) in [(0, 0), (1, 2)]  # the unlikely ones
    assert policy.choose_victim(lambda k: False, None, 0.0) is None


def test_lru_ablation_evicts_the_least_recently_used():
    policy, trace = _fitted(HISTORY, eviction="lru")
    for key in [(0, 0), (0, 2), (1, 0)]:
        policy.on_loaded(key, 0.0)
    policy.on_access(0, 0, True, 0.0)
    assert policy.choose_victim(lambda k: True, None, 0.0) == (0, 2)


def _gated(routes):
    """cost-aware, horizon 2 and 12 slots, fitted on a trace of these routes."""
    trace = trace_from_probs(_probs(routes))
    policy = make_policy("cost-aware", horizon=2)
    policy.bind(context(trace.geometry, capacity_slots=12))
    policy.fit(trace)
    return policy, trace


def _decode(policy, trace, layer_s=1.0, demand=0.0):
    """A decode step at layer 0 whose timing the policy has already observed."""
    policy._layer_s, policy._busy = layer_s, demand
    step = StepInfo(1, 0.0, (Sequence(0, 1, 0, 1),), trace)
    policy.on_step_start(step)
    return step


def test_gate_prefetches_a_sure_expert_on_an_idle_link_and_not_a_doubtful_one():
    # Layer 1 always uses (0, 1): p = 7.5/8 for both after a token that used them.
    routes = [[(0, 1), (0, 1), (0, 1)]] * 8
    trace = trace_from_probs(_probs(routes))
    policy = make_policy("cost-aware", horizon=2)
    policy.bind(context(trace.geometry, capacity_slots=12))  # expert_load_s 0.01
    policy.fit(trace)
    step = _decode(policy, trace, layer_s=0.05, demand=0.5)
    before = policy.declined  # step start declined layers 0 and 1's experts 2 and 3 the same way
    got = policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))
    # Layer 0 + horizon 2 = layer 2: experts 0 and 1 have p = (8 + 2 x 0.5) / (8 + 2) = 0.9 (the usage
    # rate: request 0 has no recency yet), 2 and 3 p = 1 / 10. Both land in time (behind the 4 copies
    # step start queued, 0.05 s per layer), so saving = p x 0.01 s against cost = (1 - p) x 0.01 s x 0.5
    # (half the link's time taken by misses), no victim (free slots).
    p = policy._p[2]
    assert p[0] == pytest.approx(0.9) and p[2] == pytest.approx(0.1)
    assert sorted((f.layer, f.expert) for f in got) == [(2, 0), (2, 1)]
    assert policy.declined - before == 2


def test_gate_declines_what_a_saturated_link_makes_costly():
    # Layer 2 uses expert 0 or 2 with expert 1: p(2, 0) is about one half.
    routes = [[(0, 1), (0, 1), (0, 1)], [(0, 1), (0, 1), (2, 1)]] * 4
    trace = trace_from_probs(_probs(routes))
    policy = make_policy("cost-aware", horizon=2)
    policy.bind(context(trace.geometry, capacity_slots=12))
    policy.fit(trace)
    step = _decode(policy, trace, layer_s=0.05, demand=0.0)
    idle = {(f.layer, f.expert) for f in policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
    policy2 = make_policy("cost-aware", horizon=2)
    policy2.bind(context(trace.geometry, capacity_slots=12))
    policy2.fit(trace)
    step = _decode(policy2, trace, layer_s=0.05, demand=0.8)  # 80% of the link's time taken by copies
    busy = {(f.layer, f.expert) for f in policy2.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
    p = policy2._p[2]
    # Busy: a right copy saves p x load x 0.2 (the link's free share), a wrong one costs
    # (1 - p) x load x 0.8: only p > 0.8 pays.
    assert p[1] > 0.8 and (2, 1) in idle and (2, 1) in busy
    doubtful = [e for e in range(4) if 0.05 <= p[e] < 0.5]
    assert doubtful and all((2, e) in idle for e in doubtful)  # free link: any saving pays
    assert not any((2, e) in busy for e in doubtful)
    policy3 = make_policy("cost-aware", horizon=2)
    policy3.bind(context(trace.geometry, capacity_slots=12))
    policy3.fit(trace)
    step = _decode(policy3, trace, layer_s=0.05, demand=1.0)  # saturated: a right copy saves nothing
    assert list(policy3.on_layer_routed(LayerRouting(step, 0, 0.0, trace))) == []


def test_the_links_load_counts_the_gates_own_prefetches():
    # On an idle link (rho 0) layer 0 prefetches all 4 experts of layer 2, no misses; layer 1 routed
    # 0.05 s later: the link was asked for 4 x 0.01 s in 0.05 s, so rho moves 1/10 of the way to 0.8.
    # Counting misses alone (rho 0 here) read a link busy with the gate's own copies as idle.
    policy, trace = _gated([[(0, 1), (0, 1), (0, 1)]] * 8)
    step = _decode(policy, trace, layer_s=0.05, demand=0.0)
    policy._last_routed = None  # layer 0 is the step's first routed layer: no gap to measure yet
    got = list(policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace)))
    assert len(got) == 4 and policy._busy == 0.0
    policy.on_layer_routed(LayerRouting(step, 1, 0.05, trace))
    assert policy._busy == pytest.approx(0.1 * 4 * 0.01 / 0.05)


def test_gate_declines_a_prefetch_that_would_land_after_its_layer():
    policy, trace = _gated([[(0, 1), (0, 1), (0, 1)]] * 8)
    step = _decode(policy, trace, layer_s=0.0)  # no time per layer: every target is needed now
    assert list(policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))) == []


def test_the_link_view_is_bounded_by_the_loads_still_pending():
    routes = [[(0, 1), (0, 1), (0, 1)]] * 8
    trace = trace_from_probs(_probs(routes))
    policy = make_policy("cost-aware", horizon=2)
    policy.bind(context(trace.geometry, capacity_slots=12))  # nothing is ever in flight there
    policy.fit(trace)
    step = _decode(policy, trace, layer_s=0.05, demand=0.5)
    policy._link_free = 10.0  # a stale view: loads counted that were dropped or have landed
    got = {(f.layer, f.expert) for f in policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
    assert got == {(2, 0), (2, 1)}  # the view fell back to now + 0 pending loads: both land in time


def test_gate_terms_credit_a_late_copy_and_charge_only_the_victims_unhidden_reload():
    policy, _ = _fitted(HISTORY)  # L = 2; expert_load_s 0.01
    policy._layer_s, policy._busy = 0.004, 0.5
    # p = 0.8, the copy starts 0.006 s before its layer asks: 0.006 of its 0.01 s is saved, in the
    # link's free half.
    saving, cost = policy._gate_terms(0.8, 0.006, 0.0, 0.01, None, 0)
    assert saving == pytest.approx(0.8 * 0.006 * 0.5)
    assert cost == pytest.approx(0.2 * 0.5 * 0.01)  # (1 - p) x rho x copy
    assert policy._gate_terms(0.8, -0.001, 0.0, 0.01, None, 0)[0] == 0.0  # starts after it is needed
    assert policy._gate_terms(0.8, 0.5, 0.0, 0.01, None, 0)[0] == pytest.approx(0.8 * 0.01 * 0.5)  # at most a copy
    # Victim (0, 3), from layer 0: its layer comes round in 2 layers = 0.008 s; this copy lands at
    # 0.002 s, leaving 0.006 s, half of it free of on-demand loads: its reload stalls 0.01 - 0.003.
    policy._p[0, 3] = 0.4
    _, with_victim = policy._gate_terms(0.8, 0.006, 0.0, 0.002, (0, 3), 0)
    assert with_victim - cost == pytest.approx(0.4 * (0.01 - 0.5 * 0.006))
    _, hidden = policy._gate_terms(0.8, 0.006, 0.0, -1.0, (0, 3), 0)  # landed 1 s before: time to hide it all
    assert hidden == pytest.approx(cost)
    _, exposed = policy._gate_terms(0.8, 0.006, 0.0, 0.5, (0, 3), 0)  # lands after the victim's next use
    assert exposed - cost == pytest.approx(0.4 * 0.01)


def test_no_prefetch_ablation_prefetches_nothing_and_no_gate_takes_every_likely_one():
    routes = [[(0, 1), (0, 1), (0, 1)], [(0, 1), (0, 1), (2, 1)]] * 4
    trace = trace_from_probs(_probs(routes))
    # Layer 2's usage rates: expert 0 and 2 (4 + 0.5) / 9 = 0.5, expert 1 8.5 / 9, expert 3 0.5 / 9.
    for name, expect in (("cost-aware-no-prefetch", set()), ("cost-aware-no-gate", {(2, 0), (2, 1), (2, 2)})):
        policy = make_policy(name, horizon=2)
        policy.bind(context(trace.geometry, capacity_slots=12))
        policy.fit(trace)
        step = _decode(policy, trace, layer_s=0.0, demand=1.0)  # the gate would refuse: no time to land
        got = {(f.layer, f.expert) for f in policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
        assert got == expect, name


def test_variants_registered_and_parameters_checked():
    assert {"cost-aware", "cost-aware-no-prefetch", "cost-aware-no-gate", "cost-aware-no-recency",
            "cost-aware-lru", "cost-aware-no-history", "cost-aware-fixed"} <= set(policy_names())
    assert make_policy("cost-aware-lru").params["eviction"] == "lru"
    modes = {name: make_policy(name).mode() for name in
             ("cost-aware", "cost-aware-fixed", "cost-aware-no-gate", "cost-aware-no-prefetch")}
    assert modes == {"cost-aware": "gated", "cost-aware-fixed": "gated", "cost-aware-no-gate": "eager",
                     "cost-aware-no-prefetch": "off"}
    assert make_policy("cost-aware")._throttle is None  # made when bound to a run
    with pytest.raises(ConfigError, match="eviction"):
        make_policy("cost-aware", eviction="mru")


def test_runs_through_the_simulator_and_beats_lru_on_a_cyclic_pattern():
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.run import simulate

    trace = synthetic_trace(num_requests=8, seed=2)
    hits = {}
    for name in ("lru", "cost-aware"):
        cfg = SimConfig("synthetic", name, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=6),
                        workload=WorkloadConfig(history_fraction=0.5))
        hits[name] = simulate(trace, cfg).summary["hit_rate"]
    assert hits["cost-aware"] > hits["lru"]  # a small cache and a layer sweep: LRU evicts the next needed


def test_recency_buckets_and_the_scaled_cold_rate():
    from finemoe.policies.cost_aware import NEVER, gap_bucket

    assert gap_bucket(np.array([1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, NEVER])).tolist() == [
        0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    rates = ReuseRates(1, 4, 2)  # every count at its prior: reuse = cold = bucket rates = 0.5
    rates.gap_k[0, 1], rates.gap_n[0, 1] = 3.0, 4.0  # two tokens back: 0.75, 1.5x the layer's cold rate
    p = rates.recency_p([0], np.array([[1, 2, 5, NEVER]]))
    assert p[0].tolist() == pytest.approx([0.5, 0.75, 0.5, 0.5])


def test_the_pooled_table_counts_reuse_by_recency_and_uses_so_far():
    from finemoe.policies.cost_aware import NEVER, count_bucket

    assert count_bucket(np.array([0, 1, 2, 3, 4, 7, 8, 50])).tolist() == [0, 1, 2, 2, 3, 3, 4, 4]
    rates = ReuseRates(2, 2, 1)  # K/J = 0.5: every cell starts at 0.5 with one token's weight
    since = np.array([[1, NEVER], [1, 3]])
    count = np.array([[5, 0], [5, 1]])
    rates.add_counts(since, count, np.array([[True, False], [True, True]]))
    # Cells (last token, 4-7 uses): 2 of 2 used, (0.5 + 2) / 3; (never, 0 uses): 0 of 1, 0.5 / 2;
    # (3-4 back, 1 use): 1 of 1, 1.5 / 2. Pooled over both layers.
    assert rates.table_p(np.array([1, NEVER, 4, 2]), np.array([6, 0, 1, 1])).tolist() == pytest.approx(
        [2.5 / 3, 0.25, 0.75, 0.5])


def test_p_is_the_mean_of_the_per_expert_forecast_and_the_pooled_table():
    with_table, trace = _fitted(HISTORY)
    alone, _ = _fitted(HISTORY, table=False)
    assert make_policy("cost-aware-no-table").params["table"] is False
    step = StepInfo(0, 0.0, (Sequence(0, 1, 0, 1),), trace)
    for policy in (with_table, alone):
        policy.on_step_start(step)
        policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))
    since, count = with_table._since[0][:1], with_table._count[0][:1]
    assert count[0].tolist() == [1, 1, 0, 0]  # layer 0 of this token used experts 0 and 1
    table = with_table.rates.table_p(since, count)
    assert with_table._p[0] == pytest.approx(0.5 * (alone._p[0] + table[0]))


def test_a_prefill_updates_recency_and_counts_token_by_token_as_the_history_fit_does():
    # A 3-token prompt at layer 0: (0, 1), (2, 3), (0, 2). Token by token, expert 0 was last used
    # by the last token (1 back) twice, expert 1 three tokens back once, 2 and 3 as the mixtures
    # say; reading only the last prompt token (the old rule) would have called 1 and 3 never used.
    trace = trace_from_probs(_probs([[(0, 1)], [(2, 3)], [(0, 2)]]))
    policy = make_policy("cost-aware")
    policy.bind(context(trace.geometry, capacity_slots=4))
    step = StepInfo(0, 0.0, (Sequence(0, 0, 0, 3),), trace)
    policy.on_step_start(step)
    policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))
    assert policy._since[0][0].tolist() == [1, 3, 1, 2]
    assert policy._count[0][0].tolist() == [2, 1, 2, 1]
    # The online rates count the prompt's two consecutive pairs, its recency buckets and its table
    # cells exactly as `fit` counts the same three tokens read as a history.
    fitted = make_policy("cost-aware")
    fitted.bind(context(trace.geometry, capacity_slots=4))
    fitted.fit(trace)
    for name in ("used", "tokens", "reuse_k", "reuse_n", "cold_k", "cold_n", "gap_k", "gap_n", "table_k", "table_n"):
        assert getattr(policy.rates, name).tolist() == getattr(fitted.rates, name).tolist(), name
