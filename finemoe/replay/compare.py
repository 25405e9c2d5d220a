"""Fidelity: the same configuration simulated with the calibrated profile, next to its replay.

The replay's result keeps the simulation's figures as `sim_*` summary fields (what the fidelity plot
reads) and the simulation is also written as its own result file, so either side can be re-read.
"""

from __future__ import annotations

import math
from dataclasses import replace

from finemoe.results import RunResult
from finemoe.sim.config import SimConfig
from finemoe.traces.schema import Trace

# (summary field, label, kind): "rate" compares in points, "time" relatively.
COMPARE_METRICS = (
    ("hit_rate", "expert hit rate", "rate"),
    ("tpot_p50_s", "time per output token p50", "time"),
    ("tpot_mean_s", "time per output token mean", "time"),
    ("ttft_p50_s", "time to first token p50", "time"),
    ("e2e_p50_s", "end-to-end latency p50", "time"),
    ("makespan_s", "makespan", "time"),
    ("stall_s", "stall on demand loads", "time"),
    ("ondemand_loads", "on-demand loads", "count"),
    ("prefetch_in_time", "prefetches in time", "count"),
)
# For a policy that computes experts on the CPU (rows left out when neither side ran one there).
CPU_METRICS = (
    ("ran_cpu", "experts run on the CPU", "count"),
    ("cpu_busy_s", "CPU busy with experts", "time"),
    ("cpu_wait_s", "device waiting for the CPU", "time"),
)


def simulate_same(trace: Trace, config: SimConfig) -> RunResult:
    """The simulator on exactly the replay's trace (scaled geometry included) and configuration."""
    from finemoe.sim.run import simulate

    return simulate(trace, config)


def comparison_rows(replayed: RunResult, simulated: RunResult) -> list[dict]:
    """Per metric: replay, simulation, and the simulator's error (points for rates, relative otherwise)."""
    rows = []
    on_cpu = any(float(res.summary.get("ran_cpu", 0) or 0) > 0 for res in (replayed, simulated))
    for key, label, kind in COMPARE_METRICS + (CPU_METRICS if on_cpu else ()):
        r = float(replayed.summary.get(key, math.nan))
        s = float(simulated.summary.get(key, math.nan))
        if kind == "rate":
            err = (s - r) * 100
        else:
            err = (s - r) / r if r else math.nan
        rows.append({"metric": key, "label": label, "kind": kind, "replay": r, "sim": s, "error": err})
    return rows


def attach_simulation(replayed: RunResult, simulated: RunResult, sim_path: str | None) -> RunResult:
    """The replay result with `sim_*` summary fields and a pointer to the simulated result file."""
    summary = dict(replayed.summary)
    for k, v in simulated.summary.items():
        if isinstance(v, (int, float)):
            summary[f"sim_{k}"] = v
    config = dict(replayed.config)
    config["compare"] = {"sim_result": sim_path, "sim_hardware": simulated.config.get("hardware")}
    return replace(replayed, summary=summary, config=config)


def format_comparison(rows: list[dict]) -> str:
    lines = [f"{'metric':30s} {'replay':>12s} {'simulate':>12s} {'sim error':>10s}"]
    for row in rows:
        if row["kind"] == "rate":
            r, s, e = f"{row['replay']:.1%}", f"{row['sim']:.1%}", f"{row['error']:+.1f} pt"
        elif row["kind"] == "time":
            r, s = _ms(row["replay"]), _ms(row["sim"])
            e = f"{row['error']:+.1%}" if math.isfinite(row["error"]) else "n/a"
        else:
            r, s = f"{row['replay']:.0f}", f"{row['sim']:.0f}"
            e = f"{row['error']:+.1%}" if math.isfinite(row["error"]) else "n/a"
        lines.append(f"{row['label']:30s} {r:>12s} {s:>12s} {e:>10s}")
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if math.isfinite(x) else "n/a"
