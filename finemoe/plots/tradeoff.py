"""The latency-memory trade-off and hit rate against memory: what each budget buys, per policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from finemoe.plots.common import (
    Skip,
    draw_series,
    drop_single_points,
    maybe_log_y,
    metric_unit,
    series,
)
from finemoe.plots.data import Run, caption, memory_axis, sim_runs
from finemoe.plots.style import Rendered, finish, new_figure


def _memory_runs(runs: Sequence[Run]) -> tuple[list[Run], str, callable]:
    runs = sim_runs(runs)
    x_label, x_of = memory_axis(runs)
    contenders = [r for r in runs if not r.is_floor and not r.is_bound]
    budgets = {x_of(r) for r in contenders}
    if len(budgets) < 2:
        raise Skip("needs results of a policy at two or more memory budgets")
    return runs, x_label, x_of


def _x_span(runs, x_of) -> tuple[float, float]:
    xs = [x_of(r) for r in runs if not r.is_floor]
    return (min(xs), max(xs))


def latency_memory(runs: Sequence[Run], out_dir: Path) -> Rendered:
    """Time per output token and time to first token against GPU memory (median over requests)."""
    units = {m: metric_unit(runs, m) for m in ("tpot", "ttft")}  # from all runs: the report's units
    runs, x_label, x_of = _memory_runs(runs)
    groups = drop_single_points(series(runs, x_of), x_of)
    fig, axes = new_figure(11.0, 4.6, 1, 2)
    for ax, metric, name in (
        (axes[0][0], "tpot_p50_s", "time per output token"),
        (axes[0][1], "ttft_p50_s", "time to first token"),
    ):
        values = [r.metric(metric) for r in runs]
        unit, scale = units[metric.split("_")[0]]
        draw_series(ax, groups, x_of, lambda r, m=metric, s=scale: r.metric(m) * s, _x_span(runs, x_of))
        maybe_log_y(ax, values)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{name}, median ({unit})")
        ax.set_title(name.capitalize(), fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    return finish(fig, "latency_memory", "Latency-memory trade-off", caption(runs), out_dir)


def hit_rate_memory(runs: Sequence[Run], out_dir: Path) -> Rendered:
    """Expert hit rate (routed experts resident when their layer needs them) against memory."""
    runs, x_label, x_of = _memory_runs(runs)
    if all(r.summary.get("hit_rate") is None for r in runs):
        raise Skip("results carry no hit_rate")
    groups = drop_single_points(series(runs, x_of), x_of)
    # for hit rate, no-offload is the ceiling (everything resident), not a floor
    groups = {k.replace(" (floor)", " (all resident)"): v for k, v in groups.items()}
    fig, axes = new_figure(7.5, 4.6)
    ax = axes[0][0]
    draw_series(ax, groups, x_of, lambda r: 100.0 * r.metric("hit_rate"), _x_span(runs, x_of))
    ax.set_xlabel(x_label)
    ax.set_ylabel("expert hit rate (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return finish(fig, "hit_rate_memory", "Expert hit rate against memory", caption(runs), out_dir)
