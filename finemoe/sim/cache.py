"""The expert cache's state and decisions, engine-neutral (the replayer reuses it): fixed slots, the
resident and in-flight sets, pins for experts the current layer still needs, the on-demand queue
(served first, in order) and the prefetch queue (by descending priority, one entry per expert,
dropped once the (step, layer) it was meant for has passed), victim selection through the policy,
and the policy's notifications. The engine supplies time; this supplies decisions."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from itertools import repeat
from typing import NamedTuple

from finemoe.policies.base import ExpertKey, Policy, Prefetch
from finemoe.sim.metrics import MetricsRecorder

_NO_ROOM = object()
_new_tuple = tuple.__new__


class Transfer(NamedTuple):
    """One host-to-device copy; `prefetch` is None for an on-demand load. (A named tuple: one is
    made per copy, and a frozen dataclass costs several times more to build.)"""

    key: ExpertKey
    prefetch: Prefetch | None
    victim: ExpertKey | None  # what was evicted to make room (None: a free slot was used)

    @property
    def kind(self) -> str:
        return "demand" if self.prefetch is None else "prefetch"


class PolicyError(RuntimeError):
    """A policy broke the interface's rules (a bug in the policy, not a user error)."""


class ExpertCache:
    def __init__(self, capacity: int, policy: Policy, recorder: MetricsRecorder, bytes_per_expert: int,
                 layer_capacity: tuple[int, ...] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least one slot, got {capacity}")
        if layer_capacity is not None and sum(layer_capacity) > capacity:
            raise ValueError(f"per-layer capacities sum to {sum(layer_capacity)}, more than the {capacity} slots")
        self.capacity = capacity
        # Per-layer capacities (sim/layer_capacity.py): a layer's copies then take slots of its own
        # share only, evicting within the layer; None: one pool shared by every layer.
        self.layer_capacity = layer_capacity
        # Experts resident or on the wire at the policy's low precision (HOBBIT), and their bytes.
        self.low: set[ExpertKey] = set()
        self.low_bytes = bytes_per_expert
        self._mixed = policy.low_precision is not None
        self.policy = policy
        self.rec = recorder
        self.bytes_per_expert = bytes_per_expert
        self.resident: set[ExpertKey] = set()
        self.in_flight: dict[ExpertKey, Transfer | None] = {}  # None: a demand started by `start_demands`
        # Pins held per expert: a layer pins what it needs and releases each pin once computed, at
        # a time (lazily); counted, so a release still pending from an earlier step cannot free an
        # expert the current layer has pinned again.
        self.pinned: dict[ExpertKey, int] = {}
        self.position: tuple[int, int] = (-1, -1)  # last (step, layer) whose routing was seen
        self.blocked = False  # an on-demand load waits for a slot to become evictable
        self._demand: deque[ExpertKey] = deque()
        self._demand_set: set[ExpertKey] = set()
        self._heap: list = []
        self._queued: dict[ExpertKey, Prefetch] = {}
        self.queued_prefetch = self._queued.get  # the prefetch queued for a key, not yet started, or None
        self._seq = 0
        self._unused_prefetch: set[ExpertKey] = set()  # prefetched (in flight or resident), not yet used
        self._unpins: deque[tuple[float, ExpertKey]] = deque()  # (time, key), time non-decreasing
        self._evictable = self._evictable_check()

    # --- queries --------------------------------------------------------------------------------
    def is_resident(self, key: ExpertKey) -> bool:
        return key in self.resident

    def is_in_flight(self, key: ExpertKey) -> bool:
        return key in self.in_flight

    def evictable(self, key: ExpertKey) -> bool:
        return key in self.resident and key not in self.pinned

    def _evictable_check(self):
        """`evictable` as a closure over the two sets, which are never replaced: what
        `choose_victim` gets, as a policy may call it for every resident expert."""
        resident, pinned = self.resident, self.pinned

        def evictable(key: ExpertKey) -> bool:
            return key in resident and key not in pinned

        return evictable

    @property
    def busy(self) -> bool:
        """Whether anything is queued or on the wire (the engine's fast path needs it idle)."""
        return bool(self.in_flight or self._demand or self._queued)

    @property
    def has_work(self) -> bool:
        return bool(self._demand or self._queued)

    def only_demands(self, n: int) -> bool:
        """Whether exactly `n` on-demand loads are queued and nothing else is queued or on the wire."""
        return not self.in_flight and not self._queued and len(self._demand) == n

    def fits(self, layer: int, n: int) -> bool:
        """Whether `n` experts of `layer` can be resident at once (its share, or the whole pool):
        what the engine's inline paths need to start a layer's loads together."""
        return n <= (self.capacity if self.layer_capacity is None else self.layer_capacity[layer])

    def queued_prefetches(self) -> int:
        return len(self._queued)

    def queued_entries(self) -> list[tuple[Prefetch, int]]:
        """The queued prefetches with their queue numbers (ties by priority, step and layer go to
        the lower), in no order: the live entries of the heap, superseded ones left out."""
        queued = self._queued
        return [(entry[4], entry[3]) for entry in self._heap if queued.get((entry[2], entry[4].expert)) is entry[4]]

    @property
    def queue_seq(self) -> int:
        """The last queue number given out."""
        return self._seq

    @property
    def unused_prefetches(self) -> set[ExpertKey]:
        """Prefetched experts (in flight or resident) not yet used."""
        return self._unused_prefetch

    def pending_unpins(self) -> list[tuple[float, ExpertKey]]:
        """Pin releases not yet applied: (time, key), in time order."""
        return list(self._unpins)

    def abandon_queues(self) -> None:
        """Forget what is queued (a compiled engine path has taken it over): no copy starts from here."""
        self._demand.clear()
        self._demand_set.clear()
        self._heap.clear()
        self._queued.clear()

    # --- set-up -----------------------------------------------------------------------------------
    def preload(self, keys: Iterable[ExpertKey], now_s: float) -> None:
        for key in keys:
            if len(self.resident) >= self.capacity:
                break
            if self.layer_capacity is not None and self._held(key[0]) >= self.layer_capacity[key[0]]:
                continue
            if key not in self.resident:
                self.resident.add(key)
                self.policy.on_loaded(key, now_s)

    # --- the current layer ------------------------------------------------------------------------
    def set_position(self, step: int, layer: int) -> None:
        self.position = (step, layer)

    def access(self, layer: int, expert: int, now_s: float) -> bool:
        """A routed expert is needed now. Records hit/miss, queues an on-demand load on a miss."""
        return not self.access_layer(layer, (expert,), now_s)

    def access_layer(self, layer: int, experts, now_s: float) -> list[int] | None:
        """Every routed expert of a layer is needed now (in this order): records hits and misses,
        notifies the policy, queues on-demand loads; returns the missed experts (None if none)."""
        resident, unused, on_access, rec = self.resident, self._unused_prefetch, self.policy.on_access, self.rec
        in_flight, demand, demand_set, queued = self.in_flight, self._demand, self._demand_set, self._queued
        misses = None
        if self._mixed:
            self._upgrade(layer, experts, now_s)
        for expert in experts:
            key = (layer, expert)
            if key in resident:
                if unused and key in unused:
                    unused.discard(key)
                    rec.prefetch_in_time += 1
                on_access(layer, expert, True, now_s)
                continue
            if unused and key in unused:  # on the wire: a late prefetch
                unused.discard(key)
                rec.prefetch_late += 1
            elif key not in in_flight and key not in demand_set:
                if queued and queued.pop(key, None) is not None:  # queued, never started: late too
                    rec.prefetch_late += 1
                demand.append(key)
                demand_set.add(key)
            on_access(layer, expert, False, now_s)
            if misses is None:
                misses = []
            misses.append(expert)
        if misses is None:
            rec.hits[layer] += len(experts)
        else:
            rec.hits[layer] += len(experts) - len(misses)
            rec.misses[layer] += len(misses)
        return misses

    def _upgrade(self, layer: int, experts, now_s: float) -> None:
        """A low-precision resident copy that the policy wants at full precision now leaves its
        slot (heard as an eviction): the access then misses and reloads it in full."""
        low, fetch_low = self.low, self.policy.fetch_low
        for expert in experts:
            key = (layer, expert)
            if key in low and key in self.resident and key not in self.pinned and not fetch_low(key):
                self.resident.discard(key)
                low.discard(key)
                self._unused_prefetch.discard(key)
                self.rec.low_upgrades += 1
                self.policy.on_evicted(key, now_s)

    def _bytes_of(self, key: ExpertKey) -> int:
        """A copy's bytes: at the policy's low precision when it asks (recorded in `low`)."""
        if self._mixed and self.policy.fetch_low(key):
            self.low.add(key)
            self.rec.low_loads += 1
            return self.low_bytes
        self.low.discard(key)
        return self.bytes_per_expert

    def access_and_start(self, layer: int, experts, now_s: float) -> list[ExpertKey] | None:
        """`access_layer`, then `start_demands`, for a layer that finds the link quiet (nothing
        queued or on the wire) and whose misses can all start now on idle copy engines: the same
        policy calls in the same order, without the on-demand queue in between. Returns the
        started loads' keys (None: every expert hit), for `complete_landed` once the engine knows
        when they land. For a policy without hooks only (the engine's quiet steps): it never queues
        a prefetch, so no resident expert is an unused prefetch to count."""
        resident, on_access = self.resident, self.policy.on_access
        keys = None
        for expert in experts:
            key = (layer, expert)
            if key in resident:
                on_access(layer, expert, True, now_s)
                continue
            on_access(layer, expert, False, now_s)
            if keys is None:
                keys = [key]
            else:
                keys.append(key)
        rec = self.rec
        if keys is None:
            rec.hits[layer] += len(experts)
            return None
        rec.hits[layer] += len(experts) - len(keys)
        rec.misses[layer] += len(keys)
        self._start_layer_loads(layer, experts, keys, now_s)
        return keys

    def drop(self, keys: Iterable[ExpertKey], now_s: float) -> None:
        """Free the slots of `keys` (computed from a temporary copy, `COPY_ONCE`): not an eviction
        the policy chose, but it hears of it as one."""
        for key in keys:
            if key in self.resident:
                self.resident.discard(key)
                self.low.discard(key)
                self._unused_prefetch.discard(key)
                self.policy.on_evicted(key, now_s)

    def withdraw_demands(self, keys: Iterable[ExpertKey]) -> None:
        """Take queued on-demand loads back before they start: the policy computes those misses on
        the CPU instead (`Policy.place_misses`)."""
        drop = set(keys) & self._demand_set
        if drop:
            self._demand_set -= drop
            kept = [k for k in self._demand if k not in drop]
            self._demand.clear()  # in place: the engine's inline path holds the deque itself
            self._demand.extend(kept)

    def pin(self, keys: Iterable[ExpertKey]) -> None:
        pinned = self.pinned
        for key in keys:
            pinned[key] = pinned.get(key, 0) + 1

    def unpin(self, key: ExpertKey, at_s: float | None = None) -> None:
        """Release a pin now, or at time `at_s` (applied before the next eviction decision at or
        after that time, so an engine need not stop its clock for it)."""
        if at_s is None:
            self._release(key)
        else:
            self._unpins.append((at_s, key))

    def next_unpin_s(self) -> float | None:
        return self._unpins[0][0] if self._unpins else None

    def _apply_unpins(self, now_s: float) -> None:
        q = self._unpins
        while q and q[0][0] <= now_s:
            self._release(q.popleft()[1])

    def _release(self, key: ExpertKey) -> None:
        held = self.pinned.get(key, 0)
        if held > 1:
            self.pinned[key] = held - 1
        elif held:
            del self.pinned[key]

    # --- prefetch queue ----------------------------------------------------------------------------
    def add_prefetches(self, prefetches: Iterable[Prefetch]) -> int:
        """Queue prefetches; returns how many were newly accepted."""
        accepted = 0
        pos = self.position
        for p in prefetches:
            key = (p.layer, p.expert)
            if key in self.resident or key in self.in_flight or key in self._demand_set:
                continue
            if (p.step, p.layer) <= pos:
                continue
            old = self._queued.get(key)
            if old is not None and (old.step, old.layer) > pos and old.priority >= p.priority:
                continue
            if old is None:
                accepted += 1
            self._queued[key] = p
            self._seq += 1
            heapq.heappush(self._heap, (-p.priority, p.step, p.layer, self._seq, p))
        self.rec.prefetch_issued += accepted
        return accepted

    # --- transfers -------------------------------------------------------------------------------
    def next_transfer(self, now_s: float) -> Transfer | None:
        """The next copy to put on a free copy engine, with its slot already made (evicting through
        the policy); None when nothing can start now (`blocked` tells whether a demand waits)."""
        self.blocked = False
        if self._unpins:
            self._apply_unpins(now_s)
        if self._demand:
            room = self._make_room(None, now_s, self._demand[0])
            if room is _NO_ROOM:
                self.blocked = True
                return None
            key = self._demand.popleft()
            self._demand_set.discard(key)
            return self._start(key, None, room)
        heap = self._heap
        while heap:
            p = heapq.heappop(heap)[4]
            key = (p.layer, p.expert)
            if self._queued.get(key) is not p:
                continue  # superseded by a later entry for the same expert
            del self._queued[key]
            if (p.step, p.layer) <= self.position:
                self.rec.prefetch_dropped += 1
                continue
            room = self._make_room(p, now_s)
            if room is _NO_ROOM:
                self.rec.prefetch_dropped += 1
                continue
            return self._start(key, p, room)
        return None

    def complete(self, transfer: Transfer, now_s: float) -> None:
        """A copy finished: the expert is resident."""
        key = transfer.key
        del self.in_flight[key]
        self.resident.add(key)
        self.policy.on_loaded(key, now_s)

    def complete_landed(self, keys: Iterable[ExpertKey], times_s: list[float]) -> None:
        """The copies of `keys` finished, in this order at these times, and nothing else was
        queued: each one `complete`, then what its copy engine's `next_transfer` does before it
        goes to sleep (release the pins due by then, unblock)."""
        in_flight, resident, on_loaded, unpins = self.in_flight, self.resident, self.policy.on_loaded, self._unpins
        # (of equal lengths by construction: `strict=True` would cost a keyword call per layer)
        for key, now_s in zip(keys, times_s):  # noqa: B905 (`complete`, inlined)
            del in_flight[key]
            resident.add(key)
            on_loaded(key, now_s)
            if unpins and unpins[0][0] <= now_s:
                self._apply_unpins(now_s)
        self.blocked = False

    def start_demands(self, layer: int, experts, now_s: float) -> list[ExpertKey]:
        """Layer `layer` needs `experts`; its on-demand loads (queued by `access_layer`; nothing else
        is queued or on the wire) start now on idle copy engines, and the compute computes every
        expert of the layer before anything else starts. Returns their keys in queue order, for
        `complete_landed` with their landing times: together the same calls as `pin` of the layer's
        experts, `next_transfer` now once per load and per landing `complete`, in SimPy's order."""
        keys = list(self._demand)
        self._demand.clear()
        self._demand_set.clear()
        self._start_layer_loads(layer, experts, keys, now_s)
        return keys

    def _start_layer_loads(self, layer: int, experts, keys: list[ExpertKey], now_s: float) -> None:
        """Start the loads of `keys`, misses of layer `layer`, now. The layer's pins can change no
        decision but these loads' victims (only a resident expert's pin counts, and no other copy
        starts before the compute releases them), so its resident experts are pinned while the
        victims are chosen, here, and released at once: no release waits in the queue."""
        self.blocked = False
        if self._unpins:
            self._apply_unpins(now_s)
        if len(keys) < len(experts):  # some of the layer's experts are resident: keep them (a miss's pin is moot)
            held = list(zip(repeat(layer), experts))
            self.pin(held)
            self._start_demands(now_s, keys)
            for key in held:
                self._release(key)
        else:
            self._start_demands(now_s, keys)

    def _start_demands(self, now_s: float, keys) -> None:
        """Start the on-demand loads of `keys`, in order, each with its slot made (evicting through
        the policy), or raise `PolicyError` when no slot can be made for one. Each is in flight
        from here, without a `Transfer` (building the named tuple costs more than the rest of a
        start, and `complete_landed` lands it soon). (`_make_room` and `_start` for demands,
        inlined: once per miss.)"""
        in_flight = self.in_flight
        if self.layer_capacity is not None:
            for key in keys:
                if self._layer_room(key[0], None, now_s) is _NO_ROOM:
                    self.blocked = True
                    raise PolicyError(f"policy {self.policy.name}: no slot of layer {key[0]} for an on-demand load")
                in_flight[key] = None
            self.rec.bytes_h2d += sum(map(self._bytes_of, keys)) if self._mixed else self.bytes_per_expert * len(keys)
            self.rec.ondemand_loads += len(keys)
            return
        free = self.capacity - len(self.resident) - len(in_flight)  # an eviction keeps it, a start on a free slot lowers it
        for key in keys:
            if free > 0:
                free -= 1
            elif self._evict_for(None, now_s) is _NO_ROOM:
                self.blocked = True
                raise PolicyError(f"policy {self.policy.name}: no slot for an on-demand load of the current layer")
            in_flight[key] = None
        rec = self.rec
        started = len(keys)
        rec.bytes_h2d += sum(map(self._bytes_of, keys)) if self._mixed else self.bytes_per_expert * started
        rec.ondemand_loads += started

    def _start(self, key: ExpertKey, p: Prefetch | None, victim: ExpertKey | None) -> Transfer:
        t = _new_tuple(Transfer, (key, p, victim))  # built directly: a named tuple's `__new__` is a Python call
        self.in_flight[key] = t
        if self._mixed:
            self.rec.bytes_h2d += self._bytes_of(key) if p is None else self._full(key)
        else:
            self.rec.bytes_h2d += self.bytes_per_expert
        if p is None:
            self.rec.ondemand_loads += 1
        else:
            self.rec.prefetch_started += 1
            self._unused_prefetch.add(key)
        return t

    def _full(self, key: ExpertKey) -> int:
        """A prefetch's bytes: prefetches copy at full precision."""
        self.low.discard(key)
        return self.bytes_per_expert

    def _make_room(self, p: Prefetch | None, now_s: float, key: ExpertKey | None = None):
        """A slot for a copy (of `key`, or of the prefetch `p`): None when one is free, else the
        victim evicted, or `_NO_ROOM`."""
        if self.layer_capacity is not None:
            return self._layer_room(p.layer if p is not None else key[0], p, now_s)
        if len(self.resident) + len(self.in_flight) < self.capacity:
            return None
        return self._evict_for(p, now_s)

    def _held(self, layer: int) -> int:
        """Slots layer `layer` holds: resident or on the wire. (Counted when asked: per-layer
        capacities are the rarer case, and every path that fills or frees a slot stays as it is.)"""
        return sum(1 for k in self.resident if k[0] == layer) + sum(1 for k in self.in_flight if k[0] == layer)

    def _layer_room(self, layer: int, p: Prefetch | None, now_s: float):
        """`_make_room` under per-layer capacities: a free slot of the layer's share, or the policy's
        victim among the layer's own evictable experts."""
        if self._held(layer) < self.layer_capacity[layer]:
            return None
        evictable = self._evictable
        return self._evict_for(p, now_s, lambda k: k[0] == layer and evictable(k), layer)

    def _evict_for(self, p: Prefetch | None, now_s: float, evictable=None, layer: int | None = None):
        """Every slot is taken: evict the policy's victim (returned) for a copy, or `_NO_ROOM`.
        `evictable`/`layer`: the victim must be of this layer (per-layer capacities)."""
        policy, resident, unused = self.policy, self.resident, self._unused_prefetch
        victim = policy.choose_victim(evictable or self._evictable, p, now_s)
        if victim is not None and layer is not None and victim[0] != layer:
            raise PolicyError(f"policy {policy.name} chose {victim} for a slot of layer {layer}")
        if victim is None:
            if p is None and any(k not in self.pinned and (layer is None or k[0] == layer) for k in resident):
                raise PolicyError(
                    f"policy {policy.name} returned no victim for an on-demand load although "
                    "evictable experts exist"
                )
            return _NO_ROOM
        if victim not in resident or victim in self.pinned:
            raise PolicyError(f"policy {policy.name} chose {victim}, which is not evictable")
        resident.discard(victim)  # `_evict`, inlined: once per eviction
        if self._mixed:
            self.low.discard(victim)
        if unused and victim in unused:
            unused.discard(victim)
            self.rec.prefetch_unused_evicted += 1
        policy.on_evicted(victim, now_s)
        return victim

