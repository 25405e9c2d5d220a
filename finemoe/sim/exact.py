"""The exact minimum number of expert loads of a small instance, by integer programming (SciPy's
HiGHS through `scipy.optimize.milp`): what `bounds.min_loads` claims to reach, checked by a solver
that knows nothing of Belady, and how far the oracle's loads are from the optimum.

The model is the relaxation every engine schedule lies in (docs/bounds.md): position p needs the set
S_p; its members are served one at a time in an order the schedule chooses (a permutation per
position), each resident at its own moment, at most `capacity` resident at any moment, any number
of loads and evictions in between. Sizes grow as positions x experts x keys: small instances only.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def exact_min_loads(sets: Sequence[Sequence[Hashable]], capacity: int, start: frozenset = frozenset(),
                    time_limit_s: float = 60.0) -> int:
    """The optimum of the load-minimisation integer program for these sets (raises on no solution)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    sets = [list(dict.fromkeys(s)) for s in sets]
    keys = sorted({k for s in sets for k in s} | set(start), key=repr)
    kid = {k: i for i, k in enumerate(keys)}
    slots = [(p, j) for p, s in enumerate(sets) for j in range(len(s))]
    T, K = len(slots), len(keys)
    if T == 0:
        return 0
    n_c = T * K  # c[t, k]: k resident at sub-slot t
    perm = [(p, x, j) for p, s in enumerate(sets) for x in s for j in range(len(s))]
    n = 2 * n_c + len(perm)  # then l[t, k] (a load of k by t), then the permutations a[p, x, j]
    c = lambda t, k: t * K + k  # noqa: E731
    ld = lambda t, k: n_c + t * K + k  # noqa: E731
    a_of = {key: 2 * n_c + i for i, key in enumerate(perm)}
    slot_of = {pj: t for t, pj in enumerate(slots)}
    rows, lo, hi = [], [], []
    A = lil_matrix((2 * n_c + T + 2 * len(perm) + T, n))
    r = 0
    for t in range(T):  # loads: l[t,k] >= c[t,k] - c[t-1,k]
        for k in range(K):
            A[r, ld(t, k)] = 1
            A[r, c(t, k)] = -1
            if t > 0:
                A[r, c(t - 1, k)] = 1
                lo.append(0)
            else:
                lo.append(-1 if keys[k] in start else 0)
            hi.append(np.inf)
            r += 1
        for k in range(K):  # capacity
            A[r, c(t, k)] = 1
        lo.append(0)
        hi.append(capacity)
        r += 1
    for p, s in enumerate(sets):
        for x in s:  # each member served at one sub-slot
            for j in range(len(s)):
                A[r, a_of[(p, x, j)]] = 1
            lo.append(1)
            hi.append(1)
            r += 1
        for j in range(len(s)):  # each sub-slot serves one member, which is resident then
            for x in s:
                A[r, a_of[(p, x, j)]] = 1
            lo.append(1)
            hi.append(1)
            r += 1
            for x in s:
                A[r, c(slot_of[(p, j)], kid[x])] = 1
                A[r, a_of[(p, x, j)]] = -1
                lo.append(0)
                hi.append(np.inf)
                r += 1
    del rows
    A = A[:r].tocsr()
    cost = np.zeros(n)
    cost[n_c : 2 * n_c] = 1.0
    res = milp(cost, constraints=LinearConstraint(A, lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"time_limit": time_limit_s})
    if res.status != 0 or res.x is None:  # 1: the time limit stopped it before optimality was proven
        raise RuntimeError(f"the integer program was not solved to optimality ({res.message})")
    return int(round(res.fun))
