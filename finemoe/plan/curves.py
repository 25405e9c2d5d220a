"""Misses at every cache size in one pass over an access sequence: stack distances.

LRU and Belady's MIN are stack algorithms (Mattson, Gecsei, Slutz & Traiger, "Evaluation techniques
for storage hierarchies", IBM Systems Journal 9(2), 1970): the cache of c slots always holds the top
c entries of one priority stack, so an access hits a cache of c slots iff its stack distance is
below c, and one pass yields the hit curve for every c at once. For LRU the priority is recency;
for MIN it is the next use (soonest first), and an access updates the stack by moving the accessed
key to the top and shifting the "records" above its old place (the entries whose next use is later
than every entry above them) down by one.

Keys are accessed one at a time here; the simulator serves a layer-step's experts as a set, which
these curves approximate (the plan confirms its front with the simulator).
"""

from __future__ import annotations

import numpy as np

COLD = np.iinfo(np.int64).max  # the stack distance of a first access: a miss at every size


def lru_distances(keys: np.ndarray) -> np.ndarray:
    """The LRU stack distance of each access (0: the most recently used key), COLD for first uses."""
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


def min_distances(keys: np.ndarray) -> np.ndarray:
    """Belady MIN's stack distance of each access, COLD for first uses: a cache of c slots run by MIN
    (evict the key needed farthest ahead) hits exactly the accesses with distance < c."""
    nxt = next_uses(keys)
    stack_keys = np.empty(0, dtype=np.int64)
    stack_next = np.empty(0, dtype=np.int64)  # each entry's next use, as of now
    out = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys.tolist()):
        where = np.flatnonzero(stack_keys == key)
        if where.size:
            d = int(where[0])
            out[i] = d
        else:
            d = len(stack_keys)
            out[i] = COLD
            stack_keys = np.append(stack_keys, key)
            stack_next = np.append(stack_next, 0)
        if d > 0:
            # The entries 0..d-1 shift: at each level the entry with the later next use moves down.
            # The ones that move are the records of a running maximum over the next uses from the top.
            above = stack_next[:d]
            records = np.flatnonzero(above >= np.maximum.accumulate(above))
            # the last record drops to level d (the accessed key's old place), each other record to the next
            moved_keys, moved_next = stack_keys[records].copy(), above[records].copy()
            targets = np.append(records[1:], d)
            stack_keys[targets], stack_next[targets] = moved_keys, moved_next
        stack_keys[0], stack_next[0] = key, nxt[i]
    return out


def misses_at(distances: np.ndarray, slots: int) -> np.ndarray:
    """bool per access: a miss in a cache of `slots` slots."""
    return distances >= slots
