"""The SimPy engine: continuous batching over the trace, per step and layer dense work, then each
routed expert's compute once its weights are resident; misses load on demand and prefetches queue
behind them on the host-to-device link. See docs/timing-model.md.

Time is kept in integer picoseconds (`costs.TICKS_PER_S`) so that sums are exact. The compute
process keeps its own clock `t` and only synchronises SimPy's clock to it (one timeout) when another
process could act in between: while a copy is queued or on the wire. When nothing is, every expert
needed is resident and the policy asks for nothing, layers run back to back without a SimPy event
(the fast path); the times are the same as with a sync at every layer (`fast_path=False`), which
the tests check. A layer whose misses are the only copies (engines idle, nothing else queued) plays
its copies out without SimPy (`_misses_inline`, in SimPy's order; `inline_misses=False` turns it off).
"""

from __future__ import annotations

import heapq
import operator
import sys
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import simpy

from finemoe.policies.base import (
    LayerRouting,
    Policy,
    PolicyContext,
    Prefetch,
    Sequence,
    StepInfo,
)
from finemoe.sim.cache import ExpertCache
from finemoe.sim.costs import TICKS_PER_S, CostModel, to_ticks
from finemoe.sim.cpu_side import CpuTimer, record_cpu_layer, split_misses
from finemoe.sim.memory import MemoryPlan
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.plan_view import PlanView
from finemoe.sim.workload import ContinuousBatcher
from finemoe.traces.schema import Trace

_S = 1.0 / TICKS_PER_S
COMPILED_MIN_LAYER_STEPS = 300_000  # `SimEngine._compiled_pays`, for a policy without hooks
COMPILED_PREFETCH_MIN_LAYER_STEPS = 30_000  # for a prefetching one (its reference is about 10x slower)
_PLAIN = operator.itemgetter(1)  # of a `_sleeping` entry: the engine sleeps until work is handed to it
_LAST = 2  # SimPy priority below NORMAL: the compute clock syncs after every other event at that time


class DeadlockError(RuntimeError):
    """The engine waits for an expert that can never arrive (a bug, not a user error)."""


@dataclass(frozen=True)
class _IterInfo:
    """Per (request, iteration): routed experts per layer as (expert, tokens), and attention sizes."""

    layers: tuple[tuple[tuple[int, int], ...], ...]
    tokens: int
    context: int  # KV entries read
    pairs: int  # (query, key) pairs scored


def iter_info(trace: Trace, start: int, stop: int) -> _IterInfo:
    """The routed experts and attention sizes of trace rows [start, stop) (one iteration)."""
    experts = trace.experts[start:stop]
    if stop - start == 1:
        layers = tuple(tuple((e, 1) for e in row if e >= 0) for row in experts[0].tolist())
    else:
        layers = []
        for layer in range(experts.shape[1]):
            ids, counts = np.unique(experts[:, layer, :], return_counts=True)
            layers.append(tuple((e, c) for e, c in zip(ids.tolist(), counts.tolist(), strict=True) if e >= 0))
        layers = tuple(layers)
    pos = trace.position[start:stop]
    context = int(pos.max()) + 1
    pairs = int(pos.astype(np.int64).sum()) + (stop - start)
    return _IterInfo(layers, stop - start, context, pairs)


def one_token(seqs: tuple[Sequence, ...]) -> bool:
    """Whether a step is one sequence's one token (a decode step at batch 1): the engines' cheap case."""
    return len(seqs) == 1 and seqs[0].stop - seqs[0].start == 1


def step_work(infos: list[_IterInfo], num_layers: int, costs: CostModel):
    """One engine step over the iterations `infos`: per layer the routed experts (ascending) and
    their token counts, the dense ticks per layer and the step's token count (the engine's general
    case; the lower bounds of sim/bounds.py read the same numbers)."""
    tokens = sum(i.tokens for i in infos)
    context = sum(i.context for i in infos)
    pairs = sum(i.pairs for i in infos)
    experts_l, counts_l = [], []
    for layer in range(num_layers):
        if len(infos) == 1:
            items = infos[0].layers[layer]
        else:
            merged: dict[int, int] = {}
            for i in infos:
                for e, c in i.layers[layer]:
                    merged[e] = merged.get(e, 0) + c
            items = sorted(merged.items())
        experts_l.append([e for e, _ in items])
        counts_l.append([c for _, c in items])
    dense = to_ticks(costs.dense_layer_s(tokens, context, pairs))
    return experts_l, counts_l, dense, tokens


class SimEngine:
    """One simulated run of a policy over a batcher's workload; `run()` returns the makespan (s)."""

    def __init__(
        self,
        trace: Trace,
        policy: Policy,
        costs: CostModel,
        memory: MemoryPlan,
        batcher: ContinuousBatcher,
        recorder: MetricsRecorder,
        *,
        seed: int = 0,
        online: bool = False,
        fast_path: bool = True,
        inline_misses: bool = True,
        host_tier=None,
        compiled: bool | None = None,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.costs = costs
        self.memory = memory
        self.batcher = batcher
        self.rec = recorder
        self.online = online
        # Host memory in front of an SSD (sim/storage.py): every copy asks it when its expert is in
        # host RAM, so copies run as SimPy events (`_reserve`), not on the inline paths.
        self.host_tier = host_tier
        # A policy that fetches some misses at a lower precision (HOBBIT): copies and computes of
        # those experts take the format's bytes, per expert, so every copy runs as a SimPy event.
        self._low = policy.low_precision is not None
        self.fast_path = fast_path and host_tier is None and not self._low
        self.inline_misses = inline_misses and self.fast_path  # `_misses_inline`; off: every copy a SimPy event
        # sim/compiled.py takes over the quiet steps of LRU and LFU runs (where it `supports` them):
        # True whenever it can, False never, None where it pays (`_compiled_pays`).
        self.compiled = compiled
        self.path = "reference"  # which ran the run's last steps: "reference" or "compiled"
        g = trace.geometry
        self.L, self.J = g.num_layers, g.num_experts
        hw = costs.hardware
        self.env = simpy.Environment()
        self.cache = ExpertCache(memory.expert_cache_slots, policy, recorder, g.bytes_per_expert,
                                 memory.layer_capacity)
        self.wire = simpy.Resource(self.env, capacity=1)
        self.copy_engines = max(1, int(hw.copy_engines))
        self.latency_ticks = to_ticks(hw.transfer_latency_s)
        self.wire_ticks = to_ticks(costs.wire_s(g.bytes_per_expert))
        self.slowdown = float(getattr(hw, "copy_compute_slowdown", 1.0))
        self.miss_ticks = to_ticks(getattr(hw, "miss_overhead_s", 0.0))
        # While compute runs (not stalled), copies cross slower where they share its cores (CPU).
        self.busy_wire_ticks = to_ticks(costs.wire_s(g.bytes_per_expert) * getattr(hw, "compute_copy_slowdown", 1.0))
        if self._low:
            from finemoe.sim.costs import CostModel
            from finemoe.traces.precision import with_expert_format

            low_g = with_expert_format(g, policy.low_precision)
            self.cache.low_bytes = low_g.bytes_per_expert
            self._low_costs = CostModel(hw, low_g, costs.cpu)
            self.low_wire_ticks = to_ticks(costs.wire_s(low_g.bytes_per_expert))
            self.low_busy_wire_ticks = to_ticks(costs.wire_s(low_g.bytes_per_expert)
                                                * getattr(hw, "compute_copy_slowdown", 1.0))
            self._low_expert_ticks: dict[int, int] = {}
        self._stalled = False
        self.busy_latency_ticks = self.latency_ticks + to_ticks(getattr(hw, "copy_start_delay_s", 0.0))
        self._expert_ticks: dict[int, int] = {}
        self._ticks_positive = self.expert_ticks(1) > 0  # then any expert's compute takes time
        self._info: dict[tuple[int, int], _IterInfo] = {}
        self._sorted: np.ndarray | None = None
        self._missing_rows: set[int] = set()
        self._dense_cache: dict = {}
        self._sleeping: list = []  # one wake-up event per idle copy engine, oldest first
        self._loaded = self.env.event()
        self._arriving: dict = {}  # expert key -> (end tick, its copy's completion event)
        self._loaded_waited = False
        self._wire_free = 0
        self._releases = 0  # prefetches waiting for their `ready_s` (scheduled release events)
        self.step = 0
        self.oracle = PlanView(self.L, self.J) if policy.is_oracle else None
        # An oracle may bring the steps the run will take (from an earlier run of the same
        # workload): then its view is that whole future, requests not yet arrived included.
        self._scripted = getattr(policy, "planned_steps", None) if policy.is_oracle else None
        self._planned_known = -1
        cls = type(policy)
        self._wants_step = cls.on_step_start is not Policy.on_step_start
        self._wants_layer = cls.on_layer_routed is not Policy.on_layer_routed
        self._wants_finished = cls.on_request_finished is not Policy.on_request_finished
        # Misses this policy computes on the CPU (docs/cpu-execution.md): the layer's CPU side is
        # analytic (it starts at the router output and ends before the next layer), no SimPy event.
        self._cpu_exec = bool(policy.executes_on_cpu)
        if self._cpu_exec and costs.cpu is None:
            raise ValueError(f"policy {policy.name} computes experts on the CPU: its cost model needs a CPU profile")
        self._cpu_timer = CpuTimer(costs) if self._cpu_exec else None
        self._transient: list = []  # COPY_ONCE experts of the current layer: their slots free after it
        self._cpu_wait = 0  # ticks the GPU waited for the CPU's experts
        self._always = not self.fast_path  # sync SimPy at every layer and expert (the fast path's check)
        self._stretch_fn = self._stretch if self.slowdown != 1.0 else None  # compute slowed by busy copies
        # No policy hook can queue a copy or needs the clock synced: quiet steps run as `_quiet_step`.
        self._hookless = (not self._wants_step and not self._wants_layer and self.oracle is None
                          and self._stretch_fn is None and not self._cpu_exec)
        policy.bind(
            PolicyContext(
                geometry=g,
                capacity_slots=memory.expert_cache_slots,
                seed=seed,
                is_resident=self.cache.is_resident,
                is_in_flight=self.cache.is_in_flight,
                expert_load_s=costs.expert_load_s,
                oracle=self.oracle,
                costs=costs,
                queued=self.cache.queued_prefetch,
            )
        )

    # --- helpers ---------------------------------------------------------------------------------
    def info(self, seq: Sequence) -> _IterInfo:
        k = (seq.start, seq.stop)
        got = self._info.get(k)
        if got is None:
            got = self._info[k] = iter_info(self.trace, seq.start, seq.stop)
        return got

    def expert_ticks(self, tokens: int) -> int:
        got = self._expert_ticks.get(tokens)
        if got is None:
            got = self._expert_ticks[tokens] = to_ticks(self.costs.expert_compute_s(tokens))
        return got

    def _place(self, step: int, layer: int, experts, counts, misses, step_tokens: int, t: int, keep: bool):
        """The policy's placement of layer `layer`'s misses at compute time `t`: those it runs on the
        CPU leave the on-demand queue (a CPU_AND_COPY one is queued as a prefetch for the next step's
        same layer instead), and the CPU side is timed here. Returns the experts the GPU computes,
        their token counts (None: one each), the misses it waits for (None: none) and the tick at
        which the CPU's result is back on the GPU (0: no CPU work)."""
        n_of = dict(zip(experts, counts, strict=True)) if counts is not None else None
        tokens = [1] * len(misses) if n_of is None else [n_of[e] for e in misses]
        split = split_misses(self.policy, layer, list(misses), tokens, step_tokens, t * _S)
        self._transient.extend((layer, e) for e in split.once)
        if not split.cpu:
            return experts, counts, misses, 0
        self.cache.withdraw_demands([(layer, e) for e, _ in split.cpu])
        on_cpu = {e for e, _ in split.cpu}
        if split.later:
            # The copies may start now, choosing victims: not among the experts this layer computes
            # on the GPU (the general path pins those next, before any other copy can start).
            held = [(layer, e) for e in experts if e not in on_cpu and (layer, e) in self.cache.resident]
            self.cache.pin(held)
            self._submit([Prefetch(0.0, step + 1, layer, e) for e in split.later], t)
            for key in held:
                self.cache.unpin(key)
        spans, done = self._cpu_timer.schedule(t, step_tokens, split.cpu)
        record_cpu_layer(self.rec, self.trace.geometry, step, layer, spans, step_tokens, keep)
        gpu = [e for e in experts if e not in on_cpu]
        gpu_counts = None if counts is None else [c for e, c in zip(experts, counts, strict=True) if e not in on_cpu]
        return gpu, gpu_counts, split.copy or None, done

    def _layer_done(self, t: int, cpu_done: int):
        """After a layer of a CPU-executing policy: its temporary copies leave their slots (once no
        copy due before `t` can still see them), then the GPU waits for the layer's CPU experts
        (`cpu_done`, 0: none). Returns the compute clock."""
        if self._transient:
            if self.env.peek() <= t:
                yield from self._sync(t)
            self.cache.drop(self._transient, t * _S)
            self._transient = []
        if cpu_done > t:
            self._cpu_wait += cpu_done - t
            t = cpu_done
        return t

    def _single_row(self, row: int) -> list[list[int]]:
        """One token's routed experts per layer, ascending, missing records dropped."""
        if self._sorted is None:
            self._sorted = np.sort(self.trace.experts, axis=2)
            self._missing_rows = set(np.flatnonzero((self._sorted < 0).any(axis=(1, 2))).tolist())
        got = self._sorted[row].tolist()
        if row in self._missing_rows:
            got = [[e for e in lay if e >= 0] for lay in got]
        return got

    def record_step(self, seqs, tokens: int, finished, end_s: float, first_seen: set[int]) -> None:
        """A step that ended at `end_s`, in the recorder: its counts, the first token of each request
        not seen before (added to `first_seen`) and the finish of those in `finished`."""
        rec = self.rec
        rec.steps += 1
        rec.layer_steps += self.L * len(seqs)
        rec.tokens += tokens
        for q in seqs:
            if q.request_id not in first_seen:
                first_seen.add(q.request_id)
                rec.first_token(q.request_id, end_s)
        for rid in finished:
            rec.finished(rid, end_s)

    def _prepare(self, seqs: tuple[Sequence, ...]):
        """Per layer the routed experts (ascending) and their token counts (None: one token each),
        the dense ticks per layer and the step's token count."""
        if one_token(seqs):
            q = seqs[0]
            pos = int(self.trace.position[q.start]) + 1
            dense = self._dense_cache.get((1, pos, pos))
            if dense is None:
                dense = self._dense_cache[(1, pos, pos)] = to_ticks(self.costs.dense_layer_s(1, pos, pos))
            return self._single_row(q.start), None, dense, 1
        return step_work([self.info(q) for q in seqs], self.L, self.costs)

    def _sync(self, t: int):
        """Bring SimPy's clock to the compute clock `t`, after every other event due at `t`."""
        env = self.env
        if env.now < t or env.peek() <= t:
            ev = simpy.Event(env)
            ev._ok = True
            ev._value = None
            env.schedule(ev, _LAST, t - env.now)
            yield ev

    def _notify(self) -> None:
        """Wake one idle copy engine now, to look at the queues itself."""
        if self._sleeping:
            self._sleeping.pop(0)[0].succeed()

    def _wake_at(self, t: int) -> None:
        """Hand queued copies to idle copy engines at time `t` (>= now, nothing else due before `t`):
        each copy starts at `t`, and its engine sleeps until the copy lands (one event per copy)."""
        sleeping, cache = self._sleeping, self.cache
        i = 0
        while i < len(sleeping) and cache.has_work:
            wake, plain = sleeping[i]
            if not plain:  # waiting for a pin's release: let it look for itself
                i += 1
                continue
            tr = cache.next_transfer(t * _S)
            if tr is None:
                break
            del sleeping[i]
            end = self._reserve(t, key=tr.key)
            wake._ok = True
            wake._value = (tr, t, end)
            self.env.schedule(wake, simpy.core.NORMAL, end - self.env.now)
            self._arriving[tr.key] = (end, wake)
        if cache.blocked and sleeping:
            self._notify()

    def _submit(self, prefetches, t: int) -> None:
        """Queue a policy's prefetches at compute time `t` (nothing else due before it): those ready
        by then at once, the others by a release event at their `ready_s`."""
        ready, later = [], None
        for p in prefetches:
            at = to_ticks(p.ready_s) if p.ready_s else 0
            if at <= t:
                ready.append(p)
            else:
                if later is None:
                    later = {}
                later.setdefault(at, []).append(p)
        if ready and self.cache.add_prefetches(ready):
            self._wake_at(t)
        if later:
            env = self.env
            for at, batch in later.items():
                ev = simpy.Event(env)
                ev._ok = True
                ev._value = batch
                ev.callbacks.append(self._release)
                env.schedule(ev, simpy.core.NORMAL, at - env.now)
                self._releases += 1

    def _release(self, event) -> None:
        """Prefetches whose prediction is ready join the queue now; one whose layer has passed is
        dropped by the cache (the prediction came too late to help)."""
        self._releases -= 1
        if self.cache.add_prefetches(event.value):
            self._wake_at(self.env.now)

    def _reserve(self, start: int, handed: bool = True, key=None) -> int:
        """The copy starting at `start` crosses the shared link after its latency, in start order.
        `handed`: given to an engine that slept; while the compute runs, such a copy also waits
        `copy_start_delay_s` (waking a CPU copy thread), one that an engine takes on its own right
        after landing its last copy does not. With an SSD tier, the copy of `key` starts once the
        expert is in host memory (read from the SSD first when it is not)."""
        latency = self.busy_latency_ticks if handed and not self._stalled else self.latency_ticks
        if self.host_tier is not None:
            start = self.host_tier.ready_at(key, start)
        wire_start = max(start + latency, self._wire_free)
        if self._low and key in self.cache.low:
            self._wire_free = end = wire_start + (self.low_wire_ticks if self._stalled else self.low_busy_wire_ticks)
        else:
            self._wire_free = end = wire_start + (self.wire_ticks if self._stalled else self.busy_wire_ticks)
        return end

    def _low_ticks(self, layer: int, experts, ticks, counts, misses):
        """The layer's expert times with those at low precision (resident so, or a miss the policy
        fetches so) at the low format's cost."""
        low, fetch_low = self.cache.low, self.policy.fetch_low
        out = list(ticks)
        for i, e in enumerate(experts):
            key = (layer, e)
            if key in low or (misses is not None and e in misses and fetch_low(key)):
                n = 1 if counts is None else counts[i]
                got = self._low_expert_ticks.get(n)
                if got is None:
                    got = self._low_expert_ticks[n] = to_ticks(self._low_costs.expert_compute_s(n))
                out[i] = got
        return out

    def _stretch(self, t: int, ticks: int) -> int:
        """Compute of `ticks` starting at `t`, run `copy_compute_slowdown` times slower while copies are
        on the wire (until `_wire_free`): on a CPU copies and compute share cores and memory. The
        caller has handled every event due by `t` first (sync / `land`), so `_wire_free` counts each
        copy started by then, whichever path runs; a copy starting during the kernel does not slow it."""
        busy = self._wire_free - t
        if busy <= 0:
            return ticks
        f = self.slowdown
        if ticks * f <= busy:
            return int(round(ticks * f))
        return busy + int(round(ticks - busy / f))

    def _misses_inline_heap(self, layer: int, experts, ticks, misses, t: int, stretch) -> tuple[int, int]:
        """`_misses_inline` in general (more misses than copy engines, or a compute stretch). Mirrors
        `_wake_at`, `_copier` and `_compute` step by step: copies land in SimPy's order (time, then
        the order they were scheduled), and each landing is handled before the compute looks at time `t`.
        Returns the compute clock after the layer and the ticks spent waiting."""
        cache, sleeping = self.cache, self._sleeping
        resident, next_transfer, unpin, complete = cache.resident, cache.next_transfer, cache.unpin, cache.complete
        cache.pin(zip(repeat(layer), experts))  # the keys (layer, e), built without a Python loop
        demand = cache._demand
        heap: list = []  # (end, order scheduled, engine's wake entry, transfer)
        arriving: dict = {}
        order = 0
        t_s = t * _S
        while sleeping and demand:  # `_wake_at(t)` for engines that all sleep plainly
            tr = next_transfer(t_s)
            end = self._reserve(t)
            heapq.heappush(heap, (end, order, sleeping.pop(0), tr))
            arriving[tr.key] = (end, order)
            order += 1

        def land(until: tuple[int, int]) -> None:
            """Every copy landing up to event `until` (end, order), as its copy engine handles it."""
            nonlocal order
            while heap and (heap[0][0], heap[0][1]) <= until:
                end, _, wake, tr = heapq.heappop(heap)
                del arriving[tr.key]
                end_s = end * _S
                if not demand:
                    cache.complete_landed([tr.key], [end_s])
                    sleeping.append(wake)
                    continue
                complete(tr, end_s)
                nxt = next_transfer(end_s)
                e2 = self._reserve(end, handed=False)  # the engine goes on to the next copy itself
                heapq.heappush(heap, (e2, order, wake, nxt))
                arriving[nxt.key] = (e2, order)
                order += 1
                while sleeping and demand:  # `_wake_at(end)`
                    tr = next_transfer(end_s)
                    e3 = self._reserve(end)
                    heapq.heappush(heap, (e3, order, sleeping.pop(0), tr))
                    arriving[tr.key] = (e3, order)
                    order += 1

        t += self.miss_ticks * len(misses)
        for e, c in zip(experts, ticks, strict=True):
            if e in misses:
                continue
            if stretch is not None:
                if heap and heap[0][0] <= t:
                    land((t, order))  # the stretch sees every copy started by `t`
                c = stretch(t, c)
            t += c
            unpin((layer, e), t * _S)

        waited = 0
        pending = list(misses)
        while pending:
            if heap and heap[0][0] <= t:
                land((t, order))
            ready = [e for e in pending if (layer, e) in resident]
            if not ready:
                # Wait for the first missing expert on the wire; landings up to and including its
                # own happen while the compute stalls, the rest at that time after it resumes.
                first = None
                for e in pending:
                    a = arriving.get((layer, e))
                    if a is not None and (first is None or a[0] < first[0]):
                        first = a
                if first is None:
                    raise DeadlockError(f"layer {layer}: a missed expert is neither resident nor on the wire")
                self._stalled = True
                land(first)
                self._stalled = False
                waited += first[0] - t
                t = first[0]
                continue
            for e in ready:
                pending.remove(e)
                c = ticks[experts.index(e)]
                if stretch is not None:
                    if heap and heap[0][0] <= t:
                        land((t, order))
                    c = stretch(t, c)
                t += c
                unpin((layer, e), t * _S)
        if heap:
            raise DeadlockError(f"layer {layer}: copies still on the wire after the layer's compute")
        return t, waited

    def _engines_idle(self) -> bool:
        """Every copy engine sleeps until work is handed to it (none waits for a pin's release)."""
        sleeping = self._sleeping
        return len(sleeping) == self.copy_engines and all(map(_PLAIN, sleeping))

    def _misses_inline(self, layer: int, experts, ticks, misses, t: int, stretch) -> tuple[int, int]:
        """One layer whose misses are the only copies (all engines idle, nothing queued, room for
        the layer): the copies and the compute, played out without SimPy, with the same times and
        calls as SimPy's copy engines. Here its common shape, without a heap (else
        `_misses_inline_heap`): no compute stretch, and an idle copy engine for every miss
        (`_lands_inline`). Returns the compute clock after the layer and the ticks spent waiting."""
        if stretch is not None or len(misses) > len(self._sleeping) or not self._ticks_positive:
            return self._misses_inline_heap(layer, experts, ticks, misses, t, stretch)
        keys = self.cache.start_demands(layer, experts, t * _S)
        return self._lands_inline(layer, experts, ticks, keys, t)

    def _lands_inline(self, layer: int, experts, ticks, keys, t: int) -> tuple[int, int]:
        """The loads of `keys`, misses of `layer` started at `t` on as many idle copy engines (no
        compute stretch, positive expert times): each wakes at `t` in miss order (`_wake_at`), the
        shared link lands them in that order one wire time apart, and no copy starts later; the
        misses are computed in miss order, each once it has landed. The times follow from that
        alone (the cache's choices do not change them), so the cache is told them afterwards.
        Returns the compute clock after the layer and the ticks spent waiting."""
        k = len(keys)
        wire = self.busy_wire_ticks  # `_reserve` while the compute runs (not stalled)
        end = t + self.busy_latency_ticks  # the first copy lands after its latency, once the link is free
        if end < self._wire_free:
            end = self._wire_free
        end += wire
        t += self.miss_ticks * k
        if k == len(experts):  # every expert missed: none resident to compute first
            missed_ticks = ticks
        else:
            missed_ticks = []  # in miss order, which is expert order too
            for e, c in zip(experts, ticks):  # noqa: B905 (resident experts first, in expert order)
                if (layer, e) in keys:
                    missed_ticks.append(c)
                else:
                    t += c
        waited = 0
        landed = []
        for c in missed_ticks:
            if end > t:  # stall until its copy lands
                waited += end - t
                t = end
            t += c
            landed.append(end * _S)
            end += wire
        self._wire_free = end - wire
        self.cache.complete_landed(keys, landed)
        sleeping = self._sleeping  # each engine back to sleep as its copy lands
        if k != len(sleeping):  # (with every engine used, they sleep in the same order again)
            sleeping += sleeping[:k]
            del sleeping[:k]
        return t, waited

    def _compiled_pays(self, min_layer_steps: int) -> bool:
        """Whether a compiled path is worth starting: once one has run in this process, always;
        before, only for a run of at least `min_layer_steps` layer-steps, as importing numba and
        loading its cached machine code take about 0.7 s, what the reference needs for a few
        hundred thousand layer-steps of on-demand LRU, or a few tens of thousands of a prefetching
        policy's."""
        for name in ("finemoe.sim.compiled", "finemoe.sim.compiled_prefetch"):
            loaded = sys.modules.get(name)
            if loaded is not None and loaded.warm:
                return True
        return self.L * sum(len(its) for _, _, its in self.batcher.arrivals) >= min_layer_steps

    def _link_idle(self) -> bool:
        """Nothing queued, on the wire, due in SimPy or waiting for a pin: every engine asleep."""
        return (not self.cache.busy and not self._releases and self.env.peek() == simpy.core.Infinity
                and self._engines_idle())

    def _quiet(self, experts_l) -> bool:
        """Whether a step can run as `_quiet_step`: nothing is queued, on the wire or due in SimPy,
        every copy engine sleeps until work is handed to it, and every layer fits in the cache.
        (The caller checks the rest: a policy without step or layer hooks, no compute stretch, no
        timeline, the inline miss path on.) Each layer then leaves the link quiet again."""
        return (not self.cache.busy and not self._releases and self.env.peek() == simpy.core.Infinity
                and self._engines_idle() and (max(map(len, experts_l)) <= self.cache.capacity
                                              if self.cache.layer_capacity is None
                                              else all(map(self.cache.fits, range(len(experts_l)), map(len, experts_l)))))

    def _quiet_step(self, step: int, experts_l, counts_l, dense: int, t: int) -> tuple[int, int]:
        """One step's layers while the link stays quiet (`_quiet`), without SimPy: what `_compute`'s
        layer loop does there, without its per-layer checks. A policy without step or layer hooks
        cannot queue a prefetch, so the only copies are each layer's own misses, started with its
        accesses (`ExpertCache.access_and_start`) and played out by `_lands_inline` (which leaves
        the engines asleep and nothing queued); a layer without a miss runs its experts back to
        back. Returns the compute clock after the step and the ticks spent waiting."""
        cache = self.cache
        access, lands = cache.access_and_start, self._lands_inline
        et1 = self.expert_ticks(1)
        # Every miss of a layer gets an idle engine (`_lands_inline`), else `_misses_inline` queues them.
        engines = len(self._sleeping) if self._ticks_positive else 0
        waited = 0
        for layer, experts in enumerate(experts_l):
            t += dense
            if len(experts) > engines:
                t, w = self._layer_queued(layer, experts, None if counts_l is None else counts_l[layer], t)
                waited += w
                continue
            keys = access(layer, experts, t * _S)
            if counts_l is None:
                if keys is None:
                    t += et1 * len(experts)
                    continue
                ticks = [et1] * len(experts)
            else:
                ticks = [self.expert_ticks(c) for c in counts_l[layer]]
                if keys is None:
                    t += sum(ticks)
                    continue
            t, w = lands(layer, experts, ticks, keys, t)
            waited += w
        cache.position = (step, len(experts_l) - 1)  # read only by the prefetch queue, empty throughout
        return t, waited

    def _layer_queued(self, layer: int, experts, counts, t: int) -> tuple[int, int]:
        """A quiet step's layer with more experts than idle copy engines: its misses queue
        (`access_layer`) and `_misses_inline` plays them out."""
        misses = self.cache.access_layer(layer, experts, t * _S)
        ticks = [self.expert_ticks(c) for c in counts] if counts is not None else [self.expert_ticks(1)] * len(experts)
        if misses is None:
            return t + sum(ticks), 0
        return self._misses_inline(layer, experts, ticks, misses, t, None)

    def _replan(self, now: int) -> None:
        if self._scripted:
            return  # the oracle brought the whole future with it (`planned_steps`)
        known = self.batcher.arrived_count(now)
        if known != self._planned_known:
            self._planned_known = known
            self.oracle.rebuild_shared((self.trace.content_hash(), self.batcher.plan_key(now)), self.step,
                                       lambda: self.batcher.plan(now), self.info, self.trace.experts)

    # --- processes -------------------------------------------------------------------------------
    def _copier(self, index: int):
        """A copy engine: take the next copy (on-demand first), wait the per-transfer latency, then
        the bytes cross the link, which all copy engines share in the order copies started. An idle
        engine sleeps until work is handed to it (`_wake_at`), already started."""
        env, cache, rec = self.env, self.cache, self.rec
        lane = f"copy{index}"
        woke = False  # slept since its last copy: what it starts now is a hand-off (`_reserve`)
        while True:
            tr = cache.next_transfer(env.now * _S)
            if tr is None:
                wake = env.event()
                nxt = cache.next_unpin_s() if cache.blocked else None
                self._sleeping.append((wake, nxt is None))
                woke = True
                if nxt is not None:
                    yield wake | env.timeout(max(0, to_ticks(nxt) - env.now))
                    self._sleeping = [w for w in self._sleeping if w[0] is not wake]
                    continue
                handed = yield wake
                if handed is None:
                    continue
                tr, start, end = handed  # started at `start` by the hand-off; it has landed now
            else:
                start = env.now
                end = self._reserve(start, woke, tr.key)
                done = env.timeout(end - start)
                self._arriving[tr.key] = (end, done)  # the compute process may wait on this very event
                if self._sleeping and cache.has_work:
                    self._wake_at(start)
                yield done
            del self._arriving[tr.key]
            woke = False
            cache.complete(tr, env.now * _S)
            step = self.step if tr.prefetch is None else tr.prefetch.step  # demand: the waiting step
            if step < rec.timeline_steps:
                rec.event(lane, tr.kind, step, tr.key[0], tr.key[1], start * _S, end * _S, tr.prefetch is None)
            if self._loaded_waited and not self._loaded.triggered:
                self._loaded.succeed()
                self._loaded = env.event()

    def _compute(self):
        """The GPU's process: step after step, layer after layer, as the batcher forms the steps.
        A step whose layers nothing can disturb runs as `_quiet_step` (or, once every remaining
        step is such, on the compiled path); any other runs its layers one by one (`_layer`)."""
        batcher, cache, policy, trace = self.batcher, self.cache, self.policy, self.trace
        peek, sync = self.env.peek, self._sync
        first_seen: set[int] = set()
        stall = 0
        t = self.env.now
        cpu_done = 0  # when the CPU's share of the current layer is back on the GPU (0: none)
        fast = self._compiled_steps()
        while not batcher.done:
            if fast is not None and self.step >= self.rec.timeline_steps and fast.can_take_over(t):
                # The compiled path plays the rest of the run with the same results.
                t, stall = fast.run(t, stall, first_seen)
                self.path = "compiled"
                break
            seqs = batcher.next_step(t)
            if not seqs:
                t = max(t, int(batcher.next_arrival()))
                continue
            step = self.step
            if self.oracle is not None:
                if peek() <= t and batcher.arrived_count(t) != self._planned_known:
                    yield from sync(t)  # copies landing by `t` choose victims by the old plan
                self._replan(t)
            cache.set_position(step, -1)
            step_info = None
            if self._wants_step or self._wants_layer:
                step_info = StepInfo(step, t * _S, seqs, trace)
            if self._wants_step:
                if self._always or peek() <= t:
                    yield from sync(t)
                pf = policy.on_step_start(step_info)
                if pf:
                    self._submit(pf, t)
            experts_l, counts_l, dense, tokens = self._prepare(seqs)
            keep = step < self.rec.timeline_steps
            inline_now = self.inline_misses and not keep and not self._cpu_exec  # `_misses_inline` keeps no timeline
            if self._hookless and inline_now and self._quiet(experts_l):
                t, waited = self._quiet_step(step, experts_l, counts_l, dense, t)
                stall += waited
            else:
                for layer in range(self.L):
                    if cpu_done or self._transient:  # the previous layer's CPU side and temporary copies
                        t = yield from self._layer_done(t, cpu_done)
                        cpu_done = 0
                    counts = None if counts_l is None else counts_l[layer]
                    t, waited, cpu_done = yield from self._layer(step_info, step, layer, experts_l[layer], counts,
                                                                 dense, tokens, keep, inline_now, t)
                    stall += waited
            if cpu_done or self._transient:  # the last layer's
                t = yield from self._layer_done(t, cpu_done)
                cpu_done = 0
            # The step is done: every sequence produced a token.
            finished = batcher.finish_step()
            self.record_step(seqs, tokens, finished, t * _S, first_seen)
            if self.online and self._wants_finished:
                for rid in finished:
                    if self._always or peek() <= t:
                        yield from sync(t)
                    policy.on_request_finished(rid, trace)
            self.step += 1
        self.rec.stall_s = stall * _S
        self.rec.cpu_wait_s = self._cpu_wait * _S
        if self.path == "reference":  # (the compiled path has played the copies due by `t` itself)
            yield from sync(t)
        return t

    def _compiled_steps(self):
        """A compiled player for the rest of this run, where one applies and pays; else None:
        sim/compiled.py's for a policy without hooks, sim/compiled_prefetch.py's for a prefetching
        policy whose asks it can plan."""
        if self.compiled is False or not self.inline_misses:
            return None
        if self._hookless:
            if not (self.compiled or self._compiled_pays(COMPILED_MIN_LAYER_STEPS)):
                return None
            from finemoe.sim.compiled import CompiledSteps, supports

            return CompiledSteps(self) if supports(self) else None
        if not (self.compiled or self._compiled_pays(COMPILED_PREFETCH_MIN_LAYER_STEPS)):
            return None
        from finemoe.sim import compiled_prefetch

        return compiled_prefetch.CompiledPrefetchSteps(self) if compiled_prefetch.supports(self) else None

    def _layer(self, step_info, step: int, layer: int, experts, counts, dense: int, tokens: int, keep: bool,
               inline_now: bool, t: int):
        """One layer of a step: its dense part, its routing (the policy's prefetches), its experts.
        Returns (time, stall, when the CPU's share is back: 0 for none)."""
        cache, rec, stretch, peek, sync = self.cache, self.rec, self._stretch_fn, self.env.peek, self._sync
        if stretch is not None and peek() <= t:
            yield from sync(t)  # the stretch sees every copy started by `t`
        t0 = t
        t += dense if stretch is None else stretch(t, dense)
        if keep:
            rec.event("compute", "dense", step, layer, -1, t0 * _S, t * _S, False)
        if self._always or peek() <= t:
            yield from sync(t)
        cache.position = (step, layer)
        now_s = t * _S
        pf = self.policy.on_layer_routed(LayerRouting(step_info, layer, now_s, self.trace)) if self._wants_layer else None
        misses = cache.access_layer(layer, experts, now_s)
        cpu_done = 0
        if self._cpu_exec and misses is not None:
            # Placed before the policy's prefetches can start a copy: no miss the CPU computes is
            # copied on demand (the replayer's order, too).
            experts, counts, misses, cpu_done = self._place(step, layer, experts, counts, misses, tokens, t, keep)
        if pf:
            self._submit(pf, t)
        quiet = not cache.busy and not self._releases  # nothing can happen on the link
        et1 = self.expert_ticks(1)
        if counts is None:
            if misses is None and not keep and not self._always and quiet:
                return t + et1 * len(experts), 0, cpu_done  # the layer's experts run back to back
            ticks = [et1] * len(experts)
        else:
            ticks = [self.expert_ticks(c) for c in counts]
        if self._low:
            ticks = self._low_ticks(layer, experts, ticks, counts, misses)
        if (misses is not None and inline_now and not self._releases and cache.only_demands(len(misses))
                and (cache.capacity >= len(experts) if cache.layer_capacity is None else cache.fits(layer, len(experts)))
                and self._engines_idle()):
            # Only this layer's misses will cross the link: play their copies out here, in the order
            # SimPy would, without an event per copy (the same times and calls).
            t, waited = self._misses_inline(layer, experts, ticks, misses, t, stretch)
            return t, waited, cpu_done
        if misses is None and quiet:
            for e, c in zip(experts, ticks, strict=True):
                t0 = t
                t += c
                if keep:
                    rec.event("compute", "expert", step, layer, e, t0 * _S, t * _S, False)
            if self._always:
                yield from sync(t)
            return t, 0, cpu_done
        # Copies are queued or on the wire: pin what this layer needs until it is computed.
        cache.pin([(layer, e) for e in experts])
        if misses is not None:
            self._wake_at(t)
            t += self.miss_ticks * len(misses)  # the host's own work per on-demand load
        # Resident experts first, in expert order; then the misses as they arrive.
        for e, c in zip(experts, ticks, strict=True):
            if misses is None or e not in misses:
                t = yield from self._run_expert(step, layer, e, c, t, keep, False)
        waited = 0
        if misses is not None:
            t, waited = yield from self._await_misses(step, layer, experts, ticks, misses, t, keep)
        if self._always:
            yield from sync(t)
        return t, waited, cpu_done

    def _run_expert(self, step: int, layer: int, expert: int, ticks: int, t: int, keep: bool, missed: bool):
        """Compute one resident expert of the layer from `t`, then let its slot go; returns the time."""
        stretch, peek, sync, cache = self._stretch_fn, self.env.peek, self._sync, self.cache
        if stretch is not None and peek() <= t:
            yield from sync(t)
        t0 = t
        t += ticks if stretch is None else stretch(t, ticks)
        cache.unpin((layer, expert), t * _S)
        if keep:
            self.rec.event("compute", "expert", step, layer, expert, t0 * _S, t * _S, missed)
        if self._always or cache.blocked:
            yield from sync(t)
            if cache.blocked:
                self._notify()
        return t

    def _await_misses(self, step: int, layer: int, experts, ticks, misses, t: int, keep: bool):
        """Compute the layer's missed experts as their copies land, waiting when none has; returns
        (time, stall)."""
        env, cache, peek, sync = self.env, self.cache, self.env.peek, self._sync
        pending = list(misses)
        stall = 0
        while pending:
            if self._always or peek() <= t:
                yield from sync(t)
            ready = [e for e in pending if (layer, e) in cache.resident]
            if not ready:
                # Wait for the first of the missing experts on the wire to land (its copy engine
                # resumes first and marks it resident), else for any copy.
                first = None
                for e in pending:
                    a = self._arriving.get((layer, e))
                    if a is not None and (first is None or a[0] < first[0]):
                        first = a
                self._stalled = True
                if first is not None:
                    yield first[1]
                else:
                    self._loaded_waited = True
                    yield self._loaded
                    self._loaded_waited = False
                self._stalled = False
                stall += env.now - t
                t = env.now
                continue
            for e in ready:
                pending.remove(e)
                t = yield from self._run_expert(step, layer, e, ticks[experts.index(e)], t, keep, True)
        return t, stall

    # --- driver ----------------------------------------------------------------------------------
    def run(self) -> float:
        """Run to completion; the makespan in seconds (first arrival at 0 to last token)."""
        env = self.env
        if self.oracle is not None:
            if self._scripted:
                self.oracle.rebuild(0, list(self._scripted), self.info, self.trace.experts)
            self._replan(0)
        if self.memory.all_resident and not self._cpu_exec:  # (a placement on the CPU is the policy's choice)
            keys = [(layer, e) for layer in range(self.L) for e in range(self.J)]
        else:
            keys = list(self.policy.initial_residents())[: self.memory.expert_cache_slots]
        self.cache.preload(keys, 0.0)
        self.start_residents = frozenset(self.cache.resident)  # the start state (what the bounds assume)
        for i in range(self.copy_engines):
            env.process(self._copier(i))
        main = env.process(self._compute())
        try:
            env.run(until=main)
        except RuntimeError as exc:
            if not main.triggered:
                raise DeadlockError(
                    f"simulation stalled at step {self.step}: an expert it waits for can never arrive ({exc})"
                ) from None
            raise
        return main.value * _S
