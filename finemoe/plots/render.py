"""Render every figure the given results support; the others are skipped with a one-line note."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from finemoe.plots.common import Skip
from finemoe.plots.data import PlotError, Run, load_runs

# name -> one line for --help and the report
FIGURES: dict[str, str] = {
    "latency_memory": "time per output token and to first token against the memory budget, per policy",
    "hit_rate_memory": "expert hit rate against the memory budget, per policy",
    "prefetch_distance": "hit rate and latency against prefetch distance d (predictive policies)",
    "latency_bars": "TTFT and TPOT p50/p90/p99 per policy at one budget (--budget)",
    "expert_placement": "where the routed experts ran (GPU resident, GPU after a copy, CPU) and the bytes each way, "
                        "per policy at one budget (--budget)",
    "routing_entropy": "coarse (per request) vs fine (per iteration) routing entropy per layer (--trace)",
    "sim_vs_replay": "simulated vs replayed metrics per configuration (fidelity)",
    "engine_timeline": "a few engine steps: compute and copy engines as lanes, misses marked",
}


@dataclass
class PlotOutcome:
    rendered: list = field(default_factory=list)  # style.Rendered
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (figure, reason)
    runs: list[Run] = field(default_factory=list)


def render_all(
    results: Iterable[str | os.PathLike] | list[Run],
    out_dir: str | os.PathLike,
    *,
    trace: str | os.PathLike | None = None,
    budget: str | None = None,
    only: Iterable[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PlotOutcome:
    """All figures from result files (paths or directories) and optionally a trace.

    Raises PlotError when there are no results at all or an unknown figure is asked for; a figure
    the results cannot support is recorded in `skipped` with its reason.
    """
    from finemoe.plots import bars, distance, entropy, fidelity, placement, timeline, tradeoff

    results = list(results)
    runs = results if results and all(isinstance(r, Run) for r in results) else load_runs(results)
    wanted = list(FIGURES) if not only else list(only)
    unknown = [w for w in wanted if w not in FIGURES]
    if unknown:
        raise PlotError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    out_dir = Path(out_dir)
    # bad --budget or --trace fails before any figure is written, not halfway through the folder
    if budget is not None and ("latency_bars" in wanted or "expert_placement" in wanted):
        try:
            bars.choose_budget(runs, budget)
        except Skip:
            pass  # a budget the results lack only skips the bars
    given_trace = _read_entropy_trace(trace) if trace is not None and "routing_entropy" in wanted else None
    makers: dict[str, Callable[[], object]] = {
        "latency_memory": lambda: tradeoff.latency_memory(runs, out_dir),
        "hit_rate_memory": lambda: tradeoff.hit_rate_memory(runs, out_dir),
        "prefetch_distance": lambda: distance.prefetch_distance(runs, out_dir),
        "latency_bars": lambda: bars.latency_bars(runs, out_dir, budget=budget),
        "expert_placement": lambda: placement.expert_placement(runs, out_dir, budget=budget),
        "routing_entropy": lambda: _entropy(entropy, trace or _recorded_trace(runs), out_dir, given_trace),
        "sim_vs_replay": lambda: fidelity.sim_vs_replay(runs, out_dir),
        "engine_timeline": lambda: timeline.engine_timeline(runs, out_dir),
    }
    outcome = PlotOutcome(runs=runs)
    for name in wanted:
        if progress:
            progress(name)
        try:
            outcome.rendered.append(makers[name]())
        except Skip as why:
            outcome.skipped.append((name, str(why)))
    return outcome


def _recorded_trace(runs: list[Run]) -> Path | None:
    """The trace the results were made from, when they share one and it is still where they say.

    Results may name one trace in different spellings (simulate records it resolved; replays
    recorded it as typed, relative to where they ran), so each is resolved first: as it stands,
    then against the folder of its result file. A Skip says why when they name several."""
    found = set()
    for r in runs:
        recorded = r.config.get("trace_path")
        path = _existing_trace(Path(str(recorded)).expanduser(), Path(r.path).parent) if recorded else None
        if path is not None:
            found.add(path)
    if len(found) > 1:
        raise Skip(f"the results come from {len(found)} traces; pick one with --trace")
    return next(iter(found)) if found else None


def _existing_trace(path: Path, result_dir: Path) -> Path | None:
    """`path` resolved, where it exists: as it stands, or (relative) beside the result file."""
    for candidate in (path,) if path.is_absolute() else (path, result_dir / path):
        if candidate.exists():
            return candidate.resolve()
    return None


def _read_entropy_trace(trace_path):
    """The routing columns the entropy figure reads from `trace_path`."""
    from finemoe.traces.io import read_trace

    return read_trace(trace_path, columns=["router_probs"])


def _entropy(entropy_module, trace_path, out_dir: Path, trace=None):
    if trace_path is None:
        raise Skip("needs a trace (--trace TRACE): the results name none that exists here")
    if trace is None:
        trace = _read_entropy_trace(trace_path)
    return entropy_module.routing_entropy(trace, out_dir, trace_name=Path(trace_path).name)
