"""The whole of `finemoe plan` against one LRU simulation at one budget, on the same trace.

    python3 benchmarks/bench_plan.py                     # the real Mixtral logs from ../shared
    python3 benchmarks/bench_plan.py --trace t.parquet --model-profile mixtral-8x7b --repeat 5

Measures, in one run on this machine (wall-clock, one process, no pool: --jobs 1):
  * one LRU simulation at the plan's budget (the baseline);
  * the one pass (LRU, LFU, per-layer LRU and MIN stack distances at every size, expert counts, the
    per-layer DP's capacities) and every closed-form estimate over the default curve (20 budgets);
  * the whole plan as `finemoe plan` makes it by default: that, the simulations that confirm the
    front at the budget (and the runtimes' defaults there), and the lower bounds at five budgets.
Prints each as a ratio to the baseline, median of --repeat runs, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from finemoe.cli.plan import default_curve
from finemoe.plan.planner import PlanRequest, chosen_strategies, estimates, make_plan, one_pass
from finemoe.plan.strategies import STRATEGIES
from finemoe.sim.cpu import CPU_PRESETS
from finemoe.sim.hardware import load_hardware
from finemoe.sim.memory import plan_for_config
from finemoe.sim.run import simulate
from finemoe.sim.workload import split_requests
from finemoe.traces.io import read_trace, write_trace

GIB = 2**30
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mixtral-8x7b-instruct"


def mixtral_trace(tmp: Path) -> Path:
    from click.testing import CliRunner

    from finemoe.cli.main import cli

    out = tmp / "mixtral.parquet"
    res = CliRunner().invoke(cli, ["import", str(SHARED / "gsm8k_2_routing.jsonl"),
                                   str(SHARED / "humaneval_2_routing.jsonl"), "--model-profile", "mixtral-8x7b",
                                   "-o", str(out), "-q"])
    if res.exit_code:
        raise SystemExit(res.output)
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--model-profile", default=None)
    ap.add_argument("--gpu-mem", type=float, default=24, help="GiB")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = args.trace or mixtral_trace(tmp)
        trace = read_trace(path)
        if args.model_profile:
            from finemoe.traces.profiles import get_profile

            trace = trace.with_geometry(get_profile(args.model_profile).geometry())
            path = write_trace(trace, tmp / "projected.parquet")
        budget = int(args.gpu_mem * GIB)
        hw = load_hardware("rtx3090")
        probe = PlanRequest(str(path), hw, CPU_PRESETS["desktop-ddr5"], budget, ())
        curve = default_curve(trace, hw, probe.memory, probe.workload, probe.seed, None)
        req = replace(probe, curve=curve)
        lru = next(s for s in STRATEGIES if s.name == "lru")
        planned = chosen_strategies(req, True)
        split = split_requests(trace, req.workload, req.seed)
        slots_at = {b: plan_for_config(trace.geometry, trace.requests, req.config(None, b)).expert_cache_slots
                    for b in sorted(set(curve) | {budget})}
        rows = {"one LRU simulation": [], "one pass + every estimate": [], "whole plan": []}
        for n in range(args.repeat):
            rows["one LRU simulation"].append(timed(lambda: simulate(trace, req.config(lru, budget))))
            rows["one pass + every estimate"].append(timed(lambda: estimates(
                one_pass(trace, req, list(split.history), list(split.measure)), planned, slots_at)))
            rows["whole plan"].append(timed(lambda n=n: make_plan(trace, req, tmp / f"plan{n}", jobs=1,
                                                                   progress=False, say=lambda _m: None)))
        base = statistics.median(rows["one LRU simulation"])
        print(f"trace {path.name}: {trace.num_tokens} tokens, {trace.geometry.num_layers} layers x "
              f"{trace.geometry.num_experts} experts; budget {args.gpu_mem:g} GiB, curve of {len(slots_at)} budgets "
              f"({min(slots_at) / GIB:g}-{max(slots_at) / GIB:g} GiB), {len(planned)} strategies planned")
        print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print(f"{'':28s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'x LRU sim':>10s}")
        for name, times in rows.items():
            med = statistics.median(times)
            print(f"{name:28s} {med:9.2f} {min(times):8.2f} {max(times):8.2f} {med / base:10.1f}")


if __name__ == "__main__":
    main()
