"""Misses at every cache size in one pass over an access sequence: stack distances.

LRU and Belady's MIN are stack algorithms (Mattson, Gecsei, Slutz & Traiger, "Evaluation techniques
for storage hierarchies", IBM Systems Journal 9(2), 1970): the cache of c slots always holds the top
c entries of one priority stack, so an access hits a cache of c slots iff its stack distance is
below c, and one pass yields the hit curve for every c at once. For LRU the priority is recency;
for MIN the next use (soonest first); for LFU the use count, then recency. An access moves the
accessed key to the top and shifts the "records" above its old place (the entries of lower
priority than every entry above them) down by one.

Keys are accessed one at a time here; the simulator serves a layer-step's experts as a set, which
these curves approximate (the plan confirms its front with the simulator).

Each pass has a plain version (`*_plain`, the reference) and a compiled one (numba, finemoe/jit.py)
that the public functions use where numba imports; tests/test_plan_curves.py shows they agree. The
compiled LRU pass counts, with a Fenwick tree over access times, the keys whose last access lies
between a key's two accesses (O(n log n) instead of a search of the stack per access).
"""

from __future__ import annotations

import numpy as np

from finemoe.jit import jit, numba

COLD = np.iinfo(np.int64).max  # the stack distance of a first access: a miss at every size


def lru_distances(keys: np.ndarray) -> np.ndarray:
    """The LRU stack distance of each access (0: the most recently used key), COLD for first uses."""
    if numba is None:
        return lru_distances_plain(keys)
    ids = _dense_ids(keys)
    return _lru_fenwick(ids, int(ids.max()) + 1 if len(ids) else 0)


def _dense_ids(keys: np.ndarray) -> np.ndarray:
    """The keys renumbered 0..k-1 (int64), for arrays indexed by key."""
    return np.unique(np.asarray(keys), return_inverse=True)[1].astype(np.int64).ravel()


@jit
def _lru_fenwick(ids, num_keys):
    """`lru_distances_plain` by counting, for each access, the keys last accessed since the key's
    previous access: a Fenwick tree holds a 1 at each key's latest access time."""
    n = ids.shape[0]
    tree = np.zeros(n + 1, np.int64)
    last = np.full(num_keys, -1, np.int64)
    out = np.empty(n, np.int64)
    for i in range(n):
        k = ids[i]
        p = last[k]
        if p < 0:
            out[i] = COLD
        else:
            # markers at times p+1 .. i-1: prefix(i) - prefix(p + 1)
            total = 0
            j = i
            while j > 0:
                total += tree[j]
                j -= j & -j
            j = p + 1
            while j > 0:
                total -= tree[j]
                j -= j & -j
            out[i] = total
            j = p + 1
            while j <= n:
                tree[j] -= 1
                j += j & -j
        j = i + 1
        while j <= n:
            tree[j] += 1
            j += j & -j
        last[k] = i
    return out


def lru_distances_plain(keys: np.ndarray) -> np.ndarray:
    """`lru_distances` with a Python list as the stack: the reference."""
    stack: list[int] = []
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys.tolist()):
        try:
            d = stack.index(key)
        except ValueError:
            out[i] = COLD
        else:
            out[i] = d
            del stack[d]
        stack.insert(0, key)
    return out


def next_uses(keys: np.ndarray) -> np.ndarray:
    """For each access, the index of the next access to the same key (len(keys) when none)."""
    n = len(keys)
    out = np.full(n, n, dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        k = int(keys[i])
        out[i] = last.get(k, n)
        last[k] = i
    return out


def priority_distances(keys: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """The stack distance of each access under a priority stack algorithm (Mattson et al. §3): the
    cache keeps the highest-priority keys, `priority[i]` is the accessed key's priority from access
    i on, and no other key's priority changes at access i. COLD for first uses."""
    if numba is None or len(keys) == 0 or not np.issubdtype(np.asarray(priority).dtype, np.integer):
        return priority_distances_plain(keys, priority)
    ids = _dense_ids(keys)
    return _priority_compiled(ids, np.ascontiguousarray(priority, dtype=np.int64), int(ids.max()) + 1)


@jit
def _priority_compiled(ids, priority, num_keys):
    """`priority_distances_plain` over arrays: the records of the running minimum above the
    accessed key's level each move down to the next record's level, the last to the key's own."""
    n = ids.shape[0]
    stack_keys = np.empty(num_keys, np.int64)
    stack_prio = np.empty(num_keys, np.int64)
    level = np.full(num_keys, -1, np.int64)
    size = 0
    out = np.empty(n, np.int64)
    for i in range(n):
        key = ids[i]
        d = level[key]
        if d < 0:
            d = size
            out[i] = COLD
            size += 1
        else:
            out[i] = d
        if d > 0:
            carry_key, carry_prio = stack_keys[0], stack_prio[0]  # level 0 is always a record
            running = carry_prio
            for j in range(1, d):
                if stack_prio[j] <= running:  # a record: the carried entry takes its place
                    running = stack_prio[j]
                    next_key, next_prio = stack_keys[j], stack_prio[j]
                    stack_keys[j], stack_prio[j] = carry_key, carry_prio
                    level[carry_key] = j
                    carry_key, carry_prio = next_key, next_prio
            stack_keys[d], stack_prio[d] = carry_key, carry_prio
            level[carry_key] = d
        stack_keys[0], stack_prio[0] = key, priority[i]
        level[key] = 0
    return out


def priority_distances_plain(keys: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """`priority_distances` with numpy per access: the reference."""
    distinct = len(np.unique(keys)) if len(keys) else 0
    stack_keys = np.empty(distinct, dtype=np.int64)
    stack_prio = np.empty(distinct, dtype=priority.dtype)
    level: dict[int, int] = {}  # each key's place in the stack
    size = 0
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys.tolist()):
        d = level.get(key)
        if d is None:
            d, out[i] = size, COLD
            size += 1
        else:
            out[i] = d
        if d > 0:
            # The entries 0..d-1 shift: at each level the lower-priority of (the entry carried down,
            # the entry there) moves on; the ones that move are the records of a running minimum.
            above = stack_prio[:d]
            records = np.flatnonzero(above <= np.minimum.accumulate(above))
            # the last record drops to level d (the accessed key's old place), each other to the next
            moved_keys, moved_prio = stack_keys[records], above[records]
            targets = np.append(records[1:], d)
            stack_keys[targets], stack_prio[targets] = moved_keys, moved_prio
            for k, t in zip(moved_keys.tolist(), targets.tolist(), strict=True):
                level[k] = t
        stack_keys[0], stack_prio[0] = key, priority[i]
        level[key] = 0
    return out


def min_distances(keys: np.ndarray) -> np.ndarray:
    """Belady MIN's stack distances: a cache of c slots run by MIN (evict the key needed farthest
    ahead) hits exactly the accesses with distance < c. Priority: the sooner the next use, the higher."""
    return priority_distances(keys, -next_uses(keys))


def lfu_priority(keys: np.ndarray) -> np.ndarray:
    """LFU's priority from each access on: (uses so far, last use) as one integer."""
    n = len(keys)
    counts: dict[int, int] = {}
    prio = np.empty(n, dtype=np.int64)
    for i, k in enumerate(keys.tolist()):
        counts[k] = counts.get(k, 0) + 1
        prio[i] = counts[k] * (n + 1) + i
    return prio


def lfu_distances(keys: np.ndarray) -> np.ndarray:
    """LFU's stack distances, with use counts kept across evictions and the least recently used
    first among equals (policies/caches.py LFUCounts): priority = (uses so far, last use)."""
    return priority_distances(keys, lfu_priority(keys))


def per_group_lru_distances(keys: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """LRU stack distances within each group's own subsequence (a cache per layer)."""
    out = np.empty(len(keys), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = lru_distances(keys[idx])
    return out


def misses_at(distances: np.ndarray, slots: int) -> np.ndarray:
    """bool per access: a miss in a cache of `slots` slots."""
    return distances >= slots
