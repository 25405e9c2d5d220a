"""The field's newer baselines: Least-Stale, SLRU, ARC, a static hot set and previous-token
prediction. Orders pinned on hand-made sequences, then each run through the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from test_policy_support import context, trace_from_probs

from finemoe.errors import ConfigError
from finemoe.policies.base import LayerRouting, Sequence, StepInfo
from finemoe.policies.registry import make_policy
from finemoe.policies.static_hot import hottest
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

A, B, C, D, E = (0, 0), (0, 1), (1, 0), (1, 1), (2, 0)


def _bound(name, slots, **params):
    policy = make_policy(name, **params)
    policy.bind(context(tiny_geometry(num_layers=3, num_experts=4, top_k=2), capacity_slots=slots))
    return policy


def _step(policy, number, trace=None):
    policy.on_step_start(StepInfo(number, 0.0, (), trace))


def _miss(policy, key, resident: set, slots: int):
    """What the engine does on a miss: report it, evict the policy's victim when full, load."""
    policy.on_access(*key, False, 0.0)
    victim = None
    if len(resident) >= slots:
        victim = policy.choose_victim(lambda k: k in resident, None, 0.0)
        resident.discard(victim)
        policy.on_evicted(victim, 0.0)
    resident.add(key)
    policy.on_loaded(key, 0.0)
    return victim


def _victim(policy):
    return policy.choose_victim(lambda k: True, None, 0.0)


# --- Least-Stale -----------------------------------------------------------------------------------


def test_least_stale_evicts_stale_before_current_first_loaded_first():
    p = _bound("least-stale", 4)
    _step(p, 0)
    for key in (A, B, C):
        p.on_loaded(key, 0.0)
    _step(p, 1)
    assert _victim(p) == A  # all stale: first loaded
    p.on_access(*A, True, 0.0)
    p.on_access(*B, True, 0.0)
    assert _victim(p) == C  # A and B are current, C is stale although loaded last
    p.on_access(*C, True, 0.0)
    assert _victim(p) == A  # all current: first loaded
    assert p.choose_victim(lambda k: k != A, None, 0.0) == B
    _step(p, 2)
    p.on_access(*A, True, 0.0)  # a use does not reorder FIFO, only makes A current
    assert _victim(p) == B
    p.on_evicted(B, 0.0)
    p.on_loaded(B, 0.0)  # reloaded: last in FIFO order
    assert _victim(p) == C
    assert p.choose_victim(lambda k: False, None, 0.0) is None


# --- SLRU -------------------------------------------------------------------------------------------


def test_slru_hits_promote_to_protected_and_overflow_demotes():
    p = _bound("slru", 4)  # protected segment: int(0.8 x 4) = 3 slots
    for key in (A, B, C, D):
        p.on_loaded(key, 0.0)
    assert _victim(p) == A  # all probationary: least recent
    p.on_access(*A, False, 0.0)  # a miss report does not promote
    assert _victim(p) == A
    for key in (A, B, C):
        p.on_access(*key, True, 0.0)
    assert p.probation.keys() == [D] and p.protected.keys() == [A, B, C]
    assert _victim(p) == D  # the probationary one, although A, B, C are older in plain LRU terms
    p.on_access(*D, True, 0.0)  # promoted: protected overflows, its least recent (A) goes back
    assert p.protected.keys() == [B, C, D] and p.probation.keys() == [A]
    assert _victim(p) == A
    assert p.choose_victim(lambda k: k != A, None, 0.0) == B  # then the protected segment, LRU
    p.on_access(*B, True, 0.0)  # a protected hit refreshes recency within the segment
    assert p.choose_victim(lambda k: k != A, None, 0.0) == C


def test_slru_rejects_a_bad_fraction():
    with pytest.raises(ConfigError, match="protected_fraction"):
        make_policy("slru", protected_fraction=1.0)


# --- ARC --------------------------------------------------------------------------------------------


def test_arc_adapts_its_target_on_ghost_hits():
    p = _bound("arc", 2)
    res: set = set()
    X1, X2, X3 = A, B, C
    assert _miss(p, X1, res, 2) is None
    assert _miss(p, X2, res, 2) is None
    p.on_access(*X1, True, 0.0)  # used again: T2
    assert p.t1.keys() == [X2] and p.t2.keys() == [X1]
    assert _miss(p, X3, res, 2) == X2  # |T1| = 1 > p = 0: T1's least recent, remembered in B1
    assert p.b1.keys() == [X2] and p.p == 0
    assert _miss(p, X2, res, 2) == X1  # a B1 ghost hit: p = 0 + max(1, 0/1) = 1; |T1| = 1 is not > 1: T2
    assert p.p == 1 and p.t2.keys() == [X2] and p.b2.keys() == [X1] and p.t1.keys() == [X3]
    assert _miss(p, X1, res, 2) == X3  # a B2 ghost hit: p = 1 - 1 = 0; |T1| = 1 > 0: T1
    assert p.p == 0 and p.t2.keys() == [X2, X1] and p.b1.keys() == [X3] and not p.t1.keys()


def test_arc_ghost_lists_stay_bounded_and_a_scan_keeps_the_reused():
    p = _bound("arc", 3)
    res: set = set()
    for key in (A, B):
        _miss(p, key, res, 3)
        p.on_access(*key, True, 0.0)  # A, B used twice: T2
    for key in [(2, e) for e in range(4)] + [(1, e) for e in range(4)]:  # a scan of one-time experts
        _miss(p, key, res, 3)
        assert len(p.t1) + len(p.b1) <= 3
        assert len(p.t1) + len(p.t2) + len(p.b1) + len(p.b2) <= 6
    assert {A, B} <= res  # the scan only cycled through T1


# --- static hot set ---------------------------------------------------------------------------------


def test_hottest_orders_by_count_then_layer_then_expert():
    counts = np.array([[0, 3, 1], [3, 0, 5]])
    assert hottest(counts, 3) == [(1, 2), (0, 1), (1, 0)]
    assert hottest(counts, 10) == [(1, 2), (0, 1), (1, 0), (0, 2)]  # never-used experts are not hot


def test_static_hot_pins_the_history_hot_set_and_uses_lru_for_the_rest():
    probs = np.zeros((3, 1, 4))
    probs[:, 0, :] = [0.5, 0.3, 0.15, 0.05]  # every token: experts 0, 1
    probs[2, 0, :] = [0.05, 0.15, 0.5, 0.3]  # one token: 2, 3
    trace = trace_from_probs(probs)
    p = make_policy("static-hot", hot_fraction=0.5)
    p.bind(context(trace.geometry, capacity_slots=4))
    p.fit(trace)
    assert p.hot == {(0, 0), (0, 1)}  # 2 tokens each vs 1: the two hottest
    assert p.initial_residents() == []  # a cold start, as every policy and the oracle get
    for key in [(0, 0), (0, 1), (0, 2), (0, 3)]:
        p.on_loaded(key, 0.0)
    p.on_access(0, 2, True, 0.0)
    assert _victim(p) == (0, 3)  # LRU among the others
    assert p.choose_victim(lambda k: k[1] in (0, 1, 2), None, 0.0) == (0, 2)
    assert p.choose_victim(lambda k: k[1] in (0, 1), None, 0.0) == (0, 0)  # hot only when nothing else


# --- previous token ---------------------------------------------------------------------------------


def test_prev_token_prefetches_the_last_tokens_experts_ahead():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 4))  # 3 tokens, 4 layers, 4 experts
    trace = trace_from_probs(probs, iterations=[0, 0, 1])  # a 2-token prefill, then one decode token
    p = make_policy("prev-token", distance=2)
    p.bind(context(trace.geometry))
    prefill = StepInfo(0, 0.0, (Sequence(0, 0, 0, 2),), trace)
    assert list(p.on_step_start(prefill)) == []  # no previous token yet
    for layer in range(4):
        assert list(p.on_layer_routed(LayerRouting(prefill, layer, 0.0, trace))) == []
    decode = StepInfo(1, 0.0, (Sequence(0, 1, 2, 3),), trace)
    last = trace.experts[1]  # the prompt's last token
    got = {(f.layer, f.expert): f.priority for f in p.on_step_start(decode)}
    assert got == pytest.approx({**{(0, int(e)): 1.0 for e in last[0]}, **{(1, int(e)): 0.5 for e in last[1]}})
    got = {(f.layer, f.expert): f.priority for f in p.on_layer_routed(LayerRouting(decode, 0, 0.0, trace))}
    assert got == pytest.approx({(2, int(e)): 0.5 for e in last[2]})
    assert list(p.on_layer_routed(LayerRouting(decode, 2, 0.0, trace))) == []  # no layer 4
    assert p.previous(0, 0) == tuple(int(e) for e in trace.experts[2, 0])  # layer 0 now holds this token's
    p.on_request_finished(0, trace)
    assert p.previous(0, 1) == ()


# --- through the simulator --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["least-stale", "slru", "arc", "static-hot", "prev-token"])
def test_each_runs_through_the_simulator(name):
    trace = synthetic_trace()
    g = trace.geometry
    cfg = SimConfig("synthetic", name, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=6),
                    workload=WorkloadConfig(history_fraction=0.5))
    result = simulate(trace, cfg)
    assert 0.0 <= result.summary["hit_rate"] <= 1.0
    full = SimConfig("synthetic", name, PRESETS["rtx3090"],
                     memory=MemoryConfig(expert_cache_slots=g.num_layers * g.num_experts),
                     workload=WorkloadConfig(history_fraction=0.5))
    assert simulate(trace, full).summary["ondemand_loads"] <= g.num_layers * g.num_experts  # each loaded once
