"""Per-policy latency at one memory budget: time to first token and per output token, p50/p90/p99."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finemoe.plots.common import Skip, drop_single_points, maybe_log_y, mean, metric_unit, series
from finemoe.plots.data import (
    PlotError,
    Run,
    caption,
    format_budget,
    memory_axis,
    sim_runs,
    sorted_budgets,
)
from finemoe.plots.style import Rendered, finish, new_figure, policy_colour

QUANTILES = (("p50", 1.0, ""), ("p90", 0.7, ""), ("p99", 0.45, "//"))


def parse_budget(text: str) -> int:
    """'24G', '24GiB', '1.5T', '512M' or plain bytes -> bytes (binary units, as GPU memory is sold)."""
    try:
        from finemoe.sim.memory import parse_size
    except ImportError:  # the simulator's parser is the one to agree with; fall back until it exists
        parse_size = None
    if parse_size is not None:
        return int(parse_size(text))
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise PlotError(f"budget {text!r} is not a size like 24G, 512M or 25769803776")
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(match.group(2).upper() or "B"))


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*$")


def budget_key(run: Run) -> str:
    return format_budget(run)


def choose_budget(runs: Sequence[Run], budget: str | None) -> str:
    """The budget the bars are drawn at: the one asked for, else the one most policies share."""
    runs = [r for r in runs if not r.is_floor]
    if budget is not None:
        if budget.strip().isdigit() and all(r.slots_set_directly for r in runs):
            wanted = f"{int(budget)} slots"
            if any(budget_key(r) == wanted for r in runs):
                return wanted
        else:
            want = parse_budget(budget)
            for r in runs:
                if not r.slots_set_directly and r.gpu_mem_bytes is not None \
                        and abs(r.gpu_mem_bytes - want) <= 0.005 * want:
                    return budget_key(r)
        raise Skip(f"no results at budget {budget} (results hold {', '.join(sorted_budgets(runs))})")
    counts = Counter()
    for key in {(r.policy, budget_key(r)) for r in runs}:
        counts[key[1]] += 1
    if not counts:
        raise Skip("no results to compare")
    best = max(counts.values())
    _, x_of = memory_axis(runs)
    candidates = sorted({budget_key(r): x_of(r) for r in runs if counts[budget_key(r)] == best}.items(), key=lambda kv: kv[1])
    return candidates[len(candidates) // 2][0]  # the middle one: neither everything-fits nor starved


def latency_bars(runs: Sequence[Run], out_dir: Path, budget: str | None = None) -> Rendered:
    units = {m: metric_unit(runs, m) for m in ("ttft", "tpot")}  # from all runs: the report's units
    runs = sim_runs(runs)
    chosen = choose_budget(runs, budget)
    # the series of the memory figures; a parameter swept at this budget only is the distance figure's
    _, x_of = memory_axis(runs)
    lines = drop_single_points(series(runs, x_of), x_of)
    keep = {id(r) for members in lines.values() for r in members}
    at = [r for r in runs if (budget_key(r) == chosen or r.is_floor) and id(r) in keep]
    groups = series(at, lambda r: 0.0)
    if len(groups) < 1:
        raise Skip(f"no results at budget {chosen}")
    labels = list(groups)
    fig, axes = new_figure(min(14.0, max(7.5, 1.0 * len(labels) + 3.0)), 5.2, 1, 2)
    for ax, prefix, name in ((axes[0][0], "ttft", "time to first token"), (axes[0][1], "tpot", "time per output token")):
        values = [_mean_metric(groups[lbl], f"{prefix}_{q}_s") for lbl in labels for q, _, _ in QUANTILES]
        if all(math.isnan(v) for v in values):
            continue
        unit, scale = units[prefix]
        x = np.arange(len(labels))
        width = 0.8 / len(QUANTILES)
        for i, (q, alpha, hatch) in enumerate(QUANTILES):
            heights = [_mean_metric(groups[lbl], f"{prefix}_{q}_s") * scale for lbl in labels]
            colours = [policy_colour(groups[lbl][0].policy) for lbl in labels]
            ax.bar(x + (i - 1) * width, heights, width, color=colours, alpha=alpha, hatch=hatch,
                   edgecolor="#333333", linewidth=0.5, label=q)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        maybe_log_y(ax, values)
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_title(name.capitalize(), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        # legend: quantile shading only (colours are the policies, named on the x axis)
        handles = [ax.bar([0], [0], color="#777777", alpha=a, hatch=h, edgecolor="#333333")[0] for _, a, h in QUANTILES]
        for h in handles:
            h.remove()
        ax.legend(handles, [q for q, _, _ in QUANTILES], fontsize=8, title="percentile", title_fontsize=8)
    return finish(fig, "latency_bars", f"Latency per policy at {chosen}", caption(at), out_dir)


def _mean_metric(members: Sequence[Run], name: str) -> float:
    """Runs of one series at the budget (several seeds) are averaged."""
    return mean([m.metric(name) for m in members])
