"""The oracle's clairvoyant candidate schedules: Belady (MIN) eviction, with or without prefetch, on
the same engine, link and (cold) start state as every policy. It reads the future from the engine's
OracleView; given `planned_steps` (the steps an earlier run of the same workload took, which
sim/offline.py supplies) that view holds every request, arrived or not.

`prefetch`:
- "none": demand loads only, evicting the resident expert needed farthest in the future (MIN when
  the engine serves a layer's experts in MIN's order).
- "conservative" (Cao et al. '95): at each step start and routed layer it asks for every expert used
  within `lookahead_layers` layers that is neither resident nor on the wire, nearest use first; a
  prefetch that needs a victim is refused unless the victim is needed later than the expert it
  brings, and unless its copy, starting now, lands in time (estimated with the shortest layer time
  seen so far): on a saturated link a late prefetch is a miss anyway, and its victim might have hit.
- "aggressive": the same requests, refused only when the victim is needed no later.
- "deadline": aggressive, but asking only for the experts whose copies can land before their use
  when the link carries just the ones asked for before them (earliest use first, one expert load
  each, the use estimated with the shortest layer time seen); the rest come by their demand loads.
  A copy that will be late anyway only delays the ones behind it on the wire.
- "decode-first": aggressive, but during a step that runs a prefill, only the experts first needed
  by later steps are asked for: time before a request's first token does not count in its time per
  output token, so loads moved into the prefill can shorten every decode step after it (an expert
  the prefill needs itself comes in by its own demand load, never a prefetch whose slot could push
  out a decode step's expert brought earlier).

Every prefetching mode reads a few cache-fulls of accesses ahead (within its lookahead) and, while
the cache has free slots, on until it has seen enough experts not resident to fill them: an expert a
later request's decode needs is best loaded before this request's first token, not during that
decode, and when a few experts repeat, a count of accesses reaches only those.

`victims`: "belady" (default) evicts the expert needed farthest ahead; "tpot" (with prefetch
"none" only) keeps what a weighted paging program (sim/weighted_min.py) keeps, the demand schedule
whose loads cost the least time per output token: a load in a step weighs what that step adds to
the mean (for each request decoding in it, one over its decode steps), a prefill's loads nearly
nothing, so an expert the decode needs stays and the prefill's come and go. Belady keeps those with
the nearest next use, whatever step it lies in. It runs on the reference engine path only.

`ration` (default none): at most this many asks newly made at a hook, nearest use first; one passed
over is not made again for that use (its expert comes by its demand load) unless the cache evicts or
drops that expert or the view changes. On a cache of few slots and a slow link every ask made at
once queues the copies of the coming layer behind each other and takes the slots their demand loads
need; rationed, one copy for the next layer lands between the current layer's demand loads, in a
slot its expert has just left, and hits (docs/bounds.md). The rule reads the asks it remembers
(`new_asks`), with numba or without.

`spread` (default off): at a hook, one ask per use position (a layer of a step), its nearest use
first; the others are passed over for those uses, as `ration`'s are. On a cache of top-k slots an
ask for each of the coming layers' first experts, not for all of the nearest layer's, leaves the
nearest layer's other experts to come one at a time through the slot of the one that has run, and
the next layer's first expert hits (docs/bounds.md).

`min_ahead` (default 1): no prefetch for an access nearer than this many layers; it is left to its
demand load. On a slow link such a copy lands late anyway (a miss either way), and on the wire it
would push the copies of farther accesses, which could still land in time, later.

Edits (`skip_asks`, `keep`, `add_asks`), set before a run by the ensemble's local search
(sim/search.py): asks not to send, each (position, key index): that expert comes by its demand load
at that use; experts not to evict at a position, each (position, key index), while another victim
will do (an on-demand load always gets one); and asks to send beside the rule's, each (position,
key index), at every hook of that position's step before it, with no check of the copy's time or of
its victim (Belady's, even one needed as soon).
With `decisions` set to a `Decisions`, a run records the asks it sent, the victims it chose and
its on-demand loads, the moves that search tries. Neither kind of run is handed to the
compiled engine path (`plays_in_kernel`), which knows no edits and records nothing.

Each candidate is a real schedule, not a bound; `oracle` as a policy name runs all of them and
reports the best (sim/offline.py, docs/bounds.md). The provable side is sim/bounds.py.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from finemoe.errors import ConfigError
from finemoe.jit import jit, numba
from finemoe.policies.base import Policy, Prefetch
from finemoe.policies.registry import register
from finemoe.sim.plan_view import PlanView

INF = float("inf")
IN_TIME, LATE = 1, 2  # how an ask's copy stood when its layer came (`Decisions.settle`)
BOOST = 1e15  # above every position's rank (-position): "later steps first" during a prefill
_NOTHING_QUEUED = {}.get  # `PolicyContext.queued` of an engine without a prefetch queue
PREFETCH_MODES = ("none", "conservative", "aggressive", "decode-first", "deadline")
VICTIM_RULES = ("belady", "tpot")
UNKEPT = 1e15  # added to an expert's next use where the "tpot" schedule lets it go: evicted first


@dataclass
class Decisions:
    """What a run decided, in order: each ask whose copy started (position, key index), and each
    victim it chose (position, key index); the local search's moves are to undo one (sim/search.py).
    An ask whose expert was neither resident nor on the wire when its layer came is left out: it
    never started a copy, and dropping it would change nothing. (One that was, was nearly always
    brought by its copy; where a demand load for an earlier use brought it, the move is wasted.)"""

    asks: list = field(default_factory=list)
    late: list = field(default_factory=list)  # those still on the wire when their layer came
    victims: list = field(default_factory=list)
    demands: list = field(default_factory=list)  # (position, key index) of each on-demand load
    pending: dict = field(default_factory=dict)  # position -> key indices asked for it, not settled yet

    def asked(self, position: int, key: int) -> None:
        keys = self.pending.setdefault(position, [])
        if key not in keys:  # (asked again at every hook until it lands)
            keys.append(key)

    def settle(self, position: int, started) -> None:
        """At the layer where the asks for `position` are used: keep those whose copy started, as
        `started(key index)` says (IN_TIME: resident by then, LATE: still on the wire, 0: neither;
        nothing else brings an expert in before its first use)."""
        for k in self.pending.pop(position, ()):
            state = started(k)
            if state:
                (self.late if state == LATE else self.asks).append((position, k))


@dataclass(frozen=True)
class ScheduleState:
    """Where a candidate schedule stands, for a compiled engine path to go on from
    (sim/compiled_prefetch.py): its parameters as numbers and what it has learnt of the run."""

    mode: int  # index into PREFETCH_MODES
    lookahead: int  # layers
    min_ahead: int
    scan: int  # accesses read ahead at first (`_prefetches`)
    next_use: dict  # resident key -> its next use (a position; inf: none) as last set
    sent: np.ndarray  # per key index, the ask last sent (-1: none)
    stale: bool  # the view changed since the schedule last read it (`_refresh` is due)
    layer_s: float | None
    last_routed: tuple[int, float] | None


@register
class OraclePolicy(Policy):
    name = "oracle"
    is_oracle = True
    # `_prefetches` reads the plan's arrays in one compiled pass (`new_asks`) and skips the asks it
    # sent before that the cache cannot have dropped since; the same list as the plain way (False:
    # every first use read with numpy, each one's queue checked), kept as the tests' reference.
    remembers_asks = True

    def __init__(self, lookahead_layers: int | None = None, prefetch: str = "conservative",
                 min_ahead: int = 1, victims: str = "belady", ration: int | None = None,
                 spread: bool = False) -> None:
        super().__init__()
        if lookahead_layers is not None and lookahead_layers < 1:
            raise ConfigError(f"oracle lookahead_layers must be at least 1, got {lookahead_layers}")
        if prefetch not in PREFETCH_MODES:
            raise ConfigError(f"oracle prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}")
        if min_ahead < 1:
            raise ConfigError(f"oracle min_ahead must be at least 1, got {min_ahead}")
        if victims not in VICTIM_RULES:
            raise ConfigError(f"oracle victims must be one of {', '.join(VICTIM_RULES)}, got {victims!r}")
        if victims != "belady" and prefetch != "none":
            raise ConfigError(f"oracle victims={victims} goes with prefetch=none, got prefetch={prefetch!r}")
        self.params = {"lookahead_layers": lookahead_layers, "prefetch": prefetch, "min_ahead": min_ahead}
        if ration is not None and ration < 1:
            raise ConfigError(f"oracle ration must be at least 1, got {ration}")
        if victims != "belady":  # (only when set: the recorded parameters of other runs stay as they were)
            self.params["victims"] = victims
        if ration is not None:
            self.params["ration"] = ration
        if spread:
            self.params["spread"] = True
        self._ration, self._spread = ration, bool(spread)
        self._weighted = victims == "tpot"
        # The compiled engine path plays Belady's victims and the unrationed asks only.
        self._kernel_rule = not (self._weighted or ration is not None or spread)
        self._kept: tuple[int, np.ndarray] | None = None  # (view version, per access: kept from the previous)
        self._decodes: dict[int, int] = {}  # request id -> decode steps (its iterations less the first)
        self.planned_steps: list | None = None  # the whole future, when an earlier run supplied it
        self.observed_steps: list = []  # the steps this run took (each a tuple of Sequences)
        self.skip_asks: frozenset = frozenset()  # edits (module docstring): set before the run
        self.keep: frozenset = frozenset()
        self.add_asks: frozenset = frozenset()
        self.decisions: Decisions | None = None  # set to record them

    def bind(self, ctx) -> None:
        super().bind(ctx)
        if ctx.oracle is None:
            raise ConfigError("the oracle policy needs an engine that provides a view of the future")
        self.view = ctx.oracle
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.lookahead = self.params["lookahead_layers"] or self.L
        self._checks_time = self.params["prefetch"] == "conservative"  # a victim only if the copy lands in time
        self._deadline = self.params["prefetch"] == "deadline"  # asks only for copies that land in time
        self.pos = (0, -1)
        self.resident: set = set()
        self.next_use: dict = {}
        self._heap: list = []
        self._version = -1
        self._last_routed: tuple[int, float] | None = None  # (position, now_s)
        self._prefill_step = False
        self.layer_s: float | None = None  # shortest interval seen between consecutive routed layers
        self._asks: dict = {}  # (position x experts + expert) x 2 + boosted -> its Prefetch (immutable, so shared)
        self._res = np.zeros(self.L * self.J, dtype=bool)  # `resident` as a mask over keys (layer x J + expert)
        self._keys = [(layer, e) for layer in range(self.L) for e in range(self.J)]  # key index -> key
        self._epoch = 0  # bumped whenever a next use is set or a resident leaves: what the victim memo checks
        self._victim: tuple | None = None  # (epoch, evictable, victim, the pinned keys passed over)
        # Per key, the ask last sent (-1: none, or the cache may have dropped it since): a sent ask
        # stays queued, starts, or leaves the queue only when its layer passes (an ask for a later
        # use differs), its victim is refused (`choose_victim`), or the plan changes (`_refresh`);
        # an expert that landed is resident until `on_evicted`.
        self._sent = np.full(self.L * self.J, -1, dtype=np.int64)
        # Where the view is the engine's plan, and numba imports (`ration` and `spread` are rules of
        # the remembered asks, which `new_asks` keeps without numba too)
        self._compiled = isinstance(self.view, PlanView) and (
            (self.remembers_asks and numba is not None) or self._ration is not None or self._spread)
        self._out_pos = np.empty(self.L * self.J, dtype=np.int64)  # its output: at most one ask per key
        self._out_key = np.empty(self.L * self.J, dtype=np.int64)

    @property
    def plays_in_kernel(self) -> bool:
        """Whether sim/compiled_prefetch.py may play this run: it reads the plan the compiled way,
        has no edits and records no decisions."""
        return (self._compiled and self._kernel_rule and not (self.skip_asks or self.keep or self.add_asks)
                and self.decisions is None)

    def describe(self) -> dict:
        d = super().describe()
        evict = "time-per-token-weighted paging" if self._weighted else "Belady eviction"
        d["bound"] = f"clairvoyant schedule: {evict}, {self.params['prefetch']} prefetch"
        return d

    def state(self) -> ScheduleState:
        """A snapshot of this schedule's parameters and what it has learnt so far."""
        J = self.J
        return ScheduleState(
            mode=PREFETCH_MODES.index(self.params["prefetch"]), lookahead=self.lookahead,
            min_ahead=self.params["min_ahead"],
            scan=min(self.lookahead * J, max(self.L * J, 4 * self.ctx.capacity_slots)),
            next_use=dict(self.next_use), sent=self._sent.copy(), stale=self.view.version != self._version,
            layer_s=self.layer_s, last_routed=self._last_routed)

    # --- the future --------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.view.version != self._version:
            self._version = self.view.version
            self._heap = []
            self._sent[:] = -1
            self._epoch += 1
            for key in self.resident:
                self._set_next(key)

    def prepare(self, trace, measure) -> None:
        by_req = trace.iterations_by_request
        self._decodes = {rid: len(by_req.get(rid, ())) - 1 for rid in measure}

    def _set_next(self, key) -> None:
        nu = self.view.next_use(key, self.pos)
        if self._weighted and nu != INF and not self._kept_at(key, nu):
            nu += UNKEPT
        self.next_use[key] = nu
        heapq.heappush(self._heap, (-nu, key))
        self._epoch += 1

    def _kept_at(self, key, position: float) -> bool:
        """Whether the "tpot" schedule keeps `key` resident until its use at `position`."""
        view = self.view
        if self._kept is None or self._kept[0] != view.version:
            self._kept = (view.version, self._weighted_schedule())
        k = key[0] * self.J + key[1]
        starts, positions = view.per_key_positions()
        lo, hi = int(starts[k]), int(starts[k + 1])
        j = lo + int(np.searchsorted(positions[lo:hi], position))
        return bool(self._kept[1][view.per_key_indices()[j]])

    def _weighted_schedule(self) -> np.ndarray:
        """Per access of the view, whether the least-cost demand schedule keeps its expert from its
        previous access (sim/weighted_min.py), each load weighted by what its step adds to the mean
        time per output token, plus a little, so that of two schedules of equal cost the one with
        fewer loads wins."""
        from finemoe.sim.weighted_min import kept_intervals

        pos, prev, _ = self.view.access_arrays
        decodes = self._decodes
        steps, of_step = np.unique(pos // self.L, return_inverse=True)
        per_step = np.array([sum(1.0 / decodes[q.request_id] for q in self.view.step_sequences(step)
                                 if q.iteration > 0 and decodes.get(q.request_id, 0) > 0)
                             for step in steps.tolist()], dtype=float)
        w = per_step[of_step]
        positive = w[w > 0]
        w += (positive.min() if positive.size else 1.0) / (10.0 * (w.size + 1))
        return kept_intervals(pos, prev, w, self.ctx.capacity_slots)

    def _prefetches(self) -> list[Prefetch]:
        if self.add_asks:
            return self._with_added(self._rule_asks())
        return self._rule_asks()

    def _with_added(self, asks: list[Prefetch]) -> list[Prefetch]:
        """`asks` and the added ones (`add_asks`) whose use is in this step and still to come, whose
        expert is neither resident nor on the wire, and that the rule did not ask for already."""
        L = self.L
        here, step = self._here(), self.pos[0]
        pos, keys = [], []
        asked = {self._use_of(a) for a in asks}
        for p, k in sorted(self.add_asks):
            if here < p < (step + 1) * L and not self._res[k] and (p, k) not in asked:
                pos.append(p)
                keys.append(k)
        if not pos:
            return asks
        flag, boost = (1, BOOST) if self._prefill_step else (0, 0.0)
        return asks + self._asks_for(np.array(pos), np.array(keys), flag, boost)

    def _rule_asks(self) -> list[Prefetch]:
        """The candidate's own asks at this hook (its `prefetch` mode's rule, less `skip_asks`)."""
        if self.params["prefetch"] == "none":
            return []
        self._refresh()
        step, layer = self.pos
        L, J = self.L, self.J
        here = step * L + layer
        limit = here + self.lookahead
        # During a prefill (decode-first), every expert first needed by a later step ranks above the
        # step's own, which come by their demand loads.
        boosted = self._prefill_step
        nearest = max(here + self.params["min_ahead"], (step + 1) * L if boosted else 0)
        # Looking far ahead, no more accesses are read than a few cache-fulls (the rest could not land).
        scan = min(self.lookahead * J, max(L * J, 4 * self.ctx.capacity_slots))  # (`state` has it too)
        flag, boost = (1, BOOST) if boosted else (0, 0.0)
        if self._compiled:
            # Only the asks not sent already since the cache last had a reason to drop them (`_sent`):
            # the same list as the plain way below gives, read in one compiled pass.
            pos_a, prev, key_a = self.view.access_arrays
            free = self.ctx.capacity_slots - len(self.resident)
            deadline_layer_s = (self.layer_s or 0.0) if self._deadline else 0.0
            n = new_asks(pos_a, prev, key_a, here, scan, limit, nearest, free, self._res, self._sent, J, flag,
                          self.ctx.expert_load_s, deadline_layer_s, self._out_pos, self._out_key)
            if n == 0:
                return []
            if self._ration is not None:
                n = min(n, self._ration)  # the rest stay marked sent: passed over for these uses
            pos, keys = self._out_pos[:n], self._out_key[:n]
            if self._spread and n > 1:  # (likewise)
                first = np.concatenate(([True], pos[1:] != pos[:-1]))  # positions ascend
                pos, keys = pos[first], keys[first]
            return self._asks_for(pos, keys, flag, boost)
        pos, keys = self._first_uses(scan, limit)  # each expert asked for at its first use, in order
        lo, hi = int(pos.searchsorted(nearest)), int(pos.searchsorted(limit, "right"))
        if hi <= lo:
            return []
        pos, keys = pos[lo:hi], keys[lo:hi]
        absent = ~self._res[keys]
        pos, keys = pos[absent], keys[absent]
        if self._deadline and self.layer_s:
            pos, keys = self._on_time(pos, keys, here)
        return self._asks_for(pos, keys, flag, boost)

    def _on_time(self, pos: np.ndarray, keys: np.ndarray, here: int) -> tuple[np.ndarray, np.ndarray]:
        """The first uses (in order: earliest deadline first) whose copies can land in time if the link
        carries only the ones kept before them, one expert load each, the use estimated with the
        shortest layer time seen: a late copy would only delay the ones behind it on the wire, and
        its expert comes by its demand load anyway (the rule that maximises on-time jobs of equal
        length on one machine: earliest deadline first, late ones dropped)."""
        load_s, layer_s = self.ctx.expert_load_s, self.layer_s
        out, ahead = [], 0
        for i, p in enumerate(pos.tolist()):
            if (ahead + 1) * load_s <= (p - here) * layer_s:
                out.append(i)
                ahead += 1
        return pos[out], keys[out]

    def _asks_for(self, pos: np.ndarray, keys: np.ndarray, flag: int, boost: float) -> list[Prefetch]:
        """The prefetches for these first uses (positions, keys), less those on the wire or queued."""
        L, J = self.L, self.J
        in_flight, asks, key_of = self.ctx.is_in_flight, self._asks, self._keys
        queued = self.ctx.queued or _NOTHING_QUEUED
        out = []
        skip, record = self.skip_asks, self.decisions
        for p, k in zip(pos.tolist(), keys.tolist()):  # noqa: B905 (equal lengths)
            key = key_of[k]
            if in_flight(key) or (p, k) in skip:
                continue
            ask = (p * J + key[1]) * 2 + flag
            prefetch = asks.get(ask)
            if prefetch is None:  # asked again at every layer until it lands: made once
                prefetch = asks[ask] = Prefetch(float(-p) + boost, p // L, key[0], key[1])
            elif queued(key) is prefetch:
                continue  # still waiting in the queue: asking again would change nothing
            out.append(prefetch)
            if record is not None:
                record.asked(p, k)
        return out

    def _first_uses(self, scan: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and keys of each expert's first access among the next `scan` accesses, or,
        while the cache has free slots, among as many more (within the lookahead `limit`, a
        position) as it takes to see enough experts not resident to fill them: when a few experts
        repeat, a count of accesses reaches only those, and an expert needed far ahead (a later
        request's decode, say) costs nothing to bring into a free slot while the link is free.
        Past the warm-up the cache is full and this reads no further."""
        view, J = self.view, self.J
        pos, keys, count, last = view.first_use_arrays(self.pos, scan, J)
        free = self.ctx.capacity_slots - len(self.resident)
        if free <= 0:
            return pos, keys
        res = self._res
        while count == scan and last <= limit:
            if keys.size - int(np.count_nonzero(res[keys])) >= free:
                break
            scan *= 2
            pos, keys, count, last = view.first_use_arrays(self.pos, scan, J)
        return pos, keys

    # --- notifications -------------------------------------------------------------------------------
    def on_step_start(self, step):
        self.pos = (step.step, -1)
        self.observed_steps.append(step.sequences)
        self._prefill_step = self.params["prefetch"] == "decode-first" and any(q.is_prefill for q in step.sequences)
        return self._prefetches()

    def on_layer_routed(self, routing):
        self.pos = (routing.step.step, routing.layer)
        here = self._here()
        if self._last_routed is not None and self._last_routed[0] == here - 1:
            dt = routing.now_s - self._last_routed[1]
            self.layer_s = dt if self.layer_s is None else min(self.layer_s, dt)
        self._last_routed = (here, routing.now_s)
        if self.decisions is not None and here in self.decisions.pending:
            res, keys, in_flight = self._res, self._keys, self.ctx.is_in_flight
            self.decisions.settle(here, lambda k: IN_TIME if res[k] else LATE if in_flight(keys[k]) else 0)
        return self._prefetches()

    def on_access(self, layer, expert, hit, now_s) -> None:
        key = (layer, expert)
        if key in self.resident:
            self._set_next(key)
        elif self.decisions is not None and not self.ctx.is_in_flight(key):  # its on-demand load
            self.decisions.demands.append((self._here(), layer * self.J + expert))

    def on_loaded(self, key, now_s) -> None:
        self.resident.add(key)
        self._res[key[0] * self.J + key[1]] = True
        self._set_next(key)

    def on_evicted(self, key, now_s) -> None:
        self.resident.discard(key)
        self._res[key[0] * self.J + key[1]] = False
        self.next_use.pop(key, None)
        self._sent[key[0] * self.J + key[1]] = -1
        self._epoch += 1

    def choose_victim(self, evictable, for_prefetch, now_s):
        if self.keep:
            victim = self._choose_victim(self._keeping(evictable), for_prefetch)
            if victim is None and for_prefetch is None:
                victim = self._choose_victim(evictable, None)  # an on-demand load needs one
        else:
            victim = self._choose_victim(evictable, for_prefetch)
        if victim is None and for_prefetch is not None:  # the cache drops it: it may be asked for again
            self._sent[for_prefetch.layer * self.J + for_prefetch.expert] = -1
        if victim is not None and self.decisions is not None:
            self.decisions.victims.append((self._here(), victim[0] * self.J + victim[1]))
        return victim

    def _here(self) -> int:
        """Where the schedule stands, as a position (step x layers + layer)."""
        return self.pos[0] * self.L + self.pos[1]

    def _use_of(self, prefetch: Prefetch) -> tuple[int, int]:
        """The use an ask is for: (position, key index), as the edits name it."""
        return prefetch.step * self.L + prefetch.layer, prefetch.layer * self.J + prefetch.expert

    def _keeping(self, evictable):
        """`evictable`, less the experts an edit keeps at this position."""
        keep, J, here = self.keep, self.J, self._here()
        return lambda key: evictable(key) and (here, key[0] * J + key[1]) not in keep

    def _choose_victim(self, evictable, for_prefetch):
        self._refresh()
        victim = self._farthest(evictable)
        if victim is None:
            return None
        if for_prefetch is not None:
            if self.add_asks and self._use_of(for_prefetch) in self.add_asks:
                return victim  # an added ask is sent as the edit says: no check of its victim or time
            wanted = self.view.next_use(for_prefetch.key, self.pos)
            if self.next_use[victim] <= wanted:
                return None
            if not self._checks_time:
                return victim
            here = self._here()
            layers_ahead = for_prefetch.step * self.L + for_prefetch.layer - here
            time_left = layers_ahead * (self.layer_s or 0.0)
            if self.ctx.expert_load_s > time_left:
                return None
        return victim

    def _farthest(self, evictable):
        """The resident expert needed farthest ahead that `evictable` allows (None: none): the last
        scan's answer while it still holds, else a new scan. Until a next use is set or a resident
        leaves (`_epoch`) the heap's valid entries stay as they are, so the scan gives the same
        victim for as long as it is evictable and the pinned ones it passed over are not (a copy
        engine asks once per queued prefetch, and the oracle's queue holds dozens)."""
        memo = self._victim
        if (memo is not None and memo[0] == self._epoch and memo[1] is evictable
                and (memo[2] is None or evictable(memo[2])) and not any(map(evictable, memo[3]))):
            return memo[2]
        return self._scan_victim(evictable)

    def _scan_victim(self, evictable):
        """`_farthest` read from the heap (the plain version), remembered for the next ask."""
        heap, aside, victim = self._heap, [], None
        while heap:
            neg, key = heap[0]
            if self.next_use.get(key) != -neg or key not in self.resident:
                heapq.heappop(heap)  # stale entry
                continue
            if evictable(key):
                victim = key
                break
            aside.append(heapq.heappop(heap))
        for item in aside:
            heapq.heappush(heap, item)
        self._victim = (self._epoch, evictable, victim, tuple(key for _, key in aside))
        return victim


@jit
def ask_window(positions, previous, keys, i0, scan, limit, free, resident):
    """The end of the accesses `new_asks` reads, [i0, i1) of the plan's access arrays (i0: the
    first after where the schedule stands): `scan` of them, doubled while fewer than `free` of
    their first uses are not resident and the window ends within `limit` (`_first_uses`)."""
    total = positions.size
    while True:
        i1 = min(i0 + scan, total)
        if free <= 0 or i1 - i0 != scan or positions[i1 - 1] > limit:
            break
        absent = 0
        for i in range(i0, i1):
            if previous[i] < i0 and not resident[keys[i]]:
                absent += 1
                if absent >= free:
                    break  # (enough to fill the free slots: the count need go no further)
        if absent >= free:
            break
        scan *= 2
    return i1


@jit
def new_asks(positions, previous, keys, here, scan, limit, nearest, free, resident, sent, num_experts, flag,
              load_s, deadline_layer_s, out_pos, out_key):
    """`_first_uses` and the filter of `_prefetches` (remembering asks) in one pass over the plan's
    access arrays (`PlanView.access_arrays`): the first use of each expert among the `scan`
    accesses after position `here` (read on, doubling, while fewer than `free` of them are not
    resident and the window ends within `limit`), those at positions in [nearest, limit] whose
    expert is not resident (with `deadline_layer_s` > 0, only those `_on_time` keeps), and whose
    ask differs from `sent`, in order. Writes them to out_pos and out_key, marks them sent and
    returns how many there are."""
    i0 = np.searchsorted(positions, here, side="right")
    i1 = ask_window(positions, previous, keys, i0, scan, limit, free, resident)
    n = 0
    ahead = 0
    for i in range(i0, i1):
        p = positions[i]
        if p > limit:
            break
        if previous[i] >= i0 or p < nearest:
            continue
        k = keys[i]
        if resident[k]:
            continue
        if deadline_layer_s > 0.0:
            if (ahead + 1) * load_s > (p - here) * deadline_layer_s:
                continue  # late behind the ones kept before it
            ahead += 1
        ask = (p * num_experts + k % num_experts) * 2 + flag
        if sent[k] == ask:
            continue
        sent[k] = ask
        out_pos[n] = p
        out_key[n] = k
        n += 1
    return n
