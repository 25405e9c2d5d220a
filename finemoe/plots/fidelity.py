"""Simulation against replay, per configuration: how far the simulator's numbers are from measured ones.

A replay result (config `engine: "replay"`) is paired with its simulated counterpart: the `sim_*`
fields of its own summary when the replayer recorded them, else a simulated result file of the same
trace, policy, parameters, budget and seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finemoe.plots.common import Skip, metric_unit
from finemoe.plots.data import Run, caption, format_budget
from finemoe.plots.style import Rendered, finish, new_figure

METRICS = (("hit_rate", "expert hit rate", "%"), ("ttft_p50_s", "time to first token, median", "time"),
           ("tpot_p50_s", "time per output token, median", "time"))


@dataclass(frozen=True)
class Pair:
    label: str
    replay: dict[str, float]
    sim: dict[str, float]
    runs: tuple[Run, ...]

    def relative_error(self, metric: str) -> float:
        """(replay - sim) / replay: the simulator's error measured against reality."""
        r, s = self.replay.get(metric, math.nan), self.sim.get(metric, math.nan)
        return (s - r) / r if r and not math.isnan(r) and not math.isnan(s) else math.nan


def _same_config(a: Run, b: Run) -> bool:
    return (
        a.config.get("trace_path") == b.config.get("trace_path")
        and a.policy == b.policy
        and a.params == b.params
        and format_budget(a) == format_budget(b)
        and a.seed == b.seed
    )


def pair_runs(runs: Sequence[Run]) -> list[Pair]:
    sims = [r for r in runs if r.engine == "sim"]
    pairs = []
    for rep in (r for r in runs if r.engine == "replay"):
        label = f"{rep.policy} @ {format_budget(rep)}"
        own = {m: rep.metric(f"sim_{m}") for m, _, _ in METRICS}
        replay = {m: rep.metric(m) for m, _, _ in METRICS}
        if not all(math.isnan(v) for v in own.values()):
            pairs.append(Pair(label, replay, own, (rep,)))
            continue
        matches = [s for s in sims if _same_config(rep, s)]
        if matches:
            sim = next((s for s in matches if s.hardware == rep.hardware), matches[0])
            pairs.append(Pair(label, replay, {m: sim.metric(m) for m, _, _ in METRICS}, (rep, sim)))
    return pairs


def sim_vs_replay(runs: Sequence[Run], out_dir: Path) -> Rendered:
    if not any(r.engine == "replay" for r in runs):
        raise Skip('no replay results (files with engine "replay"); run finemoe replay --compare')
    pairs = pair_runs(runs)
    if not pairs:
        raise Skip("replay results have no simulated counterpart (sim_* fields or a matching sim result)")
    fig, axes = new_figure(max(9.0, 1.3 * len(pairs) * 3), 4.8, 1, len(METRICS))
    x = np.arange(len(pairs))
    width = 0.38
    for ax, (metric, name, kind) in zip(axes[0], METRICS, strict=True):
        sims = np.array([p.sim.get(metric, math.nan) for p in pairs])
        reps = np.array([p.replay.get(metric, math.nan) for p in pairs])
        if kind == "%":
            scale, unit = 100.0, "%"
        else:  # the unit of this metric in the report's tables and the other figures
            unit, scale = metric_unit(runs, metric.split("_")[0])
        ax.bar(x - width / 2, sims * scale, width, color="#1f77b4", label="simulated")
        ax.bar(x + width / 2, reps * scale, width, color="#ff7f0e", label="replayed (measured)")
        for i, p in enumerate(pairs):
            if kind == "%":  # a hit rate's error is a difference in points, not a ratio
                err = 100.0 * (sims[i] - reps[i])
                text = f"{err:+.1f} pt"
            else:
                err = p.relative_error(metric)
                text = f"{err:+.0%}"
            if not math.isnan(err):
                top = np.nanmax([sims[i], reps[i]]) * scale
                ax.annotate(text, (x[i], top), ha="center", va="bottom", fontsize=8,
                            xytext=(0, 3), textcoords="offset points")
        ax.set_xticks(x, [p.label for p in pairs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_title(name.split(",")[0].capitalize(), fontsize=10)
        ax.margins(y=0.15)
        ax.set_xlim(-0.8, len(pairs) - 0.2)  # a lone pair keeps slim bars
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    used = [r for p in pairs for r in p.runs]
    title = "Simulation vs replay (labels: the simulator's error against the measurement)"
    return finish(fig, "sim_vs_replay", title, caption(used), out_dir)
