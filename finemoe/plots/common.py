"""Helpers the figure modules share: skipping, series grouping, reference lines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from finemoe.plots.data import Run, series_label, varying_params
from finemoe.plots.numbers import format_number
from finemoe.plots.style import policy_colour


class Skip(Exception):
    """The given results cannot support this figure; the message says why, in one line."""


def series(
    runs: Sequence[Run], x_of: Callable[[Run], float], exclude_params=()
) -> dict[str, list[Run]]:
    """Runs grouped into legend series (policy plus the parameters that differ), sorted along x."""
    varying = varying_params(runs, exclude=exclude_params)
    multi_hw = len({r.hardware for r in runs}) > 1
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(series_label(r, varying, multi_hw), []).append(r)
    for label, members in groups.items():
        groups[label] = sorted((m for m in members if not math.isnan(x_of(m))), key=x_of)
    return {k: v for k, v in sorted(groups.items(), key=_series_order) if v}


def drop_single_points(groups: dict[str, list[Run]], x_of) -> dict[str, list[Run]]:
    """Series with one x value, where the same policy has a proper line, are another figure's
    sweep (e.g. a prefetch-distance sweep at one budget): they would only clutter a memory plot."""
    lined = {m[0].policy for m in groups.values() if len({x_of(r) for r in m}) > 1}
    return {
        k: v for k, v in groups.items()
        if v[0].is_floor or len({x_of(r) for r in v}) > 1 or v[0].policy not in lined
    }


def _series_order(item) -> tuple:
    label, members = item
    first = members[0] if members else None
    ref = 2 if first is not None and first.is_floor else 1 if first is not None and first.is_bound else 0
    return (ref, label)


def draw_series(ax, groups: dict[str, list[Run]], x_of, y_of, x_span: tuple[float, float] | None = None) -> int:
    """One line per series: contenders solid with markers, the bound dashed, the floor a dashed
    horizontal line (its latency does not depend on the budget once everything fits)."""
    drawn = 0
    for label, members in groups.items():
        xs, ys = mean_by_x(members, x_of, y_of)
        if all(math.isnan(y) for y in ys):
            continue
        first = members[0]
        colour = policy_colour(first.policy)
        if first.is_floor:
            level = min(y for y in ys if not math.isnan(y))
            ax.axhline(level, color=colour, linestyle="--", linewidth=1.2, label=label)
        elif first.is_bound:
            ax.plot(xs, ys, color=colour, linestyle="--", linewidth=1.5, marker=".", label=label)
        else:
            width = 2.2 if first.policy == "finemoe" else 1.6
            ax.plot(xs, ys, color=colour, linestyle="-", linewidth=width, marker="o", markersize=4, label=label)
        drawn += 1
    if x_span is not None and x_span[0] < x_span[1]:
        pad = 0.03 * (x_span[1] - x_span[0])
        ax.set_xlim(x_span[0] - pad, x_span[1] + pad)
    return drawn


def mean_by_x(members: Sequence[Run], x_of, y_of) -> tuple[list[float], list[float]]:
    """One point per x: runs at the same x (other seeds, repeats) are averaged, NaNs ignored."""
    by_x: dict[float, list[float]] = {}
    for m in members:
        by_x.setdefault(x_of(m), []).append(y_of(m))
    xs = sorted(by_x)
    return xs, [mean(by_x[x]) for x in xs]


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def maybe_log_y(ax, values: Sequence[float], ratio: float = 20.0) -> None:
    """Log scale when the values span more than `ratio` (small budgets can be 100x slower)."""
    finite = [v for v in values if v is not None and not math.isnan(v) and v > 0]
    if finite and max(finite) / min(finite) > ratio:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: format_number(v))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: format_number(v) if f"{v:.1g}"[0] in "25" else ""))


def pick_time_unit(values_s: Sequence[float]) -> tuple[str, float]:
    """('ms', 1e3) etc.: the unit that puts typical values between 1 and 1000."""
    finite = sorted(abs(v) for v in values_s if v is not None and not math.isnan(v) and v != 0)
    typical = finite[len(finite) // 2] if finite else 1.0
    for unit, scale in (("s", 1.0), ("ms", 1e3), ("µs", 1e6)):
        if typical * scale >= 1.0:
            return unit, scale
    return "ns", 1e9


# The summary field that sets each time metric's unit (its p50: what the tables lead with).
TIME_METRICS = {"ttft": "ttft_p50_s", "tpot": "tpot_p50_s", "e2e": "e2e_p50_s", "stall": "stall_s"}


def metric_unit(runs: Sequence[Run], metric: str) -> tuple[str, float]:
    """The one unit of time metric `metric` ("ttft", "tpot", "e2e", "stall") for every table and
    figure drawn from `runs`: chosen once from the median over all of them (ms if it is >= 1 ms,
    else µs), so a report's TPOT column and its figures' TPOT axes always read in the same unit.
    Callers pass the whole set of runs, before picking the ones a figure shows."""
    return pick_time_unit([r.metric(TIME_METRICS[metric]) for r in runs])


def time_units(runs: Sequence[Run]) -> dict[str, tuple[str, float]]:
    """metric_unit of every time metric, for the report's tables and sentences."""
    return {metric: metric_unit(runs, metric) for metric in TIME_METRICS}
