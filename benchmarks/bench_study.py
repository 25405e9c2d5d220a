"""A paper-size study, timed: the issue's yardstick for the simulator's speed.

64 measured prompts x ~165 iterations x 32 layers (Mixtral-8x7B geometry, synthetic routing with
router probabilities, semantic keys and speculative outputs, so every policy runs), 8 policies x
10 expert-cache sizes, through `finemoe simulate --jobs N`, as a user would run it. Prints the wall
time, then per policy the worker seconds (sum of its runs' `wall_s`) and layer-steps per second,
each as a ratio to on-demand LRU and to a bare Python LRU loop (an OrderedDict over the same
measured accesses, no timing model: the floor a pure-Python engine cannot beat), both measured in
the same run.

    python3 benchmarks/bench_study.py                 # the full study (about 10 minutes on 2 cores)
    python3 benchmarks/bench_study.py --requests 20   # a smaller one
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from finemoe.results import summary_frame
from finemoe.sim.config import WorkloadConfig
from finemoe.sim.workload import split_requests
from finemoe.traces.io import write_trace
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import synthetic_trace

POLICIES = "lru,lfu,oracle,layerwise,promoe,mixtral-offloading,finemoe,moe-infinity"


def layer_accesses(trace, request_ids) -> list[list[int]]:
    """Per (measured iteration, layer), in engine order for batch 1: the experts it routes to."""
    by_req = trace.iterations_by_request
    out = []
    for rid in request_ids:
        for it in by_req[rid]:
            rows = trace.experts[it.start:it.stop]  # [tokens, L, K]
            for layer in range(trace.geometry.num_layers):
                ids = np.unique(rows[:, layer])
                out.append([int(layer * trace.geometry.num_experts + e) for e in ids if e >= 0])
    return out


def bare_lru_layer_steps_per_s(accesses: list[list[int]], slots: int) -> tuple[float, int]:
    """Layer-steps per second of an OrderedDict LRU over `accesses`, and its misses."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    t0 = time.perf_counter()
    for experts in accesses:
        for key in experts:
            if key in cache:
                cache.move_to_end(key)
            else:
                misses += 1
                if len(cache) >= slots:
                    cache.popitem(last=False)
                cache[key] = None
    return len(accesses) / (time.perf_counter() - t0), misses


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
               "--policy", POLICIES, "--expert-cache", args.expert_cache, "--history-fraction", "0.3",
               "--hardware", "rtx3090", "--jobs", str(args.jobs), "-q", "-o", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        df = summary_frame([out])
        measured = split_requests(trace, WorkloadConfig(history_fraction=0.3), seed=0).measure
        accesses = layer_accesses(trace, measured)
        sizes = sorted(set(int(x) for x in df["memory_plan.expert_cache_slots"]))
        bare = float(np.median([bare_lru_layer_steps_per_s(accesses, n)[0] for n in sizes]))
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


if __name__ == "__main__":
    main()
