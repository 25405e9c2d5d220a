"""`cost-aware` (ours): prefetch only when it pays, evict the expert whose next use is farthest.

The rule, per (layer l, expert e), with rates learned from the history split and kept learning online
(per layer and expert: r = P(used | used by the previous token), c = P(used | not used by it); per
layer: how the chance of use changes with the tokens since the last use, in buckets 2, 3-4, ..., 33+;
pooled over all: the chance of use by tokens since the last use x uses so far in the request;
a prefill's prompt tokens count one by one, in order, as they do when the history is read):
- p(l, e), the chance it is used at layer l's next visit: the mean of two forecasts, r if the last
  token used it, else c scaled by its recency bucket, and the pooled table's cell (batch:
  1 - prod(1 - p_i)); for layer l + 1, the speculative gate's pick when the trace has it.
- Eviction: the resident with the largest expected time to next use, in layers, were each visit
  of its layer to use it with chance p: d0 + (1 - p) / p * L, d0 the layers until layer l comes
  round again (ties: least recently used).
- Prefetch of (l, e) for this step, l within `horizon` layers: issued only when
  p x (the stall it avoids: the load time, less how late it would land by the policy's view of the
  link's queue and of the time per layer) x the link's free share (1 - rho) exceeds
  (1 - p) x load time x rho (rho: the share of time the link spends copying, on-demand loads and
  prefetches both) + the part of the victim's reload, at its chance p_v of use, that cannot hide in
  the link's free time.
- How eagerly to prefetch is chosen by the clock (policies/throttle.py): epochs of a few decode
  steps run the gate, every prediction with p >= 0.5, or no prefetching, and the mode with the
  lowest measured time per token runs, the others retried at growing intervals. The gate's costs
  are estimates; which regime a trace and a machine are in (a link already saturated by on-demand
  loads, or idle enough that eager prefetching pays) is measured.
Ablations (params, and registered variants): prefetch off, the gate off (prefetch whenever p >= 0.5),
the gate always (no choice of mode), no pooled table, recency off (p is the plain usage rate), LRU
eviction, no history (online rates only), no spec gate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from finemoe.policies.base import ExpertKey, LayerRouting, Policy, PolicyContext, Prefetch, StepInfo
from finemoe.policies.registry import register
from finemoe.policies.throttle import PrefetchThrottle

EVICTIONS = ("next-use", "lru")
MODES = ("gated", "eager", "off")  # the throttle's order of first tries
# Recency buckets of "tokens since the expert was last used at this layer": 1, 2, 3-4, 5-8, 9-16,
# 17-32, more (on the Qwen3 log, 17-32 tokens back is 2-3x as likely to be used as 33-64).
GAP_EDGES = np.array([1, 2, 4, 8, 16, 32])
# The pooled table's, crossed with uses so far: 1, 2, 3-4, 5-8, 9-16, more (its cells split 17-32
# from the rest made Qwen3 at 3072 slots 0.6% slower).
TABLE_GAP_EDGES = np.array([1, 2, 4, 8, 16])
# Uses of the expert at this layer so far in the request: 0, 1, 2-3, 4-7, 8 or more.
COUNT_EDGES = np.array([0, 1, 3, 7])
NEVER = 10**9


def gap_bucket(since: np.ndarray) -> np.ndarray:
    """Bucket index (0..6) of each tokens-since-last-use count."""
    return np.searchsorted(GAP_EDGES, since, side="left")


def table_gap_bucket(since: np.ndarray) -> np.ndarray:
    """The pooled table's bucket index (0..5) of each tokens-since-last-use count."""
    return np.searchsorted(TABLE_GAP_EDGES, since, side="left")


def count_bucket(count: np.ndarray) -> np.ndarray:
    """Bucket index (0..4) of each uses-so-far count."""
    return np.searchsorted(COUNT_EDGES, count, side="left")


def one_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [..., J] from expert ids [..., K] (missing ids, -1, set nothing)."""
    out = np.zeros((*experts.shape[:-1], num_experts + 1), dtype=bool)
    idx = np.where(experts >= 0, experts, num_experts).astype(np.int64)
    np.put_along_axis(out, idx, True, axis=-1)
    return out[..., :num_experts]


class ReuseRates:
    """Counts behind r and c per (layer, expert), over consecutive tokens of the same request.

    Each per-expert rate is shrunk toward its layer's pooled rate (empirical Bayes: a prior worth
    `prior_tokens` tokens at the rate the layer's experts share): an expert seen once or never is
    expected to behave like its layer's average, not like a flat K/J, which made a freshly used
    expert look unlikely to be reused and put it first in line for eviction.

    Beside them, one table pooled over every layer and expert: the chance of use given the tokens
    since the last use and the uses so far in the request (`table_p`). The per-expert rates know
    which experts are popular but learn slowly (one count per token per expert); the table knows
    how recency and repetition within a request predict reuse and fills in a few tokens."""

    def __init__(self, L: int, J: int, K: int, prior_tokens: float = 2.0) -> None:
        self.base, self.m = K / J, float(prior_tokens)
        self.used = np.zeros((L, J))  # raw counts; the pooled prior is applied when a rate is read
        self.tokens = np.zeros((L, 1))
        self.reuse_k, self.reuse_n = np.zeros((L, J)), np.zeros((L, J))
        self.cold_k, self.cold_n = np.zeros((L, J)), np.zeros((L, J))
        nb = len(GAP_EDGES) + 1
        self.gap_k, self.gap_n = np.full((L, nb), self.base), np.ones((L, nb))  # per layer and recency bucket
        self._layer_idx = np.arange(L)[:, None] * nb
        nc = len(COUNT_EDGES) + 1
        nt = len(TABLE_GAP_EDGES) + 1
        self.table_k, self.table_n = np.full((nt, nc), self.base), np.ones((nt, nc))

    def add_gaps(self, since: np.ndarray, used: np.ndarray) -> None:
        """Tokens since last use (int [L, J], before a token) and that token's routing (bool [L, J])."""
        flat = (self._layer_idx + gap_bucket(since)).ravel()
        size = self.gap_n.size
        self.gap_n += np.bincount(flat, minlength=size).reshape(self.gap_n.shape)
        self.gap_k += np.bincount(flat[used.ravel()], minlength=size).reshape(self.gap_k.shape)

    def add_counts(self, since: np.ndarray, count: np.ndarray, used: np.ndarray) -> None:
        """Tokens since last use and uses so far (int arrays, before a token) and that token's
        routing (bool, the same shape), into the pooled table."""
        cells = (table_gap_bucket(since) * self.table_n.shape[1] + count_bucket(count)).ravel()
        size, shape = self.table_n.size, self.table_n.shape
        self.table_n += np.bincount(cells, minlength=size).reshape(shape)
        self.table_k += np.bincount(cells[used.ravel()], minlength=size).reshape(shape)

    def table_p(self, since: np.ndarray, count: np.ndarray) -> np.ndarray:
        """The pooled table's chance of use for each (tokens since last use, uses so far)."""
        return (self.table_k / self.table_n)[table_gap_bucket(since), count_bucket(count)]

    def recency_p(self, layers, since: np.ndarray) -> np.ndarray:
        """p at the next visit of each layer in `layers`, given tokens since last use (int [n, J]):
        the expert's own reuse rate if the last token used it, else its cold rate scaled by how much
        more (or less) likely its layer's experts are at that distance than on average."""
        layers = np.asarray(layers)
        cold_layer = (self.cold_k[layers].sum(axis=1) + self.base) / (self.cold_n[layers].sum(axis=1) + 1.0)
        bucket = gap_bucket(since)
        factor = (self.gap_k[layers] / self.gap_n[layers])[np.arange(len(layers))[:, None], bucket]
        scaled = np.minimum(1.0, self.cold()[layers] * factor / cold_layer[:, None])
        return np.where(since == 1, self.reuse()[layers], scaled)

    def add_pairs(self, before: np.ndarray, after: np.ndarray) -> None:
        """bool [n, L, J] routing of tokens and of each one's next token."""
        self.reuse_n += before.sum(axis=0)
        self.reuse_k += (before & after).sum(axis=0)
        self.cold_n += (~before).sum(axis=0)
        self.cold_k += (~before & after).sum(axis=0)

    def add_tokens(self, used: np.ndarray) -> None:
        self.used += used.sum(axis=0)
        self.tokens += used.shape[0]

    def observe(self, layer: int, before: np.ndarray | None, after: np.ndarray) -> None:
        """One token's routing at `layer` (bool [J]) after `before` (its previous token's, or None)."""
        self.used[layer] += after
        self.tokens[layer] += 1
        if before is not None:
            self.reuse_n[layer] += before
            self.reuse_k[layer] += before & after
            self.cold_n[layer] += ~before
            self.cold_k[layer] += ~before & after

    def observe_gaps(self, layer: int, since: np.ndarray, used: np.ndarray) -> None:
        """`add_gaps` for one token at one layer."""
        b = gap_bucket(since)
        nb = self.gap_n.shape[1]
        self.gap_n[layer] += np.bincount(b, minlength=nb)
        self.gap_k[layer] += np.bincount(b[used], minlength=nb)

    def shrunk(self, k: np.ndarray, n: np.ndarray) -> np.ndarray:
        """(k + m x pooled) / (n + m) per (layer, expert); pooled: the layer's sum k / sum n, itself
        starting from K/J with one token's weight (so an empty layer reads K/J)."""
        pooled = (k.sum(axis=1, keepdims=True) + self.base) / (n.sum(axis=1, keepdims=True) + 1.0)
        return (k + self.m * pooled) / (n + self.m)

    def reuse(self) -> np.ndarray:
        return self.shrunk(self.reuse_k, self.reuse_n)

    def cold(self) -> np.ndarray:
        return self.shrunk(self.cold_k, self.cold_n)

    def rate(self) -> np.ndarray:
        return (self.used + self.m * self.base) / (self.tokens + self.m)


@register
class CostAware(Policy):
    name = "cost-aware"
    uses_history = True

    def __init__(self, prefetch: bool = True, gate: bool = True, recency: bool = True, eviction: str = "next-use",
                 history: bool = True, spec: bool = True, horizon: int = 4, prior: float = 2.0,
                 adapt: bool = True, table: bool = True) -> None:
        super().__init__()
        if eviction not in EVICTIONS:
            raise TypeError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
        if int(horizon) < 1:
            raise TypeError(f"horizon must be at least 1 layer, got {horizon}")
        if not float(prior) > 0:
            raise TypeError(f"prior must be a positive number of tokens, got {prior}")
        self.prefetch, self.gate, self.recency = bool(prefetch), bool(gate), bool(recency)
        self.eviction, self.history, self.spec, self.horizon = eviction, bool(history), bool(spec), int(horizon)
        self.adapt = bool(adapt) and self.prefetch and self.gate
        self.table = bool(table)
        self.params = dict(prefetch=self.prefetch, gate=self.gate, recency=self.recency, eviction=self.eviction,
                           history=self.history, spec=self.spec, horizon=self.horizon,
                           prior=float(prior), adapt=bool(adapt), table=self.table)
        self.issued = self.declined = 0
        self._throttle: PrefetchThrottle | None = None  # made when bound to a run

    # --- life cycle ----------------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J, self.K = g.num_layers, g.num_experts, g.top_k
        self.load_s = float(ctx.expert_load_s)
        self.rates = ReuseRates(self.L, self.J, self.K, self.params["prior"])
        self.spec_hit = np.full(self.L, self.K / self.J)  # P(used at l | the gate at l-1 picked it)
        self.spec_miss = np.full(self.L, self.K / self.J)
        self._p = np.full((self.L, self.J), self.K / self.J)  # p at each layer's next visit
        self._last_use = np.zeros((self.L, self.J))
        self._clock = 0
        self._res = np.zeros((self.L, self.J), dtype=bool)
        self._pending: set[ExpertKey] = set()  # loads started (misses, issued prefetches), not landed
        self._since: dict[int, np.ndarray] = {}  # request -> int [L, J]: tokens since each expert's last use
        self._count: dict[int, np.ndarray] = {}  # request -> int [L, J]: each expert's uses so far
        self._step: StepInfo | None = None
        self._layer = -1
        self._score: tuple | None = None  # (position, scores) cache for choose_victim
        self._link_free = 0.0  # the policy's view of when the link has done what it was given
        self._layer_s = 0.0  # time per layer (EWMA of the gaps between routed layers)
        self._busy = 0.0  # EWMA of link time asked per unit of time (0..1): on-demand loads and prefetches
        self._copies = 0  # copies asked of the link since the last routed layer (misses, issued prefetches)
        self._last_routed: float | None = None
        self._throttle = PrefetchThrottle(MODES) if self.adapt else None
        self._step_start_s = 0.0

    def fit(self, history) -> None:
        if not self.history or history.num_tokens == 0:
            return
        used = one_hot(history.experts, self.J)  # [n, L, J]
        self.rates.add_tokens(used)
        same = history.request_id[1:] == history.request_id[:-1]
        nxt = history.position[1:] > history.position[:-1]
        pairs = np.flatnonzero(same & nxt)
        if pairs.size:
            self.rates.add_pairs(used[pairs], used[pairs + 1])
        since = np.full((self.L, self.J), NEVER)
        count = np.zeros((self.L, self.J), dtype=np.int64)
        for row in range(history.num_tokens):  # recency buckets, token by token within each request
            if row == 0 or not (same[row - 1] and nxt[row - 1]):
                since[:] = NEVER
                count[:] = 0
            self.rates.add_gaps(since, used[row])
            self.rates.add_counts(since, count, used[row])
            since += 1
            since[used[row]] = 1
            count += used[row]
        if history.spec_experts is not None and self.L > 1:
            picked = one_hot(history.spec_experts[:, :-1], self.J)  # layer l-1's gate guess for layer l
            truth = used[:, 1:]
            hits = (picked & truth).sum(axis=(0, 2))
            self.spec_hit[1:] = (hits + 1) / (picked.sum(axis=(0, 2)) + self.J / self.K)
            self.spec_miss[1:] = ((truth & ~picked).sum(axis=(0, 2)) + 1) / ((~picked).sum(axis=(0, 2)) + self.J / self.K)

    def on_request_finished(self, request_id: int, trace) -> None:
        self._since.pop(request_id, None)
        self._count.pop(request_id, None)

    # --- prediction ------------------------------------------------------------------------------
    def _p_rows(self, step: StepInfo, layers) -> np.ndarray:
        """p for the given layers from each sequence's recency (a new sequence: the usage rate over
        its tokens), combined over the batch."""
        layers = list(layers)
        miss = np.ones((len(layers), self.J))
        rate = self.rates.rate()[layers]
        for seq in step.sequences:
            since = self._since.get(seq.request_id)
            if since is None or not self.recency:
                miss *= (1.0 - rate) ** seq.num_tokens
            else:
                p = self.rates.recency_p(layers, since[layers])
                if self.table:  # the two forecasts averaged
                    p = 0.5 * (p + self.rates.table_p(since[layers], self._count[seq.request_id][layers]))
                miss *= 1.0 - p
        return 1.0 - miss

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        previous = self._step
        if self._throttle is not None and previous is not None and self._last_routed is not None \
                and not any(seq.is_prefill for seq in previous.sequences):
            # Up to the last layer's routing: an idle wait for the next arrival is not the mode's.
            self._throttle.step_done(self._last_routed - self._step_start_s, len(previous.sequences))
        self._step_start_s = step.now_s
        self._step, self._layer, self._last_routed = step, -1, None
        self._pending = {k for k in self._pending if self.ctx.is_in_flight(k)}
        self._link_free = min(self._link_free, step.now_s + len(self._pending) * self.load_s)
        self._p = self._p_rows(step, range(self.L))
        self._score = None
        return self._prefetches(step, range(min(self.horizon, self.L)), -1, step.now_s)

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        step, layer, now = routing.step, routing.layer, routing.now_s
        self._layer = layer
        if self._last_routed is not None:
            gap = now - self._last_routed
            self._layer_s = gap if self._layer_s == 0 else 0.9 * self._layer_s + 0.1 * gap
            if gap > 0:
                self._busy = 0.9 * self._busy + 0.1 * min(1.0, self._copies * self.load_s / gap)
        self._last_routed, self._copies = now, 0
        self._pending = {k for k in self._pending if k[0] > layer or self.ctx.is_in_flight(k)}
        self._link_free = min(self._link_free, now + len(self._pending) * self.load_s)
        spec_rows = None
        for i, seq in enumerate(step.sequences):
            experts = routing.experts(i)
            if len(experts) == 0:
                continue
            since = self._since.setdefault(seq.request_id, np.full((self.L, self.J), NEVER))
            count = self._count.setdefault(seq.request_id, np.zeros((self.L, self.J), dtype=np.int64))
            row = since[layer]
            for token_used in one_hot(np.asarray(experts), self.J):  # a prefill's tokens in order, as `fit` reads them
                seen = row < NEVER
                self.rates.observe(layer, row == 1 if seen.any() else None, token_used)
                self.rates.observe_gaps(layer, row, token_used)
                self.rates.add_counts(row, count[layer], token_used)
                row += 1
                row[token_used] = 1
                count[layer] += token_used
            if self.spec and layer + 1 < self.L:
                spec = routing.spec_experts(i)
                if spec is not None:
                    picks = one_hot(np.asarray(spec), self.J).any(axis=0)
                    p = np.where(picks, self.spec_hit[layer + 1], self.spec_miss[layer + 1])
                    spec_rows = p if spec_rows is None else 1.0 - (1.0 - spec_rows) * (1.0 - p)
        self._p[layer] = self._p_rows(step, [layer])[0]  # its next visit: the next step
        if spec_rows is not None:
            self._p[layer + 1] = spec_rows
        self._score = None
        target = layer + self.horizon
        targets = [target] if target < self.L else []
        if spec_rows is not None and self.horizon > 1:
            targets = [layer + 1, *targets]  # the gate's sharper guess for the next layer
        return self._prefetches(step, targets, layer, now)

    def _prefetches(self, step: StepInfo, targets, current: int, now_s: float) -> list[Prefetch]:
        mode = self.mode()
        if mode == "off" or self.ctx is None:
            return []
        gated = mode == "gated"
        ctx, load = self.ctx, self.load_s
        candidates = []
        for target in targets:
            row = self._p[target]
            for e in np.flatnonzero(row >= (0.05 if gated else 0.5)).tolist():
                key = (target, e)
                if not self._res[key] and key not in self._pending and not ctx.is_in_flight(key):
                    candidates.append((float(row[e]), target, e))
        if not candidates:
            return []
        candidates.sort(reverse=True)
        free = ctx.capacity_slots - int(self._res.sum()) - len(self._pending)
        victims = self._victim_order(free, len(candidates)) if gated else []
        out = []
        link_free = max(self._link_free, now_s)
        for p, target, e in candidates:
            if gated:
                need = now_s + self._distance(target, current) * self._layer_s
                victim = None
                if free <= 0:
                    if not victims:
                        self.declined += 1
                        continue
                    victim = victims[0]
                saving, cost = self._gate_terms(p, need - link_free, now_s, link_free + load, victim, current)
                if saving <= cost:
                    self.declined += 1
                    continue
                if free <= 0:
                    victims.pop(0)
                priority = (saving - cost) / load
            else:
                priority = p
            free -= 1
            link_free += load
            self._pending.add((target, e))
            out.append(Prefetch(priority, step.step, target, e))
        self._link_free = link_free
        self.issued += len(out)
        self._copies += len(out)
        return out

    def mode(self) -> str:
        """How this step prefetches: 'gated' (the cost test), 'eager' (every p >= 0.5) or 'off'."""
        if self._throttle is not None:
            return self._throttle.mode
        return "off" if not self.prefetch else "gated" if self.gate else "eager"

    def _distance(self, layer: int, current: int) -> int:
        """Layers from `current` (-1: the step's start) until `layer` is next visited."""
        return layer - current if layer > current else layer - current + self.L

    def _gate_terms(self, p: float, lead_s: float, now_s: float, arrive_s: float, victim: ExpertKey | None,
                    current: int) -> tuple[float, float]:
        """(expected saving, expected cost) of a prefetch with chance p of use, starting `lead_s`
        before its layer needs it (the link's queue ahead of it is the policy's view).
        Saving: p x the stall it avoids, min(copy time, lead), in the link's free share (1 - rho):
        a copy that lands late still saves the part done before the layer asked (an on-demand load,
        served first, would start then), and on a busy link a right copy mostly takes the place of
        the on-demand load it replaces instead of overlapping compute.
        Cost: a wrong copy (1 - p) adds a whole copy to the link's busy period, which delays the
        on-demand loads queued behind it when the link is busy (chance rho, the share of time it
        spends copying, prefetches included: counting on-demand loads alone read a link saturated
        by the gate's own prefetches as idle); a right one only moves its own load earlier. The
        victim v, used at its layer's next visit with chance p_v, must come back by then; its reload
        hides in the link's free share (1 - rho) of the time between this copy landing and that
        visit, and stalls for the rest of a copy."""
        load, rho = self.load_s, self._busy
        saving = p * min(load, max(0.0, lead_s)) * (1.0 - rho)
        cost = (1.0 - p) * rho * load
        if victim is not None:
            back_s = now_s + self._distance(victim[0], current) * self._layer_s - arrive_s
            cost += float(self._p[victim]) * max(0.0, load - (1.0 - rho) * max(0.0, back_s))
        return saving, cost

    # --- caching ----------------------------------------------------------------------------------
    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self._clock += 1
        self._last_use[layer, expert] = self._clock
        if not hit:
            self._copies += 1
            self._pending.add((layer, expert))
            self._link_free = max(self._link_free, now_s) + self.load_s

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self._res[key] = True
        self._pending.discard(key)
        self._clock += 1
        self._last_use[key] = self._clock

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self._res[key] = False

    def expected_next_use(self) -> np.ndarray:
        """float [L, J]: expected layer visits until each expert is next used, from where the
        step is now (the eviction score, largest evicted first)."""
        position = (None if self._step is None else self._step.step, self._layer)
        if self._score is not None and self._score[0] == position:
            return self._score[1]
        layers = np.arange(self.L)
        d0 = np.where(layers > self._layer, layers - self._layer, layers - self._layer + self.L)[:, None]
        p = np.maximum(self._p, 1e-6)
        score = d0 + (1.0 - p) / p * self.L  # geometric: each later visit uses it with chance p
        self._score = (position, score)
        return score

    def _victim_order(self, free: int, n: int) -> list[ExpertKey]:
        """The victims the next `n` loads would take, after `free` free slots are used."""
        need = n - max(0, free)
        if need <= 0:
            return []
        score = np.where(self._res, self._rank_score(), -np.inf).ravel()
        top = np.argsort(-score, kind="stable")[:need]
        return [divmod(int(i), self.J) for i in top if score[i] > -np.inf]

    def _rank_score(self) -> np.ndarray:
        """Larger goes first: expected next use, ties by older use (or least recent use, for LRU)."""
        if self.eviction == "lru":
            return -self._last_use
        return self.expected_next_use() - self._last_use * 1e-12

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        score = np.where(self._res, self._rank_score(), -np.inf)
        while True:
            flat = int(np.argmax(score))
            if score.flat[flat] == -np.inf:
                return None
            key = divmod(flat, self.J)
            if evictable(key):
                if for_prefetch is not None and self.eviction == "next-use":
                    # Never displace an expert expected sooner than the prefetch's own use.
                    if score.flat[flat] < self.expected_next_use()[for_prefetch.key]:
                        return None
                return key
            score[key] = -np.inf

    def describe(self) -> dict:
        d = super().describe()
        d["stats"] = {"prefetches_issued": self.issued, "prefetches_declined": self.declined}
        if self._throttle is not None:
            d["stats"]["prefetch_mode"] = self._throttle.best()
            d["stats"]["prefetch_mode_switches"] = self._throttle.switches
        return d


def _variant(name: str, doc: str, **defaults):
    """A registered ablation: the same class with other defaults."""

    def __init__(self, **params):
        CostAware.__init__(self, **{**defaults, **params})

    return register(type(f"CostAware_{name.replace('-', '_')}", (CostAware,), {"name": name, "__doc__": doc,
                                                                             "__init__": __init__}))


_variant("cost-aware-no-prefetch", "Ablation: eviction by expected next use only, no prefetching.", prefetch=False)
_variant("cost-aware-no-gate", "Ablation: prefetch every prediction with p >= 0.5, no cost test.", gate=False)
_variant("cost-aware-fixed", "Ablation: the gated prefetch always, no choice of mode by the clock.", adapt=False)
_variant("cost-aware-no-table", "Ablation: p from the per-expert rates alone, without the pooled table of "
         "recency x uses so far.", table=False)
_variant("cost-aware-no-recency", "Ablation: p is the plain usage rate, not conditioned on the last token.",
         recency=False)
_variant("cost-aware-lru", "Ablation: the gated prefetch with LRU eviction.", eviction="lru")
_variant("cost-aware-no-history", "Ablation: no history split; rates learned online only.", history=False)
