"""FineMoE (EuroSys '26) as its paper describes it: expert maps, similarity-aware prefetch, p x freq cache.

Semantic phase at step start (layers 0..d-1 from the stored map whose semantic key is nearest),
trajectory phase at every layer l (layer l + d from the stored map whose first l+1 rows are nearest
to the rows observed so far), delta rule for how many experts to take, priority p / (l - l_now),
eviction of the lowest p x freq with the current window's predicted experts protected.

Per iteration, as the paper counts them: the store holds one map per iteration of the history (a
prefill's is the mean of its tokens' rows per layer, its key the mean of their embedding outputs)
and a running iteration is matched the same way, as one map. The predictions of all sequences of a
batch are united (max priority), never replacing one another (a mistake of the released code, see
FINEMOE.md).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from finemoe.policies.asks import PlannedAsks
from finemoe.policies.base import (
    ExpertKey,
    LayerRouting,
    Policy,
    PolicyContext,
    Prefetch,
    StepInfo,
    ranked_prefetches,
)
from finemoe.policies.expert_maps import (
    ExpertMapStore,
    Match,
    TrajectoryQuery,
    delta_prefix,
    iteration_means,
    iteration_starts,
    prefetch_priority,
    topk_map,
)
from finemoe.policies.finemoe_hooks import HookGeometry, step_hooks
from finemoe.policies.map_matches import MapMatches, matches_for
from finemoe.policies.memo import ContentMemo, digest
from finemoe.policies.registry import register

# Modelled wall time of one map search: one sequence at one layer (the policy's whole call: the
# incremental trajectory cosine against C=1000 stored maps, the argmax, the delta selection, the
# prefetch list; the semantic match at step start counts as one). Set 2026-11-29 from
# `python3 benchmarks/bench_map_search.py` on the development machine (2 shared x86 cores,
# numpy/OpenBLAS, load 1.4): 45-49 us per searched layer of a Mixtral (32 x 8) decode step and
# 4.4-4.6 us per further prefill token (3.9-4.2 us for the demo model's 6 x 8, whose decode calls
# take 72-93 us per searched layer with the step's fixed costs shared by only 3 layers: 4 x 50 us
# per step charged against 240 us measured). The policy's code has become faster since (37-41 us
# and 4.2-4.4 us, against 69-79 us and 5.2-5.4 us for the code before in the same runs); the
# defaults stay, as this host's spread for one tree is wider than the change. See docs/policies.md.
# The 4.4-4.6 us per further prefill token were for matching a prompt token by token; a prefill is
# now one query (the mean of its rows), so further tokens cost only that mean and are not charged
# by default (`search_token_s` charges them for a sensitivity run).
SEARCH_S_DEFAULT = 50e-6
SEARCH_TOKEN_S_DEFAULT = 0.0

CACHES = ("finemoe", "lru", "lfu")
HOOKS_KEPT = 2  # policies' planned hooks a process keeps (`FineMoE.planned_hooks`)
_HOOKS: OrderedDict[tuple, dict] = OrderedDict()
FITTED_KEPT = 4  # fitted stores a process keeps (`FineMoE.fit`): a sweep's variants on one history


@dataclass(frozen=True)
class _Fitted:
    """A history's store (None: no maps) and how many maps were offered to it."""

    store: ExpertMapStore | None
    maps: int


def _fitted_arrays(f: _Fitted) -> dict[str, np.ndarray]:
    arrays = {} if f.store is None else f.store.to_arrays()
    return {**arrays, "offered": np.int64(f.maps)}


def _fitted_from(a: dict[str, np.ndarray]) -> _Fitted:
    return _Fitted(ExpertMapStore.from_arrays(a) if "maps" in a else None, int(a["offered"]))


_FITTED: ContentMemo[_Fitted] = ContentMemo(FITTED_KEPT, "finemoe-store", _fitted_arrays, _fitted_from)


class _HookMemo:
    """`_HOOKS` as `get(key)`: the key's per-step table, made and kept (the last `HOOKS_KEPT`)."""

    @staticmethod
    def get(key: tuple) -> dict:
        table = _HOOKS.get(key)
        if table is None:
            table = _HOOKS[key] = {}
            while len(_HOOKS) > HOOKS_KEPT:
                _HOOKS.popitem(last=False)
        else:
            _HOOKS.move_to_end(key)
        return table


@dataclass(frozen=True)
class _StepHooks:
    """One step's hooks (`FineMoE._hooks_of`), per hook h: its asks' count and, one hook after
    another, their layers, experts and priorities; its search seconds and count; its p rows'
    count and, one after another, their layers and values; and the searches the table answered."""

    asks: np.ndarray  # int64 [layers + 1]
    layers: np.ndarray
    experts: np.ndarray
    priority: np.ndarray
    cost_s: np.ndarray  # float64 [layers + 1]
    searches: np.ndarray  # int64 [layers + 1]
    rows: np.ndarray  # int64 [layers + 1]
    row_target: np.ndarray
    row_values: np.ndarray  # float64 [rows, experts]
    planned: int


@dataclass(frozen=True)
class PlannedHooks:
    """What a FineMoE's hooks do for a run of planned steps, apart from the clock (per step s and
    hook h: 0 the step's start, l + 1 after layer l's routing): `asks`, the hook's search time and
    count, and the p rows it records, rows[row_lo[s, h]:row_hi[s, h]] for layers
    row_target[...]; `planned`: searches answered from `prepare`'s table, in all."""

    asks: PlannedAsks
    cost_s: np.ndarray  # float64 [steps, layers + 1]
    searches: np.ndarray  # int64 [steps, layers + 1]
    row_lo: np.ndarray
    row_hi: np.ndarray
    row_target: np.ndarray  # int64 [rows]
    rows: np.ndarray  # float64 [rows, experts]
    planned: int


# `PlannedHooks` as plain arrays, for a sweep's predictions folder (`_PLANNED`).
_ASK_FIELDS = ("lo", "hi", "step", "layers", "experts", "priority")
_HOOK_FIELDS = ("cost_s", "searches", "row_lo", "row_hi", "row_target", "rows")


def _planned_arrays(p: PlannedHooks) -> dict[str, np.ndarray]:
    out = {f"asks_{name}": getattr(p.asks, name) for name in _ASK_FIELDS}
    out.update({name: getattr(p, name) for name in _HOOK_FIELDS})
    return {**out, "wants_step": np.bool_(p.asks.wants_step), "planned": np.int64(p.planned)}


def _planned_from(a: dict[str, np.ndarray]) -> PlannedHooks:
    asks = PlannedAsks(*(a[f"asks_{name}"] for name in _ASK_FIELDS), bool(a["wants_step"]))
    return PlannedHooks(asks, *(a[name] for name in _HOOK_FIELDS), int(a["planned"]))


PLANNED_KEPT = 2  # whole answers of `FineMoE.planned_hooks` a process keeps
_PLANNED: ContentMemo[PlannedHooks] = ContentMemo(PLANNED_KEPT, "finemoe-hooks", _planned_arrays, _planned_from)


def _steps_digest(steps: list, first_step: int) -> str:
    """A hash of planned steps: each step's sequences (their trace rows) and the first's number."""
    sizes = np.array([len(seqs) for seqs in steps], dtype=np.int64)
    rows = np.array([x for seqs in steps for q in seqs for x in (q.start, q.stop)], dtype=np.int64)
    return digest(first_step, sizes, rows)


# Prefetch distance as the paper sets it per model (FINEMOE.md), by the geometry's model name;
# DEFAULT_DISTANCE for any other model. An explicit `distance` always wins.
PAPER_DISTANCES = (("mixtral", 3), ("qwen", 6), ("phi", 4))
DEFAULT_DISTANCE = 3


def paper_distance(model_name: str) -> int:
    """The paper's prefetch distance for a model family, matched on its name (case-insensitive)."""
    name = model_name.lower()
    for family, distance in PAPER_DISTANCES:
        if family in name:
            return distance
    return DEFAULT_DISTANCE
# How map search time reaches the timeline. "exact": searches run one after another on a search
# thread of their own (the paper's design), so a call's predictions are ready when the thread has
# done its earlier searches and this call's, and the engine starts no copy for them before then
# (`Prefetch.ready_s`); searches of a step not yet started when the next step begins are abandoned
# (every layer they aim at has passed). "none": predictions are ready at once (for ablation).
SEARCH_CHARGES = ("exact", "none")


@register
class FineMoE(Policy):
    name = "finemoe"
    needs = ("router_probs", "semantic_key")
    uses_history = True
    maps_from = "probs"  # "probs": full router rows; "topk": degraded maps from top-k gate weights

    def __init__(
        self,
        distance: int | None = None,
        capacity: int = 1000,
        semantic: bool = True,
        trajectory: bool = True,
        delta: bool = True,
        cache: str = "finemoe",
        search_s: float = SEARCH_S_DEFAULT,
        search_token_s: float = SEARCH_TOKEN_S_DEFAULT,
        search_charge: str = "exact",
        learn_online: bool = True,
    ) -> None:
        super().__init__()
        if distance is not None and int(distance) < 1:
            raise TypeError(f"distance must be at least 1 layer, got {distance}")
        if int(capacity) < 1:
            raise TypeError(f"capacity must be at least 1 map, got {capacity}")
        if cache not in CACHES:
            raise TypeError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if not (semantic or trajectory):
            raise TypeError("at least one of semantic and trajectory must be enabled")
        if float(search_s) < 0 or float(search_token_s) < 0:
            raise TypeError(f"search_s and search_token_s must not be negative, got {search_s}, {search_token_s}")
        if search_charge not in SEARCH_CHARGES:
            raise TypeError(f"search_charge must be one of {', '.join(SEARCH_CHARGES)}, got {search_charge!r}")
        self._distance_given = distance is not None
        self.distance, self.capacity = int(distance) if distance is not None else DEFAULT_DISTANCE, int(capacity)
        self.semantic, self.trajectory, self.delta = bool(semantic), bool(trajectory), bool(delta)
        self.cache, self.learn_online = cache, bool(learn_online)
        self.search_s, self.search_token_s, self.search_charge = float(search_s), float(search_token_s), search_charge
        self.params = dict(
            distance=self.distance, capacity=self.capacity, semantic=self.semantic,
            trajectory=self.trajectory, delta=self.delta, cache=self.cache, search_s=self.search_s,
            search_token_s=self.search_token_s, search_charge=self.search_charge, learn_online=self.learn_online, maps_from=self.maps_from,
        )
        self.store: ExpertMapStore | None = None
        self._store_shared = False  # `store` is a fitted one that other runs share (`fit`)
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._searches: list[tuple[float, float, int]] = []  # this step's calls' (start s, end s, searches)
        self.fit_maps = 0
        self.searches = 0  # (sequence, layer) map searches asked for
        self.search_busy_s = 0.0  # modelled search thread time of the searches it ran
        self.searches_abandoned = 0
        self.searches_planned = 0  # of them, answered from the matches `prepare` computed
        self._matches: MapMatches | None = None  # every measured iteration's matches (`prepare`)
        self._matches_inserted = -1  # the store's `inserted` when they were computed
        self._rows_log: list | None = None  # (target, row) per `_remember_p`, while hooks are planned
        self._last_search = (0.0, 0)  # the last `_searched` call's (seconds, searches)

    # --- life cycle ----------------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J, self.K = g.num_layers, g.num_experts, g.top_k
        if not self._distance_given:
            self.distance = paper_distance(g.model_name)
            self.params["distance"] = self.distance
        self._p = np.zeros((self.L, self.J))  # latest predicted probability per expert
        self._p_step = np.full(self.L, -1)  # engine step whose predictions _p[layer] holds
        self._freq = np.zeros((self.L, self.J))
        self._last = np.zeros((self.L, self.J))  # use counter, for LRU and tie-breaks
        self._clock = 0
        self._res = np.zeros((self.L, self.J), dtype=bool)  # resident, as the engine reports it
        self._prot_step = np.full((self.L, self.J), -1)  # step in which the expert was last predicted
        self._offers = 0  # experts ever chosen, so the protected mask is rebuilt only when it changes
        self._protected: tuple | None = None  # ((step, layer, offers), mask, its negation)
        # Per current layer l (-1 before layer 0, at index l + 1): the rows of layers not yet passed.
        self._ahead = [np.repeat(np.arange(self.L)[:, None] >= layer, self.J, axis=1) for layer in range(-1, self.L)]
        self._step: StepInfo | None = None
        self._layer = -1
        self._queries: list[TrajectoryQuery | tuple[list[int], list[float]] | None] = []
        self._sem: list[Match | None] = []
        self._searches = []

    def fit(self, history) -> None:
        """The store of the history's maps. Every budget and hardware of a sweep fits the same one,
        so it is kept by the content it is built from (the history's rows and the store's size and
        layers ahead: policies/memo.py, on disk too for a sweep's workers), and a run shares it
        until it adds a map of its own (`_own_store`)."""
        if self.store is not None:  # (fitted before: the maps join it)
            for expert_map, key in self._maps_of(history, np.arange(history.num_tokens)):
                self._own_store(key).add(expert_map, key)
                self.fit_maps += 1
            return
        fitted = _FITTED.get(self._fit_key(history), lambda: self._fitted(history))
        self.store, self.fit_maps = fitted.store, self.fit_maps + fitted.maps
        self._store_shared = self.store is not None

    def _fit_key(self, history) -> str:
        """A hash of what `_fitted` reads."""
        rows = (history.router_probs,) if self.maps_from == "probs" else (history.experts, history.weights)
        return digest("fit", self.maps_from, self.L, self.J, self.capacity, self.distance, history.request_id,
                      history.iteration, *rows, history.semantic_key)

    def _fitted(self, history) -> _Fitted:
        """`fit`'s store built afresh: the history's maps added one by one."""
        maps = self._maps_of(history, np.arange(history.num_tokens))
        store = None
        for expert_map, key in maps:
            if store is None:
                store = self._new_store(key)
            store.add(expert_map, key)
        return _Fitted(store, len(maps))

    def _own_store(self, key: np.ndarray | None) -> ExpertMapStore:
        """`_store_for`, copied first where it is a fitted store other runs share."""
        if self._store_shared:
            self.store, self._store_shared = copy.deepcopy(self.store), False
        return self._store_for(key)

    def on_request_finished(self, request_id: int, trace) -> None:
        if not self.learn_online:
            return
        rows = np.flatnonzero(trace.request_id == request_id)
        # Applied at the next step start: a trajectory query must see a store that does not change.
        self._pending.extend(self._maps_of(trace, rows))

    def prepare(self, trace, measure: list[int]) -> None:
        """Every measured iteration's map matches, computed at once (policies/map_matches.py): the
        store is fixed for an offline run, so they are what the searches would return."""
        if self.store is None or self.store.size == 0:
            return
        its = [it for rid in measure for it in trace.iterations_by_request.get(rid, ())]
        starts = np.array([it.start for it in its], dtype=np.int64)
        stops = np.array([it.stop for it in its], dtype=np.int64)
        layers = self.L - self.distance if self.trajectory else 0
        self._matches = matches_for(self.store, trace, starts, stops, self.maps_from, layers, self.semantic)
        self._matches_inserted = self.store.inserted

    def _planned(self) -> MapMatches | None:
        """The matches `prepare` computed, while the store is still the one they were computed on."""
        m = self._matches
        return m if m is not None and self.store is not None and self.store.inserted == self._matches_inserted else None

    def _maps_of(self, trace, rows) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One (map, semantic key) per iteration among `rows` (row order): the paper treats a prefill
        as one iteration, so its map is the mean of its tokens' rows per layer and its key the mean
        of their embedding outputs, as `StepInfo.semantic_key` gives a query (a decode iteration is
        one token)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return []
        if self.maps_from == "probs":
            tokens = np.nan_to_num(trace.router_probs[rows].astype(np.float32))
        else:
            tokens = topk_map(trace.experts[rows], trace.weights[rows], trace.geometry.num_experts)
        starts = iteration_starts(trace.request_id[rows], trace.iteration[rows])
        maps = iteration_means(tokens, starts)
        keys = None
        if trace.semantic_key is not None:  # kept even when the phase is off: same store, fair ablation
            keys = iteration_means(trace.semantic_key[rows].astype(np.float32), starts)
        return [(maps[i], None if keys is None else keys[i]) for i in range(len(starts))]

    def _store_for(self, key: np.ndarray | None) -> ExpertMapStore:
        if self.store is None:
            self.store = self._new_store(key)
        return self.store

    def _new_store(self, key: np.ndarray | None) -> ExpertMapStore:
        """An empty store of this policy's size, with room for semantic keys like `key` (None: none)."""
        return ExpertMapStore(self.L, self.J, self.capacity, self.distance, None if key is None else int(key.shape[0]))

    # --- prediction ------------------------------------------------------------------------------
    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        for expert_map, key in self._pending:
            self._own_store(key).add(expert_map, key)
        self._pending.clear()
        self._step, self._layer = step, -1
        n = len(step.sequences)
        store = self.store
        ready = store is not None and store.size > 0
        planned = self._planned() if ready else None
        # One query per sequence: an iteration (a prefill too) is matched as one map, like the stored
        # ones; its matches read from `prepare`'s table where it has them, else searched as it goes.
        self._queries = [self._query(planned, q) if ready and self.trajectory else None for q in step.sequences]
        self._sem = [None] * n
        self._abandon_unstarted(step.now_s)
        if not ready or not self.semantic:
            return []
        out: dict[ExpertKey, float] = {}  # the call's prefetches: key -> highest priority
        searched: list[int] = []  # tokens of each sequence searched
        for i in range(n):
            first = step.sequences[i].start
            read = planned is not None and first in planned.index_of
            if read:
                match = planned.semantic[planned.index_of[first]]
            else:
                key = step.semantic_key(i)
                match = store.match_semantic(key) if key is not None else None
            self._sem[i] = match
            if match is None:
                continue
            self.searches_planned += read
            searched.append(1)  # one key per sequence
            # Semantic phase: layers 0..d-1. Semantic-only mode also serves later layers (below).
            for target in range(min(self.distance, self.L)):
                self._predict(out, step.step, target, -1, store.maps[match.index, target], match.similarity)
        return self._searched(step.now_s, out, searched)

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        layer = routing.layer
        self._layer = layer
        target = layer + self.distance
        step = self._step
        if step is None or self.store is None or self.store.size == 0 or target >= self.L:
            return []
        out: dict[ExpertKey, float] = {}
        searched: list[int] = []
        for i in range(len(step.sequences)):
            query = self._queries[i] if i < len(self._queries) else None
            if query is not None:
                if isinstance(query, TrajectoryQuery):
                    cos = query.observe(layer, self._observed_row(routing, i))[0]
                    best = int(cos.argmax())  # the first of ties
                    similarity = float(cos[best])
                else:  # `prepare`'s: (best map per layer, its cosine per layer)
                    best, similarity = query[0][layer], query[1][layer]
                    self.searches_planned += 1
                searched.append(step.sequences[i].num_tokens)
                self._predict(out, step.step, target, layer, self.store.maps[best, target], similarity)
            elif not self.trajectory and self._sem[i] is not None:
                match = self._sem[i]
                self._predict(out, step.step, target, layer, self.store.maps[match.index, target], match.similarity)
        return self._searched(routing.now_s, out, searched)

    def _query(self, planned: MapMatches | None, seq) -> TrajectoryQuery | tuple[list[int], list[float]]:
        """Sequence `seq`'s trajectory query: its row of `prepare`'s table, or an incremental search."""
        rows = planned.trajectory(seq.start) if planned is not None else None
        return rows if rows is not None else self.store.trajectory(1)

    # --- hooks planned for the compiled path (sim/compiled_prefetch.py) ---------------------------
    def plans_asks(self) -> bool:
        """Whether `planned_hooks` applies: every search is answered from `prepare`'s matches and
        the store does not change (an offline run), so what each hook predicts and asks for
        depends on the step's sequences alone; only when its searches finish depends on the clock."""
        return self._planned() is not None and not self._pending

    def planned_hooks(self, trace, steps: list, first_step: int) -> PlannedHooks:
        """For planned steps (the first is engine step `first_step`), what each hook does apart
        from the clock: its asks (all for its own step), the p rows it records (`_remember_p`, in
        order), its search time and count, and how many searches `prepare`'s table answered. Each
        step's are those of `_vector_hooks` (or, for a step it leaves, the hooks' own, called on a
        copy of this policy), remembered per process for steps of the same sequences, and the
        whole answer for the same steps (`_PLANNED`: a sweep's other budgets, and in its predictions
        folder its other workers too; the kernel only reads it)."""
        hooks_key = self._hooks_key(trace)
        return _PLANNED.get(digest("hooks", hooks_key, _steps_digest(steps, first_step)),
                            lambda: self._assembled(trace, _HookMemo.get(hooks_key), steps, first_step))

    def _assembled(self, trace, memo: dict, steps: list, first_step: int) -> PlannedHooks:
        L1, J = self.L + 1, self.J
        missing = list(dict.fromkeys(seqs for seqs in steps if seqs not in memo))
        scratch = None
        for seqs, hooks in zip(missing, self._vector_hooks(missing), strict=True):
            if hooks is None:  # (a sequence the table lacks: its hooks search the store)
                if scratch is None:
                    scratch = self._scratch()
                hooks = scratch._hooks_of(seqs, trace)
            memo[seqs] = hooks
        per_step = [memo[seqs] for seqs in steps]
        n = len(steps)
        if n == 0:
            none = np.zeros((0, L1), np.int64)
            return PlannedHooks(PlannedAsks(none, none, none, np.zeros(0, np.int64), np.zeros(0, np.int64),
                                            np.zeros(0), True), np.zeros((0, L1)), none, none, none,
                                np.zeros(0, np.int64), np.zeros((0, J)), 0)
        # One step's arrays after another: each hook's slice from the running counts.
        asks_n = np.stack([h.asks for h in per_step]).reshape(-1)
        rows_n = np.stack([h.rows for h in per_step]).reshape(-1)
        hi = np.cumsum(asks_n).reshape(n, L1)
        row_hi = np.cumsum(rows_n).reshape(n, L1)
        step = np.broadcast_to(first_step + np.arange(n, dtype=np.int64)[:, None], (n, L1)).copy()
        asks = PlannedAsks(hi - asks_n.reshape(n, L1), hi, step,
                           np.concatenate([h.layers for h in per_step]), np.concatenate([h.experts for h in per_step]),
                           np.concatenate([h.priority for h in per_step]), True)
        return PlannedHooks(asks, np.stack([h.cost_s for h in per_step]), np.stack([h.searches for h in per_step]),
                            row_hi - rows_n.reshape(n, L1), row_hi,
                            np.concatenate([h.row_target for h in per_step]),
                            np.concatenate([h.row_values for h in per_step]).reshape(-1, J),
                            sum(h.planned for h in per_step))

    def _vector_hooks(self, steps: list) -> list[_StepHooks | None]:
        """`_hooks_of` for every step at once (policies/finemoe_hooks.py), where the hooks are
        FineMoE's own and every row of the maps is a probability (the delta rule's running sum only
        grows); None for a step it leaves to `_hooks_of`."""
        planned = self._planned()
        store = self.store
        if (not steps or planned is None or type(self) not in VARIANTS or store is None
                or bool((store.maps[: store.size] < 0).any())):
            return [None] * len(steps)
        g = HookGeometry(self.L, self.J, self.K, self.distance, self.semantic, self.trajectory, self.delta,
                         self.search_s, self.search_token_s)
        return step_hooks(g, steps, planned.index_of, *planned.arrays, store.maps, _StepHooks)

    def _hooks_key(self, trace) -> tuple:
        return (type(self).__name__, tuple(sorted(self.params.items())), trace.content_hash(),
                self._matches.store_digest, self.L, self.J, self.K)

    def _scratch(self) -> FineMoE:
        """A copy to call the hooks on: the same store and matches, its own per-run state."""

        scratch = copy.copy(self)
        scratch._p, scratch._p_step = self._p.copy(), self._p_step.copy()
        scratch._prot_step = self._prot_step.copy()
        scratch._searches = []
        scratch.search_charge = "none"  # (when a search finishes is the kernel's to play)
        return scratch

    def _hooks_of(self, seqs, trace) -> _StepHooks:
        """What the hooks of one step (its start, then each layer's routing) do apart from the
        clock, as arrays (`_StepHooks`)."""
        info = StepInfo(0, 0.0, seqs, trace)
        L1 = self.L + 1
        asks_n, rows_n = np.zeros(L1, np.int64), np.zeros(L1, np.int64)
        cost, count = np.zeros(L1), np.zeros(L1, np.int64)
        layers: list[int] = []
        experts: list[int] = []
        prios: list[float] = []
        targets: list[int] = []
        rows: list[np.ndarray] = []
        before = self.searches_planned
        for h in range(L1):
            self._rows_log, self._last_search = [], (0.0, 0)
            asks = self.on_step_start(info) if h == 0 else self.on_layer_routed(LayerRouting(info, h - 1, 0.0, trace))
            for p in asks:
                layers.append(p.layer)
                experts.append(p.expert)
                prios.append(p.priority)
                asks_n[h] += 1
            cost[h], count[h] = self._last_search
            for target, row in self._rows_log:
                targets.append(target)
                rows.append(np.asarray(row, np.float64))
            rows_n[h] = len(self._rows_log)
        self._rows_log = None
        return _StepHooks(asks_n, np.array(layers, np.int64), np.array(experts, np.int64), np.array(prios, np.float64),
                          cost, count, rows_n, np.array(targets, np.int64),
                          np.array(rows, np.float64).reshape(len(rows), self.J), self.searches_planned - before)

    def state(self) -> dict:
        """What a compiled engine path needs to go on where this policy stands (sim/compiled_prefetch.py)."""
        return dict(p=self._p, p_step=self._p_step, freq=self._freq, last=self._last, clock=self._clock,
                    prot_step=self._prot_step, step=-1 if self._step is None else self._step.step, layer=self._layer,
                    searches=list(self._searches), cache=CACHES.index(self.cache),
                    charged=self.search_charge != "none")

    # --- search time -------------------------------------------------------------------------------
    def _abandon_unstarted(self, now_s: float) -> None:
        """A new step begins: the search thread drops the previous step's searches it has not
        started (their layers have passed) and finishes the one it is running."""
        for start, end, count in self._searches:
            if start >= now_s:
                self.searches_abandoned += count
                self.search_busy_s -= end - start
        self._searches = [entry for entry in self._searches if entry[0] < now_s][-1:]

    def _searched(self, now_s: float, out: dict[ExpertKey, float], searched: list[int]) -> list[Prefetch]:
        """The call's prefetches, highest priority first (`Prefetch` order), stamped with when its
        searches finish on the search thread (after the searches queued before them). `searched`:
        the tokens of each sequence's search; one costs `search_s` plus `search_token_s` per further
        token."""
        cost_s = sum(self.search_s + max(0, tokens - 1) * self.search_token_s for tokens in searched)
        self._last_search = (cost_s, len(searched))
        self.searches += len(searched)
        self.search_busy_s += cost_s
        ready = 0.0
        if self.search_charge != "none" and cost_s > 0:
            start = max(now_s, self._searches[-1][1] if self._searches else 0.0)
            self._searches.append((start, start + cost_s, len(searched)))
            ready = start + cost_s
        return ranked_prefetches(self._step.step, out, ready)

    def _observed_row(self, routing: LayerRouting, i: int) -> np.ndarray:
        """Sequence i's row of this layer as the stored maps hold it: [1, J], the mean over the
        iteration's tokens (a decode step's one token as it is)."""
        if self.maps_from == "probs":
            rows = routing.router_rows(i)
        else:
            rows = topk_map(routing.experts(i), routing.weights(i), self.J)
        return rows if len(rows) == 1 else rows.mean(axis=0, keepdims=True)

    def _predict(self, out: dict, step: int, target: int, current: int, row: np.ndarray, similarity: float) -> None:
        """Select experts of one predicted row, record p for eviction, add prefetches (max priority)."""
        self._remember_p(step, target, row)
        values = row.tolist()
        for e in delta_prefix(values, similarity if self.delta else 1.0, self.K):
            self._offer(out, step, target, e, prefetch_priority(values[e], target, current))

    def _remember_p(self, step: int, target: int, row: np.ndarray) -> None:
        """The eviction score's p: the highest probability predicted for the target in this step."""
        if self._rows_log is not None:
            self._rows_log.append((target, row))
        if self._p_step[target] != step:
            self._p[target] = row
            self._p_step[target] = step
        else:
            np.maximum(self._p[target], row, out=self._p[target])

    def _offer(self, out: dict, step: int, target: int, expert: int, priority: float) -> None:
        """Protect a chosen expert for this step and keep its highest priority among the call's."""
        key = (target, expert)
        self._prot_step[key] = step
        self._offers += 1
        old = out.get(key)
        if old is None or old < priority:
            out[key] = priority

    # --- caching ----------------------------------------------------------------------------------
    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        self._layer = max(self._layer, layer)
        self._freq[layer, expert] += 1
        self._clock += 1
        self._last[layer, expert] = self._clock

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        self._res[key] = True
        self._clock += 1
        self._last[key] = self._clock

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        self._res[key] = False

    def protected_mask(self) -> np.ndarray:
        """bool [L, J]: experts predicted in this step for a layer not yet passed (with every cache:
        the LRU and LFU ablations change the score, not the protection). Read-only: it is kept until
        the step, the layer or the predictions change."""
        return self._protection()[0]

    def _protection(self) -> tuple[np.ndarray, np.ndarray]:
        """The protected mask and its negation, rebuilt only when the step, the layer or the chosen
        experts have changed since the last call (evictions come many to a layer)."""
        if self._step is None:  # every cache keeps the window's protection (the paper's ablations)
            state = None
        else:
            state = (self._step.step, self._layer, self._offers)
        if self._protected is None or self._protected[0] != state:
            if state is None:
                mask = np.zeros((self.L, self.J), dtype=bool)
            else:
                mask = (self._prot_step == self._step.step) & self._ahead[self._layer + 1]
            self._protected = (state, mask, ~mask)
        return self._protected[1], self._protected[2]

    def _primary(self) -> np.ndarray:
        """float [L, J]: the cache's eviction score, lowest evicted first (ties: least recently used).

        FineMoE: p x freq. LRU: last use. LFU: use count.
        """
        if self.cache == "lru":
            return self._last
        if self.cache == "lfu":
            return self._freq
        return self._p * self._freq

    def eviction_order(self) -> list[ExpertKey]:
        """Resident experts, first to evict first: unprotected before protected (FineMoE's cache),
        then by score, then least recently used, then (layer, expert)."""
        layer, expert = np.nonzero(self._res)
        if layer.size == 0:
            return []
        prot = self.protected_mask()[layer, expert]
        order = np.lexsort((expert, layer, self._last[layer, expert], self._primary()[layer, expert], prot))
        return [(int(layer[i]), int(expert[i])) for i in order]

    def _first(self, mask: np.ndarray, primary: np.ndarray) -> ExpertKey | None:
        """The first of `mask` in eviction order, without sorting: lowest score, then oldest use.
        Scores are finite, so an infinite minimum means an empty mask."""
        score = np.where(mask, primary, np.inf)
        low = score.min()
        if low == np.inf:
            return None
        flat = int(np.argmin(np.where(score == low, self._last, np.inf)))
        return divmod(flat, self.J)

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        """The first evictable expert of `eviction_order`, found without sorting: the unprotected
        ones first; then, for an on-demand load only, the protected ones (a prefetch may not
        displace them). A choice that is pinned or in use is masked out and the next one taken."""
        if not self._res.any():
            return None
        protected, unprotected = self._protection()
        primary = self._primary()
        victim = self._first_evictable(self._res & unprotected, primary, evictable)
        if victim is None and for_prefetch is None:
            victim = self._first_evictable(self._res & protected, primary, evictable)
        return victim

    def _first_evictable(self, mask: np.ndarray, primary: np.ndarray,
                         evictable: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The first evictable expert of `mask` (a fresh array, cleared as choices fail)."""
        while True:
            first = self._first(mask, primary)
            if first is None or evictable(first):
                return first
            mask[first] = False

    def describe(self) -> dict:
        d = super().describe()
        d["stats"] = {
            "fit_maps": self.fit_maps,
            "store_size": 0 if self.store is None else self.store.size,
            "store_replaced": 0 if self.store is None else self.store.replaced,
            "store_bytes": 0 if self.store is None else self.store.nbytes,
            "searches": self.searches,
            "searches_abandoned": self.searches_abandoned,
            "searches_planned": self.searches_planned,
            "modelled_search_s": self.search_busy_s,
            "semantic_phase_ran": bool(self.store is not None and self.store.keys is not None and self.semantic),
        }
        return d


def _variant(name: str, doc: str, needs: tuple[str, ...] | None = None, maps_from: str = "probs", **defaults):
    """A registered FineMoE variant: same class, other defaults (so sweeps can name ablations)."""

    def __init__(self, **params):
        FineMoE.__init__(self, **{**defaults, **params})

    attrs = {"name": name, "__doc__": doc, "__init__": __init__, "maps_from": maps_from}
    if needs is not None:
        attrs["needs"] = needs
    cls = type(f"FineMoE_{name.replace('-', '_')}", (FineMoE,), attrs)
    VARIANTS.append(cls)
    return register(cls)


VARIANTS: list[type] = [FineMoE]  # FineMoE and its registered variants: the same hooks, other defaults


_variant("finemoe-semantic", "Ablation: semantic matching only (the step's semantic match serves every layer).",
         needs=("router_probs", "semantic_key"), trajectory=False)
_variant("finemoe-trajectory", "Ablation: trajectory matching only (no semantic phase: layers 0..d-1 unpredicted).",
         needs=("router_probs",), semantic=False)
_variant("finemoe-no-delta", "Ablation: exactly top-k experts per predicted layer, whatever the similarity.",
         delta=False)
_variant("finemoe-lru", "Ablation: FineMoE's prefetching with an LRU cache instead of p x freq.", cache="lru")
_variant("finemoe-lfu", "Ablation: FineMoE's prefetching with an LFU cache instead of p x freq.", cache="lfu")
_variant(
    "finemoe-topk",
    "Degraded FineMoE for traces without full router probabilities (e.g. imported vLLM logs): maps "
    "hold the top-k gate weights and zero elsewhere, so the delta rule cannot hedge; the semantic "
    "phase runs only if the trace has semantic keys.",
    needs=(), maps_from="topk",
)
