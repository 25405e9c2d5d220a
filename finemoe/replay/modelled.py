"""A modelled machine for the replayer: a virtual clock, copy engines and compute whose durations
come from the simulator's cost model (`ReplayOptions(timing="modelled")`).

The replayer's own step logic (its policy calls, accesses, pins, prefetch queueing, the order it
computes experts in and the waits for copies) then runs against time that no machine's speed can
change, so its decisions and times can be checked exactly against the simulator's: a difference is
a difference of mechanics, not of timing. The rules are the simulator's timing model
(docs/timing-model.md): a copy engine takes the next transfer (on-demand first) as soon as it is
free, waits the per-transfer latency and crosses the link that all engines share in start order;
copies landing at a time are handled before the compute looks at that time, except that a pin
released by compute finishing at that time is seen by them; prefetches whose prediction is not
ready wait for their `ready_s`. Time is kept in the simulator's integer ticks so sums are exact.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from finemoe.policies.base import Prefetch
from finemoe.sim.cache import ExpertCache, Transfer
from finemoe.sim.costs import TICKS_PER_S, CostModel, to_ticks
from finemoe.sim.metrics import MetricsRecorder
from finemoe.traces.schema import Trace

_S = 1.0 / TICKS_PER_S
_LAND, _RELEASE, _RETRY = 0, 1, 2


class ModelledMachine:
    """Virtual clock, copy engines and compute durations of one modelled replay (single-threaded:
    the copy engines act when the clock passes their events)."""

    def __init__(self, trace: Trace, costs: CostModel, cache: ExpertCache, rec: MetricsRecorder,
                 engines: int, step) -> None:
        hw = costs.hardware
        g = trace.geometry
        self.trace, self.costs, self.cache, self.rec, self.step = trace, costs, cache, rec, step
        self.engines = max(1, int(engines))
        self.t = 0  # ticks
        self.latency = to_ticks(hw.transfer_latency_s)
        self.handed_latency = self.latency + to_ticks(hw.copy_start_delay_s)  # waking a sleeping engine
        self.wire = to_ticks(costs.wire_s(g.bytes_per_expert))
        self.busy_wire = to_ticks(costs.wire_s(g.bytes_per_expert) * hw.compute_copy_slowdown)
        self.slowdown = float(hw.copy_compute_slowdown)
        self.miss_ticks = to_ticks(hw.miss_overhead_s)
        self.wire_free = 0
        self.stalled = False
        self.sleeping: list[tuple[int, bool]] = [(e, True) for e in range(self.engines)]  # (engine, plain)
        self.arriving: dict = {}  # expert key -> its landing tick
        self._events: list = []  # (tick, order, kind, payload)
        self._order = 0
        self._expert_ticks: dict[int, int] = {}
        self._retry: dict[int, int] = {}  # engine -> the order of its pending timeout event
        # What the threaded copy engines report, for the same result fields.
        self.busy_s = [0.0] * self.engines
        self.copies = 0
        self.error = None

    # --- the clock ------------------------------------------------------------------------------
    def now(self) -> float:
        """The current time (s), after every event due by now has been handled."""
        self._handle_until(self.t, inclusive=True)
        return self.t * _S

    def advance(self, ticks: int) -> None:
        """Let `ticks` pass: events due before the new time are handled at their own times."""
        self._handle_until(self.t + ticks, inclusive=False)
        self.t += ticks

    def compute(self, ticks: int) -> None:
        """Compute of `ticks`, run `copy_compute_slowdown` times slower while copies are on the wire."""
        if self.slowdown != 1.0:
            self.now()  # the stretch sees every copy started by now
            busy = self.wire_free - self.t
            if busy > 0:
                ticks = int(round(ticks * self.slowdown)) if ticks * self.slowdown <= busy \
                    else busy + int(round(ticks - busy / self.slowdown))
        self.advance(ticks)

    def idle_until(self, at_s: float) -> None:
        self.advance(max(0, to_ticks(at_s) - self.t))

    # --- compute durations ----------------------------------------------------------------------
    def dense_ticks(self, seqs) -> int:
        """One layer's dense work for the step's sequences (the simulator's arguments to the cost)."""
        pos = self.trace.position
        tokens = context = pairs = 0
        for s in seqs:
            p = pos[s.start : s.stop]
            tokens += s.stop - s.start
            context += int(p.max()) + 1
            pairs += int(p.sum()) + (s.stop - s.start)
        return to_ticks(self.costs.dense_layer_s(tokens, context, pairs))

    def expert_ticks(self, tokens: int) -> int:
        got = self._expert_ticks.get(tokens)
        if got is None:
            got = self._expert_ticks[tokens] = to_ticks(self.costs.expert_compute_s(tokens))
        return got

    def missed(self, misses: int) -> None:
        """The host's own work per on-demand load (`miss_overhead_s`)."""
        if misses:
            self.advance(self.miss_ticks * misses)

    # --- prefetches and copies ------------------------------------------------------------------
    def submit(self, prefetches: Iterable[Prefetch]) -> None:
        """Queue prefetches now: those whose prediction is ready at once, the others at `ready_s`."""
        ready, later = [], {}
        for p in prefetches:
            at = to_ticks(p.ready_s) if p.ready_s else 0
            if at <= self.t:
                ready.append(p)
            else:
                later.setdefault(at, []).append(p)
        if ready:
            self.cache.add_prefetches(ready)
        for at, batch in later.items():
            self._push(at, _RELEASE, batch)

    def wake(self) -> None:
        """Hand queued copies to the engines that sleep until work comes, oldest sleeper first; wake
        one to look for itself when an on-demand load waits for a slot."""
        self._wake_at(self.t)

    def unblocked(self) -> None:
        """A pin was released while an on-demand load waited for a slot."""
        self.now()
        if self.cache.blocked and self.sleeping:
            e, _ = self.sleeping.pop(0)
            self._engine_next(e, self.t, handed=True)

    def wait_for(self, pending: list) -> None:
        """Stall until one of `pending` is resident: the copies' events pass meanwhile."""
        cache = self.cache
        self.stalled = True
        try:
            while not any(cache.is_resident(k) for k in pending):
                if not self._events:
                    raise RuntimeError("modelled replay deadlock: a routed expert is neither resident nor loading")
                arriving = any(k in self.arriving for k in pending)
                tick, _, kind, _ = self._events[0]
                self._handle_next()
                self.t = max(self.t, tick)
                if kind == _LAND and not arriving:
                    break  # waiting for any copy: the compute looks again
        finally:
            self.stalled = False

    def drain(self) -> None:
        """The run is over: copies still on the wire land after its makespan, as in the simulator."""

    def close(self) -> None:
        pass

    # --- events ---------------------------------------------------------------------------------
    def _push(self, tick: int, kind: int, payload) -> None:
        heapq.heappush(self._events, (tick, self._order, kind, payload))
        self._order += 1

    def _handle_until(self, tick: int, inclusive: bool) -> None:
        ev = self._events
        while ev and (ev[0][0] <= tick if inclusive else ev[0][0] < tick):
            self._handle_next()

    def _handle_next(self) -> None:
        tick, _, kind, payload = heapq.heappop(self._events)
        if kind == _LAND:
            e, tr, start = payload
            self._land(e, tr, start, tick)
        elif kind == _RELEASE:
            if self.cache.add_prefetches(payload):
                self._wake_at(tick)
        else:  # a blocked engine's timeout at the next pin release
            e, token = payload
            entry = (e, False)
            if token == self._retry.get(e) and entry in self.sleeping:
                self.sleeping.remove(entry)
                self._engine_next(e, tick, handed=True)

    def _land(self, e: int, tr: Transfer, start: int, tick: int) -> None:
        del self.arriving[tr.key]
        self.cache.complete(tr, tick * _S)
        self.busy_s[e] += (tick - start) * _S
        self.copies += 1
        self.rec.event(f"copy{e}", tr.kind, self.step(), tr.key[0], tr.key[1], start * _S, tick * _S,
                       tr.prefetch is None)
        self._engine_next(e, tick, handed=False)

    def _engine_next(self, e: int, tick: int, handed: bool) -> None:
        """Engine `e` is free at `tick`: it starts the next transfer, or sleeps."""
        cache = self.cache
        tr = cache.next_transfer(tick * _S)
        if tr is None:
            nxt = cache.next_unpin_s() if cache.blocked else None
            self.sleeping.append((e, nxt is None))
            if nxt is not None:
                self._retry[e] = self._order
                self._push(max(tick, to_ticks(nxt)), _RETRY, (e, self._order))
            return
        self._start(e, tr, tick, handed)
        if self.sleeping and cache.has_work:
            self._wake_at(tick)

    def _wake_at(self, tick: int) -> None:
        sleeping, cache = self.sleeping, self.cache
        i = 0
        while i < len(sleeping) and cache.has_work:
            e, plain = sleeping[i]
            if not plain:
                i += 1
                continue
            tr = cache.next_transfer(tick * _S)
            if tr is None:
                break
            del sleeping[i]
            self._start(e, tr, tick, handed=True)
        if cache.blocked and sleeping:
            e, _ = sleeping.pop(0)
            self._engine_next(e, tick, handed=True)

    def _start(self, e: int, tr: Transfer, start: int, handed: bool) -> None:
        """The copy crosses the shared link after its latency, in start order."""
        latency = self.handed_latency if handed and not self.stalled else self.latency
        wire_start = max(start + latency, self.wire_free)
        end = self.wire_free = wire_start + (self.wire if self.stalled else self.busy_wire)
        self.arriving[tr.key] = end
        self._push(end, _LAND, (e, tr, start))
