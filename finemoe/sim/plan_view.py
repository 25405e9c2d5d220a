"""The future as the batcher would run it, for oracle policies (`OracleView`): every expert access
of the planned steps, in the order the engine makes them (step, then layer, then the layer's
experts), with each one's position (step x layers + layer), key (layer x experts + expert) and the
index of its expert's previous access.

Exact for all-at-once arrivals; the engine rebuilds it whenever a request arrives otherwise, and an
oracle's candidate runs each build it once, so building it is part of every oracle run's cost: a
paper-size workload has hundreds of thousands of accesses. `plan_accesses` gathers a decode step's
experts (one trace row) with numpy, runs of such steps at once; `plan_accesses_reference` is the plain
loop it must equal (tests/test_oracle_view.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

from finemoe.policies.base import OracleView, Sequence

_NONE = np.zeros(0, dtype=np.int64)
_INF = float("inf")


def _layer_sets(seqs: tuple[Sequence, ...], info: Callable, num_layers: int) -> list[list[int]]:
    """A step's experts per layer in the engine's access order: one sequence's as its iteration
    lists them (a decode token's in routing order), several sequences' union ascending."""
    if len(seqs) == 1:
        return [[e for e, _ in layer] for layer in info(seqs[0]).layers]
    return [sorted({e for q in seqs for e, _ in info(q).layers[layer]}) for layer in range(num_layers)]


def plan_accesses_reference(base_step: int, steps: list[tuple[Sequence, ...]], info: Callable,
                            num_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every access of `steps` (the first is step `base_step`) as int64 arrays: step, layer, expert."""
    out_s: list[int] = []
    out_l: list[int] = []
    out_e: list[int] = []
    for i, seqs in enumerate(steps):
        for layer, experts in enumerate(_layer_sets(seqs, info, num_layers)):
            for e in experts:
                out_s.append(base_step + i)
                out_l.append(layer)
                out_e.append(e)
    return (np.array(out_s, dtype=np.int64), np.array(out_l, dtype=np.int64), np.array(out_e, dtype=np.int64))


def plan_accesses(base_step: int, steps: list[tuple[Sequence, ...]], info: Callable, num_layers: int,
                  experts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`plan_accesses_reference`, with each run of one-token steps (trace rows of `experts`,
    [rows, layers, top-k], -1 where a record is missing) read in one gather."""
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rows: list[int] = []
    row_steps: list[int] = []

    def flush() -> None:
        if rows:
            block = experts[np.asarray(rows)]
            i, layer, k = np.nonzero(block >= 0)  # C order: step, layer, routing order
            chunks.append((np.asarray(row_steps, dtype=np.int64)[i], layer.astype(np.int64),
                           block[i, layer, k].astype(np.int64)))
            rows.clear()
            row_steps.clear()

    for i, seqs in enumerate(steps):
        if len(seqs) == 1 and seqs[0].stop - seqs[0].start == 1:
            rows.append(seqs[0].start)
            row_steps.append(base_step + i)
            continue
        flush()
        sets = _layer_sets(seqs, info, num_layers)
        sizes = [len(x) for x in sets]
        chunks.append((np.full(sum(sizes), base_step + i, dtype=np.int64),
                       np.repeat(np.arange(num_layers, dtype=np.int64), sizes),
                       np.array([e for x in sets for e in x], dtype=np.int64)))
    flush()
    if not chunks:
        return _NONE, _NONE, _NONE
    return tuple(np.concatenate([c[j] for c in chunks]) for j in range(3))


class PlanView(OracleView):
    """`OracleView` over the accesses of a plan (`rebuild`); `version` counts the rebuilds, so
    policies can refresh what they derived from it."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.L = self.num_layers = num_layers
        self.J = num_experts
        self._per_key: dict[tuple[int, int], list[int]] = {}  # key -> positions of its accesses, ascending
        self._pos: list[int] = []  # per access: its position (what bisect reads)
        self._steps = self._layers = self._experts = _NONE
        self._entries: list[tuple[int, int, int]] | None = []  # (step, layer, expert) per access, made when asked
        self._prev = _NONE  # per access: the index of its expert's previous access (-1: none)
        self._pos_arr = self._key_arr = _NONE  # per access: its position, its key
        self.version = 0

    def rebuild(self, base_step: int, steps: list[tuple[Sequence, ...]], info: Callable,
                experts: np.ndarray | None = None) -> None:
        """The future is `steps`, the first of them step `base_step`; `info(seq)` gives a sequence's
        iteration (sim/engine.py's `iter_info`), `experts` the trace's expert table, if given."""
        L, J = self.L, self.J
        if experts is None:
            s, layer, e = plan_accesses_reference(base_step, steps, info, L)
        else:
            s, layer, e = plan_accesses(base_step, steps, info, L, experts)
        pos, key = s * L + layer, layer * J + e
        order = np.argsort(key, kind="stable")  # each key's accesses together, in plan order
        sorted_key = key[order]
        prev_sorted = np.full(order.size, -1, dtype=np.int64)
        if order.size > 1:
            same = sorted_key[1:] == sorted_key[:-1]
            prev_sorted[1:][same] = order[:-1][same]
        prev = np.empty_like(prev_sorted)
        prev[order] = prev_sorted
        per_key: dict[tuple[int, int], list[int]] = {}
        sorted_pos = pos[order].tolist()
        bounds = [0, *(np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1).tolist(), order.size]
        for a, b in zip(bounds[:-1], bounds[1:]):  # noqa: B905 (one longer by construction)
            if b > a:
                k = int(sorted_key[a])
                per_key[(k // J, k % J)] = sorted_pos[a:b]
        self._steps, self._layers, self._experts = s, layer, e
        self._entries = None
        self._pos, self._per_key, self._prev = pos.tolist(), per_key, prev
        self._pos_arr, self._key_arr = pos, key
        self.version += 1

    @property
    def access_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per access, in order: its position (ascending), the index of its expert's previous
        access (-1: none) and its key (int64 arrays, not to be written): what a compiled reader of
        the first uses takes (policies/oracle.py)."""
        return self._pos_arr, self._prev, self._key_arr

    def per_key_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key's access positions, ascending, as one array with offsets: key k's are
        positions[starts[k]:starts[k + 1]] (what `next_use` bisects, for a compiled reader)."""
        n = self.L * self.J
        order = np.argsort(self._key_arr, kind="stable")
        counts = np.bincount(self._key_arr, minlength=n) if order.size else np.zeros(n, np.int64)
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        return starts, np.ascontiguousarray(self._pos_arr[order], dtype=np.int64)

    def entries(self) -> list[tuple[int, int, int]]:
        """Every access as (step, layer, expert), in order."""
        if self._entries is None:
            self._entries = list(zip(self._steps.tolist(), self._layers.tolist(), self._experts.tolist()))  # noqa: B905
        return self._entries

    def position(self, after: tuple[int, int]) -> int:
        return after[0] * self.L + after[1]

    def next_use(self, key, after):
        arr = self._per_key.get(key)
        if not arr:
            return _INF
        i = bisect.bisect_right(arr, after[0] * self.L + after[1])
        return float(arr[i]) if i < len(arr) else _INF

    def upcoming(self, after, limit):
        i = bisect.bisect_right(self._pos, after[0] * self.L + after[1])
        return self.entries()[i : i + limit]

    def first_uses(self, after, limit):
        """`OracleView.first_uses` without reading the window: an entry is its expert's first in a
        window starting at entry i0 exactly when its expert's previous entry lies before i0."""
        i0 = bisect.bisect_right(self._pos, after[0] * self.L + after[1])
        i1 = min(i0 + limit, len(self._pos))
        if i1 <= i0:
            return [], 0, -1
        entries = self.entries()
        first = [entries[i] for i in (np.flatnonzero(self._prev[i0:i1] < i0) + i0).tolist()]
        return first, i1 - i0, self._pos[i1 - 1]

    def first_use_arrays(self, after, limit, num_experts):
        """`OracleView.first_use_arrays` from the plan's own arrays (as `first_uses` finds them)."""
        if num_experts != self.J:
            return super().first_use_arrays(after, limit, num_experts)
        i0 = bisect.bisect_right(self._pos, after[0] * self.L + after[1])
        i1 = min(i0 + limit, len(self._pos))
        if i1 <= i0:
            return _NONE, _NONE, 0, -1
        idx = (self._prev[i0:i1] < i0).nonzero()[0] + i0
        return self._pos_arr[idx], self._key_arr[idx], i1 - i0, self._pos[i1 - 1]
