"""`finemoe validate`: how far to trust the simulator on this machine, measured.

A few configurations are replayed for real (`run_replay` with `compare=True`: calibrated before and
after each replay, then simulated with that profile) round after round, one replay of each
configuration per round, so that a slow episode of a shared machine touches every configuration
alike. Per configuration and metric it keeps the simulation's error of every round
(`comparison_rows`: points for rates, relative otherwise) and reports the median with the range,
beside the load average at the start and the end. It is a measurement, not a test: no outcome is a
failure; the verdict only says whether the median TPOT error lies within a tolerance.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.replay.executor import ReplayOptions
from finemoe.replay.run import prepare_trace, run_replay
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.traces.schema import Trace

VERSION = 1
VERDICT_METRIC = "tpot_p50_s"


@dataclass(frozen=True)
class DemoSize:
    """The embedded model's trace for the default configurations: its prompts and tokens."""

    prompts: int
    max_new_tokens: int


# 6 x 96 tokens: with fewer tokens FineMoE's replayed prefetches in time vary more from run to run
# and prefill steps, where the simulation is least faithful, weigh more (docs/replay.md).
DEMO_FULL = DemoSize(prompts=6, max_new_tokens=96)
DEMO_QUICK = DemoSize(prompts=3, max_new_tokens=24)
DEMO_EXPERT_SCALE = 4.0  # 2.4 MB experts in bf16: kernels, not dispatch, dominate a step
DEMO_DTYPE = "bfloat16"
DEMO_SLOTS = 20  # of 48 experts
DEFAULT_POLICIES = ("lru", "finemoe")
USER_SLOT_SHARE = 0.4  # a user trace's default expert cache: this share of its experts


@dataclass(frozen=True)
class Case:
    """One configuration to replay and simulate: a prepared trace and its SimConfig."""

    name: str
    trace: Trace
    config: SimConfig
    source: dict  # how the trace was made (recorded in the report)


@dataclass
class CaseResult:
    case: Case
    rounds: list[dict[str, dict]] = field(default_factory=list)  # per round: metric -> comparison row
    replay_s: list[float] = field(default_factory=list)


def collect_demo_trace(path: Path, size: DemoSize, seed: int = 0) -> Path:
    """The embedded demo MoE's real routing over ShareGPT prompts (what `finemoe collect` records)."""
    import torch

    from finemoe.traces.collect import CollectConfig, collect
    from finemoe.traces.collect.loader import load_model
    from finemoe.traces.prompts import load_prompts

    prompts = load_prompts("sharegpt", limit=size.prompts)
    model, tokenizer, name = load_model(None)
    cfg = CollectConfig(max_new_tokens=size.max_new_tokens, batch_size=size.prompts, seed=seed, greedy=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = collect(model, tokenizer, prompts, path, cfg, model_name=name,
                      metadata={"by": "finemoe validate", "prompts": "sharegpt", "limit": size.prompts})
    finally:
        torch.set_num_threads(threads)
    if out is None:
        raise ConfigError("collecting the demo trace finished no request")
    return Path(out)


def demo_cases(trace: Trace, policies: Sequence[str], slots: int | None, seed: int = 0) -> list[Case]:
    """The default configurations: the demo trace with experts scaled x4 (bf16), one per policy."""
    prepared = prepare_trace(trace, model_profile=None, expert_scale=DEMO_EXPERT_SCALE, dtype=DEMO_DTYPE)
    source = {"trace": "embedded demo model over ShareGPT", "expert_scale": DEMO_EXPERT_SCALE, "dtype": DEMO_DTYPE}
    return [_case(f"demo/{p}", prepared, "demo", p, slots or DEMO_SLOTS, WorkloadConfig(), seed, source)
            for p in policies]


def trace_cases(trace: Trace, path: str, policies: Sequence[str], slots: int | None, *,
                model_profile: str | None, expert_scale: float, dtype: str | None,
                history_fraction: float | None, seed: int = 0) -> list[Case]:
    """A user's trace, one configuration per policy; `slots` None: `USER_SLOT_SHARE` of its experts."""
    prepared = prepare_trace(trace, model_profile=model_profile, expert_scale=expert_scale, dtype=dtype)
    g = prepared.geometry
    slots = slots or max(g.top_k, round(USER_SLOT_SHARE * g.num_layers * g.num_experts))
    workload = WorkloadConfig() if history_fraction is None else WorkloadConfig(history_fraction=history_fraction)
    source = {"trace": path, "model_profile": model_profile, "expert_scale": expert_scale, "dtype": dtype}
    name = Path(path).stem
    return [_case(f"{name}/{p}", prepared, path, p, slots, workload, seed, source) for p in policies]


def _case(name: str, trace: Trace, path: str, policy: str, slots: int, workload: WorkloadConfig, seed: int,
          source: dict) -> Case:
    from finemoe.policies.registry import make_policy

    make_policy(policy)  # an unknown name fails here, before anything runs
    if slots < 1:
        raise ConfigError(f"--expert-cache must be at least 1, got {slots}")
    # The preset is a placeholder: `run_replay` replaces it with the calibrated (or given) profile.
    config = SimConfig(trace_path=path, policy=policy, hardware=PRESETS["rtx3090"],
                       memory=MemoryConfig(expert_cache_slots=slots), workload=workload, seed=seed)
    return Case(name, trace, config, source)


def run_rounds(cases: Sequence[Case], rounds: int, options: ReplayOptions, *, hardware: str | None,
               say: Callable[[str], None] = lambda _m: None) -> list[CaseResult]:
    """`rounds` rounds of one replay per case (interleaved), each compared with its simulation."""
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    results = [CaseResult(c) for c in cases]
    total = rounds * len(cases)
    done = 0
    for r in range(rounds):
        for res in results:
            t0 = time.perf_counter()
            outcome = run_replay(res.case.trace, res.case.config, options, hardware=hardware, compare=True)
            res.replay_s.append(time.perf_counter() - t0)
            rows = {row["metric"]: row for row in outcome.rows}
            res.rounds.append(rows)
            done += 1
            tpot = rows[VERDICT_METRIC]["error"]
            say(f"[{done}/{total}] round {r + 1}: {res.case.name}: TPOT p50 sim error {_pct(tpot)}, "
                f"hit-rate gap {rows['hit_rate']['error']:+.2f} pt, load {os.getloadavg()[0]:.2f} "
                f"({res.replay_s[-1]:.1f} s)")
    return results


def summarise(result: CaseResult) -> dict[str, dict]:
    """Per metric over the rounds: the median, min and max of the simulation's error, and the
    median replayed and simulated values."""
    out = {}
    for metric, first in result.rounds[0].items():
        errors = [r[metric]["error"] for r in result.rounds]
        finite = [e for e in errors if math.isfinite(e)]
        out[metric] = {
            "label": first["label"], "kind": first["kind"],
            "error_median": statistics.median(finite) if finite else None,
            "error_min": min(finite) if finite else None,
            "error_max": max(finite) if finite else None,
            "errors": [e if math.isfinite(e) else None for e in errors],
            "replay_median": _median(r[metric]["replay"] for r in result.rounds),
            "sim_median": _median(r[metric]["sim"] for r in result.rounds),
        }
    return out


def _median(values) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None


def verdict(summaries: dict[str, dict[str, dict]], tolerance: float) -> dict:
    """Whether every configuration's median TPOT p50 error lies within `tolerance` (a fraction)."""
    outside = {name: s[VERDICT_METRIC]["error_median"] for name, s in summaries.items()
               if s[VERDICT_METRIC]["error_median"] is None or abs(s[VERDICT_METRIC]["error_median"]) > tolerance}
    if not outside:
        text = f"within {tolerance:.0%} on TPOT p50 for every configuration (median over the rounds)"
    else:
        text = f"outside {tolerance:.0%} on TPOT p50: " + ", ".join(f"{n} ({_pct(e)})" for n, e in outside.items())
    return {"metric": VERDICT_METRIC, "tolerance": tolerance, "within": not outside,
            "outside": sorted(outside), "text": text}


@dataclass(frozen=True)
class ValidateRun:
    """Everything `validate` measured, and how (the JSON report)."""

    report: dict

    @property
    def verdict_text(self) -> str:
        return self.report["verdict"]["text"]


def validate(cases: Sequence[Case], *, rounds: int, options: ReplayOptions, hardware: str | None,
             tolerance: float = 0.15, settings: dict | None = None,
             say: Callable[[str], None] = lambda _m: None) -> ValidateRun:
    """Replay and simulate `cases` for `rounds` interleaved rounds; the report with the load average."""
    if not cases:
        raise ConfigError("nothing to validate: no configuration")
    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be positive, got {tolerance}")
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    results = run_rounds(cases, rounds, options, hardware=hardware, say=say)
    load_end = os.getloadavg()
    summaries = {res.case.name: summarise(res) for res in results}
    report = {
        "version": VERSION,
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t0,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "configuration": {
            **(settings or {}),
            "rounds": rounds, "tolerance": tolerance,
            "hardware": hardware or "calibrated before and after each replay",
            "replay_options": options.to_dict(), "cpu_count": os.cpu_count(),
            # Each case's configuration but its hardware, which is the calibration (or `hardware`).
            "cases": [{"name": c.name, "source": c.source,
                       "sim_config": {k: v for k, v in c.config.to_dict().items() if k != "hardware"}}
                      for c in cases],
        },
        "cases": {res.case.name: {"metrics": summaries[res.case.name], "rounds": len(res.rounds),
                                  "replay_s": res.replay_s} for res in results},
    }
    report["verdict"] = verdict(summaries, tolerance)
    return ValidateRun(report)


def format_report(report: dict) -> str:
    """The table: per configuration and metric, the median sim error with its range over the rounds."""
    lines = [f"{'configuration':18s} {'metric':28s} {'median error':>12s} {'min':>9s} {'max':>9s}"]
    for name, case in report["cases"].items():
        for metric in case["metrics"].values():
            fmt = _points if metric["kind"] == "rate" else _pct
            lines.append(f"{name:18s} {metric['label']:28s} {fmt(metric['error_median']):>12s} "
                         f"{fmt(metric['error_min']):>9s} {fmt(metric['error_max']):>9s}")
    load = report["load_average"]
    lines.append(f"{report['configuration']['rounds']} round(s); load average {load['start'][0]:.2f} at the start, "
                 f"{load['end'][0]:.2f} at the end ({report['configuration']['cpu_count']} cores); started {report['started_utc']}")
    lines.append(f"verdict: {report['verdict']['text']}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.1%}"


def _points(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.2f} pt"


def write_report(report: dict, path: str | os.PathLike) -> Path:
    from finemoe.files import atomic_write_json

    return atomic_write_json(path, report)
