"""A few engine steps as lanes: compute and each copy engine, with misses marked.

Shows where a policy stalls: an on-demand copy on a copy lane with the compute lane idle until it
lands, versus prefetches overlapping compute. Drawn from `RunResult.timeline` (TIMELINE_FIELDS).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from finemoe.plots.common import Skip, pick_time_unit
from finemoe.plots.data import Run, caption, format_budget, sim_runs
from finemoe.plots.style import Rendered, finish, new_figure

KIND_COLOURS = {"dense": "#b0b0b0", "expert": "#1f77b4", "demand": "#d62728", "prefetch": "#2ca02c"}
POLICY_PREFERENCE = ("finemoe", "lru", "oracle", "mixtral-offloading", "moe-infinity", "promoe", "lfu", "layerwise")
MAX_PANELS = 3
DEFAULT_STEPS = 3
MAX_EVENTS = 250  # per panel; beyond that bars become slivers


def _lane_order(lane: str) -> tuple:
    if lane == "compute":
        return (0, 0, lane)
    digits = "".join(ch for ch in lane if ch.isdigit())
    return (1, int(digits) if digits else 0, lane)


def pick_runs(runs: Sequence[Run]) -> list[Run]:
    """Up to three runs with timelines, different policies at one budget (the most shared one),
    preferring the runs that show misses (a timeline of all hits shows nothing of interest)."""
    with_tl = [r for r in sim_runs(runs) if r.result.timeline and not r.is_floor]
    if not with_tl:
        with_tl = [r for r in runs if r.result.timeline]
    if not with_tl:
        raise Skip("results carry no timeline events")
    by_budget: dict[str, list[Run]] = {}
    for r in with_tl:
        by_budget.setdefault(format_budget(r), []).append(r)

    # the budget most policies were run at; among those the middle one (neither starved nor all-hit)
    most = max(len({m.policy for m in members}) for members in by_budget.values())
    candidates = sorted((b for b, members in by_budget.items() if len({m.policy for m in members}) == most),
                        key=lambda b: min(m.budget_order for m in by_budget[b]))
    members = by_budget[candidates[len(candidates) // 2]]
    chosen, seen = [], set()
    for r in sorted(members, key=lambda r: (_rank(r.policy), r.policy, str(r.seed))):
        if r.policy not in seen:
            chosen.append(r)
            seen.add(r.policy)
        if len(chosen) == MAX_PANELS:
            break
    return chosen


def _rank(policy: str) -> int:
    for i, name in enumerate(POLICY_PREFERENCE):
        if policy == name or policy.startswith(name + "-"):
            return i
    return len(POLICY_PREFERENCE)


def steps_to_show(runs: Sequence[Run], most: int = DEFAULT_STEPS, max_events: int = MAX_EVENTS) -> int:
    """As many of the first steps as stay readable: a 32-layer model's step holds hundreds of events."""
    for steps in range(most, 1, -1):
        if all(sum(1 for e in r.result.timeline if int(e.get("step", 0)) < _first_step(r) + steps) <= max_events
               for r in runs):
            return steps
    return 1


def _first_step(run: Run) -> int:
    return min(int(e.get("step", 0)) for e in run.result.timeline)


def engine_timeline(runs: Sequence[Run], out_dir: Path, steps: int | None = None) -> Rendered:
    chosen = pick_runs(runs)
    steps = steps or steps_to_show(chosen)
    panels = []
    for run in chosen:
        first = _first_step(run)
        panels.append((run, [e for e in run.result.timeline if int(e.get("step", 0)) < first + steps]))
    all_times = [float(e["end_s"]) - float(e["start_s"]) for _, evs in panels for e in evs]
    spans = [max(float(e["end_s"]) for e in evs) - min(float(e["start_s"]) for e in evs) for _, evs in panels if evs]
    unit, scale = pick_time_unit(spans or all_times)
    span = max(spans) if spans else 0.0  # panels share the time axis
    fig, axes = new_figure(11.0, 1.0 + 1.3 * sum(len({e["lane"] for e in evs}) for _, evs in panels) ** 0.9, len(panels), 1,
                           sharex=True)
    for ax, (run, events) in zip((row[0] for row in axes), panels, strict=True):
        lanes = sorted({str(e["lane"]) for e in events}, key=_lane_order)
        y_of = {lane: i for i, lane in enumerate(reversed(lanes))}
        for kind, colour in KIND_COLOURS.items():
            for lane in lanes:
                bars = [(float(e["start_s"]) * scale, (float(e["end_s"]) - float(e["start_s"])) * scale)
                        for e in events if e["lane"] == lane and e["kind"] == kind]
                if bars:
                    # white separators between back-to-back bars, unless bars are too thin to show them
                    wide = sorted(w for _, w in bars)[len(bars) // 2] > 0.004 * span * scale
                    ax.broken_barh(bars, (y_of[lane] - 0.38, 0.76), facecolors=colour, edgecolor="white",
                                   linewidth=0.3 if wide else 0.0,
                                   label=None if kind in _labelled(ax) else kind)
        misses = [e for e in events if e.get("miss") and e["lane"] == "compute"] or [e for e in events if e.get("miss")]
        if misses:
            ax.scatter([float(e["start_s"]) * scale for e in misses], [y_of[str(e["lane"])] + 0.5 for e in misses],
                       marker="v", color="#d62728", s=22, zorder=3, label="miss")
        step_starts = {}
        for e in events:
            step_starts[e["step"]] = min(step_starts.get(e["step"], float("inf")), float(e["start_s"]))
        for step, start in sorted(step_starts.items()):
            ax.axvline(start * scale, color="#555555", linestyle=":", linewidth=0.8)
            ax.annotate(f"step {step}", (start * scale, len(lanes) - 0.45), fontsize=7, color="#555555",
                        xytext=(2, 0), textcoords="offset points")
        ax.set_yticks(list(y_of.values()), list(y_of.keys()))
        ax.set_ylim(-0.6, len(lanes) + 0.1)
        hits = 100.0 * run.metric("hit_rate")
        ax.set_title(f"{run.policy} at {format_budget(run)} (hit rate {hits:.1f}% over the run)", fontsize=9)
        if run is chosen[-1]:
            ax.set_xlabel(f"simulated time ({unit})" if run.engine == "sim" else f"measured time ({unit})")
        ax.grid(True, axis="x", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right", ncol=5)
    title = f"Engine timeline: first {steps} step{'s' if steps > 1 else ''}, compute and copy engines"
    return finish(fig, "engine_timeline", title, caption(chosen), out_dir)


def _labelled(ax) -> set[str]:
    return set(ax.get_legend_handles_labels()[1])
