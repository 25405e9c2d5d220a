"""FineMoE's motivating figure: routing entropy per layer, per request (coarse) vs per iteration (fine).

Aggregated over a whole request, expert usage is nearly uniform (entropy close to log2 J), so
request-level statistics predict little; within one iteration it is concentrated on a few experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finemoe.plots.common import Skip
from finemoe.plots.style import Rendered, finish, new_figure


def coarse_fine_entropy(trace) -> tuple[np.ndarray, np.ndarray]:
    """Mean entropy (bits) per layer of expert usage per request (coarse) and per iteration (fine).

    Usage of a group of tokens at a layer = the summed router probabilities of its tokens (the
    top-k gate weights where the trace lacks full probabilities), normalised to a distribution.
    """
    try:  # the trace statistics module owns these definitions (finemoe trace info prints them)
        from finemoe.traces.stats import routing_stats
    except ImportError:
        return _coarse_fine_entropy(trace)
    st = routing_stats(trace)
    return np.asarray(st.coarse_entropy_per_layer_bits, float), np.asarray(st.fine_entropy_per_layer_bits, float)


def _coarse_fine_entropy(trace) -> tuple[np.ndarray, np.ndarray]:
    g = trace.geometry
    n, L, J = trace.num_tokens, g.num_layers, g.num_experts
    if n == 0:
        raise Skip("the trace holds no tokens")
    if trace.router_probs is not None:
        mass = trace.router_probs.astype(np.float64)
    else:
        mass = np.zeros((n, L, J))
        present = trace.experts >= 0
        rows, layers, slots = np.nonzero(present)
        np.add.at(mass, (rows, layers, trace.experts[rows, layers, slots].astype(np.int64)),
                  trace.weights[rows, layers, slots].astype(np.float64))
    fine_groups = np.array([it.start for it in trace.iterations] + [n])
    request_starts = np.flatnonzero(np.r_[True, np.diff(trace.request_id) != 0])
    coarse_groups = np.r_[request_starts, n]
    return _group_entropy(mass, coarse_groups), _group_entropy(mass, fine_groups)


def _group_entropy(mass: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Mean over groups (rows bounds[i]:bounds[i+1]) of the entropy of each layer's summed mass."""
    sums = np.add.reduceat(mass, bounds[:-1], axis=0)  # [groups, L, J]
    totals = sums.sum(axis=2, keepdims=True)
    valid = totals[:, :, 0] > 0
    p = np.divide(sums, totals, out=np.zeros_like(sums), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=2)
    counts = valid.sum(axis=0)
    return np.where(counts > 0, (h * valid).sum(axis=0) / np.maximum(counts, 1), np.nan)


def routing_entropy(trace, out_dir: Path, trace_name: str = "trace") -> Rendered:
    g = trace.geometry
    coarse, fine = coarse_fine_entropy(trace)
    layers = np.arange(g.num_layers)
    fig, axes = new_figure(max(7.5, 0.25 * g.num_layers + 4), 4.6)
    ax = axes[0][0]
    width = 0.4
    ax.bar(layers - width / 2, coarse, width, color="#9467bd", label="coarse: per request")
    ax.bar(layers + width / 2, fine, width, color="#d62728", label="fine: per iteration")
    ax.axhline(np.log2(g.num_experts), color="#333333", linestyle="--", linewidth=1,
               label=f"uniform over {g.num_experts} experts ({np.log2(g.num_experts):.2g} bits)")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert-usage entropy (bits)")
    ax.set_ylim(0, np.log2(g.num_experts) * 1.3)
    step = max(1, g.num_layers // 16)
    ax.set_xticks(layers[::step])
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    source = "full router probabilities" if trace.router_probs is not None else "top-k gate weights"
    seed = _trace_seed(trace.metadata or {})
    cap = (f"trace: {trace_name} ({len(trace.requests)} requests, {trace.num_tokens} tokens, from {source})  |  "
           f"model: {g.model_name}  |  hardware: n/a (routing only)  |  seed: {seed}")
    title = f"Routing entropy per layer: coarse {np.nanmean(coarse):.2f} vs fine {np.nanmean(fine):.2f} bits"
    return finish(fig, "routing_entropy", title, cap, out_dir)


def _trace_seed(meta: dict):
    """The seed a trace was made with: the collector's, or a synthetic source's."""
    for section in ("collector", "source"):
        part = meta.get(section)
        if isinstance(part, dict) and part.get("seed") is not None:
            return part["seed"]
    return meta.get("seed", "n/a")
