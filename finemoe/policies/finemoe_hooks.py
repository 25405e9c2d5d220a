"""FineMoE's hooks for a run of planned steps, every step at once: what `FineMoE._hooks_of` returns
step by step (the reference, which calls the hooks themselves), as a few numpy passes.

In an offline run a sequence's predictions at each hook depend on its iteration alone: its semantic
match (the step's start: layers 0..d-1) or its trajectory match after layer l (layer l + d), both
read from `prepare`'s table. So every (step, hook, sequence, target) row is gathered from the store
at once, the delta rule is applied to all of them (`delta_prefix_rows`), and a step's several
sequences are merged as the hooks merge them: one ask per expert at its highest priority, ranked
as `ranked_prefetches` ranks them. Float operations are those of the reference in its order (a
sequential running sum, left-to-right search costs), so the results are bit for bit the same;
tests/test_policy_finemoe_hooks.py compares the two on random workloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.jit import jit

_CHUNK_ELEMENTS = 1 << 22  # predicted rows x experts sorted at a time (some 100 MB of temporaries)


@dataclass(frozen=True)
class HookGeometry:
    """What the hooks' arithmetic reads of a FineMoE: its model's shape and its parameters."""

    layers: int
    experts: int
    top_k: int
    distance: int
    semantic: bool
    trajectory: bool
    delta: bool
    search_s: float
    search_token_s: float


def delta_prefix_rows(values: np.ndarray, similarity: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """`expert_maps.delta_prefix` on each row of `values` [n, J] (non-negative): every row's experts
    by descending value (ties: lower id first) and how many of them it selects."""
    n, J = values.shape
    order = np.argsort(-values, axis=1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=1)
    cum = np.cumsum(ranked, axis=1)  # (sequential, as `accumulate` adds)
    total = cum[:, -1] if J else np.zeros(n)
    delta = np.minimum(np.maximum(1.0 - similarity, 0.0), 1.0)
    threshold = delta * total * (1.0 - 1e-9)
    reach = (cum < threshold[:, None]).sum(axis=1) + 1  # (`bisect_left` on a running sum)
    count = np.where(total <= 0.0, min(top_k, J), np.minimum(np.maximum(reach, top_k), J))
    return order, count


@dataclass(frozen=True)
class _Rows:
    """Every predicted row of the planned steps, sorted as the hooks record them: by step, hook,
    sequence, target layer."""

    step: np.ndarray
    hook: np.ndarray
    target: np.ndarray
    current: np.ndarray  # the layer just routed (-1: the step's start)
    map_index: np.ndarray  # the stored map the row is read from
    similarity: np.ndarray


def _predicted_rows(g: HookGeometry, step: np.ndarray, position: np.ndarray, sem_index: np.ndarray,
                    sem_sim: np.ndarray, best: np.ndarray, cosine: np.ndarray) -> _Rows:
    """The rows each planned sequence (its step, its place in the step, its iteration's matches)
    predicts: semantic ones at the step's start, then one per routed layer with a target ahead."""
    L, d = g.layers, g.distance
    parts = []  # (step, hook, position, target, current, map index, similarity)
    has_sem = sem_index >= 0
    if g.semantic:
        targets = np.arange(min(d, L))
        s, p = step[has_sem], position[has_sem]
        nt = len(targets)
        parts.append((np.repeat(s, nt), np.zeros(s.size * nt, np.int64), np.repeat(p, nt), np.tile(targets, s.size),
                      np.full(s.size * nt, -1), np.repeat(sem_index[has_sem], nt), np.repeat(sem_sim[has_sem], nt)))
    routed = np.arange(max(L - d, 0))  # layers whose target (l + d) is a layer of the model
    nl = len(routed)
    if nl:
        if g.trajectory:
            who = np.arange(step.size)
            index, sim = best[:, :nl].reshape(-1), cosine[:, :nl].reshape(-1)
        else:  # the semantic match serves the later layers too, with no search of its own
            who = np.flatnonzero(has_sem)
            index, sim = np.repeat(sem_index[who], nl), np.repeat(sem_sim[who], nl)
        layer = np.tile(routed, who.size)
        parts.append((np.repeat(step[who], nl), layer + 1, np.repeat(position[who], nl), layer + d, layer, index, sim))
    cols = [np.concatenate([part[c] for part in parts]) if parts else np.zeros(0, np.int64) for c in range(7)]
    order = np.lexsort((cols[3], cols[2], cols[1], cols[0]))
    s, h, _, target, current, index, sim = (c[order] for c in cols)
    return _Rows(s.astype(np.int64), h.astype(np.int64), target.astype(np.int64), current.astype(np.int64),
                 index.astype(np.int64), sim.astype(np.float64))


def _asks(g: HookGeometry, rows: _Rows, values: np.ndarray):
    """Each (step, hook)'s asks, ranked: the experts the delta rule selects of each row, at
    p / (target - current), one per expert at its highest priority, highest first (then the
    higher layer, then the higher expert)."""
    sim = rows.similarity if g.delta else np.ones_like(rows.similarity)
    which_parts, expert_parts = [], []
    chunk = max(1, _CHUNK_ELEMENTS // max(g.experts, 1))  # (a sort's temporaries, a chunk at a time)
    for lo in range(0, len(values), chunk):
        order, count = delta_prefix_rows(values[lo : lo + chunk], sim[lo : lo + chunk], g.top_k)
        chosen = np.arange(g.experts)[None, :] < count[:, None]
        which_parts.append(lo + np.nonzero(chosen)[0])
        expert_parts.append(order[chosen])
    which = np.concatenate(which_parts) if which_parts else np.zeros(0, np.int64)
    expert = np.concatenate(expert_parts) if expert_parts else np.zeros(0, np.int64)
    prio = values[which, expert] / (rows.target - rows.current)[which]
    group = rows.step[which] * (g.layers + 1) + rows.hook[which]  # (step, hook): rows are in its order
    ask = rows.target[which] * g.experts + expert  # (layer, expert)
    kept = ranked_asks(group, ask, prio)
    group, ask, prio = group[kept], ask[kept], prio[kept]
    return group // (g.layers + 1), group % (g.layers + 1), ask // g.experts, ask % g.experts, prio


def ranked_asks_reference(group: np.ndarray, ask: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """The asks kept, as indices in their final order: one per (group, ask) at its highest
    priority, then by group, priority (highest first), the higher ask. Two sorts of every ask."""
    per_group = int(ask.max()) + 1 if ask.size else 1
    key = group * per_group + ask
    first = np.lexsort((-prio, key))  # each ask's highest priority first
    keep = np.ones(key.size, bool)
    keep[1:] = np.diff(key[first]) != 0
    kept = first[keep]
    return kept[np.lexsort((-ask[kept], -prio[kept], group[kept]))]


def ranked_asks(group: np.ndarray, ask: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """`ranked_asks_reference` where the groups come in order (the rows' order): each group's few
    asks deduplicated and ordered in place (`_ranked_in_groups`), not every ask sorted twice (0.24
    of the paper-size hooks' 0.35 s). Equal priorities keep the same ask as the reference: the
    first of identical entries, which then differ in nothing."""
    if group.size and np.any(np.diff(group) < 0):
        return ranked_asks_reference(group, ask, prio)
    return _ranked_in_groups(np.ascontiguousarray(group, np.int64), np.ascontiguousarray(ask, np.int64),
                             np.ascontiguousarray(prio, np.float64))


@jit
def _ranked_in_groups(group, ask, prio):
    n = group.size
    kept = np.empty(n, np.int64)
    m = 0
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and group[hi] == group[lo]:
            hi += 1
        start = m
        for i in range(lo, hi):  # one per ask, at its highest priority (the first of equals)
            seen = False
            for j in range(start, m):
                if ask[kept[j]] == ask[i]:
                    if prio[i] > prio[kept[j]]:
                        kept[j] = i
                    seen = True
                    break
            if not seen:
                kept[m] = i
                m += 1
        for a in range(start + 1, m):  # by priority, then the higher ask (an insertion sort: a few)
            v = kept[a]
            b = a - 1
            while b >= start and (prio[v] > prio[kept[b]] or (prio[v] == prio[kept[b]] and ask[v] > ask[kept[b]])):
                kept[b + 1] = kept[b]
                b -= 1
            kept[b + 1] = v
        lo = hi
    return kept[:m]


def step_hooks(g: HookGeometry, steps: list, index_of: dict[int, int], sem_index: np.ndarray, sem_sim: np.ndarray,
               best: np.ndarray, cosine: np.ndarray, maps: np.ndarray, make):
    """Per step, `make(asks, layers, experts, priority, cost_s, searches, rows, row_target,
    row_values, planned)` of its hooks (`finemoe._StepHooks`), or None for a step with a sequence
    the table lacks (the reference searches it). `index_of`, `sem_index`..`cosine`: `prepare`'s
    table (`MapMatches`); `maps`: the store's maps [C, L, J]."""
    L1, J = g.layers + 1, g.experts
    step_of, position, iteration, tokens = [], [], [], []
    out: list = [None] * len(steps)
    planned_steps = []
    for s, seqs in enumerate(steps):
        found = [index_of.get(seq.start) for seq in seqs]
        if any(i is None for i in found):
            continue
        planned_steps.append(s)
        for p, (seq, i) in enumerate(zip(seqs, found, strict=True)):
            step_of.append(s)
            position.append(p)
            iteration.append(i)
            tokens.append(seq.stop - seq.start)
    if not planned_steps:
        return out
    step_a, pos_a = np.array(step_of, np.int64), np.array(position, np.int64)
    it, tok = np.array(iteration, np.int64), np.array(tokens, np.int64)
    si, ss = sem_index[it], sem_sim[it]
    rows = _predicted_rows(g, step_a, pos_a, si, ss, best[it], cosine[it])
    values = maps[rows.map_index, rows.target].astype(np.float64)
    a_step, a_hook, a_layer, a_expert, a_prio = _asks(g, rows, values)

    # The searches, one per sequence and hook, their costs added in the sequences' order.
    n = len(steps)
    cost = np.zeros(n * L1)
    count = np.zeros(n * L1, np.int64)
    planned = np.zeros(n, np.int64)
    nl = max(g.layers - g.distance, 0)
    for p in range(int(pos_a.max()) + 1):
        at = pos_a == p
        if g.semantic:
            sem = at & (si >= 0)
            cell = step_a[sem] * L1
            cost[cell] += g.search_s  # (one key searched: no further tokens to charge)
            count[cell] += 1
            planned += np.bincount(step_a[sem], minlength=n)
        if g.trajectory and nl:
            s = step_a[at]
            cell = (s[:, None] * L1 + 1 + np.arange(nl)[None, :]).reshape(-1)
            term = g.search_s + np.maximum(0, tok[at] - 1) * g.search_token_s
            cost[cell] += np.repeat(term, nl)
            count[cell] += 1
            planned += np.bincount(s, minlength=n) * nl

    asks_n = np.bincount(a_step * L1 + a_hook, minlength=n * L1).reshape(n, L1)
    rows_n = np.bincount(rows.step * L1 + rows.hook, minlength=n * L1).reshape(n, L1)
    a_hi, r_hi = np.cumsum(asks_n.sum(axis=1)), np.cumsum(rows_n.sum(axis=1))
    cost, count = cost.reshape(n, L1), count.reshape(n, L1)
    for s in planned_steps:
        a0, a1 = a_hi[s] - asks_n[s].sum(), a_hi[s]
        r0, r1 = r_hi[s] - rows_n[s].sum(), r_hi[s]
        out[s] = make(asks_n[s], a_layer[a0:a1], a_expert[a0:a1], a_prio[a0:a1], cost[s], count[s], rows_n[s],
                      rows.target[r0:r1], values[r0:r1].reshape(r1 - r0, J), int(planned[s]))
    return out
