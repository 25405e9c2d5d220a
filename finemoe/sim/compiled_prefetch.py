"""The engine's compiled path for prefetching policies whose asks depend on the routing alone
(layer-wise prefetch, Mixtral-Offloading, and ProMoE and MoE-Infinity in offline runs), with LRU or
LFU victims, and for the oracle's candidate schedules (policies/oracle.py: asks read from the plan
as the cache stands, Belady's victims with its refusals): the same times and counts as `SimEngine`
(sim/engine.py), which stays the reference.

Why this path exists: with a prefetch queue every layer's copies are SimPy events, and the
reference spends its time in that machinery (a process resumption, a `Transfer`, dict and heap
work per copy), not in the timing model: layer-wise prefetch ran at 0.02x on-demand LRU in the
paper-size study. Its rules are still few, and `run_prefetch_steps` plays them over flat arrays in
one numba call for the rest of a run:

- the compute runs ahead of the copy engines and looks at them only where the reference syncs
  SimPy's clock (`_sync`: every event due by the compute clock, in (time, order scheduled) order);
- a copy engine that lands a copy makes the expert resident, wakes a compute waiting for any
  landing (`_loaded`), then takes the next copy itself (on-demand loads first, then prefetches by
  descending priority, dropping those whose layer has passed or that find no victim) and hands
  more to sleeping engines (`_wake_at`);
- the compute, per layer: dense work, a sync, the accesses (`ExpertCache.access_layer`), the
  policy's asks queued (`add_prefetches`), the layer's experts pinned and computed, misses as they
  land, stalling on the first one on the wire (or on any landing when none is).

A policy joins by giving its asks for a list of planned steps as arrays (`planned_asks`, the
`PlannedAsks` of policies/asks.py); a property test shows they are what its `on_layer_routed`
returns, and tests/test_sim_compiled_prefetch.py that both engines give the same results, field
by field. The oracle's asks depend on the cache, so the kernel plays its hooks itself: at each
step start and routed layer the asks of `new_asks` (the function its Python side calls) over the
plan's arrays, read again only where they can have changed (`_changed_asks`), less those on the
wire or queued as the same ask; at each hit and landing the expert's next use; at each eviction
Belady's victim (`_farthest`), refused for a prefetch as `OraclePolicy.choose_victim` refuses it. It takes over at a step boundary once every request has arrived and the timeline's steps
are done, with the reference's queue, copies on the wire, pins and victim order as its start state.
"""

from __future__ import annotations

import numpy as np

from finemoe.jit import jit as _jit
from finemoe.jit import jit_borrowing as _borrowing
from finemoe.jit import numba
from finemoe.policies.asks import AskBuilder
from finemoe.policies.caches import LFUCounts
from finemoe.policies.oracle import BOOST, ask_window
from finemoe.sim.compiled import StepPlanner, load_order, victim, victim_order, wire_end
from finemoe.sim.costs import TICKS_PER_S

_S = 1.0 / TICKS_PER_S
UNPIN_ROOM = 1024  # the unpin queue's first size; it grows between steps (`roomier_unpins`)
warm = False  # the kernel has run in this process: numba is imported and its machine code loaded

# Per-key fields of the int64 `keys` table (row = field, column = layer * J + expert); the last
# three are the oracle's: the next use it last set, the ask it last sent, where `_next_use` reads.
RES, STAMP, PIN, FLIGHT, LEND, LORD, UNUSED, QSEQ, QSTEP, QLAYER, DEMAND, COUNT, NEXT_USE, SENT, USE_AT = range(15)
# ... and FineMoE's: its use count, last use (its own clock) and the step that last predicted the expert.
FM_FREQ, FM_LAST, FM_PROT = range(15, 18)
# ... and the oracle's again: which keys' asks may have changed since its last ones (a flag, and
# the list of those flagged, `_mark_changed`).
CHANGED, CHANGED_LIST = 18, 19
# ... and the residents as a list (the first N_RES entries of row RLIST, in no order; RPOS: a
# resident's place in it), so a victim is sought among the residents, not every key.
RLIST, RPOS = 20, 21
N_KEY_FIELDS = 22
# Scalars of the int64 `st` array (the last eleven the oracle's: where `_changed_asks` last read, its
# window's start and end, `nearest` and flag, the keys marked changed; `_farthest`'s remembered victim;
# the window start `_first_uses_at` last brought its list to, -1 before the first, and the list's head).
(N_RES, N_FLIGHT, N_QUEUED, WIRE_FREE, CLOCK, SLEEPING, ORDER, SEQ, POS_STEP, POS_LAYER, STALLED, WAITED_LOADED,
 LOADED_PENDING, LOADED_END, LOADED_ORD, HEAP_N, UNPIN_HEAD, UNPIN_TAIL, DQ_HEAD, DQ_TAIL, NOW, ONDEMAND, ISSUED,
 STARTED, IN_TIME, LATE, UNUSED_EVICTED, DROPPED, ERROR, USES_N, STALE, LAST_HERE, HAS_LAYER_S,
 FM_CLOCK, FM_STEP, FM_LAYER, TH_N, REL_N, FM_SEARCHES, FM_ABANDONED,
 ASKED, ASKED_I0, ASKED_END, ASKED_NEAREST, ASKED_FLAG, N_CHANGED, EPOCH, VICTIM_AT, VICTIM,
 FU_I0, FU_HEAD) = range(51)
N_STATE = 51
# Parameters of the int64 `par` array (the last six: the oracle's, `ORACLE` 0 for any other policy).
(CAPACITY, NUM_EXPERTS, BUSY_LATENCY, LATENCY, BUSY_WIRE, WIRE, MISS_TICKS, LFU, ORACLE, MODE, LOOKAHEAD, MIN_AHEAD,
 SCAN, NUM_LAYERS, FINEMOE, FM_CACHE, FM_CHARGE) = range(17)
# `fmc`, FineMoE's arrays (`_finemoe_state`): its p per key, the step of each layer's p, its
# floats (the search thread's busy seconds), the search thread's entries (start, end; searches),
# the pending release events (`ev`'s), and per group (s, h) its
# search seconds and count and the p rows it records.
(FM_P, FM_P_STEP, FM_F, TH_F, TH_I, REL, G_COST, G_COUNT, R_LO, R_HI, R_TARGET, R_ROWS, G_LO, G_HI, G_STEP, G_LAYERS,
 G_EXPERTS, G_PRIO, QPRIO) = range(19)  # (and the queue's priorities, `qprio`, which a release needs)
BUSY = 0  # in fmc[FM_F]
# `ev`, what the event path reads of FineMoE: the pending releases (tick, order, and the asks'
# slice lo, hi and step), its p per key, and the asks' arrays and the queue's priorities.
EV_REL, EV_P, EV_LAYERS, EV_EXPERTS, EV_PRIO, EV_QPRIO = range(6)
SCORE_PXF, SCORE_LRU, SCORE_LFU = range(3)  # `par[FM_CACHE]`: policies/finemoe.py's CACHES
# The oracle's float64 `fpar`: a copy's load time, the shortest layer interval seen, the last routing's time.
LOAD_S, LAYER_S, LAST_NOW = range(3)
# `par[MODE]`: the index into policies/oracle.py's PREFETCH_MODES.
NONE, CONSERVATIVE, AGGRESSIVE, DECODE_FIRST, DEADLINE = range(5)
NEVER = 1 << 62  # a next use that never comes (the oracle's inf)
SCANNED_KEYS = 1024  # up to this many keys the oracle's victim is found by a scan, not a heap (`_farthest`)
NO_ROUTING = -(1 << 62)  # `LAST_HERE` before the first routing
DEADLOCK, BLOCKED = 1, 2  # error codes: the reference raises there, or would wait for a pin's release
LANDED, LOADED, RELEASED = 1, 2, 3  # kinds of event `_next_event` handles


@_borrowing
def _heap_less(hf, hi, a, b):
    """Entry a before entry b: (-priority, step, layer, seq), the cache's heap order."""
    if hf[a] != hf[b]:
        return hf[a] < hf[b]
    for j in range(3):
        if hi[a, j] != hi[b, j]:
            return hi[a, j] < hi[b, j]
    return False


@_borrowing
def _heap_swap(hf, hi, a, b):
    hf[a], hf[b] = hf[b], hf[a]
    for j in range(4):
        hi[a, j], hi[b, j] = hi[b, j], hi[a, j]


@_borrowing
def _heap_up(hf, hi, i):
    while i > 0:
        parent = (i - 1) // 2
        if not _heap_less(hf, hi, i, parent):
            break
        _heap_swap(hf, hi, i, parent)
        i = parent


@_borrowing
def _heap_down(hf, hi, i, n):
    while True:
        small = i
        left, right = 2 * i + 1, 2 * i + 2
        if left < n and _heap_less(hf, hi, left, small):
            small = left
        if right < n and _heap_less(hf, hi, right, small):
            small = right
        if small == i:
            return
        _heap_swap(hf, hi, i, small)
        i = small


@_borrowing
def _heap_push(hf, hi, keys, st, negprio, step, layer, seq, key):
    """Push a prefetch; a full heap first drops its superseded entries (skipped when popped, so
    dropping them changes nothing), which leaves at most one entry per expert."""
    n = st[HEAP_N]
    if n == hf.shape[0]:
        m = 0
        for i in range(n):
            if keys[QSEQ, hi[i, 3]] == hi[i, 2]:
                hf[m] = hf[i]
                for j in range(4):
                    hi[m, j] = hi[i, j]
                m += 1
        n = m
        for i in range(n // 2 - 1, -1, -1):
            _heap_down(hf, hi, i, n)
    hf[n] = negprio
    hi[n, 0], hi[n, 1], hi[n, 2], hi[n, 3] = step, layer, seq, key
    _heap_up(hf, hi, n)
    st[HEAP_N] = n + 1


@_borrowing
def _heap_pop(hf, hi, st):
    """Remove the first entry, moved to index n (the old last slot), where the caller reads it."""
    n = st[HEAP_N] - 1
    _heap_swap(hf, hi, 0, n)
    _heap_down(hf, hi, 0, n)
    st[HEAP_N] = n
    return n


@_borrowing
def _apply_unpins(u_t, u_k, keys, st, now_s):
    """The pins due by `now_s` released (`ExpertCache._apply_unpins`)."""
    h, tail = st[UNPIN_HEAD], st[UNPIN_TAIL]
    while h < tail and u_t[h] <= now_s:
        keys[PIN, u_k[h]] -= 1
        h += 1
    st[EPOCH] += h - st[UNPIN_HEAD]  # (the oracle's victim may differ now)
    st[UNPIN_HEAD] = h


# --- the oracle's schedules (policies/oracle.py's `OraclePolicy`) ---------------------------------
# `orc` = (fpar, uses, starts, positions, fu): its floats, its heap of residents by next use (rows 0-1:
# next use and key; rows 2-3 room for the entries set aside while a victim is sought; row 4 a mark
# per key for `_uses_push`'s compaction), every key's access positions in the plan
# (`PlanView.per_key_positions`), and for the deadline rule, per access of the plan, the next first
# use in its list (row 0, -1: the last) and its key's next access (row 1, -1: none; `_first_uses_at`).


@_borrowing
def _here(st, par):
    """The position the schedule stands at: step x layers + layer."""
    return st[POS_STEP] * par[NUM_LAYERS] + st[POS_LAYER]


@_borrowing
def _next_use(keys, orc, key, here):
    """`PlanView.next_use`: the key's first access after `here` (NEVER: none). Positions only grow,
    so each key's read point (`USE_AT`) only moves forward."""
    starts, positions = orc[2], orc[3]
    i, end = keys[USE_AT, key], starts[key + 1]
    while i < end and positions[i] <= here:
        i += 1
    keys[USE_AT, key] = i
    return positions[i] if i < end else NEVER


@_borrowing
def _uses_before(uses, a, b):
    """Entry a before entry b: the later next use first, then the lower key (`(-next use, key)`)."""
    return uses[0, a] > uses[0, b] or (uses[0, a] == uses[0, b] and uses[1, a] < uses[1, b])


@_borrowing
def _uses_swap(uses, a, b):
    for r in range(2):
        uses[r, a], uses[r, b] = uses[r, b], uses[r, a]


@_borrowing
def _uses_down(uses, i, n):
    while True:
        first, left, right = i, 2 * i + 1, 2 * i + 2
        if left < n and _uses_before(uses, left, first):
            first = left
        if right < n and _uses_before(uses, right, first):
            first = right
        if first == i:
            return
        _uses_swap(uses, i, first)
        i = first


@_borrowing
def _uses_push(keys, st, uses, use, key):
    """Push (use, key); a full heap first keeps only its live entries (one per resident; row 4
    marks, per key, the ones kept, and is clear again after)."""
    n = st[USES_N]
    if n == uses.shape[1]:
        m = 0
        for i in range(n):
            k = uses[1, i]
            if keys[RES, k] and keys[NEXT_USE, k] == uses[0, i] and not uses[4, k]:
                uses[4, k] = 1
                uses[0, m], uses[1, m] = uses[0, i], k
                m += 1
        n = m
        for i in range(n):
            uses[4, uses[1, i]] = 0
        for i in range(n // 2 - 1, -1, -1):
            _uses_down(uses, i, n)
    uses[0, n], uses[1, n] = use, key
    st[USES_N] = n + 1
    while n > 0:
        parent = (n - 1) // 2
        if not _uses_before(uses, n, parent):
            break
        _uses_swap(uses, n, parent)
        n = parent


@_borrowing
def _uses_pop(uses, st):
    n = st[USES_N] - 1
    _uses_swap(uses, 0, n)
    _uses_down(uses, 0, n)
    st[USES_N] = n


@_borrowing
def _set_next(keys, st, par, orc, key):
    """`OraclePolicy._set_next`: the key's next use after where the schedule stands."""
    use = _next_use(keys, orc, key, _here(st, par))
    keys[NEXT_USE, key] = use
    st[EPOCH] += 1
    if keys.shape[1] > SCANNED_KEYS:  # (`_farthest` reads the heap)
        _uses_push(keys, st, orc[1], use, key)


@_borrowing
def _refresh(keys, st, par, orc):
    """`OraclePolicy._refresh`, where the view changed before the handover and the schedule has not
    read it since: every ask forgotten, every resident's next use read anew."""
    if st[STALE]:
        st[STALE] = 0
        st[ASKED] = 0  # every ask forgotten: the next are read in full
        keys[SENT, :] = -1
        st[USES_N] = 0
        st[EPOCH] += 1
        for k in range(keys.shape[1]):
            if keys[RES, k]:
                _set_next(keys, st, par, orc, k)


@_borrowing
def _farthest(keys, st, orc):
    """`OraclePolicy._farthest`: the unpinned resident needed farthest ahead (lowest key among
    equals), or -1. The answer depends on the residents, their next uses and pins alone, so it
    is the last one's until one of those changes (`EPOCH`): a copy engine asks once per queued
    prefetch, and the oracle's queue holds dozens. Up to `SCANNED_KEYS` keys it is read off the
    keys table, else from the heap of next uses (stale entries leave it, pinned ones go back): a
    scan of a few hundred keys costs less than the heap's pops and pushes of the pinned residents
    it passes over (most of a small cache is the layer being computed)."""
    if st[VICTIM_AT] == st[EPOCH]:
        return st[VICTIM]
    found = -1
    if keys.shape[1] <= SCANNED_KEYS:
        farthest = -1
        for r in range(st[N_RES]):
            k = keys[RLIST, r]
            if keys[PIN, k] == 0 and (keys[NEXT_USE, k] > farthest or (keys[NEXT_USE, k] == farthest and k < found)):
                farthest, found = keys[NEXT_USE, k], k
        st[VICTIM_AT], st[VICTIM] = st[EPOCH], found
        return found
    uses = orc[1]
    aside = 0
    while st[USES_N] > 0:
        use, k = uses[0, 0], uses[1, 0]
        live = keys[RES, k] and keys[NEXT_USE, k] == use
        if live and keys[PIN, k] == 0:
            found = k
            break
        _uses_pop(uses, st)
        if live:
            uses[2, aside], uses[3, aside] = use, k
            aside += 1
    for i in range(aside):
        _uses_push(keys, st, uses, uses[2, i], uses[3, i])
    st[VICTIM_AT], st[VICTIM] = st[EPOCH], found
    return found


@_borrowing
def _oracle_victim(keys, st, par, orc, pf_key, pf_step, pf_layer):
    """`OraclePolicy.choose_victim` for an on-demand load (pf_key -1) or a prefetch: Belady's victim;
    for a prefetch none unless the victim is needed later than the expert it brings and, for the
    conservative schedule, unless the copy lands in time at the shortest layer interval seen."""
    _refresh(keys, st, par, orc)
    here = _here(st, par)
    if pf_key >= 0 and par[MODE] == CONSERVATIVE:
        # Too late to land: refused whatever the victim (so no victim is sought; the answer of
        # `_farthest` depends on the residents alone, not on the heap's state it leaves).
        layer_s = orc[0][LAYER_S] if st[HAS_LAYER_S] else 0.0
        if orc[0][LOAD_S] > (pf_step * par[NUM_LAYERS] + pf_layer - here) * layer_s:
            _forget_ask(keys, st, pf_key)
            return -1
    found = _farthest(keys, st, orc)
    if found >= 0 and pf_key >= 0 and keys[NEXT_USE, found] <= _next_use(keys, orc, pf_key, here):
        found = -1
    if found < 0 and pf_key >= 0:
        _forget_ask(keys, st, pf_key)  # the cache drops it
    return found


@_borrowing
def _forget_ask(keys, st, key):
    """The ask last sent for the key is forgotten (the cache dropped it, or evicted the expert): it
    may be asked for again, so `_changed_asks` reads its first use again."""
    keys[SENT, key] = -1
    _mark_changed(keys, st, key)


@_borrowing
def _mark_changed(keys, st, key):
    """The key's ask may differ from the one last sent (its ask was forgotten, its expert evicted,
    or its next use passed): `_changed_asks` reads it again."""
    if not keys[CHANGED, key]:
        keys[CHANGED, key] = 1
        keys[CHANGED_LIST, st[N_CHANGED]] = key
        st[N_CHANGED] += 1


@_borrowing
def _ask_of(keys, positions, previous, key_a, i, i0, nearest, num_experts, flag, out_pos, out_key, n):
    """`new_asks`'s test of access i (no deadline rule): its expert's first use after the window's
    start, not nearer than `nearest`, not resident, an ask not sent already; marked sent and
    written as out[n] if so. Returns the new count."""
    p, k = positions[i], key_a[i]
    if previous[i] >= i0 or p < nearest or keys[RES, k]:
        return n
    ask = (p * num_experts + k % num_experts) * 2 + flag
    if keys[SENT, k] == ask:
        return n
    keys[SENT, k] = ask
    out_pos[n], out_key[n] = p, k
    return n + 1


@_borrowing
def _changed_asks(keys, st, orc, positions, previous, key_a, key_idx, here, scan, limit, nearest, free, num_experts,
                  flag, out_pos, out_key, scratch):
    """`new_asks` without the deadline rule, reading only the accesses whose answer can differ from
    its last call's: those the window has newly reached, and the first uses of the keys marked
    changed (`_mark_changed`; the keys accessed since are marked here). Every other access of
    the window was read last time and nothing it is tested on has moved: a first use stays one,
    `nearest` only grows (else the window is read in full), an expert becomes non-resident only
    by an eviction, and an ask sent stays so until it is forgotten. The same asks in the same
    order (tests/test_sim_compiled_prefetch.py against the reference engine)."""
    if st[ASKED]:
        i0 = st[ASKED_I0]
        while i0 < positions.size and positions[i0] <= here:
            _mark_changed(keys, st, key_a[i0])  # its next use has passed
            i0 += 1
    else:
        i0 = np.searchsorted(positions, here, side="right")
    i1 = ask_window(positions, previous, key_a, i0, scan, limit, free, keys[RES])
    end = i1
    if i1 > i0 and positions[i1 - 1] > limit:
        end = i0 + np.searchsorted(positions[i0:i1], limit, side="right")
    n = 0
    lo = i0
    if st[ASKED] and flag == st[ASKED_FLAG] and nearest >= st[ASKED_NEAREST]:
        read_to = min(end, st[ASKED_END])
        starts = orc[2]
        m = 0
        for c in range(st[N_CHANGED]):
            k = keys[CHANGED_LIST, c]
            _next_use(keys, orc, k, here)
            slot = keys[USE_AT, k]
            if slot < starts[k + 1] and key_idx[slot] < read_to:
                scratch[m] = key_idx[slot]
                m += 1
        for a in range(1, m):  # (a few: an insertion sort)
            v = scratch[a]
            b = a - 1
            while b >= 0 and scratch[b] > v:
                scratch[b + 1] = scratch[b]
                b -= 1
            scratch[b + 1] = v
        for c in range(m):
            n = _ask_of(keys, positions, previous, key_a, scratch[c], i0, nearest, num_experts, flag, out_pos,
                        out_key, n)
        lo = max(i0, st[ASKED_END])
    for c in range(st[N_CHANGED]):
        keys[CHANGED, keys[CHANGED_LIST, c]] = 0
    st[N_CHANGED] = 0
    for i in range(lo, end):
        n = _ask_of(keys, positions, previous, key_a, i, i0, nearest, num_experts, flag, out_pos, out_key, n)
    st[ASKED], st[ASKED_I0], st[ASKED_END], st[ASKED_NEAREST], st[ASKED_FLAG] = 1, i0, end, nearest, flag
    return n


@_borrowing
def _first_uses_at(st, fu, previous, i0):
    """Bring the list of first uses (the accesses x >= i0 whose key's previous access is before i0,
    ascending, linked through fu[0] from st[FU_HEAD]) to window start i0. Moving the start past
    access j takes j, the list's head, off it and puts its key's next access on (after the
    nearest first use before it, found by reading back from there): so the deadline rule reads a
    window's first uses, not every access in it. Built afresh by one pass where i0 is new or
    behind the list's."""
    if st[FU_I0] < 0 or i0 < st[FU_I0]:
        head, last = -1, -1
        for x in range(i0, previous.size):
            if previous[x] < i0:
                if last < 0:
                    head = x
                else:
                    fu[0, last] = x
                last = x
        if last >= 0:
            fu[0, last] = -1
        st[FU_HEAD], st[FU_I0] = head, i0
        return
    head = st[FU_HEAD]
    for j in range(st[FU_I0], i0):  # (j is the head: its previous access is before it)
        head = fu[0, j]
        nj = fu[1, j]
        if nj >= 0:  # a first use from window start j + 1 on
            pred = -1
            x = nj - 1
            while x > j:
                if previous[x] <= j:
                    pred = x
                    break
                x -= 1
            if pred < 0:
                fu[0, nj] = head
                head = nj
            else:
                fu[0, nj] = fu[0, pred]
                fu[0, pred] = nj
    st[FU_HEAD], st[FU_I0] = head, i0


@_borrowing
def _deadline_asks(keys, st, fu, positions, previous, key_a, here, scan, limit, nearest, free, num_experts, flag,
                   load_s, deadline_layer_s, out_pos, out_key):
    """`new_asks` (with its deadline rule) reading the window's first uses from their list
    (`_first_uses_at`) instead of every access in it: the same asks in the same order."""
    i0 = np.searchsorted(positions, here, side="right")
    i1 = ask_window(positions, previous, key_a, i0, scan, limit, free, keys[RES])
    _first_uses_at(st, fu, previous, i0)
    n = 0
    ahead = 0
    x = st[FU_HEAD]
    while x >= 0 and x < i1:
        p = positions[x]
        if p > limit:
            break
        k = key_a[x]
        if p >= nearest and not keys[RES, k]:
            late = False
            if deadline_layer_s > 0.0:
                if (ahead + 1) * load_s > (p - here) * deadline_layer_s:
                    late = True  # late behind the ones kept before it
                else:
                    ahead += 1
            if not late:
                ask = (p * num_experts + k % num_experts) * 2 + flag
                if keys[SENT, k] != ask:
                    keys[SENT, k] = ask
                    out_pos[n] = p
                    out_key[n] = k
                    n += 1
        x = fu[0, x]
    return n


@_borrowing
def _oracle_asks(keys, qprio, st, par, orc, view_pos, view_prev, view_key, view_idx, out_pos, out_key, scratch,
                 step, boosted):
    """`OraclePolicy._prefetches` where the schedule stands (`_changed_asks`; for the deadline rule,
    whose every ask hangs on those before it, `_deadline_asks`: what `new_asks`, the function its
    Python side calls, gives, read from the window's first uses), less
    those on the wire or queued as this very ask (`_asks_for`): written to out_pos/out_key, their
    count returned."""
    _refresh(keys, st, par, orc)
    L, J = par[NUM_LAYERS], par[NUM_EXPERTS]
    here = _here(st, par)
    nearest = here + par[MIN_AHEAD]
    if boosted and (step + 1) * L > nearest:
        nearest = (step + 1) * L
    flag, boost = (1, BOOST) if boosted else (0, 0.0)
    free = par[CAPACITY] - st[N_RES]
    if par[MODE] == DEADLINE:
        layer_s = orc[0][LAYER_S] if st[HAS_LAYER_S] else 0.0
        n = _deadline_asks(keys, st, orc[4], view_pos, view_prev, view_key, here, par[SCAN], here + par[LOOKAHEAD],
                           nearest, free, J, flag, orc[0][LOAD_S], layer_s, out_pos, out_key)
    else:
        n = _changed_asks(keys, st, orc, view_pos, view_prev, view_key, view_idx, here, par[SCAN],
                          here + par[LOOKAHEAD], nearest, free, J, flag, out_pos, out_key, scratch)
    m = 0
    for i in range(n):
        p, k = out_pos[i], out_key[i]
        if keys[FLIGHT, k]:
            continue
        if (keys[QSEQ, k] >= 0 and keys[QSTEP, k] * L + keys[QLAYER, k] == p
                and qprio[k] == float(-p) + boost):
            continue  # still waiting in the queue
        out_pos[m], out_key[m] = p, k
        m += 1
    return m


@_borrowing
def _evicted_before(score, last, k, best_score, best_last, best_k):
    """FineMoE's eviction order: (score, last use, key) below the best so far (none: best_k -1)."""
    if best_k < 0 or score < best_score:
        return True
    return score == best_score and (last < best_last or (last == best_last and k < best_k))


@_borrowing
def _finemoe_victim(keys, st, par, p, for_prefetch):
    """`FineMoE.choose_victim`: the evictable resident of lowest score (p x freq, last use or use
    count), then oldest use, then lowest key, among those not predicted this step for a layer not
    yet passed; for an on-demand load then among those too."""
    # This scan is most of a FineMoE run's kernel time: the protected ones are sought only when
    # no other will do, the score's kind, the protecting step and the first key of a layer not
    # yet passed (k // J >= layer for keys k >= 0, without a division) are read once, and the
    # keys table's rows are read as rows, so that the loop's values fit the registers.
    found = _finemoe_best(keys, st, par, p, False)
    if found >= 0 or for_prefetch:
        return found
    return _finemoe_best(keys, st, par, p, True)


@_borrowing
def _finemoe_best(keys, st, par, p, protected):
    """`_finemoe_victim`'s scan: the evictable resident of the kind asked (protected or not) first
    in FineMoE's eviction order (`_evicted_before`), or -1."""
    mode, step = par[FM_CACHE], st[FM_STEP]
    watch = step >= 0
    first_ahead = st[FM_LAYER] * par[NUM_EXPERTS]
    rlist, pin, freq, used, prot = keys[RLIST], keys[PIN], keys[FM_FREQ], keys[FM_LAST], keys[FM_PROT]
    best_k, best_score, best_last = -1, 0.0, 0
    for r in range(st[N_RES]):
        k = rlist[r]
        if pin[k]:
            continue
        if (watch and prot[k] == step and k >= first_ahead) != protected:
            continue
        last = used[k]
        if mode == SCORE_PXF:
            score = p[k] * float(freq[k])
        elif mode == SCORE_LRU:
            score = float(last)
        else:
            score = float(freq[k])
        if _evicted_before(score, last, k, best_score, best_last, best_k):
            best_k, best_score, best_last = k, score, last
    return best_k


@_borrowing
def _res_add(keys, st, key):
    n = st[N_RES]
    keys[RES, key], keys[RPOS, key], keys[RLIST, n] = 1, n, key
    st[N_RES] = n + 1


@_borrowing
def _res_remove(keys, st, key):
    n = st[N_RES] - 1
    i, last = keys[RPOS, key], keys[RLIST, n]
    keys[RLIST, i], keys[RPOS, last] = last, i
    keys[RES, key] = 0
    st[N_RES] = n


@_borrowing
def _evict(keys, st, par, orc, ev, pf_key, pf_step, pf_layer):
    """Evict the policy's victim for an on-demand load (pf_key -1) or a prefetch (sim/compiled.py's
    `victim`, the oracle's or FineMoE's; `_evict_for`); -1 when none."""
    if par[ORACLE]:
        best = _oracle_victim(keys, st, par, orc, pf_key, pf_step, pf_layer)
    elif par[FINEMOE]:
        best = _finemoe_victim(keys, st, par, ev[EV_P], pf_key >= 0)
    else:
        best = victim(keys[RES], keys[STAMP], keys[COUNT], keys[PIN], par[LFU])
    if best >= 0:
        _res_remove(keys, st, best)
        st[EPOCH] += 1
        if keys[UNUSED, best]:
            keys[UNUSED, best] = 0
            st[UNUSED_EVICTED] += 1
        if par[ORACLE]:
            _forget_ask(keys, st, best)  # `on_evicted`
    return best


@_borrowing
def _has_work(st):
    """`ExpertCache.has_work`: an on-demand load or a prefetch is queued."""
    return st[DQ_HEAD] < st[DQ_TAIL] or st[N_QUEUED] > 0


@_borrowing
def _next_transfer(keys, hf, hi, dq, u_t, u_k, st, par, orc, ev, now):
    """`ExpertCache.next_transfer` at tick `now`: the key of the copy started (its slot made), or -1."""
    _apply_unpins(u_t, u_k, keys, st, now * _S)
    if st[DQ_HEAD] < st[DQ_TAIL]:
        if st[N_RES] + st[N_FLIGHT] >= par[CAPACITY] and _evict(keys, st, par, orc, ev, -1, 0, 0) < 0:
            st[ERROR] = BLOCKED  # the reference's copy engine would wait for a pin's release
            return -1
        key = dq[st[DQ_HEAD]]
        st[DQ_HEAD] += 1
        keys[DEMAND, key] = 0
        keys[FLIGHT, key] = 1
        st[N_FLIGHT] += 1
        st[ONDEMAND] += 1
        return key
    while st[HEAP_N] > 0:
        i = _heap_pop(hf, hi, st)
        step, layer, seq, key = hi[i, 0], hi[i, 1], hi[i, 2], hi[i, 3]
        if keys[QSEQ, key] != seq:
            continue  # superseded by a later entry for the same expert
        keys[QSEQ, key] = -1
        st[N_QUEUED] -= 1
        if step < st[POS_STEP] or (step == st[POS_STEP] and layer <= st[POS_LAYER]):
            st[DROPPED] += 1
            continue
        if st[N_RES] + st[N_FLIGHT] >= par[CAPACITY] and _evict(keys, st, par, orc, ev, key, step, layer) < 0:
            st[DROPPED] += 1
            continue
        keys[FLIGHT, key] = 1
        st[N_FLIGHT] += 1
        st[STARTED] += 1
        keys[UNUSED, key] = 1
        return key
    return -1


@_borrowing
def _start(keys, fl, st, par, key, at, handed):
    """`SimEngine._reserve` for the copy of `key` starting at `at`, and its landing scheduled."""
    end = wire_end(at, handed, st[STALLED] != 0, st[WIRE_FREE], par[BUSY_LATENCY], par[LATENCY], par[BUSY_WIRE],
                   par[WIRE])
    st[WIRE_FREE] = end
    keys[LEND, key] = end
    keys[LORD, key] = st[ORDER]
    st[ORDER] += 1
    fl[st[N_FLIGHT] - 1] = key  # `_next_transfer` counted it in flight


@_borrowing
def _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t):
    """Hand queued copies to sleeping copy engines at tick `t` (`SimEngine._wake_at`)."""
    while st[SLEEPING] > 0 and _has_work(st):
        key = _next_transfer(keys, hf, hi, dq, u_t, u_k, st, par, orc, ev, t)
        if key < 0:
            return
        st[SLEEPING] -= 1
        _start(keys, fl, st, par, key, t, True)


@_borrowing
def _first_event(keys, fl, st, rel):
    """(time, order, index into fl, -1 for the `_loaded` event or -2 - r for release r) of the next
    event; time -1: none."""
    best_t, best_o, best_i = -1, -1, -1
    for i in range(st[N_FLIGHT]):
        key = fl[i]
        end, order = keys[LEND, key], keys[LORD, key]
        if best_t < 0 or end < best_t or (end == best_t and order < best_o):
            best_t, best_o, best_i = end, order, i
    if st[LOADED_PENDING]:
        end, order = st[LOADED_END], st[LOADED_ORD]
        if best_t < 0 or end < best_t or (end == best_t and order < best_o):
            best_t, best_o, best_i = end, order, -1
    for r in range(st[REL_N]):  # FineMoE's asks waiting for their search (`SimEngine._release`)
        if best_t < 0 or rel[0, r] < best_t or (rel[0, r] == best_t and rel[1, r] < best_o):
            best_t, best_o, best_i = rel[0, r], rel[1, r], -2 - r
    return best_t, best_o, best_i


@_borrowing
def _next_event(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev):
    """Handle the next event as SimPy would; returns (kind, key landed or -1), kind 0: none due."""
    now, _, i = _first_event(keys, fl, st, ev[EV_REL])
    if now < 0:
        return 0, -1
    st[NOW] = now
    if i <= -2:  # `_release`: the asks join the queue now (those whose layer has passed are dropped)
        rel = ev[EV_REL]
        r, n = -2 - i, st[REL_N] - 1
        lo, hi_, step = rel[2, r], rel[3, r], rel[4, r]
        for j in range(5):
            rel[j, r] = rel[j, n]
        st[REL_N] = n
        if _add_prefetches(keys, ev[EV_QPRIO], hf, hi, st, ev[EV_LAYERS], ev[EV_EXPERTS], ev[EV_PRIO], lo, hi_, step,
                           par[NUM_EXPERTS]):
            _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, now)
        return RELEASED, -1
    if i < 0:
        st[LOADED_PENDING] = 0
        return LOADED, -1
    key = fl[i]
    n = st[N_FLIGHT] - 1
    fl[i] = fl[n]
    st[N_FLIGHT] = n
    keys[FLIGHT, key] = 0
    _res_add(keys, st, key)  # `complete`: resident, last in LRU order
    st[CLOCK] += 1
    keys[STAMP, key] = st[CLOCK]
    if par[ORACLE]:
        _set_next(keys, st, par, orc, key)  # `on_loaded`
    elif par[FINEMOE]:
        st[FM_CLOCK] += 1  # `on_loaded`
        keys[FM_LAST, key] = st[FM_CLOCK]
    if st[WAITED_LOADED]:  # `_loaded.succeed()`: the first wakes the compute, later ones nobody
        if not st[LOADED_PENDING]:
            st[LOADED_PENDING] = 1
            st[LOADED_END] = now
            st[LOADED_ORD] = st[ORDER]
        st[ORDER] += 1
    nxt = _next_transfer(keys, hf, hi, dq, u_t, u_k, st, par, orc, ev, now)
    if nxt < 0:
        st[SLEEPING] += 1
    else:
        _start(keys, fl, st, par, nxt, now, False)
        if st[SLEEPING] > 0 and _has_work(st):
            _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, now)
    return LANDED, key


@_borrowing
def _sync(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t):
    """`SimEngine._sync(t)`: every event due by tick `t` (those it schedules by then too)."""
    while True:
        first, _, _ = _first_event(keys, fl, st, ev[EV_REL])
        if first < 0 or first > t:
            return
        _next_event(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev)


@_borrowing
def _add_prefetch(keys, qprio, hf, hi, st, step, layer, key, p):
    """One ask of `ExpertCache.add_prefetches` (expert `key` by `layer` of `step`, priority `p`);
    returns 1 when it is newly accepted, else 0. The caller adds its count to `ISSUED`."""
    if keys[RES, key] or keys[FLIGHT, key] or keys[DEMAND, key]:
        return 0
    if step < st[POS_STEP] or (step == st[POS_STEP] and layer <= st[POS_LAYER]):
        return 0
    accepted = 0
    if keys[QSEQ, key] >= 0:
        qs, ql = keys[QSTEP, key], keys[QLAYER, key]
        if (qs > st[POS_STEP] or (qs == st[POS_STEP] and ql > st[POS_LAYER])) and qprio[key] >= p:
            return 0
    else:
        accepted = 1
        st[N_QUEUED] += 1
    st[SEQ] += 1
    keys[QSEQ, key] = st[SEQ]
    keys[QSTEP, key] = step
    keys[QLAYER, key] = layer
    qprio[key] = p
    _heap_push(hf, hi, keys, st, -p, step, layer, st[SEQ], key)
    return accepted


@_borrowing
def _add_prefetches(keys, qprio, hf, hi, st, g_layers, g_experts, g_prio, lo, hi_, step, num_experts):
    """`ExpertCache.add_prefetches` for the asks [lo, hi_) of one group; returns how many were new."""
    accepted = 0
    for a in range(lo, hi_):
        layer = g_layers[a]
        accepted += _add_prefetch(keys, qprio, hf, hi, st, step, layer, layer * num_experts + g_experts[a], g_prio[a])
    st[ISSUED] += accepted
    return accepted


@_borrowing
def _add_oracle_asks(keys, qprio, hf, hi, st, par, out_pos, out_key, n, boost):
    """`ExpertCache.add_prefetches` for the oracle's n asks (`_oracle_asks`, priorities -position +
    `boost`); returns how many were new."""
    L, J = par[NUM_LAYERS], par[NUM_EXPERTS]
    accepted = 0
    for i in range(n):
        p, k = out_pos[i], out_key[i]
        accepted += _add_prefetch(keys, qprio, hf, hi, st, p // L, k // J, k, float(-p) + boost)
    st[ISSUED] += accepted
    return accepted


@_borrowing
def _compact_unpins(u_t, u_k, st):
    """The unpin queue's unreleased entries moved to its front, in order."""
    h, tail = st[UNPIN_HEAD], st[UNPIN_TAIL]
    for i in range(tail - h):
        u_t[i], u_k[i] = u_t[h + i], u_k[h + i]
    st[UNPIN_HEAD], st[UNPIN_TAIL] = 0, tail - h


def roomier_unpins(u_t: np.ndarray, u_k: np.ndarray, st: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
    """The unpin queue in arrays with `room` free entries past its tail, its entries at the front.
    The kernel returns to have them made (`run_prefetch_steps`' `resume`): an array it allocates
    and reassigns in its loop is reference-counted at every use (two atomic operations per expert
    computed, a tenth of a FineMoE run's time), and an array it is passed and never rebinds is not."""
    h, tail = int(st[UNPIN_HEAD]), int(st[UNPIN_TAIL])
    n = tail - h
    size = max(2 * u_t.shape[0], n + room)
    new_t, new_k = np.zeros(size, np.float64), np.zeros(size, np.int64)
    new_t[:n], new_k[:n] = u_t[h:tail], u_k[h:tail]
    st[UNPIN_HEAD], st[UNPIN_TAIL] = 0, n
    return new_t, new_k


@_borrowing
def _queue_unpin(u_t, u_k, st, at_s, key):
    """`ExpertCache.unpin(key, at_s)`: the release queued (the kernel made room for a step's)."""
    tail = st[UNPIN_TAIL]
    u_t[tail], u_k[tail] = at_s, key
    st[UNPIN_TAIL] = tail + 1


@_borrowing
def _abandon_unstarted(st, fmc, now_s):
    """`FineMoE._abandon_unstarted`: a step begins; the search thread drops the searches it has not
    started and keeps the last one it has."""
    th_f, th_i, busy = fmc[TH_F], fmc[TH_I], fmc[FM_F]
    keep = -1
    for i in range(st[TH_N]):
        if th_f[0, i] >= now_s:
            st[FM_ABANDONED] += th_i[i]
            busy[BUSY] -= th_f[1, i] - th_f[0, i]
        else:
            keep = i
    st[TH_N] = 0
    if keep >= 0:
        th_f[0, 0], th_f[1, 0], th_i[0] = th_f[0, keep], th_f[1, keep], th_i[keep]
        st[TH_N] = 1


@_borrowing
def _finemoe_hook(keys, st, par, fmc, s, h, step, now_s):
    """What `FineMoE.on_step_start` (h 0) or `on_layer_routed` (h = layer + 1) of planned step s
    does apart from queueing its asks: its p rows recorded (`_remember_p`), the experts it asks
    for protected in this step (`_offer`), its searches put on the search thread (`_searched`).
    Returns the tick from which its asks may join the queue (0: at once)."""
    J = par[NUM_EXPERTS]
    p, p_step, rows, targets = fmc[FM_P], fmc[FM_P_STEP], fmc[R_ROWS], fmc[R_TARGET]
    for r in range(fmc[R_LO][s, h], fmc[R_HI][s, h]):
        target = targets[r]
        if p_step[target] != step:
            for e in range(J):
                p[target * J + e] = rows[r, e]
            p_step[target] = step
        else:
            for e in range(J):
                if rows[r, e] > p[target * J + e]:
                    p[target * J + e] = rows[r, e]
    layers, experts = fmc[G_LAYERS], fmc[G_EXPERTS]
    for a in range(fmc[G_LO][s, h], fmc[G_HI][s, h]):
        keys[FM_PROT, layers[a] * J + experts[a]] = step
    cost = fmc[G_COST][s, h]
    st[FM_SEARCHES] += fmc[G_COUNT][s, h]
    busy = fmc[FM_F]
    busy[BUSY] += cost
    if not par[FM_CHARGE] or cost <= 0.0:
        return 0
    th_f, th_i = fmc[TH_F], fmc[TH_I]
    n = st[TH_N]
    start = now_s
    if n > 0 and th_f[1, n - 1] > start:
        start = th_f[1, n - 1]
    th_f[0, n], th_f[1, n], th_i[n] = start, start + cost, fmc[G_COUNT][s, h]
    st[TH_N] = n + 1
    return np.int64(np.rint((start + cost) * TICKS_PER_S))


@_borrowing
def _submit_finemoe(keys, qprio, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, fmc, s, h, at, t):
    """`SimEngine._submit` of a FineMoE hook's asks at compute tick t: queued now if their search
    is done by then, else by a release event at tick `at`."""
    lo, hi_ = fmc[G_LO][s, h], fmc[G_HI][s, h]
    if hi_ <= lo:
        return
    if at <= t:
        if _add_prefetches(keys, qprio, hf, hi, st, fmc[G_LAYERS], fmc[G_EXPERTS], fmc[G_PRIO], lo, hi_,
                           fmc[G_STEP][s, h], par[NUM_EXPERTS]):
            _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
        return
    rel, n = ev[EV_REL], st[REL_N]
    rel[0, n], rel[1, n], rel[2, n], rel[3, n], rel[4, n] = at, st[ORDER], lo, hi_, fmc[G_STEP][s, h]
    st[ORDER] += 1
    st[REL_N] = n + 1


@_jit
def run_prefetch_steps(rows, multi, sorted_experts, one_tick, multi_experts, multi_ticks, dense, first_step,
                       wants_step, g_lo, g_hi, g_step, g_layers, g_experts, g_prio, t, ends, keys, qprio, hf, hi, fl,
                       u_t, u_k, st, par, hits, misses, orc, view_pos, view_prev, view_key, view_idx, prefill,
                       fmc, s0):
    """The reference's general path over a fixed sequence of steps: step s is trace row `rows[s]`
    alone or, where rows[s] < 0, prepared step `multi[s]`; its asks at the step's start (hook 0)
    and after layer l's routing (hook l + 1) are a in [g_lo[s, h], g_hi[s, h]): expert g_experts[a]
    of layer g_layers[a] for step g_step[s, h], at priority g_prio[a]. With `par[ORACLE]` the asks
    and victims are instead the oracle's, from its plan (`orc`; view_* are `PlanView.access_arrays`
    and `per_key_indices`; `prefill[s]`: step s runs a prefill); with `par[FINEMOE]` the victims are FineMoE's and its
    asks wait for their search (`fmc`). Each step's end clock goes to `ends[s]`. Runs steps s0
    onwards; returns (clock, ticks stalled, the failing step or -1, the step to resume at once the
    unpin queue has room for a step's releases (`roomier_unpins`), or -1: done)."""
    num_layers = one_tick.shape[0]
    J = par[NUM_EXPERTS]
    room = max(J, one_tick.shape[1])
    dq = np.empty(room, np.int64)
    pending = np.empty(room, np.int64)
    pend_ticks = np.empty(room, np.int64)
    oracle = par[ORACLE] != 0
    finemoe = par[FINEMOE] != 0
    asks_oracle = oracle and par[MODE] != NONE
    out_pos = np.empty(keys.shape[1], np.int64)  # the oracle's asks: at most one per key
    out_key = np.empty(keys.shape[1], np.int64)
    scratch = np.empty(keys.shape[1], np.int64)
    fpar = orc[0]
    # What the event path reads of FineMoE (a release's asks, its p): a few arrays, not all of `fmc`.
    ev = (fmc[REL], fmc[FM_P], g_layers, g_experts, g_prio, qprio)
    stall = 0
    for s in range(s0, rows.shape[0]):
        step = first_step + s
        if rows[s] >= 0:
            experts, ticks = sorted_experts[rows[s]], one_tick
        else:
            experts, ticks = multi_experts[multi[s]], multi_ticks[multi[s]]
        width = experts.shape[1]
        if st[UNPIN_TAIL] + num_layers * width > u_t.shape[0]:  # room for the step's releases
            _compact_unpins(u_t, u_k, st)
            if st[UNPIN_TAIL] + num_layers * width > u_t.shape[0]:
                return t, stall, -1, s
        st[POS_STEP], st[POS_LAYER] = step, -1
        boosted = par[MODE] == DECODE_FIRST and prefill[s] != 0
        boost = BOOST if boosted else 0.0
        if wants_step:
            _sync(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
            if finemoe:  # `on_step_start`
                st[FM_STEP], st[FM_LAYER] = step, -1
                _abandon_unstarted(st, fmc, t * _S)
                at = _finemoe_hook(keys, st, par, fmc, s, 0, step, t * _S)
                _submit_finemoe(keys, qprio, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, fmc, s, 0, at, t)
            elif asks_oracle:
                n_asks = _oracle_asks(keys, qprio, st, par, orc, view_pos, view_prev, view_key, view_idx, out_pos,
                                      out_key, scratch, step, boosted)
                if n_asks and _add_oracle_asks(keys, qprio, hf, hi, st, par, out_pos, out_key, n_asks, boost):
                    _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
            elif g_hi[s, 0] > g_lo[s, 0] and _add_prefetches(keys, qprio, hf, hi, st, g_layers, g_experts, g_prio,
                                                             g_lo[s, 0], g_hi[s, 0], g_step[s, 0], J):
                _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
        for layer in range(num_layers):
            t += dense[s]
            _sync(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
            st[POS_LAYER] = layer
            n_asks = 0
            at = 0
            if finemoe:  # `on_layer_routed`, but the asks join the queue after the accesses
                st[FM_LAYER] = layer
                at = _finemoe_hook(keys, st, par, fmc, s, layer + 1, step, t * _S)
            if oracle:  # `on_layer_routed`: the shortest layer interval, then the asks
                here = step * num_layers + layer
                now_s = t * _S
                if st[LAST_HERE] == here - 1:
                    dt = now_s - fpar[LAST_NOW]
                    if not st[HAS_LAYER_S] or dt < fpar[LAYER_S]:
                        fpar[LAYER_S] = dt
                    st[HAS_LAYER_S] = 1
                st[LAST_HERE] = here
                fpar[LAST_NOW] = now_s
                if asks_oracle:
                    n_asks = _oracle_asks(keys, qprio, st, par, orc, view_pos, view_prev, view_key, view_idx,
                                          out_pos, out_key, scratch, step, boosted)
            # The accesses (`access_layer`), in expert order; the misses queue as on-demand loads.
            st[DQ_HEAD] = st[DQ_TAIL] = 0
            n = k = 0
            for i in range(width):
                e = experts[layer, i]
                if e < 0:
                    continue
                n += 1
                key = layer * J + e
                if finemoe:  # `on_access`, hit or miss
                    if layer > st[FM_LAYER]:
                        st[FM_LAYER] = layer
                    keys[FM_FREQ, key] += 1
                    st[FM_CLOCK] += 1
                    keys[FM_LAST, key] = st[FM_CLOCK]
                if par[LFU]:
                    keys[COUNT, key] += 1  # every access counts, kept across evictions
                if keys[RES, key]:
                    if keys[UNUSED, key]:
                        keys[UNUSED, key] = 0
                        st[IN_TIME] += 1
                    st[CLOCK] += 1  # a touch: last in LRU order (in LFU's, of its new count)
                    keys[STAMP, key] = st[CLOCK]
                    if oracle:
                        _set_next(keys, st, par, orc, key)  # `on_access` of a resident
                    continue
                if keys[UNUSED, key]:  # on the wire: a late prefetch
                    keys[UNUSED, key] = 0
                    st[LATE] += 1
                elif not keys[FLIGHT, key] and not keys[DEMAND, key]:
                    if keys[QSEQ, key] >= 0:  # queued, never started: late too
                        keys[QSEQ, key] = -1
                        st[N_QUEUED] -= 1
                        st[LATE] += 1
                    dq[st[DQ_TAIL]] = key
                    st[DQ_TAIL] += 1
                    keys[DEMAND, key] = 1
                pending[k] = key
                pend_ticks[k] = ticks[layer, i]
                k += 1
            hits[layer] += n - k
            misses[layer] += k
            h = layer + 1
            if finemoe:
                _submit_finemoe(keys, qprio, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, fmc, s, h, at, t)
            elif asks_oracle:
                if n_asks and _add_oracle_asks(keys, qprio, hf, hi, st, par, out_pos, out_key, n_asks, boost):
                    _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
            elif g_hi[s, h] > g_lo[s, h] and _add_prefetches(keys, qprio, hf, hi, st, g_layers, g_experts, g_prio,
                                                             g_lo[s, h], g_hi[s, h], g_step[s, h], J):
                _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
            if k == 0 and st[N_FLIGHT] == 0 and st[N_QUEUED] == 0 and st[REL_N] == 0:
                for i in range(width):  # nothing can happen on the link: back to back, no pins
                    if experts[layer, i] >= 0:
                        t += ticks[layer, i]
                continue
            for i in range(width):  # pin what the layer needs until it is computed
                if experts[layer, i] >= 0:
                    keys[PIN, layer * J + experts[layer, i]] += 1
            st[EPOCH] += 1
            if k > 0:
                _wake_at(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
                t += par[MISS_TICKS] * k
            for i in range(width):  # resident experts first, in expert order
                e = experts[layer, i]
                if e < 0:
                    continue
                key = layer * J + e
                missed = False
                for m in range(k):
                    if pending[m] == key:
                        missed = True
                if missed:
                    continue
                t += ticks[layer, i]
                _queue_unpin(u_t, u_k, st, t * _S, key)
            left = k  # `_await_misses`: pending[:left], in miss order
            while left > 0:
                _sync(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
                if st[ERROR]:
                    return t, stall, s, -1
                ready = 0
                for m in range(left):
                    if keys[RES, pending[m]]:
                        ready += 1
                if ready == 0:
                    first = -1
                    for m in range(left):
                        key = pending[m]
                        if keys[FLIGHT, key] and (first < 0 or keys[LEND, key] < keys[LEND, first]):
                            first = key
                    st[STALLED] = 1
                    if first >= 0:  # until its copy lands (its engine handles the landing first)
                        target = keys[LORD, first]
                        while True:
                            kind, landed = _next_event(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev)
                            if kind == 0 or st[ERROR]:
                                break
                            if kind == LANDED and landed == first and keys[LORD, first] == target:
                                break
                    else:  # until any copy lands
                        st[WAITED_LOADED] = 1
                        while True:
                            kind, landed = _next_event(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev)
                            if kind == 0 or kind == LOADED or st[ERROR]:
                                break
                        st[WAITED_LOADED] = 0
                    st[STALLED] = 0
                    if kind == 0:
                        st[ERROR] = DEADLOCK
                    if st[ERROR]:
                        return t, stall, s, -1
                    stall += st[NOW] - t
                    t = st[NOW]
                    continue
                m2 = 0
                for m in range(left):  # the ready ones in miss order; the rest stay pending
                    key = pending[m]
                    if keys[RES, key]:
                        t += pend_ticks[m]
                        _queue_unpin(u_t, u_k, st, t * _S, key)
                    else:
                        pending[m2] = key
                        pend_ticks[m2] = pend_ticks[m]
                        m2 += 1
                left = m2
        ends[s] = t
    _sync(keys, hf, hi, fl, dq, u_t, u_k, st, par, orc, ev, t)
    return t, stall, (rows.shape[0] - 1 if st[ERROR] else -1), -1


def _policies() -> tuple[type, ...]:
    """The policies whose asks `run_prefetch_steps` can plan (each has `planned_asks` and
    `plans_asks`): matched exactly, as a subclass may change any hook."""
    from finemoe.policies.layerwise import LayerwisePolicy
    from finemoe.policies.mixtral_offloading import MixtralOffloading
    from finemoe.policies.moe_infinity import MoEInfinity
    from finemoe.policies.promoe import ProMoE

    return (LayerwisePolicy, MixtralOffloading, ProMoE, MoEInfinity)


def _is_oracle(policy) -> bool:
    """Whether `policy` is one of the oracle's candidate schedules reading the engine's plan the
    compiled way (`OraclePolicy.remembers_asks`), unedited and recording nothing, which
    `run_prefetch_steps` plays itself."""
    from finemoe.policies.oracle import OraclePolicy

    return type(policy) is OraclePolicy and policy.plays_in_kernel


def _is_finemoe(policy) -> bool:
    """Whether `policy` is FineMoE or one of its registered variants (the same hooks)."""
    from finemoe.policies.finemoe import VARIANTS

    return type(policy) in VARIANTS


def supports(engine) -> bool:
    """Whether a `SimEngine` as built runs, once every request has arrived, only what
    `run_prefetch_steps` reproduces: a policy of `_policies` or FineMoE that can plan its asks for
    this run (offline: no finished request changes them) or an oracle schedule, no compute stretch, no CPU
    side, SSD tier or low precision, one shared pool, and slots for a layer's experts next to the
    copies on the wire (so no on-demand load ever waits for a pin's release, the one state the
    kernel does not play)."""
    policy, cache = engine.policy, engine.cache
    if numba is None:
        return False
    if _is_oracle(policy):
        planned = True
    elif type(policy) in _policies() or _is_finemoe(policy):
        planned = policy.plans_asks() and not (engine.online and engine._wants_finished)
    else:
        return False
    return (planned and engine.fast_path and engine.slowdown == 1.0 and not engine._cpu_exec
            and cache.layer_capacity is None and cache.capacity >= engine.J + engine.copy_engines)


class CompiledPrefetchSteps:
    """The rest of a `SimEngine._compute` run of a policy `supports` accepts, from a step boundary
    once every request has arrived: the reference's cache, copies on the wire and the policy's
    victim order become the kernel's arrays, the planned steps and the policy's asks for them run in one
    `run_prefetch_steps` call, and the recorder gets its counts."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.planner = StepPlanner(engine)
        self.oracle = _is_oracle(engine.policy)
        self.finemoe = _is_finemoe(engine.policy)

    def can_take_over(self, t: int) -> bool:
        """At this step boundary (compute clock `t`): every request arrived, no prediction waiting
        for its time, every engine awake or plainly asleep, and no copy on the wire that the
        timeline still records."""
        eng = self.engine
        last = eng.batcher.last_arrival()
        if (last is not None and last > t) or eng._releases or eng.cache.blocked or not all(w[1] for w in eng._sleeping):
            return False
        if self.oracle and not eng._scripted and eng.batcher.arrived_count(t) != eng._planned_known:
            return False  # the oracle's plan is rebuilt at the next step's start, with the last arrivals
        timeline = eng.rec.timeline_steps
        return all(tr is None or tr.prefetch is None or tr.prefetch.step >= timeline
                   for tr in eng.cache.in_flight.values())

    def _state(self, t: int):
        """The kernel's arrays from the reference's state at a step boundary."""
        eng = self.engine
        cache, J = eng.cache, eng.J
        n = eng.L * J
        keys = np.zeros((N_KEY_FIELDS, n), np.int64)
        keys[QSEQ] = -1
        qprio = np.zeros(n, np.float64)
        st = np.zeros(N_STATE, np.int64)
        lfu = False
        if not (self.oracle or self.finemoe):  # (theirs are their own: `_oracle_state`, `_finemoe_state`)
            order = victim_order(eng.policy)
            lfu = isinstance(order, LFUCounts)
            st[CLOCK] = load_order(order, J, keys[STAMP], keys[COUNT])
        for layer, e in cache.resident:
            _res_add(keys, st, layer * J + e)
        for (layer, e), count in cache.pinned.items():
            keys[PIN, layer * J + e] = count
        for layer, e in cache.unused_prefetches:
            keys[UNUSED, layer * J + e] = 1
        fl = np.zeros(eng.copy_engines, np.int64)
        for i, ((layer, e), (end, _)) in enumerate(eng._arriving.items()):  # in the order SimPy scheduled them
            key = layer * J + e
            keys[FLIGHT, key], keys[LEND, key], keys[LORD, key] = 1, end, i
            fl[i] = key
        st[N_FLIGHT] = len(eng._arriving)
        st[ORDER] = len(eng._arriving)
        hf = np.zeros(2 * n + J + 8, np.float64)
        hi = np.zeros((hf.shape[0], 4), np.int64)
        entries = cache.queued_entries()
        for i, (p, seq) in enumerate(entries):
            key = p.layer * J + p.expert
            keys[QSEQ, key], keys[QSTEP, key], keys[QLAYER, key] = seq, p.step, p.layer
            qprio[key] = p.priority
            hf[i] = -p.priority
            hi[i] = (p.step, p.layer, seq, key)
        st[HEAP_N] = len(entries)
        for i in range(len(entries) // 2 - 1, -1, -1):
            _heap_down(hf, hi, i, len(entries))
        st[N_QUEUED] = len(entries)
        st[SEQ] = cache.queue_seq
        unpins = cache.pending_unpins()
        u_t = np.zeros(max(UNPIN_ROOM, 2 * len(unpins)), np.float64)
        u_k = np.zeros(u_t.shape[0], np.int64)
        for i, (at_s, (layer, e)) in enumerate(unpins):
            u_t[i], u_k[i] = at_s, layer * J + e
        st[UNPIN_TAIL] = len(unpins)
        st[WIRE_FREE] = eng._wire_free
        st[SLEEPING] = len(eng._sleeping)
        st[POS_STEP], st[POS_LAYER] = cache.position
        par = np.array([cache.capacity, J, eng.busy_latency_ticks, eng.latency_ticks, eng.busy_wire_ticks,
                        eng.wire_ticks, eng.miss_ticks, lfu, 0, 0, 0, 0, 0, eng.L, 0, 0, 0], np.int64)
        orc = self._oracle_state(keys, st, par)
        return keys, qprio, hf, hi, fl, u_t, u_k, st, par, orc

    def _oracle_state(self, keys: np.ndarray, st: np.ndarray, par: np.ndarray):
        """The oracle's part of the kernel's state (`orc`, its next uses, asks sent and what it saw
        of the layer times, into keys/st/par): an empty stand-in for any other policy."""
        eng = self.engine
        fpar = np.zeros(3, np.float64)
        if not self.oracle:
            return (fpar, np.zeros((5, 1), np.int64), np.zeros(keys.shape[1] + 1, np.int64), np.zeros(0, np.int64),
                    np.zeros((2, 0), np.int64))
        sched = eng.policy.state()
        J = eng.J
        par[ORACLE], par[MODE], par[LOOKAHEAD], par[MIN_AHEAD], par[SCAN] = (
            1, sched.mode, sched.lookahead, sched.min_ahead, sched.scan)
        fpar[LOAD_S] = eng.policy.ctx.expert_load_s
        if sched.layer_s is not None:
            fpar[LAYER_S], st[HAS_LAYER_S] = sched.layer_s, 1
        st[LAST_HERE], fpar[LAST_NOW] = sched.last_routed if sched.last_routed is not None else (NO_ROUTING, 0.0)
        st[STALE] = sched.stale
        st[EPOCH] = 1  # (no victim remembered yet)
        keys[SENT] = sched.sent
        starts, positions = eng.oracle.per_key_positions()
        keys[USE_AT] = starts[:-1]
        heap = keys.shape[1] > SCANNED_KEYS  # (kept only where `_farthest` reads it)
        uses = np.zeros((5, 2 * keys.shape[1] + 16 if heap else 1), np.int64)
        for (layer, e), use in sched.next_use.items():
            key = layer * J + e
            keys[NEXT_USE, key] = NEVER if use == float("inf") else int(use)
            if heap:
                uses[0, st[USES_N]], uses[1, st[USES_N]] = keys[NEXT_USE, key], key
                st[USES_N] += 1
        for i in range(st[USES_N] // 2 - 1, -1, -1):
            _uses_down(uses, i, st[USES_N])
        st[FU_I0] = -1
        fu = np.zeros((2, 0), np.int64)
        if sched.mode == DEADLINE:
            _, previous, _ = eng.oracle.access_arrays
            fu = np.empty((2, previous.size), np.int64)
            fu[1] = -1
            has = np.flatnonzero(previous >= 0)
            fu[1, previous[has]] = has  # each access's key's next access
        return fpar, uses, starts, positions, fu

    def _finemoe_state(self, keys: np.ndarray, st: np.ndarray, par: np.ndarray, qprio: np.ndarray, asks, hooks):
        """FineMoE's part of the kernel's state (`fmc`; its counters into keys/st/par), from where
        the policy stands and its planned hooks: a stand-in for any other policy."""
        eng = self.engine
        L1 = eng.L + 1
        n = keys.shape[1]
        if hooks is None:
            one = np.zeros((1, L1), np.int64)
            return (np.zeros(n), np.zeros(eng.L, np.int64), np.zeros(1), np.zeros((2, 1)), np.zeros(1, np.int64),
                    np.zeros((5, 1), np.int64), np.zeros((1, L1)), one, one, one, np.zeros(0, np.int64),
                    np.zeros((0, eng.J)), asks.lo, asks.hi, asks.step, asks.layers, asks.experts, asks.priority, qprio)
        fm = eng.policy.state()
        par[FINEMOE], par[FM_CACHE], par[FM_CHARGE] = 1, fm["cache"], fm["charged"]
        keys[FM_FREQ] = fm["freq"].reshape(-1)  # (exact small integers, as floats there)
        keys[FM_LAST] = fm["last"].reshape(-1)
        keys[FM_PROT] = fm["prot_step"].reshape(-1)
        st[FM_CLOCK], st[FM_STEP], st[FM_LAYER] = fm["clock"], fm["step"], fm["layer"]
        searches = fm["searches"]
        th_f = np.zeros((2, max(len(searches), 1) + L1))
        th_i = np.zeros(th_f.shape[1], np.int64)
        for i, (start, end, count) in enumerate(searches):
            th_f[0, i], th_f[1, i], th_i[i] = start, end, count
        st[TH_N] = len(searches)
        busy = np.array([eng.policy.search_busy_s])
        groups = asks.lo.shape[0] * L1
        return (fm["p"].reshape(-1).astype(np.float64), fm["p_step"].astype(np.int64), busy, th_f, th_i,
                np.zeros((5, groups + 1), np.int64), hooks.cost_s, hooks.searches, hooks.row_lo, hooks.row_hi,
                hooks.row_target, hooks.rows, asks.lo, asks.hi, asks.step, asks.layers, asks.experts, asks.priority,
                qprio)

    def run(self, t: int, stall: int, first_seen: set[int]) -> tuple[int, int]:
        """Every remaining step from compute clock `t`; returns the clock at the end and the stall
        ticks so far, with the recorder's counts and the engine's step brought up to date. The
        reference's queues are emptied: what was on them is the kernel's now."""
        global warm
        warm = True
        eng = self.engine
        keys, qprio, hf, hi, fl, u_t, u_k, st, par, orc = self._state(t)
        eng.cache.abandon_queues()
        planner = self.planner
        steps, rows, multi, dense, tokens, multi_experts, multi_ticks = planner.plan(t)
        seqs_of = [seqs for seqs, _ in steps]
        hooks = None
        view_pos = view_prev = view_key = view_idx = np.zeros(0, np.int64)
        if self.oracle:  # its asks come from its plan as the kernel goes
            asks = AskBuilder(len(steps), eng.L, eng.step).build(wants_step=True)  # none planned
            view_pos, view_prev, view_key = eng.oracle.access_arrays
            view_idx = eng.oracle.per_key_indices()
            eng.policy.observed_steps.extend(seqs_of)
        elif self.finemoe:  # its asks and p rows planned; when its searches end, the kernel's
            hooks = eng.policy.planned_hooks(eng.trace, seqs_of, eng.step)
            asks = hooks.asks
        else:
            asks = eng.policy.planned_asks(eng.trace, seqs_of, eng.step)
        fmc = self._finemoe_state(keys, st, par, qprio, asks, hooks)
        prefill = planner.planned.prefill
        rec = eng.rec
        hits = np.array(rec.hits, np.int64)
        misses = np.array(rec.misses, np.int64)
        ends = np.zeros(len(steps), np.int64)
        waited, resume = 0, 0
        while resume >= 0:
            t, more, failed, resume = run_prefetch_steps(
                rows, multi, planner.rows(), planner.one_tick, multi_experts, multi_ticks, dense, eng.step,
                asks.wants_step, asks.lo, asks.hi, asks.step, asks.layers, asks.experts, asks.priority, t, ends,
                keys, qprio, hf, hi, fl, u_t, u_k, st, par, hits, misses, orc, view_pos, view_prev, view_key,
                view_idx, prefill, fmc, resume)
            waited += more
            if resume >= 0:
                u_t, u_k = roomier_unpins(u_t, u_k, st, eng.L * max(multi_experts.shape[2], planner.rows().shape[2]))
        rec.hits = [int(h) for h in hits]
        rec.misses = [int(m) for m in misses]
        rec.ondemand_loads += int(st[ONDEMAND])
        rec.prefetch_issued += int(st[ISSUED])
        rec.prefetch_started += int(st[STARTED])
        rec.prefetch_in_time += int(st[IN_TIME])
        rec.prefetch_late += int(st[LATE])
        rec.prefetch_unused_evicted += int(st[UNUSED_EVICTED])
        rec.prefetch_dropped += int(st[DROPPED])
        rec.bytes_h2d += int(st[ONDEMAND] + st[STARTED]) * eng.cache.bytes_per_expert
        planner.record(steps, tokens, ends, len(steps) if failed < 0 else failed, first_seen)
        if hooks is not None:  # what FineMoE's stats count
            pol = eng.policy
            pol.searches += int(st[FM_SEARCHES])
            pol.searches_abandoned += int(st[FM_ABANDONED])
            pol.search_busy_s = float(fmc[FM_F][BUSY])
            pol.searches_planned += hooks.planned
        if failed >= 0:
            self._raise(int(st[ERROR]))
        return t, stall + waited

    def _raise(self, error: int):
        from finemoe.sim.engine import DeadlockError

        name = self.engine.policy.name
        if error == BLOCKED:
            raise RuntimeError(f"policy {name}: an on-demand load waited for a pin's release on the compiled path, "
                               "which its conditions exclude (a bug)")
        raise DeadlockError(f"simulation stalled at step {self.engine.step}: an expert it waits for can never arrive")
