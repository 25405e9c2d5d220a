"""A paper-size study, timed: the issue's yardstick for the simulator's speed.

64 measured prompts x ~165 iterations x 32 layers (Mixtral-8x7B geometry, synthetic routing with
router probabilities, semantic keys and speculative outputs, so every policy runs), 8 policies x
10 expert-cache sizes, through `finemoe simulate --jobs N`, as a user would run it. Prints the wall
time, then per policy the worker seconds (sum of its runs' `wall_s`) and layer-steps per second,
each as a ratio to on-demand LRU and to a bare Python LRU loop (bench_sim_throughput.py's: an
OrderedDict over the same measured accesses, no timing model), both measured in the same run.

    python3 benchmarks/bench_study.py                 # the full study (about a minute on 2 cores)
    python3 benchmarks/bench_study.py --requests 20   # a smaller one
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_sim_throughput import bare_lru

from finemoe.results import summary_frame
from finemoe.sim.config import WorkloadConfig
from finemoe.sim.workload import split_requests
from finemoe.traces.io import write_trace
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import synthetic_trace

POLICIES = "lru,lfu,oracle,layerwise,promoe,mixtral-offloading,finemoe,moe-infinity"
HISTORY_FRACTION = 0.3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=92, help="requests in the trace; 70%% are measured")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--expert-cache", default="24:240:24")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "study.parquet"
        g = get_profile("mixtral-8x7b").geometry()
        trace = synthetic_trace(g, num_requests=args.requests, prompt_tokens=(30, 50),
                                generated_tokens=(150, 180), seed=0, semantic_dim=64)
        write_trace(trace, trace_path)
        out = Path(tmp) / "results"
        cmd = [sys.executable, "-c", "from finemoe.cli.main import cli; cli()", "simulate", str(trace_path),
               "--policy", POLICIES, "--expert-cache", args.expert_cache, "--history-fraction", str(HISTORY_FRACTION),
               "--hardware", "rtx3090", "--jobs", str(args.jobs), "-q", "-o", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        df = summary_frame([out])
        measured = trace.select_requests(split_requests(trace, WorkloadConfig(history_fraction=HISTORY_FRACTION), seed=0).measure)
        sizes = sorted(set(int(x) for x in df["memory_plan.expert_cache_slots"]))
        layer_steps = len(measured.iterations) * measured.geometry.num_layers
        bare = float(np.median([layer_steps / bare_lru(measured, n)[2] for n in sizes]))
    per = df.groupby("policy").agg(worker_s=("wall_s", "sum"), layer_steps=("layer_steps", "sum"), runs=("seed", "count"))
    per["ls_per_s"] = per.layer_steps / per.worker_s
    base = per.loc["lru", "ls_per_s"]
    print(f"{len(df)} configurations, {int(df.layer_steps.sum()):,} layer-steps, {wall:.0f} s wall with --jobs {args.jobs}, "
          f"{per.worker_s.sum():.0f} s of worker time")
    print(f"bare Python LRU loop over the same measured accesses: {bare:,.0f} layer-steps/s "
          f"(median over the {len(sizes)} cache sizes)")
    print(f"{'policy':20s} {'worker s':>9s} {'layer-steps/s':>14s} {'vs lru':>7s} {'vs bare loop':>13s}")
    for name, row in per.sort_values("worker_s").iterrows():
        print(f"{name:20s} {row.worker_s:9.1f} {row.ls_per_s:14,.0f} {row.ls_per_s / base:7.3f} "
              f"{row.ls_per_s / bare:13.3f}")
    oracle = df[df.policy == "oracle"]
    if len(oracle):  # the ensemble's row counts every candidate; one candidate's own rate beside it
        steps = seconds = 0.0
        runs = 0
        for ls, candidates in zip(oracle.layer_steps, oracle["policy_info.candidates"], strict=True):
            candidates = json.loads(candidates)
            runs += len(candidates)
            steps += ls * len(candidates)
            seconds += sum(c["wall_s"] for c in candidates)
        print(f"oracle: {runs} candidate runs, one at {steps / seconds:,.0f} layer-steps/s on average "
              f"({steps / seconds / base:.3f} x lru): its row above is all of them together")


if __name__ == "__main__":
    main()
