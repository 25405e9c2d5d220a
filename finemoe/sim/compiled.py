"""The engine's compiled path: on-demand LRU and LFU caches, each engine step's layers in one numba
call, with the same times and counts as `SimEngine` (sim/engine.py), which stays the reference.

Why this path exists: a sweep's commonest runs are copy-on-miss caches, and there the SimPy engine
spends its time in Python bookkeeping (dict moves, tuples, calls per access), not in the timing
model. For such a policy every step is what the reference calls a quiet step (`_quiet_step`: no
hook can queue a prefetch, so each layer's only copies are its own misses and the link is idle
again after the layer), whose rules are few: a layer's dense work, its hits back to back, its
misses started together on idle copy engines (`_lands_inline`) or queued behind them when there
are more misses than engines (`_misses_inline_heap`), victims chosen by the policy among the
residents the layer does not pin. `layer_step` plays exactly those rules over flat arrays.

It applies when `supports` says so (the policy is exactly `lru` or `lfu`, no compute stretch, no
CPU side, no SSD tier, no low precision, one shared pool, every layer's experts fit,
numba importable); anything else runs on the reference. tests/test_sim_compiled.py shows both give
the same results, field by field, on random traces and on the real Mixtral logs. Why numba:
docs/timing-model.md, "The compiled path".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from finemoe.jit import jit as _jit
from finemoe.jit import jit_borrowing as _borrowing
from finemoe.jit import numba
from finemoe.policies.caches import LFUCounts
from finemoe.policies.lfu import LFUPolicy
from finemoe.policies.lru import LRUPolicy
from finemoe.sim.costs import TICKS_PER_S, to_ticks
from finemoe.sim.engine import DeadlockError, one_token

_S = 1.0 / TICKS_PER_S
# The policies whose victim order `layer_step` reproduces: LRU (least recent use or load first) and
# LFU (fewest accesses, kept across evictions; ties: least recently entered its count).
POLICIES = {LRUPolicy: 0, LFUPolicy: 1}
# State slots of the int64 `state` array the kernel updates in place.
N_RESIDENT, WIRE_FREE, CLOCK, LOADS, ERROR = range(5)
NO_VICTIM, DEADLOCK = 1, 2  # error codes: the reference raises PolicyError / DeadlockError there
warm = False  # the kernels have run in this process: numba is imported and their machine code loaded


def supports(engine) -> bool:
    """Whether a `SimEngine` as built would run every step as a quiet step of a policy this path
    reproduces (the reference's own conditions for `_quiet_step`, made to hold for the whole run).
    Exactly LRU or LFU: neither has a step, layer or finish hook, sees the future or computes on
    the CPU, and a subclass might change any of that."""
    cache = engine.cache
    return (type(engine.policy) in POLICIES and engine.inline_misses and engine.slowdown == 1.0
            and cache.layer_capacity is None and cache.capacity >= engine.J and numba is not None)


@_jit
def layer_step(experts, ticks, dense, t, num_experts, capacity, engines, ticks_positive, busy_latency, latency,
               busy_wire, wire, miss_ticks, lfu, resident, stamp, count, pinned, state, hits, misses):
    """One engine step's layers (`experts[l]`: ascending ids, -1 padding; `ticks[l]`: each one's
    compute ticks) from compute clock `t`; returns (clock after the step, ticks waited). Updates the
    cache arrays (per key l * J + e: resident, last-use stamp, LFU count, pins), `state` and the
    per-layer hit and miss counts in place; `state[ERROR]` set means the reference would raise."""
    num_layers, width = experts.shape
    keys = np.empty(width, np.int64)
    cost = np.empty(width, np.int64)
    missed = np.zeros(width, np.bool_)
    miss_keys = np.empty(width, np.int64)
    miss_cost = np.empty(width, np.int64)
    # The queued path's structures, sized for one layer: copies on the wire (a heap by (end, order),
    # scanned: a layer has few), when each miss lands, and pins released at compute times.
    h_end = np.empty(width, np.int64)
    h_ord = np.empty(width, np.int64)
    h_miss = np.empty(width, np.int64)
    arr_end = np.empty(width, np.int64)
    arr_ord = np.empty(width, np.int64)
    on_wire = np.zeros(width, np.bool_)
    pending = np.zeros(width, np.bool_)
    ready = np.empty(width, np.int64)
    u_time = np.empty(width, np.int64)
    u_key = np.empty(width, np.int64)
    waited = 0
    for layer in range(num_layers):
        t += dense
        n = 0
        for i in range(width):
            e = experts[layer, i]
            if e >= 0:
                keys[n] = layer * num_experts + e
                cost[n] = ticks[layer, i]
                n += 1
        # The accesses, in expert order (`ExpertCache.access_layer` / `access_and_start`).
        k = 0
        for i in range(n):
            key = keys[i]
            if lfu:
                count[key] += 1  # every access counts; a resident re-enters its count's order
                if resident[key]:
                    state[CLOCK] += 1
                    stamp[key] = state[CLOCK]
            elif resident[key]:
                state[CLOCK] += 1
                stamp[key] = state[CLOCK]
            if resident[key]:
                missed[i] = False
            else:
                missed[i] = True
                miss_keys[k] = key
                miss_cost[k] = cost[i]
                k += 1
        hits[layer] += n - k
        if k == 0:
            for i in range(n):
                t += cost[i]
            continue
        misses[layer] += k
        state[LOADS] += k
        if k <= engines and ticks_positive:
            # `_start_layer_loads` + `_lands_inline`: every miss on an idle engine at once, victims
            # chosen while the layer's resident experts are pinned.
            for i in range(n):
                pinned[keys[i]] += 1
            for m in range(k):
                if state[N_RESIDENT] + m >= capacity:
                    if _evict(resident, stamp, count, pinned, lfu, state) < 0:
                        state[ERROR] = NO_VICTIM
                        return t, waited
            for i in range(n):
                pinned[keys[i]] -= 1
            end = t + busy_latency
            if end < state[WIRE_FREE]:
                end = state[WIRE_FREE]
            end += busy_wire
            t += miss_ticks * k
            for i in range(n):
                if not missed[i]:
                    t += cost[i]
            for m in range(k):
                if end > t:
                    waited += end - t
                    t = end
                t += miss_cost[m]
                end += busy_wire
            state[WIRE_FREE] = end - busy_wire
            for m in range(k):  # `complete_landed`, in miss order
                _load(miss_keys[m], resident, stamp, state)
            continue
        # `_misses_inline_heap` without a compute stretch: more misses than idle engines.
        for i in range(n):
            pinned[keys[i]] += 1
        in_flight = 0
        head = 0  # the on-demand queue: miss_keys[head:k]
        hn = 0
        order = 0
        un = 0  # unpins queued (u_time non-decreasing), applied up to uh
        uh = 0
        sleeping = engines  # every engine sleeps between layers
        stalled = False
        for m in range(k):
            on_wire[m] = False
            pending[m] = True
        while sleeping > 0 and head < k:  # `_wake_at(t)`
            uh, in_flight, hn, head, order = _start_next(
                t, True, stalled, u_time, u_key, uh, un, capacity, in_flight, lfu, resident, stamp, count, pinned,
                state, busy_latency, latency, busy_wire, wire, h_end, h_ord, h_miss, hn, arr_end, arr_ord, on_wire,
                head, order)
            if uh < 0:
                state[ERROR] = DEADLOCK
                return t, waited
            sleeping -= 1
        t += miss_ticks * k
        for i in range(n):
            if not missed[i]:
                t += cost[i]
                u_time[un], u_key[un] = t, keys[i]
                un += 1
        while True:
            left = 0
            for m in range(k):
                if pending[m]:
                    left += 1
            if left == 0:
                break
            if hn > 0 and _heap_min_end(h_end, hn) <= t:
                hn, head, sleeping, order, in_flight, uh, err = _land(
                    t, order, h_end, h_ord, h_miss, hn, arr_end, arr_ord, on_wire, miss_keys, k, head, sleeping,
                    order, in_flight, u_time, u_key, uh, un, stalled, capacity, busy_latency, latency, busy_wire,
                    wire, lfu, resident, stamp, count, pinned, state)
                if err:
                    state[ERROR] = DEADLOCK
                    return t, waited
            nr = 0
            for m in range(k):
                if pending[m] and resident[miss_keys[m]]:
                    ready[nr] = m
                    nr += 1
            if nr == 0:
                first = -1
                for m in range(k):
                    if pending[m] and on_wire[m] and (first < 0 or arr_end[m] < arr_end[first]):
                        first = m
                if first < 0:
                    state[ERROR] = DEADLOCK
                    return t, waited
                until_end, until_ord = arr_end[first], arr_ord[first]
                stalled = True
                hn, head, sleeping, order, in_flight, uh, err = _land(
                    until_end, until_ord, h_end, h_ord, h_miss, hn, arr_end, arr_ord, on_wire, miss_keys, k, head,
                    sleeping, order, in_flight, u_time, u_key, uh, un, stalled, capacity, busy_latency, latency,
                    busy_wire, wire, lfu, resident, stamp, count, pinned, state)
                stalled = False
                if err:
                    state[ERROR] = DEADLOCK
                    return t, waited
                waited += until_end - t
                t = until_end
                continue
            for j in range(nr):
                m = ready[j]
                pending[m] = False
                t += miss_cost[m]
                u_time[un], u_key[un] = t, miss_keys[m]
                un += 1
        if hn > 0:
            state[ERROR] = DEADLOCK
            return t, waited
        for j in range(uh, un):  # released before any later victim choice (all due by then)
            pinned[u_key[j]] -= 1
    return t, waited


@_jit
def run_steps(rows, multi, sorted_experts, one_tick, multi_experts, multi_ticks, dense, t, ends, num_experts,
              capacity, engines, ticks_positive, busy_latency, latency, busy_wire, wire, miss_ticks, lfu, resident,
              stamp, count, pinned, state, hits, misses):
    """`layer_step` over a fixed sequence of steps: step s is trace row `rows[s]` alone (a decode
    step of one sequence, `sorted_experts[row]`) or, where rows[s] < 0, prepared step `multi[s]`;
    each step's end clock goes to `ends[s]`. Returns (clock, ticks waited, the failing step or -1)."""
    waited = 0
    for s in range(rows.shape[0]):
        if rows[s] >= 0:
            t, w = layer_step(sorted_experts[rows[s]], one_tick, dense[s], t, num_experts, capacity, engines,
                              ticks_positive, busy_latency, latency, busy_wire, wire, miss_ticks, lfu, resident,
                              stamp, count, pinned, state, hits, misses)
        else:
            t, w = layer_step(multi_experts[multi[s]], multi_ticks[multi[s]], dense[s], t, num_experts, capacity,
                              engines, ticks_positive, busy_latency, latency, busy_wire, wire, miss_ticks, lfu,
                              resident, stamp, count, pinned, state, hits, misses)
        if state[ERROR]:
            return t, waited, s
        waited += w
        ends[s] = t
    return t, waited, -1


@_borrowing
def _load(key, resident, stamp, state):
    """A copy landed: resident, entered last in its order (`on_loaded`; an LFU count stays)."""
    resident[key] = True
    state[N_RESIDENT] += 1
    state[CLOCK] += 1
    stamp[key] = state[CLOCK]


@_borrowing
def victim(resident, stamp, count, pinned, lfu):
    """The policy's victim among unpinned residents: LRU's least recent, LFU's least used (then
    least recent); its key, or -1 when none is evictable. (Also sim/compiled_prefetch.py's.)"""
    best = -1
    for key in range(resident.shape[0]):
        if resident[key] and pinned[key] == 0:
            if best < 0:
                best = key
            elif lfu and count[key] != count[best]:
                if count[key] < count[best]:
                    best = key
            elif stamp[key] < stamp[best]:
                best = key
    return best


@_borrowing
def _evict(resident, stamp, count, pinned, lfu, state):
    """Evict the policy's victim (`victim`); returns its key, or -1 when none is evictable."""
    best = victim(resident, stamp, count, pinned, lfu)
    if best >= 0:
        resident[best] = False
        state[N_RESIDENT] -= 1
    return best


@_borrowing
def wire_end(start, handed, stalled, wire_free, busy_latency, latency, busy_wire, wire):
    """`SimEngine._reserve`: when the copy starting at `start` lands, crossing the shared link
    (free from `wire_free`) after its latency, in start order. (Also sim/compiled_prefetch.py's.)"""
    lat = busy_latency if handed and not stalled else latency
    wire_start = start + lat
    if wire_start < wire_free:
        wire_start = wire_free
    return wire_start + (wire if stalled else busy_wire)


@_borrowing
def _reserve(start, handed, stalled, busy_latency, latency, busy_wire, wire, state):
    """`wire_end`, the link then busy until the copy lands."""
    end = wire_end(start, handed, stalled, state[WIRE_FREE], busy_latency, latency, busy_wire, wire)
    state[WIRE_FREE] = end
    return end


@_borrowing
def _heap_min_end(h_end, hn):
    best = h_end[0]
    for i in range(1, hn):
        if h_end[i] < best:
            best = h_end[i]
    return best


@_borrowing
def _apply_unpins(u_time, u_key, uh, un, now, pinned):
    while uh < un and u_time[uh] <= now:
        pinned[u_key[uh]] -= 1
        uh += 1
    return uh


@_borrowing
def _start_next(at, handed, stalled, u_time, u_key, uh, un, capacity, in_flight, lfu, resident, stamp, count, pinned,
                state, busy_latency, latency, busy_wire, wire, h_end, h_ord, h_miss, hn, arr_end, arr_ord, on_wire,
                head, order):
    """The queue's next on-demand load at time `at`, as `next_transfer` and `_reserve` start it:
    the pins due released, a slot made (the policy's victim when none is free), the copy on the
    wire. Returns (uh, in_flight, hn, head, order), uh = -1 when no slot can be made."""
    uh = _apply_unpins(u_time, u_key, uh, un, at, pinned)
    if state[N_RESIDENT] + in_flight >= capacity and _evict(resident, stamp, count, pinned, lfu, state) < 0:
        return -1, in_flight, hn, head, order
    end = _reserve(at, handed, stalled, busy_latency, latency, busy_wire, wire, state)
    h_end[hn], h_ord[hn], h_miss[hn] = end, order, head
    arr_end[head], arr_ord[head], on_wire[head] = end, order, True
    return uh, in_flight + 1, hn + 1, head + 1, order + 1


@_borrowing
def _land(until_end, until_ord, h_end, h_ord, h_miss, hn, arr_end, arr_ord, on_wire, miss_keys, k, head, sleeping,
          order, in_flight, u_time, u_key, uh, un, stalled, capacity, busy_latency, latency, busy_wire, wire, lfu,
          resident, stamp, count, pinned, state):
    """Every copy landing up to event (until_end, until_ord), in (end, order) order, each handled as
    its copy engine does: the expert becomes resident and the engine takes the next on-demand load
    (or sleeps); returns the updated counters and an error flag."""
    while hn > 0:
        best = 0
        for i in range(1, hn):
            if h_end[i] < h_end[best] or (h_end[i] == h_end[best] and h_ord[i] < h_ord[best]):
                best = i
        end, ordv, m = h_end[best], h_ord[best], h_miss[best]
        if end > until_end or (end == until_end and ordv > until_ord):
            break
        hn -= 1
        h_end[best], h_ord[best], h_miss[best] = h_end[hn], h_ord[hn], h_miss[hn]
        on_wire[m] = False
        in_flight -= 1
        _load(miss_keys[m], resident, stamp, state)
        if head >= k:  # nothing queued: `complete_landed`, and the engine sleeps
            uh = _apply_unpins(u_time, u_key, uh, un, end, pinned)
            sleeping += 1
            continue
        handed = False  # the engine goes on to the next copy itself, then wakes the sleeping ones
        while True:
            uh, in_flight, hn, head, order = _start_next(
                end, handed, stalled, u_time, u_key, uh, un, capacity, in_flight, lfu, resident, stamp, count,
                pinned, state, busy_latency, latency, busy_wire, wire, h_end, h_ord, h_miss, hn, arr_end, arr_ord,
                on_wire, head, order)
            if uh < 0:
                return hn, head, sleeping, order, in_flight, uh, True
            if handed:
                sleeping -= 1
            if not (sleeping > 0 and head < k):
                break
            handed = True
    return hn, head, sleeping, order, in_flight, uh, False


@dataclass(frozen=True)
class _PlannedSteps:
    """A run's remaining steps as the batcher forms them, and what of them the hardware does not
    change (`StepPlanner.plan` adds the ticks): never written once built."""

    steps: list  # (sequences, the requests the step finishes)
    rows: np.ndarray  # per step its trace row (one token), else -1
    multi: np.ndarray  # per step its index into the multi-token ones
    tokens: np.ndarray
    multi_work: list  # (step, (tokens, context, pairs)) of each multi-token step
    multi_experts: np.ndarray  # [multi, L, J] experts in id order, -1 elsewhere
    multi_counts: np.ndarray  # [multi, L, J] their token counts
    prefill: np.ndarray  # per step 1 where it runs a prefill (a sequence's first iteration), else 0


PLANS_KEPT = 2  # planned steps a process keeps for reuse (`StepPlanner.plan`)
_PLANS: OrderedDict[tuple, _PlannedSteps] = OrderedDict()
_SORTED: OrderedDict[str, np.ndarray] = OrderedDict()  # a trace's sorted routing, by its content hash


class StepPlanner:
    """A run's steps as the kernels take them: the trace's sorted routing, each step's experts,
    compute and dense ticks, the steps planned once every request has arrived, and their ends in
    the recorder. Shared by both compiled paths (this one and sim/compiled_prefetch.py)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._sorted: np.ndarray | None = None
        self.one_tick: np.ndarray | None = None  # one token's compute ticks per (layer, rank), set by `rows`
        self._dense: dict = {}
        self.planned: _PlannedSteps | None = None  # what `plan` planned last

    def rows(self) -> np.ndarray:
        """The trace's routing sorted per (token, layer), int64 (-1 first where a record is missing):
        sorted once per process for the same trace (`_SORTED`), not once per run (at paper size
        the sort took 18 ms a run, a sixth of an LRU run and a tenth of the oracle's 14 candidates)."""
        if self._sorted is None:
            eng = self.engine
            key = eng.trace.content_hash()
            self._sorted = _SORTED.get(key)
            if self._sorted is None:
                self._sorted = _SORTED[key] = np.ascontiguousarray(np.sort(eng.trace.experts, axis=2), dtype=np.int64)
                while len(_SORTED) > PLANS_KEPT:
                    _SORTED.popitem(last=False)
            self.one_tick = np.full(self._sorted.shape[1:], eng.expert_ticks(1), np.int64)
        return self._sorted

    def dense_of(self, tokens: int, context: int, pairs: int) -> int:
        """The dense ticks per layer of a step (the reference's `step_work` and `_prepare`)."""
        key = (tokens, context, pairs)
        dense = self._dense.get(key)
        if dense is None:
            dense = self._dense[key] = to_ticks(self.engine.costs.dense_layer_s(tokens, context, pairs))
        return dense

    def prepare(self, seqs):
        """Per layer the routed experts (ascending, -1 elsewhere), their compute ticks, the dense
        ticks per layer and the step's token count: what the reference's `_prepare` and
        `step_work` give, as arrays. One sequence's one token is a view of its sorted row; any
        other step counts its tokens per (layer, expert) and keeps the experts in id order."""
        eng = self.engine
        if one_token(seqs):
            row = seqs[0].start
            pos = int(eng.trace.position[row]) + 1
            return self.rows()[row], self.one_tick, self.dense_of(1, pos, pos), 1
        experts, counts, work = self._work(seqs)
        return experts, self._ticks(counts), self.dense_of(*work), work[0]

    def _work(self, seqs):
        """A step of several tokens as the hardware does not change it: per layer its experts in id
        order (-1 elsewhere), their token counts, and its (tokens, context, pairs) for the dense part."""
        eng = self.engine
        L, J = eng.L, eng.J
        position = eng.trace.position
        counts = np.zeros(L * J, np.int64)
        tokens = context = pairs = 0
        layer_base = (np.arange(L) * J)[None, :, None]
        for q in seqs:
            routed = eng.trace.experts[q.start:q.stop]
            keys = (layer_base + routed)[routed >= 0]
            counts += np.bincount(keys, minlength=L * J)
            pos = position[q.start:q.stop]
            tokens += q.stop - q.start
            context += int(pos.max()) + 1
            pairs += int(pos.astype(np.int64).sum()) + (q.stop - q.start)
        counts = counts.reshape(L, J)
        experts = np.where(counts > 0, np.arange(J)[None, :], -1)
        return experts, counts, (tokens, context, pairs)

    def _ticks(self, counts: np.ndarray) -> np.ndarray:
        """Each routed expert's compute ticks for its token count (0 where none is routed)."""
        ticks = np.zeros(counts.shape, np.int64)
        for c in np.unique(counts[counts > 0]).tolist():
            ticks[counts == c] = self.engine.expert_ticks(c)
        return ticks

    def plan(self, t: int):
        """The rest of the run once the batcher's steps are fixed, as the kernels take it: the steps
        (each with the requests it finishes), per step its trace row (a one-token step) or its
        index into the prepared multi-token steps, its dense ticks and tokens, and those steps.
        What does not depend on the hardware is built once per process for the same trace and
        batcher state (`_PLANS`: the runs of a sweep at other budgets, the oracle's candidates)."""
        eng, batcher = self.engine, self.engine.batcher
        key = (eng.trace.content_hash(), eng.step, batcher.plan_key())
        steps = self.planned = _PLANS.get(key)
        if steps is None:
            steps = self.planned = self._steps(t)
            _PLANS[key] = steps
            while len(_PLANS) > PLANS_KEPT:
                _PLANS.popitem(last=False)
        else:
            _PLANS.move_to_end(key)
            batcher.skip_to_end()
        dense = np.zeros(len(steps.steps), np.int64)
        single = steps.rows >= 0
        if single.any():
            pos = eng.trace.position[steps.rows[single]].astype(np.int64) + 1
            dense_of = {p: self.dense_of(1, p, p) for p in np.unique(pos).tolist()}
            dense[single] = [dense_of[p] for p in pos.tolist()]
        for s, work in steps.multi_work:
            dense[s] = self.dense_of(*work)
        multi_ticks = self._ticks(steps.multi_counts)
        return (steps.steps, steps.rows, steps.multi, dense, steps.tokens, steps.multi_experts, multi_ticks)

    def _steps(self, t: int) -> _PlannedSteps:
        """The batcher's remaining steps, run out (every request has arrived: never an empty one)."""
        eng, batcher = self.engine, self.engine.batcher
        steps = []
        while not batcher.done:
            seqs = batcher.next_step(t)
            steps.append((seqs, batcher.finish_step()))
        n = len(steps)
        rows = np.full(n, -1, np.int64)
        multi = np.zeros(n, np.int64)
        tokens = np.ones(n, np.int64)
        multi_experts, multi_counts, multi_work = [], [], []
        for s, (seqs, _) in enumerate(steps):
            if one_token(seqs):
                rows[s] = seqs[0].start
                continue
            experts, counts, work = self._work(seqs)
            multi[s], tokens[s] = len(multi_experts), work[0]
            multi_experts.append(experts)
            multi_counts.append(counts)
            multi_work.append((s, work))
        shape = (eng.L, eng.J)
        prefill = np.array([any(q.is_prefill for q in seqs) for seqs, _ in steps], np.int64)
        return _PlannedSteps(steps, rows, multi, tokens, multi_work,
                             np.stack(multi_experts) if multi_experts else np.full((1, *shape), -1, np.int64),
                             np.stack(multi_counts) if multi_counts else np.zeros((1, *shape), np.int64), prefill)

    def record(self, steps, tokens, ends, done: int, first_seen: set[int]) -> None:
        """The first `done` planned steps, in the recorder, ended at `ends` (ticks)."""
        eng = self.engine
        for s in range(done):
            eng.record_step(steps[s][0], int(tokens[s]), steps[s][1], int(ends[s]) * _S, first_seen)
        eng.step += done


def victim_order(policy):
    """The policy's victim order as the reference keeps it: an `LRUOrder` or `LFUCounts`."""
    if isinstance(policy, LRUPolicy):
        return policy.order
    if isinstance(policy, LFUPolicy):
        return policy.lfu
    return policy.ordering  # a `TrackedCachePolicy`


def load_order(order, num_experts: int, stamp: np.ndarray, count: np.ndarray) -> int:
    """`order` as the kernels keep it, per key l x J + e: LFU's use counts (every key's) in `count`,
    the residents' order as stamps 1, 2, ... in `stamp` (only the order among equal counts matters:
    a resident that changes count re-enters last); returns the last stamp."""
    if isinstance(order, LFUCounts):
        for (layer, e), c in order.counts.items():
            count[layer * num_experts + e] = c
    ordered = order.keys()
    for i, (layer, e) in enumerate(ordered, start=1):
        stamp[layer * num_experts + e] = i
    return len(ordered)


class CompiledSteps:
    """The rest of a `SimEngine._compute` run for a policy `supports` accepts, from a step boundary
    where the link is idle: step by step in Python (the batcher, the recorder), layer by layer in
    the kernel. The steps kept for the timeline run on the reference before it takes over."""

    def __init__(self, engine) -> None:
        self.engine = engine
        L, J = engine.L, engine.J
        self.resident = np.zeros(L * J, np.bool_)
        self.stamp = np.zeros(L * J, np.int64)
        self.count = np.zeros(L * J, np.int64)
        self.pinned = np.zeros(L * J, np.int64)
        self.state = np.zeros(5, np.int64)
        self.hits = np.zeros(L, np.int64)
        self.misses = np.zeros(L, np.int64)
        self.lfu = POLICIES[type(engine.policy)] == 1
        self.planner = StepPlanner(engine)

    def can_take_over(self, t: int) -> bool:
        """At this step boundary: nothing queued, on the wire or due (every step after is quiet)."""
        return self.engine._link_idle()

    def _take_over(self) -> None:
        """The cache and the policy's order as the reference left them: resident keys, LRU's order
        or LFU's counts and per-count orders as stamps (only the order among equal counts matters:
        a resident that changes count re-enters last). Every pin is due by now (a step's pins are
        released by its end), so none is held."""
        eng, J = self.engine, self.engine.J
        for layer, e in eng.cache.resident:
            self.resident[layer * J + e] = True
        self.state[CLOCK] = load_order(victim_order(eng.policy), J, self.stamp, self.count)
        self.state[N_RESIDENT] = len(eng.cache.resident)
        self.state[WIRE_FREE] = eng._wire_free
        self.hits[:] = eng.rec.hits
        self.misses[:] = eng.rec.misses

    def run(self, t: int, stall: int, first_seen: set[int]) -> tuple[int, int]:
        """Every remaining step from compute clock `t`; returns the clock at the end and the stall
        ticks so far, with the recorder's counts, the engine's step and link brought up to date.
        Once every request has arrived the steps no longer depend on the clock: they are planned
        first and run in one kernel call (`run_steps`)."""
        global warm
        warm = True
        self._take_over()
        eng = self.engine
        batcher, rec, cache = eng.batcher, eng.rec, eng.cache
        args = (eng.J, cache.capacity, eng.copy_engines, eng._ticks_positive, eng.busy_latency_ticks,
                eng.latency_ticks, eng.busy_wire_ticks, eng.wire_ticks, eng.miss_ticks, self.lfu, self.resident,
                self.stamp, self.count, self.pinned, self.state, self.hits, self.misses)
        try:
            while not batcher.done:
                last = batcher.last_arrival()
                if last is None or last <= t:
                    return self._run_planned(t, stall, first_seen, args)
                seqs = batcher.next_step(t)
                if not seqs:
                    t = max(t, int(batcher.next_arrival()))
                    continue
                experts, ticks, dense, tokens = self.planner.prepare(seqs)
                t, waited = layer_step(experts, ticks, dense, t, *args)
                if self.state[ERROR]:
                    self._raise()
                stall += waited
                eng.record_step(seqs, tokens, batcher.finish_step(), t * _S, first_seen)
                eng.step += 1
            return t, stall
        finally:
            rec.hits = [int(h) for h in self.hits]
            rec.misses = [int(m) for m in self.misses]
            loads = int(self.state[LOADS])
            rec.ondemand_loads += loads
            rec.bytes_h2d += loads * cache.bytes_per_expert
            eng._wire_free = int(self.state[WIRE_FREE])

    def _run_planned(self, t: int, stall: int, first_seen: set[int], args) -> tuple[int, int]:
        """The rest of the run once the batcher's steps are fixed: planned, prepared, run at once."""
        planner = self.planner
        steps, rows, multi, dense, tokens, multi_experts, multi_ticks = planner.plan(t)
        ends = np.zeros(len(steps), np.int64)
        t, waited, failed = run_steps(rows, multi, planner.rows(), planner.one_tick, multi_experts, multi_ticks,
                                      dense, t, ends, *args)
        planner.record(steps, tokens, ends, len(steps) if failed < 0 else failed, first_seen)
        if failed >= 0:
            self._raise()
        return t, stall + waited

    def _raise(self):
        from finemoe.sim.cache import PolicyError

        if self.state[ERROR] == NO_VICTIM:
            raise PolicyError(f"policy {self.engine.policy.name}: no slot for an on-demand load of the current layer")
        raise DeadlockError(f"simulation stalled at step {self.engine.step}: an expert it waits for can never arrive")
