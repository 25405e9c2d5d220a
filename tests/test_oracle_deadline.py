"""The oracle's "deadline" candidate: earliest use first, each copy kept only if it lands in time
behind the ones kept before it (by hand), and its place in the ensemble; the kernel's rule
(sim/compiled_prefetch.py's `_deadline_asks`, reading a window's first uses from a list it keeps)
asks for what `new_asks`, which reads every access of the window, asks for: the same asks in the
same order, at every step of a schedule moving through random plans."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.policies.oracle import OraclePolicy, new_asks
from finemoe.sim import compiled_prefetch as cp
from finemoe.sim.offline import CANDIDATES, _label
from finemoe.sim.plan_view import _Plan


def test_deadline_keeps_the_copies_that_land_in_time_behind_the_kept_ones():
    oracle = OraclePolicy(prefetch="deadline")
    oracle.ctx = SimpleNamespace(expert_load_s=1.0)
    oracle.layer_s = 1.0
    # Uses 1, 2, 3, 3 and 5 layers ahead (1 s a layer), one copy 1 s: the first three land at 1, 2
    # and 3 s, in time; the fourth would land at 4 s, after its use at 3 s, so it is left to its
    # demand load and the fifth, behind three, lands at 4 s, before its use at 5 s.
    pos, keys = oracle._on_time(np.array([1, 2, 3, 3, 5]), np.array([10, 11, 12, 13, 14]), 0)
    assert keys.tolist() == [10, 11, 12, 14] and pos.tolist() == [1, 2, 3, 5]
    # Twice as slow a link: 2, 4, 6 s for the first copies against uses at 1, 2, 3, 3, 5 s.
    oracle.ctx = SimpleNamespace(expert_load_s=2.0)
    _, keys = oracle._on_time(np.array([1, 2, 3, 3, 5]), np.array([10, 11, 12, 13, 14]), 0)
    assert keys.tolist() == [11, 14]  # 2 <= 2, then 4 <= 5 (the ones at 1 and 3 cannot land in time)


def test_the_ensemble_runs_deadline_far_ahead_alone_and_leaving_the_nearest_layer():
    labels = {_label(c, 0) for c in CANDIDATES}
    assert {"deadline/far#0", "deadline/far+2#0"} <= labels


def _plan(L, J, K, steps, rng):
    s = np.repeat(np.arange(steps), L * K)
    layer = np.tile(np.repeat(np.arange(L), K), steps)
    e = np.concatenate([rng.choice(J, K, replace=False) for _ in range(steps * L)])
    return _Plan(L, J, s, layer, e)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.integers(1, 12), st.integers(0, 10_000),
       st.sampled_from([0.0, 0.5e-3, 2e-3, 1e-2]), st.integers(1, 40), st.integers(1, 1 << 20))
def test_deadline_asks_from_the_first_use_list_are_new_asks(L, J, K, steps, seed, layer_s, scan, lookahead):
    K = min(K, J)
    rng = np.random.default_rng(seed)
    plan = _plan(L, J, K, steps, rng)
    positions, previous, key_a = plan.pos_arr, plan.prev, plan.key_arr
    n_keys, load_s = L * J, 1e-3
    keys = np.zeros((cp.N_KEY_FIELDS, n_keys), np.int64)
    sent = np.zeros(n_keys, np.int64)
    state = np.zeros(cp.N_STATE, np.int64)
    state[cp.FU_I0] = -1
    fu = np.empty((2, previous.size), np.int64)
    fu[1] = -1
    has = np.flatnonzero(previous >= 0)
    fu[1, previous[has]] = has
    out = [np.zeros(max(previous.size, 1), np.int64) for _ in range(4)]
    here = -1
    while here < steps * L + 1:
        keys[cp.RES] = rng.random(n_keys) < 0.4  # the cache as it happens to stand
        free = int(rng.integers(-1, 3))
        nearest = here + int(rng.integers(1, 3))
        flag = int(rng.integers(0, 2))
        want = new_asks(positions, previous, key_a, here, scan, here + lookahead, nearest, free, keys[cp.RES], sent,
                        J, flag, load_s, layer_s, out[0], out[1])
        got = cp._deadline_asks(keys, state, fu, positions, previous, key_a, here, scan, here + lookahead, nearest,
                                free, J, flag, load_s, layer_s, out[2], out[3])
        assert got == want and np.array_equal(out[2][:got], out[0][:want]) and np.array_equal(out[3][:got], out[1][:want])
        assert np.array_equal(keys[cp.SENT], sent)
        here += int(rng.integers(0, 4))


def test_first_use_list_by_hand():
    # one layer, keys 0 1 0 2 1 at positions 0..4: from window start 1 the first uses are 1 (key 1),
    # 2 (key 0) and 3 (key 2); past access 1, key 1's next access (4) joins after 3
    previous = np.array([-1, -1, 0, -1, 1])
    fu = np.array([[0] * 5, [2, 4, -1, -1, -1]])
    state = np.zeros(cp.N_STATE, np.int64)
    state[cp.FU_I0] = -1

    def listed():
        x, seen = state[cp.FU_HEAD], []
        while x >= 0:
            seen.append(int(x))
            x = fu[0, x]
        return seen

    cp._first_uses_at(state, fu, previous, 1)
    assert listed() == [1, 2, 3]
    cp._first_uses_at(state, fu, previous, 2)
    assert listed() == [2, 3, 4]
    cp._first_uses_at(state, fu, previous, 4)
    assert listed() == [4]
    cp._first_uses_at(state, fu, previous, 0)  # behind the list: built again
    assert listed() == [0, 1, 3]
