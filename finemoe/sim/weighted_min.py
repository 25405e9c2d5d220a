"""Offline demand paging that minimises the *weight* of its faults, not their number: the oracle's
"tpot" victims (policies/oracle.py). A load during a prefill costs a request's time per output token
nothing, one during a decode step costs it that step's share, so Belady's fewest loads can be the
wrong ones to take (docs/bounds.md).

The model is paging by positions: each position (a layer of a step) needs its experts resident
together (the engine issues a layer's demand loads at once), `capacity` slots. A schedule is the set
of intervals (an expert's access to its next one) over which the expert stays resident; it is
feasible exactly when the kept intervals spanning a position fit beside that position's experts,
and its faults are the accesses whose interval is not kept (measured: keeping across a position as
if its experts came one at a time lost, on ((2,3,2,4,141), 5 slots, 3 copy engines), the time per
token a co-resident schedule won). The constraint matrix of intervals over consecutive positions is
totally unimodular, so the linear program's vertices are integral and SciPy's HiGHS (dual simplex)
returns an optimal schedule. Written as a flow along the positions (y_u: kept intervals spanning
position u), it has four non-zeros per position and interval, not one per position an interval
spans.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from finemoe.errors import FinemoeError


def kept_intervals(positions: np.ndarray, prev: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """Per access (in order), whether its expert is resident from its previous access on (a hit) in
    a demand schedule with the least total weight of faults. `positions[i]`: access i's position
    (non-decreasing; one access per expert and position, all of a position's resident together, as
    the engine's concurrent demand loads need them), `prev[i]`: the index of the same expert's
    previous access (-1: none, a fault whatever the schedule), `weights[i]`: what a fault there
    costs."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    positions = np.asarray(positions, dtype=np.int64)
    prev = np.asarray(prev, dtype=np.int64)
    kept = np.zeros(prev.size, dtype=bool)
    ends = np.flatnonzero(prev >= 0)  # interval j: from access prev[ends[j]] to access ends[j]
    if ends.size == 0:
        return kept
    uniq, at, count = np.unique(positions, return_inverse=True, return_counts=True)
    n, m = uniq.size, ends.size
    first, last = at[prev[ends]], at[ends]  # the positions (as indices) an interval runs between
    # Columns: x_j (interval j kept), then y_u, the kept intervals spanning position u, for u = 1..n-1
    # (none spans the first). Row u - 1: y_u - y_(u-1) - (x_j starting at u - 1) + (x_j ending at u)
    # = 0; an interval between neighbouring positions spans none, its two entries cancel.
    u = np.arange(1, n)
    u2 = np.arange(2, n)
    rows = np.concatenate([u - 1, u2 - 1, first, last - 1])
    cols = np.concatenate([m + u - 1, m + u2 - 2, np.arange(m), np.arange(m)])
    vals = np.concatenate([np.ones(n - 1), -np.ones(n - 2), -np.ones(m), np.ones(m)])
    A = csr_matrix((vals, (rows, cols)), shape=(n - 1, m + n - 1))
    room = np.maximum(capacity - count[1:], 0).astype(float)  # beside the position's own experts
    bounds = np.column_stack([np.zeros(m + n - 1), np.concatenate([np.ones(m), room])])
    cost = np.concatenate([-np.asarray(weights, dtype=float)[ends], np.zeros(n - 1)])
    res = linprog(cost, A_eq=A, b_eq=np.zeros(n - 1), bounds=bounds, method="highs-ds")
    if res.status != 0:
        raise FinemoeError(f"the weighted paging program did not solve: {res.message}")
    x = res.x[:m]
    if np.abs(x - np.round(x)).max(initial=0.0) > 1e-6:
        raise FinemoeError("the weighted paging program returned a fractional schedule")
    kept[ends] = x > 0.5
    return kept


def weighted_faults_reference(sets: list[list], weights: list[list[float]], capacity: int) -> float:
    """The least total fault weight of a demand schedule for `sets` (each position's experts, all
    resident together; `weights[p][i]`: what a fault of sets[p][i] costs; an empty cache at the
    start), by search over every cache state: the tests' reference for `kept_intervals`."""
    best: dict[frozenset, float] = {frozenset(): 0.0}
    for need, ws in zip(sets, weights, strict=True):
        need_set = frozenset(need)
        nxt: dict[frozenset, float] = {}
        for state, cost in best.items():
            c = cost + sum(w for k, w in zip(need, ws, strict=True) if k not in state)
            others = sorted(state - need_set, key=repr)
            room = capacity - len(need_set)
            for r in range(min(room, len(others)) + 1):
                for kept in combinations(others, r):
                    s = need_set | frozenset(kept)
                    if c < nxt.get(s, float("inf")):
                        nxt[s] = c
        best = nxt
    return min(best.values())
