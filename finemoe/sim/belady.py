"""Belady's MIN with sets held at once: the load counts every lower bound of sim/bounds.py rests on.

A sweep asks for them at every budget, over the whole measured workload and again over each
request's decode window: hundreds of thousands of positions per budget on a paper-size study, where
the plain loop (`min_loads_reference`, kept as the definition) took 2-3 s. `min_loads` runs the same
algorithm compiled (numba, sim/jit) over integer keys, with the same heap, the same tie rule (push
order) and so the same counts; tests/test_belady.py checks the two agree on random instances.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence

import numpy as np

from finemoe.jit import jit, jit_borrowing, numba

INF = float("inf")


def _check(capacity: int, start: frozenset) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be at least one slot, got {capacity}")
    if len(start) > capacity:
        raise ValueError(f"{len(start)} experts resident at the start exceed {capacity} slots")


def _next_positions(sets: Sequence[Sequence[Hashable]]) -> tuple[list[list[Hashable]], list[dict], dict]:
    """Each position's distinct members; per position, each member's next position after it
    (`inf`: never again); and each key's first position."""
    later: dict = {}
    members = [list(dict.fromkeys(s)) for s in sets]
    after: list[dict] = [{} for _ in sets]
    for p in range(len(sets) - 1, -1, -1):
        for k in members[p]:
            after[p][k] = later.get(k, INF)
        for k in members[p]:
            later[k] = p
    return members, after, later


def min_loads_reference(sets: Sequence[Sequence[Hashable]], capacity: int,
                        start: frozenset = frozenset()) -> list[int]:
    """`min_loads` as plain Python over any hashable keys: the definition the compiled one follows."""
    _check(capacity, start)
    members, after, first = _next_positions(sets)
    resident = set(start)
    next_of = {k: first.get(k, INF) for k in resident}
    # ties in next use are broken by push order: the keys tied are needed at the same position (or
    # never), so which of them goes does not change the count
    order = itertools.count()
    heap = [(-v, next(order), k) for k, v in sorted(next_of.items(), key=lambda kv: repr(kv[0]))]
    heapq.heapify(heap)
    loads, out = 0, []

    def touch(key, nxt):
        next_of[key] = nxt
        heapq.heappush(heap, (-nxt, next(order), key))

    def evict_farthest(here):
        aside = []
        while True:
            item = heapq.heappop(heap)
            victim = item[2]
            if victim not in resident or next_of[victim] != -item[0]:
                continue  # stale
            if victim in here:
                aside.append(item)  # the set is held at once
                continue
            break
        for item in aside:
            heapq.heappush(heap, item)
        resident.discard(victim)
        del next_of[victim]

    for p, mem in enumerate(members):
        nu = after[p]
        here = set(mem)
        slots = capacity + max(len(mem), 1) - 1  # this position's slots (see `min_loads`; none extra if empty)
        missing = [k for k in mem if k not in resident]
        for k in mem:
            if k in resident:
                touch(k, nu[k])
        for k in missing:
            loads += 1
            if len(resident) >= slots:
                evict_farthest(here)
            resident.add(k)
            touch(k, nu[k])
        while len(resident) > slots:  # fewer slots than the position before had
            evict_farthest(here)
        out.append(loads)
    return out


def min_loads(sets: Sequence[Sequence[Hashable]], capacity: int, start: frozenset = frozenset()) -> list[int]:
    """A lower bound on the loads of any schedule with `capacity` slots and `start` resident, once
    position p is served, for every p: Belady's MIN with each position's set resident at once, on
    `capacity + m_p - 1` slots while position p is served (m_p: its set's size). A schedule may
    serve a set's members one at a time and evict a served one for the next; holding the served
    ones until the set is done needs at most m_p - 1 more slots there and no more loads, and
    farthest-next-use eviction is optimal for slots that vary by position too, so this is below
    every schedule (docs/bounds.md). The prefix counts are MIN of each prefix."""
    _check(capacity, start)
    ids: dict = {}
    flat = [ids.setdefault(k, len(ids)) for s in sets for k in s]
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sets], out=offsets[1:])
    first = np.array([ids.setdefault(k, len(ids)) for k in sorted(start, key=repr)], dtype=np.int64)
    return min_loads_of_arrays(offsets, np.array(flat, dtype=np.int64), len(ids), capacity, first).tolist()


def min_loads_of_arrays(offsets: np.ndarray, keys: np.ndarray, num_keys: int, capacity: int,
                        start: np.ndarray) -> np.ndarray:
    """`min_loads` over integer keys 0..num_keys-1: position p's set is keys[offsets[p]:offsets[p+1]],
    `start` the resident keys in the order the reference pushes them (by repr of the key)."""
    if numba is None:  # pragma: no cover - numba is a dependency
        sets = [keys[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]  # noqa: B905
        return np.array(min_loads_reference(sets, capacity, frozenset(start.tolist())), dtype=np.int64)
    out = np.empty(offsets.size - 1, dtype=np.int64)
    if not _min_loads_kernel(offsets, keys, num_keys, capacity, start, out):
        raise RuntimeError("MIN found no victim to evict")  # cannot happen for capacity >= 1 (a bug)
    return out


@jit_borrowing
def _push(h_neg, h_ord, h_key, hn, neg, order, key):
    i = hn
    h_neg[i], h_ord[i], h_key[i] = neg, order, key
    while i > 0:
        up = (i - 1) // 2
        if h_neg[up] < h_neg[i] or (h_neg[up] == h_neg[i] and h_ord[up] < h_ord[i]):
            break
        h_neg[up], h_neg[i] = h_neg[i], h_neg[up]
        h_ord[up], h_ord[i] = h_ord[i], h_ord[up]
        h_key[up], h_key[i] = h_key[i], h_key[up]
        i = up
    return hn + 1


@jit_borrowing
def _pop(h_neg, h_ord, h_key, hn):
    """Removes the heap's least (neg, order) entry (moved to index hn - 1); returns the new size."""
    hn -= 1
    h_neg[0], h_neg[hn] = h_neg[hn], h_neg[0]
    h_ord[0], h_ord[hn] = h_ord[hn], h_ord[0]
    h_key[0], h_key[hn] = h_key[hn], h_key[0]
    i = 0
    while True:
        least, left, right = i, 2 * i + 1, 2 * i + 2
        for c in (left, right):
            if c < hn and (h_neg[c] < h_neg[least] or (h_neg[c] == h_neg[least] and h_ord[c] < h_ord[least])):
                least = c
        if least == i:
            return hn
        h_neg[least], h_neg[i] = h_neg[i], h_neg[least]
        h_ord[least], h_ord[i] = h_ord[i], h_ord[least]
        h_key[least], h_key[i] = h_key[i], h_key[least]
        i = least


@jit
def _min_loads_kernel(offsets, keys, num_keys, capacity, start, out):
    """`min_loads_reference` step for step over flat integer sets; writes the prefix counts to
    `out`; False where a victim could not be found (the reference would raise)."""
    n = offsets.size - 1
    seen = np.full(num_keys, -1, np.int64)
    mem = np.empty(keys.size, np.int64)
    moff = np.zeros(n + 1, np.int64)
    m = 0
    widest = 0
    for p in range(n):  # each position's distinct members, in order
        moff[p] = m
        for i in range(offsets[p], offsets[p + 1]):
            k = keys[i]
            if seen[k] != p:
                seen[k] = p
                mem[m] = k
                m += 1
        widest = max(widest, m - moff[p])
    moff[n] = m
    if n == 0:
        widest = 1
    later = np.full(num_keys, np.inf)
    after = np.empty(m)
    for p in range(n - 1, -1, -1):
        for i in range(moff[p], moff[p + 1]):
            after[i] = later[mem[i]]
        for i in range(moff[p], moff[p + 1]):
            later[mem[i]] = p
    resident = np.zeros(num_keys, np.bool_)
    next_of = np.full(num_keys, np.inf)
    size = start.size + m + 1  # live entries: at most one push per start key and per member
    h_neg = np.empty(size)
    h_ord = np.empty(size, np.int64)
    h_key = np.empty(size, np.int64)
    hn = 0
    order = 0
    n_res = 0
    for k in start:
        resident[k] = True
        n_res += 1
        next_of[k] = later[k]
        hn = _push(h_neg, h_ord, h_key, hn, -later[k], order, k)
        order += 1
    here = np.full(num_keys, -1, np.int64)
    missing = np.empty(max(widest, 1), np.int64)
    missing_after = np.empty(max(widest, 1))
    a_neg = np.empty(max(widest, 1))
    a_ord = np.empty(max(widest, 1), np.int64)
    a_key = np.empty(max(widest, 1), np.int64)
    loads = 0
    for p in range(n):
        nm = 0
        for i in range(moff[p], moff[p + 1]):
            k = mem[i]
            here[k] = p
            if not resident[k]:
                missing[nm], missing_after[nm] = k, after[i]
                nm += 1
        for i in range(moff[p], moff[p + 1]):
            k = mem[i]
            if resident[k]:  # (the missing ones are not, yet)
                next_of[k] = after[i]
                hn = _push(h_neg, h_ord, h_key, hn, -after[i], order, k)
                order += 1
        slots = capacity + max(moff[p + 1] - moff[p], 1) - 1  # this position's slots (none extra if empty)
        for j in range(nm):
            k = missing[j]
            loads += 1
            if n_res >= slots:
                hn = _evict_farthest(h_neg, h_ord, h_key, hn, resident, next_of, here, p, a_neg, a_ord, a_key)
                if hn < 0:
                    return False
                n_res -= 1
            resident[k] = True
            n_res += 1
            next_of[k] = missing_after[j]
            hn = _push(h_neg, h_ord, h_key, hn, -missing_after[j], order, k)
            order += 1
        while n_res > slots:  # fewer slots than the position before had
            hn = _evict_farthest(h_neg, h_ord, h_key, hn, resident, next_of, here, p, a_neg, a_ord, a_key)
            if hn < 0:
                return False
            n_res -= 1
        out[p] = loads
    return True


@jit_borrowing
def _evict_farthest(h_neg, h_ord, h_key, hn, resident, next_of, here, p, a_neg, a_ord, a_key):
    """Evicts the resident key needed farthest ahead that position p's set does not hold; returns
    the heap's new size (-1: no such key, the reference would raise)."""
    na = 0
    while True:
        if hn == 0:
            return -1
        hn = _pop(h_neg, h_ord, h_key, hn)
        neg, o, victim = h_neg[hn], h_ord[hn], h_key[hn]
        if not resident[victim] or next_of[victim] != -neg:
            continue  # stale
        if here[victim] == p:
            a_neg[na], a_ord[na], a_key[na] = neg, o, victim  # the set is held at once
            na += 1
            continue
        break
    for a in range(na):
        hn = _push(h_neg, h_ord, h_key, hn, a_neg[a], a_ord[a], a_key[a])
    resident[victim] = False
    next_of[victim] = np.inf
    return hn
