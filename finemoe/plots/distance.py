"""Hit rate and latency against prefetch distance d, for the predictive policies.

Too short a distance cannot hide a transfer behind compute; too long a distance predicts worse.
The runs of one policy that differ only in `d` (at one budget) make one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from finemoe.plots.common import Skip, maybe_log_y, mean_by_x, metric_unit
from finemoe.plots.data import Run, caption, format_budget, sim_runs, sorted_budgets, varying_params
from finemoe.plots.style import Rendered, finish, new_figure, policy_colour

DISTANCE_PARAMS = ("d", "prefetch_distance", "distance")


def _distance(run: Run) -> float:
    for name in DISTANCE_PARAMS:
        value = run.params.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return math.nan


def prefetch_distance(runs: Sequence[Run], out_dir: Path) -> Rendered:
    unit, scale = metric_unit(runs, "tpot")  # from all runs: the report's unit
    runs = [r for r in sim_runs(runs) if not math.isnan(_distance(r))]
    if not runs:
        raise Skip("no results of a policy with a prefetch distance parameter (d)")
    varying = varying_params(runs, exclude=DISTANCE_PARAMS)
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        others = tuple(sorted((k, str(r.params.get(k))) for k in varying.get(r.policy, ())))
        groups.setdefault((r.policy, others, format_budget(r), r.hardware), []).append(r)
    groups = {k: sorted(v, key=_distance) for k, v in groups.items() if len({_distance(r) for r in v}) >= 2}
    if not groups:
        raise Skip("needs results of one policy at two or more prefetch distances (policy param d)")
    used = [r for v in groups.values() for r in v]
    multi_budget = len({k[2] for k in groups}) > 1
    multi_hw = len({k[3] for k in groups}) > 1
    styles = ["-", "--", ":", "-."]
    budgets = sorted_budgets(used)

    fig, axes = new_figure(11.0, 4.6, 1, 2)
    hit_ax, lat_ax = axes[0][0], axes[0][1]
    lat_values = [r.metric("tpot_p50_s") for r in used]
    for (policy, others, budget, hw), members in sorted(groups.items()):
        label = policy + "".join(f" {k}={v}" for k, v in others)
        if multi_budget:
            label += f" @ {budget}"
        if multi_hw:
            label += f" {hw}"
        style = styles[budgets.index(budget) % len(styles)]
        kw = dict(color=policy_colour(policy), linestyle=style, marker="o", markersize=4, label=label)
        hit_ax.plot(*mean_by_x(members, _distance, lambda r: 100.0 * r.metric("hit_rate")), **kw)
        lat_ax.plot(*mean_by_x(members, _distance, lambda r, s=scale: r.metric("tpot_p50_s") * s), **kw)
    maybe_log_y(lat_ax, lat_values)
    hit_ax.set_ylabel("expert hit rate (%)")
    hit_ax.set_ylim(0, 102)
    lat_ax.set_ylabel(f"time per output token, median ({unit})")
    for ax, title in ((hit_ax, "Hit rate"), (lat_ax, "Time per output token")):
        ax.set_xlabel("prefetch distance d (layers ahead)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    hit_ax.legend(fontsize=8, loc="best")
    title = "Prefetch distance"
    if not multi_budget:
        title += f" at {budgets[0]}"
    return finish(fig, "prefetch_distance", title, caption(used), out_dir)
