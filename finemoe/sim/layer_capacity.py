"""Per-layer expert cache sizes: how a budget's slots are split between the MoE layers.

By default every layer draws from one shared pool (`shared`: a policy's eviction may take any
layer's expert). A split gives each layer a share of its own, in which its copies evict only its
own experts (AdapMoE sizes them by a dynamic programme; Fate argues for more slots in early
layers; llama.cpp users ask for per-layer hot counts):

- `uniform`: the slots split evenly (the first layers take the remainder);
- `demand`: in proportion to each layer's effective number of experts on the history split
  (2 to the entropy of its expert usage, in bits): a layer whose routing is concentrated needs fewer;
- `dp`: the split that maximises the history split's hits of a per-layer LRU, by a dynamic
  programme over each layer's hit curve (one pass of LRU stack distances per layer: an access
  hits a cache of c slots iff fewer than c other experts were used since its last use);
- a file: one whole number per layer (whitespace or comma separated, or a JSON list).

Every layer gets at least the experts one step of it can need at once (top-k x batch, at most
the layer's experts) and at most its experts. A split is a restriction of the shared pool, so the
lower bounds of a shared cache of the same size still hold (sim/bounds.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError
from finemoe.traces.schema import MISSING_EXPERT, Trace

MODES = ("shared", "uniform", "demand", "dp")


def layer_floor(num_experts: int, top_k: int, max_batch: int) -> int:
    """The fewest slots a layer can run with: one step's experts of it at once."""
    return min(num_experts, top_k * max_batch)


def check_split_fits(mode: str, slots: int, geometry, max_batch: int) -> None:
    """ConfigError when `slots` cannot give every layer what one step of it needs (before a sweep runs)."""
    low = layer_floor(geometry.num_experts, geometry.top_k, max_batch)
    if slots < geometry.num_layers * low:
        raise ConfigError(f"--layer-capacity {Path(mode).name}: {slots} expert slots cannot give each of "
                          f"{geometry.num_layers} layers the {low} it needs at once (top-k x batch); use a larger "
                          "budget or the shared pool")


def resolve(mode: str, trace: Trace, history: list[str], slots: int, max_batch: int) -> tuple[int, ...] | None:
    """The per-layer capacities `mode` gives `slots` over `trace` (None for `shared`)."""
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    low = layer_floor(J, g.top_k, max_batch)
    if mode == "shared":
        return None
    if slots >= L * J:
        return (J,) * L
    check_split_fits(mode, slots, g, max_batch)
    if mode == "uniform":
        base, extra = divmod(slots, L)
        return tuple(min(J, base + (1 if layer < extra else 0)) for layer in range(L))
    if mode in ("demand", "dp"):
        if not history:
            raise ConfigError(f"--layer-capacity {mode} sizes layers from the history split, and this run has "
                              "none (--online or --history-fraction 0); use uniform or a file")
        if mode == "demand":
            return proportional(effective_experts(trace.select_requests(history).experts, J), slots, low, J)
        return dp_sizer(trace, history, max_batch)(slots)
    return from_file(mode, L, slots, low, J)


def dp_sizer(trace: Trace, history: list[str], max_batch: int):
    """`dp`'s capacities as a function of the slots: the layers' hit curves are measured once, so a
    caller sizing many budgets (`finemoe plan`) pays the pass over the history once."""
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    low = layer_floor(J, g.top_k, max_batch)
    experts = trace.select_requests(history).experts
    curves = [lru_hit_curve(experts[:, layer], J) for layer in range(L)]

    def capacities(slots: int) -> tuple[int, ...]:
        if slots >= L * J:
            return (J,) * L
        check_split_fits("dp", slots, g, max_batch)
        return best_split(curves, slots, low, J)

    return capacities


def effective_experts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer, 2 ** (entropy of its expert usage in bits): 1 for one expert always, J for uniform."""
    out = np.ones(experts.shape[1])
    for layer in range(experts.shape[1]):
        ids = experts[:, layer].ravel()
        counts = np.bincount(ids[ids != MISSING_EXPERT], minlength=num_experts).astype(float)
        if counts.sum() > 0:
            p = counts[counts > 0] / counts.sum()
            out[layer] = float(2.0 ** -(p * np.log2(p)).sum())
    return out


def proportional(weights: np.ndarray, slots: int, low: int, high: int) -> tuple[int, ...]:
    """`slots` split in proportion to `weights`, each share in [low, high]: from `low` each, one slot
    at a time to the layer furthest below its proportional share (ties: the lower layer)."""
    caps = np.full(len(weights), low, dtype=int)
    target = slots * np.asarray(weights, dtype=float) / max(float(np.sum(weights)), 1e-12)
    for _ in range(min(slots, high * len(caps)) - int(caps.sum())):
        gap = np.where(caps < high, target - caps, -np.inf)
        caps[int(np.argmax(gap))] += 1
    return tuple(int(c) for c in caps)


def lru_hit_curve(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """hits[c] of a per-layer LRU of c slots (c = 0..J) over one layer's accesses `experts` [n, K],
    row after row, from cold: an access hits iff its LRU stack distance is below c."""
    stack: list[int] = []
    at = np.zeros(num_experts + 1, dtype=np.int64)  # accesses at each stack distance
    for row in experts:
        for e in row:
            if e == MISSING_EXPERT:
                continue
            e = int(e)
            if e in stack:
                d = stack.index(e)
                at[d] += 1
                del stack[d]
            stack.insert(0, e)
    return np.concatenate([[0], np.cumsum(at[:num_experts])])


def best_split(curves: list[np.ndarray], slots: int, low: int, high: int) -> tuple[int, ...]:
    """The capacities in [low, high] with sum <= slots that maximise the total hits (a knapsack by
    dynamic programme over layers); slots the hits leave unused go, one by one, to the lowest layers
    with room."""
    n = len(curves)
    neg = -np.inf
    best = np.full(slots + 1, neg)
    best[0] = 0.0
    choices = []
    for curve in curves:
        new = np.full(slots + 1, neg)
        pick = np.zeros(slots + 1, dtype=int)
        for c in range(low, min(high, slots) + 1):
            cand = np.full(slots + 1, neg)
            cand[c:] = best[: slots + 1 - c] + float(curve[c])
            better = cand > new
            new[better], pick[better] = cand[better], c
        best = new
        choices.append(pick)
    top = float(np.max(best))
    s = int(np.flatnonzero(best == top).max())  # the most slots used among the best
    caps = [0] * n
    for layer in range(n - 1, -1, -1):
        caps[layer] = int(choices[layer][s])
        s -= caps[layer]
    spare = slots - sum(caps)
    for layer in range(n):
        add = min(spare, high - caps[layer])
        caps[layer] += add
        spare -= add
    return tuple(caps)


def from_file(path: str, num_layers: int, slots: int, low: int, high: int) -> tuple[int, ...]:
    """Per-layer capacities from a file: one whole number per layer, checked against the budget."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--layer-capacity: {path!r} is none of {', '.join(MODES)} and no such file")
    text = p.read_text().strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(v) for v in text.replace(",", " ").split()]
        caps = tuple(int(v) for v in values)
        if any(int(v) != v for v in values):
            raise ValueError
    except (ValueError, TypeError):
        raise ConfigError(f"--layer-capacity {path}: not a list of whole numbers") from None
    if len(caps) != num_layers:
        raise ConfigError(f"--layer-capacity {path}: {len(caps)} sizes for a model of {num_layers} layers")
    if any(not low <= c <= high for c in caps):
        raise ConfigError(f"--layer-capacity {path}: each layer needs {low} to {high} slots, got {min(caps)}-{max(caps)}")
    if sum(caps) > slots:
        raise ConfigError(f"--layer-capacity {path}: {sum(caps)} slots in all, more than the budget's {slots}")
    return caps
