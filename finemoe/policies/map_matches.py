"""FineMoE's map matches for a whole run at once: what its searches return depends on the trace and
the store the history built, not on the cache or the clock, so an offline run (a store fixed
before it starts) can have every measured iteration's matches computed in one vectorised pass, and
every budget and hardware of a sweep read the same ones (`matches_for` remembers them per process,
keyed by their inputs' content).

Bit for bit what the incremental path returns (`ExpertMapStore.trajectory_matches`, and the same
`match_semantic` call per iteration); tests/test_map_matches.py runs both. An online run (the store
grows as requests finish) and the replayer keep the incremental path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from finemoe.policies.expert_maps import ExpertMapStore, Match, topk_map
from finemoe.policies.memo import ContentMemo, digest

MATCHES_KEPT = 4  # tables remembered per process: a sweep's FineMoE variants on one trace


@dataclass(frozen=True)
class MapMatches:
    """Per iteration (by its first trace row): its semantic match (None: none) and, per layer
    l < `layers`, the best stored map over rows 0..l and its cosine (plain lists: read per call)."""

    index_of: dict[int, int]  # first trace row of an iteration -> its index below
    semantic: list[Match | None]
    best: list[list[int]]
    cosine: list[list[float]]
    store_digest: str

    def trajectory(self, first_row: int) -> tuple[list[int], list[float]] | None:
        i = self.index_of.get(first_row)
        return None if i is None else (self.best[i], self.cosine[i])

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(semantic match's map index, -1: none; its similarity; best [n, layers]; cosine
        [n, layers]) as arrays, for the hooks planned all at once (policies/finemoe_hooks.py)."""
        a = _to_arrays(self)
        return a["semantic_index"], a["semantic_similarity"], a["best"], a["cosine"]


def _to_arrays(m: MapMatches) -> dict[str, np.ndarray]:
    n = len(m.best)
    layers = len(m.best[0]) if n else 0
    return {"starts": np.array(sorted(m.index_of, key=m.index_of.get), dtype=np.int64).reshape(n),
            "semantic_index": np.array([-1 if s is None else s.index for s in m.semantic], dtype=np.int64).reshape(n),
            "semantic_similarity": np.array([0.0 if s is None else s.similarity for s in m.semantic]).reshape(n),
            "best": np.array(m.best, dtype=np.int64).reshape(n, layers),
            "cosine": np.array(m.cosine, dtype=np.float64).reshape(n, layers),
            "store_digest": np.array(m.store_digest)}


def _from_arrays(a: dict[str, np.ndarray]) -> MapMatches:
    semantic = [None if i < 0 else Match(int(i), float(s))
                for i, s in zip(a["semantic_index"].tolist(), a["semantic_similarity"].tolist(), strict=True)]
    return MapMatches({s: i for i, s in enumerate(a["starts"].tolist())}, semantic, a["best"].tolist(),
                      a["cosine"].tolist(), str(a["store_digest"]))


_MATCHES: ContentMemo[MapMatches] = ContentMemo(MATCHES_KEPT, "finemoe-matches", _to_arrays, _from_arrays)
# The last few questions with the objects they were asked of (held, so that no other object takes
# their identity): (store, its `inserted`, trace, starts, stops, (maps_from, layers, semantic), the
# content key its answer is kept under in `_MATCHES`, which a cleared memo no longer holds).
_BY_IDENTITY: list[tuple] = []


def observed_rows(trace, starts: np.ndarray, stops: np.ndarray, maps_from: str) -> np.ndarray:
    """[n, L, J] float64: iteration [start, stop)'s row per layer as FineMoE observes it (its router
    rows, or the top-k map; a prefill's the mean over its tokens, as `FineMoE._observed_row`)."""
    J = trace.geometry.num_experts
    if maps_from == "probs":
        rows = np.nan_to_num(trace.router_probs[starts].astype(np.float32))
    else:
        rows = topk_map(trace.experts[starts], trace.weights[starts], J)
    rows = rows.astype(np.float64)
    for i in np.flatnonzero(stops - starts > 1).tolist():
        lo, hi = int(starts[i]), int(stops[i])
        for layer in range(trace.geometry.num_layers):
            if maps_from == "probs":
                tokens = np.nan_to_num(trace.router_probs[lo:hi, layer].astype(np.float32))
            else:
                tokens = topk_map(trace.experts[lo:hi, layer], trace.weights[lo:hi, layer], J)
            rows[i, layer] = tokens.mean(axis=0, keepdims=True)[0]
    return rows


def semantic_keys(trace, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray] | None:
    """Each iteration's semantic key as `StepInfo.semantic_key` gives it (None: the trace has none)."""
    if trace.semantic_key is None:
        return None
    return [trace.semantic_key[lo:hi].astype(np.float32).mean(axis=0) for lo, hi in
            zip(starts.tolist(), stops.tolist(), strict=True)]


def matches_for(store: ExpertMapStore, trace, starts: np.ndarray, stops: np.ndarray, maps_from: str,
                layers: int, semantic: bool) -> MapMatches:
    """The matches of iterations [starts[i], stops[i]) of `trace` against `store`: computed once
    per process for the same store, rows and keys (a content hash of them all). The same store and
    trace objects asked again (a sweep's budgets share a fitted store) skip even the hash."""
    asked = (maps_from, layers, semantic)
    for seen in _BY_IDENTITY:
        if (seen[0] is store and seen[1] == store.inserted and seen[2] is trace and seen[5] == asked
                and np.array_equal(seen[3], starts) and np.array_equal(seen[4], stops)):
            held = _MATCHES.held(seen[6])
            if held is not None:
                return held
    rows = observed_rows(trace, starts, stops, maps_from)
    keys = semantic_keys(trace, starts, stops) if semantic else None
    key = digest(store.digest(), layers, semantic, np.asarray(starts, dtype=np.int64), rows,
                 None if not keys else np.stack(keys))
    matches = _MATCHES.get(key, lambda: compute_matches(store, starts, rows, keys, layers))
    _BY_IDENTITY.append((store, store.inserted, trace, np.array(starts), np.array(stops), asked, key))
    del _BY_IDENTITY[:-MATCHES_KEPT]
    return matches


def compute_matches(store: ExpertMapStore, starts: np.ndarray, rows: np.ndarray,
                    keys: list[np.ndarray] | None, layers: int) -> MapMatches:
    """`matches_for` computed afresh."""
    best, cos = store.trajectory_matches(rows, max(layers, 0))
    semantic = [None] * len(starts) if keys is None else [store.match_semantic(k) for k in keys]
    return MapMatches({int(s): i for i, s in enumerate(starts.tolist())}, semantic, best.tolist(), cos.tolist(),
                      store.digest())
