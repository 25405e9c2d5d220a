"""The oracle's "deadline" candidate: earliest use first, each copy kept only if it lands in time
behind the ones kept before it (by hand), and its place in the ensemble."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from finemoe.policies.oracle import OraclePolicy
from finemoe.sim.offline import CANDIDATES, _label


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
