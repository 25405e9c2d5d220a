"""Where each routed expert ran, per policy at one memory budget: resident on the GPU, on the GPU
after a copy, or on the CPU (docs/cpu-execution.md), with the bytes that crossed each way."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finemoe.plots.bars import budget_key, choose_budget
from finemoe.plots.common import Skip, mean, series
from finemoe.plots.data import Run, caption, sim_runs
from finemoe.plots.style import Rendered, finish, new_figure

PARTS = (("ran_gpu_resident", "on the GPU, resident", "#2b8cbe"),
         ("ran_gpu_copied", "on the GPU, after a copy", "#fdae61"),
         ("ran_cpu", "on the CPU", "#7b3294"))


def expert_placement(runs: Sequence[Run], out_dir: Path, budget: str | None = None) -> Rendered:
    runs = [r for r in sim_runs(runs) if not r.is_floor and not np.isnan(r.metric("ran_cpu"))]
    if not runs:
        raise Skip("no simulation results record where experts ran (results of finemoe 2026-12-03 or later)")
    chosen = choose_budget(runs, budget)
    groups = series([r for r in runs if budget_key(r) == chosen], lambda r: 0.0)
    if not groups:
        raise Skip(f"no results at budget {chosen}")
    labels = list(groups)
    fig, axes = new_figure(9.0, max(3.0, 0.45 * len(labels) + 2.0), 1, 1)
    ax = axes[0][0]
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for name, text, colour in PARTS:
        share = []
        for lbl in labels:
            members = groups[lbl]
            routed = mean([m.metric("hits") + m.metric("misses") for m in members])
            share.append(100.0 * mean([m.metric(name) for m in members]) / routed if routed else 0.0)
        ax.barh(y, share, left=left, color=colour, edgecolor="#333333", linewidth=0.4, label=text)
        left += np.asarray(share)
    for i, lbl in enumerate(labels):
        members = groups[lbl]
        h2d = mean([m.metric("bytes_h2d") + _zero(m.metric("bytes_h2d_activations")) for m in members]) / 1e9
        d2h = mean([_zero(m.metric("bytes_d2h")) for m in members]) / 1e9
        ax.text(101, i, f"{h2d:,.1f} GB to GPU, {d2h:,.2f} GB to CPU", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 140)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("share of routed experts (%)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.36, -0.16), ncol=3, frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    return finish(fig, "expert_placement", f"Where the experts ran at {chosen}", caption(groups[labels[0]]), out_dir)


def _zero(v: float) -> float:
    return 0.0 if np.isnan(v) else v
