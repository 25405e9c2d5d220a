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
from collections import OrderedDict
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


class _Plan:
    """One plan's accesses, built once and never changed (so candidate runs can share it)."""

    def __init__(self, L: int, J: int, s: np.ndarray, layer: np.ndarray, e: np.ndarray, base_step: int = 0,
                 sequences: list[tuple[Sequence, ...]] | None = None) -> None:
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
        sorted_pos = pos[order]
        sorted_list = sorted_pos.tolist()
        bounds = [0, *(np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1).tolist(), order.size]
        for a, b in zip(bounds[:-1], bounds[1:]):  # noqa: B905 (one longer by construction)
            if b > a:
                k = int(sorted_key[a])
                per_key[(k // J, k % J)] = sorted_list[a:b]
        starts = np.zeros(L * J + 1, np.int64)
        np.cumsum(np.bincount(key, minlength=L * J), out=starts[1:])
        self.steps, self.layers, self.experts = s, layer, e
        self.pos, self.per_key, self.prev = pos.tolist(), per_key, prev
        self.pos_arr, self.key_arr = pos, key
        self.key_starts, self.key_positions = starts, np.ascontiguousarray(sorted_pos, dtype=np.int64)
        self.key_indices = order.astype(np.int64)
        self.entries: list[tuple[int, int, int]] | None = None  # (step, layer, expert) per access, made when asked
        self.base_step = base_step  # the plan's steps, the first of them step `base_step` (`step_sequences`)
        self.sequences = sequences or []


SHARED_PLANS = 2  # plans a process keeps for reuse (`PlanView.rebuild_shared`): each is ~100 MB at paper size
_SHARED: OrderedDict[tuple, _Plan] = OrderedDict()


class PlanView(OracleView):
    """`OracleView` over the accesses of a plan (`rebuild`); `version` counts the rebuilds, so
    policies can refresh what they derived from it."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.L = self.num_layers = num_layers
        self.J = num_experts
        self._plan = _Plan(num_layers, num_experts, _NONE, _NONE, _NONE)
        self.version = 0

    def rebuild(self, base_step: int, steps: list[tuple[Sequence, ...]], info: Callable,
                experts: np.ndarray | None = None) -> None:
        """The future is `steps`, the first of them step `base_step`; `info(seq)` gives a sequence's
        iteration (sim/engine.py's `iter_info`), `experts` the trace's expert table, if given."""
        if experts is None:
            s, layer, e = plan_accesses_reference(base_step, steps, info, self.L)
        else:
            s, layer, e = plan_accesses(base_step, steps, info, self.L, experts)
        self._plan = _Plan(self.L, self.J, s, layer, e, base_step, steps)
        self.version += 1

    def rebuild_shared(self, key: tuple, base_step: int, steps: Callable[[], list], info: Callable,
                       experts: np.ndarray) -> None:
        """`rebuild` with the steps `steps()` gives, or the plan built under the same `key` before
        in this process (whatever the plan depends on: the trace, the batcher's state, the base
        step): an oracle's candidate runs each ask for the same future."""
        key = (self.L, self.J, base_step, key)
        plan = _SHARED.get(key)
        if plan is None:
            self.rebuild(base_step, steps(), info, experts)
            _SHARED[key] = self._plan
            while len(_SHARED) > SHARED_PLANS:
                _SHARED.popitem(last=False)
        else:
            _SHARED.move_to_end(key)
            self._plan = plan
            self.version += 1

    @property
    def access_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per access, in order: its position (ascending), the index of its expert's previous
        access (-1: none) and its key (int64 arrays, not to be written): what a compiled reader of
        the first uses takes (policies/oracle.py)."""
        p = self._plan
        return p.pos_arr, p.prev, p.key_arr

    def per_key_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key's access positions, ascending, as one array with offsets: key k's are
        positions[starts[k]:starts[k + 1]] (what `next_use` bisects, for a compiled reader; not to
        be written)."""
        return self._plan.key_starts, self._plan.key_positions

    def per_key_indices(self) -> np.ndarray:
        """Beside `per_key_positions`, each of those accesses' index in `access_arrays`."""
        return self._plan.key_indices

    def step_sequences(self, step: int) -> tuple[Sequence, ...]:
        """The sequences the plan runs at engine step `step` (empty outside it)."""
        p = self._plan
        i = step - p.base_step
        return p.sequences[i] if 0 <= i < len(p.sequences) else ()

    def entries(self) -> list[tuple[int, int, int]]:
        """Every access as (step, layer, expert), in order."""
        p = self._plan
        if p.entries is None:
            p.entries = list(zip(p.steps.tolist(), p.layers.tolist(), p.experts.tolist()))  # noqa: B905
        return p.entries

    def position(self, after: tuple[int, int]) -> int:
        return after[0] * self.L + after[1]

    def next_use(self, key, after):
        arr = self._plan.per_key.get(key)
        if not arr:
            return _INF
        i = bisect.bisect_right(arr, after[0] * self.L + after[1])
        return float(arr[i]) if i < len(arr) else _INF

    def upcoming(self, after, limit):
        i = bisect.bisect_right(self._plan.pos, after[0] * self.L + after[1])
        return self.entries()[i : i + limit]

    def first_uses(self, after, limit):
        """`OracleView.first_uses` without reading the window: an entry is its expert's first in a
        window starting at entry i0 exactly when its expert's previous entry lies before i0."""
        p = self._plan
        i0 = bisect.bisect_right(p.pos, after[0] * self.L + after[1])
        i1 = min(i0 + limit, len(p.pos))
        if i1 <= i0:
            return [], 0, -1
        entries = self.entries()
        first = [entries[i] for i in (np.flatnonzero(p.prev[i0:i1] < i0) + i0).tolist()]
        return first, i1 - i0, p.pos[i1 - 1]

    def first_use_arrays(self, after, limit, num_experts):
        """`OracleView.first_use_arrays` from the plan's own arrays (as `first_uses` finds them)."""
        if num_experts != self.J:
            return super().first_use_arrays(after, limit, num_experts)
        p = self._plan
        i0 = bisect.bisect_right(p.pos, after[0] * self.L + after[1])
        i1 = min(i0 + limit, len(p.pos))
        if i1 <= i0:
            return _NONE, _NONE, 0, -1
        idx = (p.prev[i0:i1] < i0).nonzero()[0] + i0
        return p.pos_arr[idx], p.key_arr[idx], i1 - i0, p.pos[i1 - 1]
