"""FineMoE's expert map store and selection rules: pure functions and arrays, no engine, no timing.

An expert map is the L x J stack of one iteration's router probability rows (a prefill's: the mean
over its tokens). The store keeps at most C maps, each with a semantic key (embedding output) and
the map itself as its trajectory key. The functions here are what the unit tests pin: the delta rule, redundancy replacement, the trajectory
cosine over the first rows, and the prefetch priority.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from finemoe.jit import jit

_EPS = 1e-12
_BATCH_ELEMENTS = 1 << 17  # query x map cosines per batch of `trajectory_matches` (1 MB: cache-sized)


def select_by_delta(row: np.ndarray, similarity: float, top_k: int) -> np.ndarray:
    """Expert ids to prefetch from one predicted probability row, likeliest first.

    delta = clamp(1 - similarity, 0, 1); the SMALLEST prefix of experts in descending probability
    whose summed probability reaches delta, but never fewer than `top_k` (and never more than J).
    A confident match (similarity 1) gives exactly top_k; a poor one hedges with more.
    Probability is counted as a share of the row's total, with a relative tolerance of 1e-9, because
    stored rows (float16) rarely sum to exactly 1: delta = 1 then means "every expert with non-zero
    probability", not "all J experts because 0.9999 < 1".
    """
    values = np.asarray(row, dtype=np.float64).tolist()
    return np.array(delta_prefix(values, similarity, top_k), dtype=np.int64)


def delta_prefix(values: list[float], similarity: float, top_k: int) -> list[int]:
    """`select_by_delta` on a plain list: the policy calls it once per predicted row, and for a
    row of tens of experts Python's sort and running sum cost less than numpy's per-call overhead.
    Ties go to the lower id (a stable sort), and the running sum adds in the same order as numpy's."""
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    delta = min(max(1.0 - float(similarity), 0.0), 1.0)
    cum = list(accumulate(values[i] for i in order))
    total = cum[-1] if cum else 0.0
    if total <= 0.0:
        return order[:top_k]
    n = bisect.bisect_left(cum, delta * total * (1.0 - 1e-9)) + 1
    return order[: min(max(n, top_k), len(values))]


def prefetch_priority(prob: float, target_layer: int, current_layer: int) -> float:
    """p / (l - l_now): likelier and nearer first. `current_layer` is -1 before layer 0 runs."""
    distance = target_layer - current_layer
    if distance <= 0:
        raise ValueError(f"target layer {target_layer} is not ahead of layer {current_layer}")
    return float(prob) / distance


def cosine_rows(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Cosine of each row of `matrix` with `vector` (0 where either is all zero)."""
    num = matrix @ vector
    den = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    return np.where(den > _EPS, num / np.maximum(den, _EPS), 0.0)


def topk_map(experts: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """The degraded expert map of traces without full router probabilities.

    Each row puts the recorded (renormalised) top-k gate weights on the routed experts and zero
    elsewhere. Missing records (expert id -1) give an all-zero row. experts/weights: [..., L, K].
    """
    experts = np.asarray(experts)
    out = np.zeros(experts.shape[:-1] + (num_experts,), dtype=np.float32)
    valid = experts >= 0
    idx = np.where(valid, experts, 0).astype(np.int64)
    w = np.where(valid, np.asarray(weights, dtype=np.float32), 0.0)
    # Ids within one top-k record are distinct, so no write overwrites another.
    np.put_along_axis(out, idx, w, axis=-1)
    return out


def iteration_starts(request_id: np.ndarray, iteration: np.ndarray) -> np.ndarray:
    """Row offsets where a new (request, iteration) begins, for rows sorted by both."""
    request_id, iteration = np.asarray(request_id), np.asarray(iteration)
    if request_id.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = (np.diff(request_id) != 0) | (np.diff(iteration) != 0)
    return np.concatenate(([0], np.flatnonzero(change) + 1)).astype(np.int64)


def iteration_means(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The mean of `values` (rows first) over each group of rows beginning at `starts`: one expert
    map (or semantic key) per iteration, as the paper counts a prefill as one iteration."""
    values = np.asarray(values, dtype=np.float32)
    counts = np.diff(np.append(starts, values.shape[0]))
    sums = np.add.reduceat(values.astype(np.float64), starts, axis=0)
    return (sums / counts.reshape((-1,) + (1,) * (values.ndim - 1))).astype(np.float32)


@dataclass
class Match:
    """The best stored map for a query and how similar it was (cosine)."""

    index: int
    similarity: float


class ExpertMapStore:
    """At most `capacity` expert maps with semantic keys; full store replaces the most redundant map.

    redundancy(new, stored) = (d/L) * cos(semantic keys) + (1 - d/L) * cos(full maps). Without
    semantic keys (traces that lack them) the semantic term is dropped and only the map term counts.
    """

    def __init__(self, num_layers: int, num_experts: int, capacity: int, distance: int, semantic_dim: int | None):
        if capacity < 1:
            raise ValueError(f"map store capacity must be at least 1, got {capacity}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.capacity, self.distance = capacity, distance
        self.maps = np.zeros((capacity, num_layers, num_experts), dtype=np.float32)
        # The same maps layer-major, so a trajectory match reads one contiguous [C, J] block per layer.
        self._layer_maps = np.zeros((num_layers, capacity, num_experts), dtype=np.float32)
        self._unit_maps = np.zeros((capacity, num_layers * num_experts), dtype=np.float32)
        self._cum_norm2 = np.zeros((capacity, num_layers), dtype=np.float32)  # sum of squares, rows 0..l
        self._inv_cum_norm = np.zeros((num_layers, capacity))  # 1 / sqrt of it (0 for a zero prefix), layer-major
        self.semantic_dim = semantic_dim
        self.keys = None if semantic_dim is None else np.zeros((capacity, semantic_dim), dtype=np.float32)
        self._unit_keys = None if semantic_dim is None else np.zeros((capacity, semantic_dim), dtype=np.float32)
        self.size = 0
        self.inserted = 0  # maps ever offered (a full store replaces instead of growing)
        self.replaced = 0

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        arrays = [self.maps, self._layer_maps, self._unit_maps, self._cum_norm2, self._inv_cum_norm, self.keys,
                  self._unit_keys]
        return int(sum(a.nbytes for a in arrays if a is not None))

    def redundancy(self, expert_map: np.ndarray, key: np.ndarray | None) -> np.ndarray:
        """Redundancy of the new map with each stored map (length `size`)."""
        n = self.size
        flat = np.asarray(expert_map, dtype=np.float32).reshape(-1)
        map_cos = self._unit_maps[:n] @ _unit(flat)
        if self._unit_keys is None or key is None:
            return map_cos
        w = self.distance / self.num_layers
        return w * (self._unit_keys[:n] @ _unit(np.asarray(key, dtype=np.float32))) + (1.0 - w) * map_cos

    def add(self, expert_map: np.ndarray, key: np.ndarray | None = None) -> int:
        """Store a map; returns its slot. A full store overwrites the stored map most redundant with it."""
        expert_map = np.asarray(expert_map, dtype=np.float32)
        if expert_map.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"expert map shape {expert_map.shape} != {(self.num_layers, self.num_experts)}")
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:
            slot = int(np.argmax(self.redundancy(expert_map, key)))
            self.replaced += 1
        self.inserted += 1
        self.maps[slot] = expert_map
        self._layer_maps[:, slot] = expert_map
        self._unit_maps[slot] = _unit(expert_map.reshape(-1))
        self._cum_norm2[slot] = np.cumsum((expert_map.astype(np.float64) ** 2).sum(axis=1))
        self._inv_cum_norm[:, slot] = _inverse_norms(self._cum_norm2[slot])
        if self.keys is not None:
            k = np.zeros(self.semantic_dim, np.float32) if key is None else np.asarray(key, np.float32)
            self.keys[slot] = k
            self._unit_keys[slot] = _unit(k)
        return slot

    def match_semantic(self, key: np.ndarray) -> Match | None:
        """The stored map whose semantic key is most similar (cosine) to `key`."""
        if self.size == 0 or self._unit_keys is None or key is None:
            return None
        sims = self._unit_keys[: self.size] @ _unit(np.asarray(key, dtype=np.float32))
        i = int(np.argmax(sims))
        return Match(i, float(sims[i]))

    def trajectory_matches(self, rows: np.ndarray, layers: int) -> tuple[np.ndarray, np.ndarray]:
        """For each of n one-token queries (`rows` [n, L, J]: a query's observed row per layer) and
        each layer l < `layers`: the best stored map over rows 0..l and its cosine, as a
        `trajectory(1)` query fed layers 0..l and its argmax would give them, bit for bit; all
        queries at once, a hundred or so at a time."""
        n, s = rows.shape[0], self.size
        best = np.zeros((n, layers), dtype=np.int64)
        sims = np.zeros((n, layers))
        if s == 0:
            return best, sims
        chunk = max(1, _BATCH_ELEMENTS // s)
        for lo in range(0, n, chunk):
            part = np.asarray(rows[lo : lo + chunk], dtype=np.float64)
            dot = np.zeros((part.shape[0], s))
            q_norm2 = np.zeros(part.shape[0])
            for layer in range(layers):
                r = part[:, layer]
                # One [1, J] x [J, size] product per query, stacked: numpy's matmul runs each as the
                # query's own `observe` runs it (the same BLAS call), where one [n, J] x [J, size]
                # product would sum in another order (for J > 8 its last bits differ).
                dot += (r[:, None, :] @ self._layer_maps[layer, :s].astype(np.float64).T)[:, 0]
                q_norm2 += (r**2).sum(axis=1)
                _best_cosines(dot, self._inv_cum_norm[layer, :s], _inverse_norms(q_norm2),
                              best[lo : lo + chunk, layer], sims[lo : lo + chunk, layer])
        return best, sims

    _ARRAYS = ("maps", "_layer_maps", "_unit_maps", "_cum_norm2", "_inv_cum_norm", "keys", "_unit_keys")
    _NUMBERS = ("num_layers", "num_experts", "capacity", "distance", "size", "inserted", "replaced")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything the store holds, as plain arrays: a fitted store kept on disk (finemoe.py's
        `fit`) is read back as the same store, bit for bit, without adding its maps again."""
        out = {name: getattr(self, name) for name in self._ARRAYS if getattr(self, name) is not None}
        out.update({name: np.int64(getattr(self, name)) for name in self._NUMBERS})
        out["semantic_dim"] = np.int64(-1 if self.semantic_dim is None else self.semantic_dim)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> ExpertMapStore:
        """The store `to_arrays` gave."""
        dim = int(a["semantic_dim"])
        store = cls(int(a["num_layers"]), int(a["num_experts"]), int(a["capacity"]), int(a["distance"]),
                    None if dim < 0 else dim)
        for name in cls._ARRAYS:
            if getattr(store, name) is not None:
                have = getattr(store, name)
                if a[name].shape != have.shape or a[name].dtype != have.dtype:
                    raise ValueError(f"stored {name} is {a[name].dtype}{a[name].shape}, not {have.dtype}{have.shape}")
                have[...] = a[name]
        store.size, store.inserted, store.replaced = int(a["size"]), int(a["inserted"]), int(a["replaced"])
        return store

    def digest(self) -> str:
        """A hash of what the store holds (maps and semantic keys): what its matches depend on."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.int64(self.size).tobytes())
        h.update(np.ascontiguousarray(self.maps[: self.size]).tobytes())
        if self.keys is not None:
            h.update(np.ascontiguousarray(self.keys[: self.size]).tobytes())
        return h.hexdigest()

    def trajectory(self, num_tokens: int) -> TrajectoryQuery:
        """An incremental trajectory match for `num_tokens` tokens, fed one layer at a time."""
        return TrajectoryQuery(self, num_tokens)


class TrajectoryQuery:
    """Cosine of each token's observed rows 0..l (flattened) with every stored map's rows 0..l.

    Accumulates dot products layer by layer, so matching at layer l costs O(tokens x C x J), not
    O(tokens x C x l x J). The store must not change while a query is alive (the policy applies new
    maps between engine steps).
    """

    def __init__(self, store: ExpertMapStore, num_tokens: int):
        self.store = store
        self.size = store.size
        self.dot = np.zeros((num_tokens, self.size), dtype=np.float64)
        self.q_norm2 = np.zeros(num_tokens, dtype=np.float64)
        self.last_layer = -1

    def observe(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """Add layer `layer`'s observed rows [tokens, J]; returns the cosines [tokens, size]."""
        if layer != self.last_layer + 1:
            raise ValueError(f"trajectory layers must arrive in order: got {layer} after {self.last_layer}")
        self.last_layer = layer
        rows = np.asarray(rows, dtype=np.float64)
        s = self.size
        self.dot += rows @ self.store._layer_maps[layer, :s].astype(np.float64).T
        self.q_norm2 += (rows**2).sum(axis=1)
        # dot / (|q| |m|) as two scalings of the [tokens, size] matrix (a prompt has hundreds of
        # tokens: each pass over that matrix costs about a millisecond); zero where a norm vanishes.
        cos = self.dot * self.store._inv_cum_norm[layer, :s]
        if len(self.q_norm2) == 1:  # a decode token: the same scaling, without numpy's per-call cost
            norm = math.sqrt(self.q_norm2[0])
            cos *= 1.0 / norm if norm > _EPS else 0.0
        else:
            cos *= _inverse_norms(self.q_norm2)[:, None]
        return cos

    def best(self, cos: np.ndarray) -> list[Match]:
        """Per token, the best stored map and its similarity."""
        idx, sim = self.best_arrays(cos)
        return [Match(int(i), float(s)) for i, s in zip(idx, sim, strict=True)]

    def best_arrays(self, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per token, the best stored map's index and its similarity, as arrays."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        idx = np.argmax(cos, axis=1)
        return idx, cos[np.arange(cos.shape[0]), idx]


@jit
def _best_cosines(dot, inv_map, inv_query, best, sims):
    """Per query row i, into best and sims: the argmax (first of ties; a NaN wins, as in np.argmax)
    over stored maps j of (dot[i, j] * inv_map[j]) * inv_query[i], the cosine `TrajectoryQuery.observe`
    computes, and that cosine: what `observe` and `best_arrays` give, in one pass over the
    [queries, maps] matrix instead of their three."""
    for i in range(dot.shape[0]):
        q = inv_query[i]
        top, at = (dot[i, 0] * inv_map[0]) * q, 0
        if top == top:
            for j in range(1, dot.shape[1]):
                c = (dot[i, j] * inv_map[j]) * q
                if c > top:
                    top, at = c, j
                elif c != c:
                    top, at = c, j
                    break
        best[i], sims[i] = at, top


def _inverse_norms(norm2: np.ndarray) -> np.ndarray:
    """1 / sqrt(norm2), 0 where the norm is (numerically) zero."""
    norm = np.sqrt(np.asarray(norm2, dtype=np.float64))
    out = np.zeros_like(norm)
    np.divide(1.0, norm, out=out, where=norm > _EPS)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > _EPS else np.zeros_like(v, dtype=np.float32)
