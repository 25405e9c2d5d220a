"""Lower bounds that hold for every schedule the engine can run, policies and oracle alike: expert
loads (Belady's MIN), bytes moved, and per request TTFT, TPOT and end-to-end latency, and the
makespan (from the compute critical path and the link time the minimum loads need). The arguments
are in docs/bounds.md; the property tests (tests/test_bounds_properties.py) check them against
every registered policy and, on small instances, against the exact optimum (sim/exact.py).

Which accesses a run issues is fixed by the workload when every request arrives at once or the
batch holds one sequence (the batcher's steps do not depend on timing then): the bounds use that
exact step sequence. Otherwise (later arrivals and batches of several) the batches a run forms
depend on its timing, so the bounds use each request's own accesses, which every batching contains.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from finemoe.policies.base import Sequence as Run
from finemoe.results import latency_summary
from finemoe.sim.belady import min_loads, min_loads_of_arrays
from finemoe.sim.costs import TICKS_PER_S, CostModel, to_ticks
from finemoe.sim.engine import iter_info, step_work
from finemoe.sim.workload import ContinuousBatcher

_S = 1.0 / TICKS_PER_S


@dataclass(frozen=True)
class StepCost:
    """One engine step for the bounds: per layer the keys it needs, its compute ticks without any
    wait (dense plus every routed expert), its cheapest expert, and when its last request arrived."""

    keys: tuple[tuple[tuple[int, int], ...], ...]
    layer_ticks: tuple[int, ...]
    min_expert_ticks: tuple[int, ...]
    arrival: int
    requests: tuple[int, ...]


@dataclass(frozen=True)
class Link:
    """The link as the bounds see it: the shortest per-copy latency and wire time the engine uses,
    and the factor below 1 by which copies can speed compute up (none: 1)."""

    latency: int
    wire: int
    compute_factor: float


def link_of(costs: CostModel, bytes_per_expert: int) -> Link:
    hw = costs.hardware
    wire = costs.wire_s(bytes_per_expert)
    wire_ticks = min(to_ticks(wire), to_ticks(wire * getattr(hw, "compute_copy_slowdown", 1.0)))
    factor = min(1.0, float(getattr(hw, "copy_compute_slowdown", 1.0)))
    return Link(to_ticks(hw.transfer_latency_s), wire_ticks, factor)


def step_costs(trace, costs: CostModel, steps, arrival_of: dict[int, int]) -> list[StepCost]:
    """`StepCost` of each step (a tuple of Sequences), from the engine's own step arithmetic."""
    L = trace.geometry.num_layers
    memo: dict = {}
    expert_ticks: dict[int, int] = {}
    out = []
    for seqs in steps:
        infos = []
        for q in seqs:
            k = (q.start, q.stop)
            if k not in memo:
                memo[k] = iter_info(trace, q.start, q.stop)
            infos.append(memo[k])
        experts_l, counts_l, dense, _ = step_work(infos, L, costs)
        keys, ticks, mins = [], [], []
        for layer in range(L):
            et = []
            for c in counts_l[layer]:
                if c not in expert_ticks:
                    expert_ticks[c] = to_ticks(costs.expert_compute_s(c))
                et.append(expert_ticks[c])
            keys.append(tuple((layer, e) for e in experts_l[layer]))
            ticks.append(dense + sum(et))
            mins.append(min(et) if et else 0)
        rids = tuple(q.request_id for q in seqs)
        out.append(StepCost(tuple(keys), tuple(ticks), tuple(mins), max(arrival_of[r] for r in rids), rids))
    return out


@dataclass(frozen=True)
class _Positions:
    """Steps as arrays over their (step, layer) positions, for the bounds' arithmetic: each
    position's keys (integer ids by first appearance, `keys[offsets[p]:offsets[p + 1]]`), its
    compute ticks and cheapest expert's ticks, and each step's first position (`starts`, one
    longer). A window of steps is a slice of them (`min_loads(a, b)`, `_window`)."""

    offsets: np.ndarray
    keys: np.ndarray
    ticks: np.ndarray
    mins: np.ndarray
    starts: np.ndarray
    ids: dict

    @staticmethod
    def of(steps: list[StepCost]) -> _Positions:
        ids: dict = {}
        flat = [ids.setdefault(k, len(ids)) for s in steps for lk in s.keys for k in lk]
        sizes = [len(lk) for s in steps for lk in s.keys]
        offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        starts = np.zeros(len(steps) + 1, np.int64)
        np.cumsum([len(s.keys) for s in steps], out=starts[1:])
        return _Positions(offsets, np.array(flat, np.int64), np.array([t for s in steps for t in s.layer_ticks], np.int64),
                          np.array([m for s in steps for m in s.min_expert_ticks], np.int64), starts, ids)

    def min_loads(self, a: int, b: int, capacity: int, start: frozenset = frozenset()) -> np.ndarray:
        """`min_loads` of positions [a, b) (the same counts: MIN's ids are only indices)."""
        ids = dict(self.ids) if start else self.ids  # (a request's window starts cold: no copy)
        first = np.array([ids.setdefault(k, len(ids)) for k in sorted(start, key=repr)], np.int64)
        offsets = self.offsets[a : b + 1]
        return min_loads_of_arrays(offsets - offsets[0], self.keys[offsets[0] : offsets[-1]], len(ids), capacity,
                                   first)


class _Steps(list):
    """A list of `StepCost` that remembers its positions (`_Positions`) once built: the planned
    steps a process keeps (`planned_step_costs`), which every budget's bounds read."""

    _positions: _Positions | None = None


def _positions_of(steps: list[StepCost]) -> _Positions:
    if not isinstance(steps, _Steps):
        return _Positions.of(steps)
    if steps._positions is None:
        steps._positions = _Positions.of(steps)
    return steps._positions


def _scaled(ticks: int, f: float) -> int:
    return ticks if f >= 1.0 else int(ticks * f)


def step_end_bounds(steps: list[StepCost], capacity: int, start: frozenset, link: Link) -> tuple[list[int], int]:
    """A lower bound on the time (ticks) each step ends, and the minimum loads over all steps.

    Step s ends no earlier than (a) its compute after the previous step's end or its arrival,
    whichever is later, and (b) for each of its layers l, the link time of the MIN loads of the
    prefix through (s, l) (the k-th copy lands at latency + k wire times at the earliest) plus one
    expert of l and the step's compute after l. (The plain loop, the definition: sweeps use
    `_step_ends`, checked against it.)
    """
    f = link.compute_factor
    cum = min_loads([k for s in steps for k in s.keys], capacity, start)
    ends, prev, p = [], 0, 0
    for s in steps:
        ticks = [_scaled(t, f) for t in s.layer_ticks]
        end = max(prev, s.arrival) + sum(ticks)
        after = sum(ticks)
        for layer, t in enumerate(ticks):
            after -= t
            n = cum[p]
            if n:
                end = max(end, link.latency + n * link.wire + _scaled(s.min_expert_ticks[layer], f) + after)
            p += 1
        ends.append(end)
        prev = end
    return ends, (cum[-1] if cum else 0)


def window_bound(steps: list[StepCost], capacity: int, link: Link) -> int:
    """A lower bound on the time (ticks) the steps `steps` take after the step before them ends:
    their compute, and for each position the link time of the copies that must start after that
    moment (MIN of the window from cold, less the `capacity` experts the cache may hold then,
    resident or on the wire) plus the compute that follows. (The plain loop: sweeps use `_window`.)"""
    if not steps:
        return 0
    f = link.compute_factor
    cum = min_loads([k for s in steps for k in s.keys], capacity)
    ticks = [_scaled(t, f) for s in steps for t in s.layer_ticks]
    mins = [_scaled(m, f) for s in steps for m in s.min_expert_ticks]
    total = sum(ticks)
    best, after = total, total
    for p, t in enumerate(ticks):
        after -= t
        n = cum[p] - capacity
        if n > 0:
            best = max(best, link.latency + n * link.wire + mins[p] + after)
    return best


def _scaled_array(ticks: np.ndarray, f: float) -> np.ndarray:
    """`_scaled` of each (int() truncates toward zero, as astype does)."""
    return ticks if f >= 1.0 else (ticks * f).astype(np.int64)


def _step_ends(steps: list[StepCost], pos: _Positions, capacity: int, start: frozenset,
               link: Link) -> tuple[list[int], int]:
    """`step_end_bounds` over the steps' positions (`pos`), its per-position part with numpy
    (hundreds of thousands of positions per budget at paper size: 1.5 s in the plain loop); the
    same ends (tests/test_bounds.py)."""
    if not steps:
        return [], 0
    f = link.compute_factor
    cum = pos.min_loads(0, pos.ticks.size, capacity, start)
    ticks, mins = _scaled_array(pos.ticks, f), _scaled_array(pos.mins, f)
    through = np.cumsum(ticks)  # compute through each position
    step_last = pos.starts[1:] - 1
    totals = through[step_last] - np.concatenate(([0], through[step_last[:-1]]))
    after = np.repeat(through[step_last], np.diff(pos.starts)) - through  # the step's compute after p
    copies = np.where(cum > 0, link.latency + cum * link.wire + mins + after, 0)
    by_copies = np.maximum.reduceat(copies, pos.starts[:-1]).tolist()
    ends, prev = [], 0
    for s, total, floor in zip(steps, totals.tolist(), by_copies):  # noqa: B905 (one per step)
        prev = max(max(prev, s.arrival) + total, floor)
        ends.append(prev)
    return ends, int(cum[-1])


def _window(pos: _Positions, first: int, stop: int, capacity: int, link: Link) -> int:
    """`window_bound` of steps [first, stop) of `pos` (a request's decode steps: a slice of the
    arrays every request shares, not a list of its own), with numpy; the same bound."""
    if stop <= first:
        return 0
    a, b = int(pos.starts[first]), int(pos.starts[stop])
    f = link.compute_factor
    cum = pos.min_loads(a, b, capacity)
    ticks, mins = _scaled_array(pos.ticks[a:b], f), _scaled_array(pos.mins[a:b], f)
    total = int(ticks.sum())
    after = total - np.cumsum(ticks)
    n = cum - capacity
    copies = np.where(n > 0, link.latency + n * link.wire + mins + after, 0)
    return max(total, int(copies.max()))


def _request_bounds(steps: list[StepCost], capacity: int, start: frozenset, link: Link,
                    arrival_of: dict[int, int], rids) -> tuple[dict[int, dict], list[int], int]:
    """Per request of `rids` (each must appear in `steps`) its TTFT, TPOT and e2e bounds (s)."""
    pos = _positions_of(steps)
    ends, loads = _step_ends(steps, pos, capacity, start, link)
    where: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        for r in s.requests:
            where.setdefault(r, []).append(i)
    out = {}
    for r in rids:
        idx = where[r]
        first, last = idx[0], idx[-1]
        a = arrival_of[r]
        tpot = float("nan")
        if len(idx) > 1:
            tpot = _window(pos, first + 1, last + 1, capacity, link) * _S / (len(idx) - 1)
        out[r] = {"ttft_s": (ends[first] - a) * _S, "tpot_s": tpot, "e2e_s": (ends[last] - a) * _S}
    return out, ends, loads


STEP_COSTS_KEPT = 2  # planned step costs a process keeps (`planned_step_costs`): up to ~200 MB each at paper size
_STEP_COSTS: OrderedDict[tuple, list[StepCost]] = OrderedDict()


def planned_step_costs(trace, costs: CostModel, batcher: ContinuousBatcher) -> tuple[list[StepCost], dict[int, int]]:
    """`StepCost` of each step the batcher plans (the steps a run takes when they are fixed), and
    each request's arrival tick. The costs do not depend on the cache, so a process computes them
    once per trace, hardware and batcher (`_STEP_COSTS`; a sweep's budgets share them: 5 s of a
    7.7 s bound at paper size). The list is shared: not to be changed."""
    arrival_of = {rid: int(a) for rid, a, _ in batcher.arrivals}
    key = (trace.content_hash(), costs, batcher.plan_key(), tuple(arrival_of.items()))
    steps = _STEP_COSTS.get(key)
    if steps is None:
        steps = _STEP_COSTS[key] = _Steps(step_costs(trace, costs, batcher.plan(None), arrival_of))
        while len(_STEP_COSTS) > STEP_COSTS_KEPT:
            _STEP_COSTS.popitem(last=False)
    else:
        _STEP_COSTS.move_to_end(key)
    return steps, arrival_of


def lower_bounds(trace, costs: CostModel, batcher: ContinuousBatcher, capacity: int, start: frozenset,
                 fixed_steps: bool) -> dict:
    """Every bound of one configuration, as `bound_*` summary fields (loads, bytes, seconds).

    `batcher`: a fresh batcher of the measured requests (it is planned, not run); `start`: the
    experts resident before the first step (empty: a cold start). `fixed_steps`:
    whether the run's steps are the batcher's plan whatever the timing (all arrive at once, or a
    batch of one); otherwise each request's own accesses are used (see the module docstring).
    """
    return lower_bounds_at(trace, costs, batcher, [capacity], start, fixed_steps)[0]


def lower_bounds_at(trace, costs: CostModel, batcher: ContinuousBatcher, capacities, start: frozenset,
                    fixed_steps: bool) -> list[dict]:
    """`lower_bounds` at each cache size of `capacities`: the steps' compute is costed once (a plan's
    curve asks for several sizes of one workload)."""
    g = trace.geometry
    link = link_of(costs, g.bytes_per_expert)
    all_steps, arrival_of = planned_step_costs(trace, costs, batcher)
    rids = [rid for rid, _, its in batcher.arrivals if its]
    alone: dict = {}
    if not fixed_steps:
        by_req = trace.iterations_by_request
        alone = {r: step_costs(trace, costs, [(Run(r, it.iteration, it.start, it.stop),) for it in by_req[r]],
                               arrival_of) for r in rids}
    results = []
    for capacity in capacities:
        if fixed_steps:
            per_req, ends, loads = _request_bounds(all_steps, capacity, start, link, arrival_of, rids)
            makespan = ends[-1] if ends else 0
        else:
            per_req, makespan = {}, 0
            loads = len({k for s in all_steps for lk in s.keys for k in lk} - start)  # every expert used is
            # loaded once, unless resident from the start
            for r in rids:
                got, ends, n = _request_bounds(alone[r], capacity, start, link, arrival_of, [r])
                per_req.update(got)
                loads = max(loads, n)
                makespan = max(makespan, ends[-1])
            if loads:
                makespan = max(makespan, link.latency + loads * link.wire)
        frame = pd.DataFrame([per_req[r] for r in rids], columns=["ttft_s", "tpot_s", "e2e_s"])
        out = {f"bound_{k}": v for k, v in latency_summary(frame).items()}
        out.update(bound_loads=int(loads), bound_bytes_h2d=int(loads) * g.bytes_per_expert,
                   bound_makespan_s=makespan * _S, bound_steps_fixed=int(fixed_steps))
        results.append(out)
    return results


def steps_are_fixed(arrival: str, max_batch: int) -> bool:
    """Whether the batcher's steps cannot depend on a run's timing (see the module docstring)."""
    return arrival == "all" or max_batch == 1
