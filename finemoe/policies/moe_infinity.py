"""MoE-Infinity-style (Xue et al., 2024): request-level expert activation matrices, LFU cache.

An expert activation matrix (EAM) counts, per layer and expert, the tokens a request routed there.
History keeps one EAM per request. While a request runs, its partial EAM (all iterations so far,
the current one up to the layer just routed) is matched by cosine to the stored EAMs; the best
match's rows for the next `distance` layers name the experts to prefetch (its `num_prefetch` most
used per layer, priority = activation ratio / layers ahead). A request with nothing observed yet
matches the sum of all history (plain popularity). Coarse-grained by design: FINEMOE.md explains
why request-level statistics predict little when routing is balanced over a request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from finemoe.policies.asks import AskBuilder, PlannedAsks, hook_asks
from finemoe.policies.base import LayerRouting, PolicyContext, Prefetch, StepInfo, ranked_prefetches
from finemoe.policies.caches import TrackedCachePolicy
from finemoe.policies.memo import ContentMemo, digest
from finemoe.policies.registry import register


def activation_matrix(trace, rows: np.ndarray) -> np.ndarray:
    """float [L, J]: tokens routed to each expert over `rows` of `trace` (missing records skipped)."""
    g = trace.geometry
    eam = np.zeros((g.num_layers, g.num_experts))
    ex = trace.experts[rows]  # [n, L, K]
    layer_idx = np.broadcast_to(np.arange(g.num_layers)[None, :, None], ex.shape)
    valid = ex >= 0
    np.add.at(eam, (layer_idx[valid], ex[valid].astype(np.int64)), 1.0)
    return eam


class _Partial:
    """A running request's EAM so far, with its squared norm kept exact as counts arrive."""

    __slots__ = ("eam", "norm2")

    def __init__(self, eam: np.ndarray) -> None:
        self.eam = eam
        self.norm2 = 0.0

    def count(self, layer: int, experts: np.ndarray) -> None:
        """Add one layer's routed experts (all tokens; -1, a missing record, skipped)."""
        row = self.eam[layer]
        for e in experts.ravel().tolist():
            if e >= 0:
                c = row[e]
                row[e] = c + 1.0
                self.norm2 += 2.0 * c + 1.0  # (c + 1)^2 - c^2: integers, so the sum stays exact


def _to_arrays(matches: dict[int, list[int]]) -> dict[str, np.ndarray]:
    width = len(next(iter(matches.values()))) if matches else 0
    return {"starts": np.array(list(matches), dtype=np.int64),
            "matches": np.array(list(matches.values()), dtype=np.int64).reshape(len(matches), width)}


def _from_arrays(a: dict[str, np.ndarray]) -> dict[int, list[int]]:
    return dict(zip(a["starts"].tolist(), a["matches"].tolist(), strict=True))


# By stored EAMs and measured routing.
_MATCHES: ContentMemo[dict[int, list[int]]] = ContentMemo(4, "moe-infinity-matches", _to_arrays, _from_arrays)


@register
class MoEInfinity(TrackedCachePolicy):
    cache_order = "lfu"
    name = "moe-infinity"
    uses_history = True

    def __init__(self, distance: int = 3, num_prefetch: int | None = None, learn_online: bool = True) -> None:
        super().__init__()
        if int(distance) < 1:
            raise TypeError(f"distance must be at least 1 layer, got {distance}")
        if num_prefetch is not None and int(num_prefetch) < 1:
            raise TypeError(f"num_prefetch must be at least 1, got {num_prefetch}")
        self.distance = int(distance)
        self.num_prefetch = None if num_prefetch is None else int(num_prefetch)
        self.learn_online = bool(learn_online)
        self.params = dict(distance=self.distance, num_prefetch=self.num_prefetch, learn_online=self.learn_online)
        self.history: list[np.ndarray] = []
        self.matches_planned = 0  # calls whose match `prepare` computed
        self._planned: dict[int, list[int]] | None = None  # every measured iteration's matches (`prepare`)
        self._planned_history = -1  # stored EAMs when they were computed
        self._seq_planned: list[list[int] | None] = []

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.n_pref = min(self.num_prefetch or g.top_k, g.num_experts)
        self._partial: dict[int, np.ndarray] = {}  # request id -> EAM so far
        self._step: StepInfo | None = None
        self._refresh()

    def _refresh(self) -> None:
        self._predictions: dict[tuple[int, int], list[tuple[float, int, int]]] = {}  # _predict's memo
        if self.history:
            stack = np.stack(self.history)
            self._flat = stack.reshape(len(self.history), -1)
            self._norms = np.linalg.norm(self._flat, axis=1)
            self._popular = stack.sum(axis=0)
        else:
            self._flat, self._norms, self._popular = None, None, None

    def fit(self, history) -> None:
        for its in history.iterations_by_request.values():
            if its:
                self.history.append(activation_matrix(history, np.arange(its[0].start, its[-1].stop)))
        self._refresh()

    def on_request_finished(self, request_id: int, trace) -> None:
        self._partial.pop(request_id, None)
        if self.learn_online:
            rows = np.flatnonzero(trace.request_id == request_id)
            if rows.size:
                self.history.append(activation_matrix(trace, rows))
                self._refresh()

    def _match(self, partial: _Partial) -> int | None:
        """Index of the stored EAM most similar (cosine) to `partial`; -1 (popularity) if nothing
        is observed yet; None without history."""
        if self._flat is None:
            return None
        if partial.norm2 == 0.0:
            return -1
        # np.linalg.norm of counts: the square root of an exact integer sum, kept as counts arrive.
        qn = math.sqrt(partial.norm2)
        cos = (self._flat @ partial.eam.reshape(-1)) / np.maximum(self._norms * qn, 1e-12)
        return int(np.argmax(cos))

    def prepare(self, trace, measure: list[int]) -> None:
        """Every measured request's matches at each of its calls, computed at once: the stored
        EAMs are fixed for an offline run, and a request's partial EAM grows with its own
        routing only (`_matches_for`)."""
        if self._flat is None:
            return
        by_request = trace.iterations_by_request
        its = {rid: by_request.get(rid, ()) for rid in measure}
        key = digest(self._flat, trace.content_hash(), self.L, self.J,
                     np.array([(it.start, it.stop) for rid in measure for it in its[rid]]))
        self._planned = _MATCHES.get(key, lambda: self._matches_for(trace, its))
        self._planned_history = len(self.history)

    def _matches_for(self, trace, its: dict) -> dict[int, list[int]]:
        """By an iteration's first trace row: its match at step start, then after each layer, as
        `_match` returns them. Counts are integers, so every product and sum is exact, in any
        order: all of a request's partial EAMs go through one matrix product."""
        out: dict[int, list[int]] = {}
        layers_so_far = (np.arange(self.L)[None, :] <= np.arange(self.L)[:, None]).astype(np.float64)  # [after, row]
        for request_its in its.values():
            if not request_its:
                continue
            counts = np.stack([activation_matrix(trace, np.arange(it.start, it.stop)) for it in request_its])
            before = np.cumsum(counts, axis=0) - counts  # [iterations, L, J]: the earlier iterations'
            partial = np.concatenate(
                [before[:, None], before[:, None] + counts[:, None] * layers_so_far[None, :, :, None]], axis=1)
            flat = partial.reshape(-1, self.L * self.J)  # [iterations x (1 + L), L x J]
            norm2 = (flat**2).sum(axis=1)
            cos = (flat @ self._flat.T) / np.maximum(self._norms[None, :] * np.sqrt(norm2)[:, None], 1e-12)
            matches = np.where(norm2 == 0.0, -1, np.argmax(cos, axis=1)).reshape(len(request_its), 1 + self.L)
            for it, row in zip(request_its, matches.tolist(), strict=True):
                out[it.start] = row
        return out

    def _planned_of(self, seq) -> list[int] | None:
        """`prepare`'s matches of sequence `seq`'s iteration (None: it searches as it goes)."""
        if self._planned is None or len(self.history) != self._planned_history:
            return None
        return self._planned.get(seq.start)

    def _predictions_of(self, match: int, current: int) -> list[tuple[float, int, int]]:
        """(priority, target layer, expert) for the layers after `current` from stored EAM `match`
        (-1: popularity). Memoised: they depend on nothing else until the history changes."""
        got = self._predictions.get((match, current))
        if got is None:
            eam = self._popular if match < 0 else self._flat[match].reshape(self.L, self.J)
            got = []
            for target in range(current + 1, min(current + 1 + self.distance, self.L)):
                row = eam[target]
                total = row.sum()
                if total <= 0:
                    continue
                for e in np.argsort(-row, kind="stable")[: self.n_pref].tolist():
                    got.append((float(row[e] / total) / (target - current), target, e))
            self._predictions[(match, current)] = got
        return got

    def _predict(self, out: dict, current: int, match: int | None) -> None:
        """Merge one sequence's predictions into `out` ((target, expert) -> highest priority)."""
        if match is None:
            return
        for prio, target, e in self._predictions_of(match, current):
            key = (target, e)
            if key not in out or out[key] < prio:
                out[key] = prio

    def _partial_of(self, request_id: int) -> _Partial:
        partial = self._partial.get(request_id)
        if partial is None:
            partial = self._partial[request_id] = _Partial(np.zeros((self.L, self.J)))
        return partial

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        self._step = step
        self._seq_planned = [self._planned_of(s) for s in step.sequences]
        out: dict = {}
        for s, planned in zip(step.sequences, self._seq_planned, strict=True):
            if planned is not None:
                self.matches_planned += 1
                self._predict(out, -1, planned[0])
            else:
                self._predict(out, -1, self._match(self._partial_of(s.request_id)))
        return ranked_prefetches(step.step, out)

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        out: dict = {}
        layer = routing.layer
        for i, s in enumerate(routing.step.sequences):
            planned = self._seq_planned[i] if i < len(self._seq_planned) else None
            if planned is not None:
                if layer + 1 < self.L:
                    self.matches_planned += 1
                    self._predict(out, layer, planned[layer + 1])
                continue
            partial = self._partial_of(s.request_id)
            partial.count(layer, routing.experts(i))
            if layer + 1 < self.L:
                self._predict(out, layer, self._match(partial))
        return ranked_prefetches(routing.step.step, out)

    def plans_asks(self) -> bool:
        """Whether `planned_asks` can stand for the hooks: `prepare` matched every measured call
        against the stored EAMs in use (an offline run), or there are none (it predicts nothing)."""
        return self._flat is None or (self._planned is not None and len(self.history) == self._planned_history)

    def planned_asks(self, trace, steps, first_step: int) -> PlannedAsks:
        """The hooks' asks for planned steps (`steps[s]` is engine step first_step + s): a step of
        one sequence asks, at its start and after each layer, what its planned match predicts, one
        ranked slice per (match, hook) shared by every step; any other step calls the hooks."""
        L = self.L
        b = AskBuilder(len(steps), L, first_step)
        single, matches = [], []
        for s, seqs in enumerate(steps):
            row = self._planned_of(seqs[0]) if len(seqs) == 1 else None
            if row is not None:
                single.append(s)
                matches.append(row)
        chosen = set(single)
        hook_asks(self, trace, steps, first_step, b, [s for s in range(len(steps)) if s not in chosen])
        if single:
            hooks = np.arange(L)  # hook h: after layer h - 1 (0: the step's start); after the last: none
            pairs = np.asarray(matches, np.int64)[:, :L] * (L + 1) + hooks[None, :]
            unique, inverse = np.unique(pairs, return_inverse=True)
            lo = np.empty(unique.size, np.int64)
            hi = np.empty(unique.size, np.int64)
            for u, pair in enumerate(unique.tolist()):
                match, h = divmod(pair, L + 1)
                ranked = sorted(self._predictions_of(match, h - 1), reverse=True)
                lo[u] = b.append([t for _, t, _ in ranked], [e for _, _, e in ranked], [p for p, _, _ in ranked])
                hi[u] = lo[u] + len(ranked)
            inverse = inverse.reshape(pairs.shape)
            rows = np.array(single)[:, None]
            b.lo[rows, hooks[None, :]] = lo[inverse]
            b.hi[rows, hooks[None, :]] = hi[inverse]
            self.matches_planned += len(single) * L
        return b.build(wants_step=True)

    def describe(self) -> dict:
        d = super().describe()
        d["stats"] = {"history_matrices": len(self.history), "matches_planned": self.matches_planned}
        return d
