"""Simulator throughput: engine layer-steps per second (one core) for on-demand LRU, with its
compiled path (sim/compiled.py) and without it (the SimPy reference engine), against a bare loop
over the same expert accesses with an LRU dict, and against the reference with its inline miss path
off (every copy a SimPy event), all measured in the same run.

    python3 benchmarks/bench_sim_throughput.py            # quick (16 requests)
    python3 benchmarks/bench_sim_throughput.py --requests 64 --slots 64,128,192 --profile

A layer-step is one layer of one sequence in one engine step (the paper-size study: 64 prompts x
~165 iterations x 32 layers, 8 policies x 10 budgets, is ~27 M of them). The trace is synthetic,
with Mixtral-8x7B's geometry (32 layers, 8 experts, top-2), batch 1, all requests at time 0.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from collections import OrderedDict

from finemoe.policies.registry import make_policy
from finemoe.sim.config import MemoryConfig
from finemoe.sim.costs import CostModel
from finemoe.sim.engine import SimEngine
from finemoe.sim.hardware import PRESETS
from finemoe.sim.memory import plan_memory
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.workload import build_batcher
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import synthetic_trace


def make_trace(requests: int, seed: int = 0):
    g = get_profile("mixtral-8x7b").geometry()
    return synthetic_trace(g, num_requests=requests, prompt_tokens=(30, 50), generated_tokens=(110, 140),
                           seed=seed, with_probs=False, semantic_dim=None, with_spec=False)


def run_engine(trace, policy: str, slots: int, fast_path: bool = True, inline_misses: bool = True,
               compiled: bool = True):
    """Build and run one engine (the part a sweep repeats per configuration); returns (recorder, seconds)."""
    hw = PRESETS["rtx3090"]
    measure = tuple(r.request_id for r in trace.requests)
    plan = plan_memory(trace.geometry, hw, MemoryConfig(expert_cache_slots=slots), max_batch=1,
                       longest_request_tokens=200)
    t0 = time.perf_counter()
    batcher = build_batcher(trace, measure, [0] * len(measure), 1)
    rec = MetricsRecorder(trace.geometry.num_layers, timeline_steps=0)
    for r in trace.requests:
        rec.request_arrived(r.request_id, 0.0, r.prompt_tokens, r.generated_tokens)
    engine = SimEngine(trace, make_policy(policy), CostModel(hw, trace.geometry), plan, batcher, rec,
                       fast_path=fast_path, inline_misses=inline_misses, compiled=compiled)
    engine.run()
    return rec, time.perf_counter() - t0


def bare_lru(trace, slots: int):
    """The baseline: the same accesses (step by step, layer by layer) through an LRU OrderedDict,
    counting hits, with no timing at all."""
    t0 = time.perf_counter()
    order: OrderedDict = OrderedDict()
    hits = misses = 0
    experts = trace.experts
    for it in trace.iterations:
        rows = experts[it.start : it.stop]
        per_layer = [sorted({int(e) for e in rows[:, layer].ravel() if e >= 0}) for layer in range(rows.shape[1])] \
            if it.stop - it.start > 1 else [sorted(x) for x in rows[0].tolist()]
        for layer, needed in enumerate(per_layer):
            for e in needed:
                key = (layer, e)
                if key in order:
                    hits += 1
                    order.move_to_end(key)
                else:
                    misses += 1
                    if len(order) >= slots:
                        order.popitem(last=False)
                    order[key] = None
    return hits, misses, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--slots", default="64,128,256", help="comma-separated expert cache sizes (256 = all resident)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    ap.add_argument("--profile", action="store_true", help="cProfile one run of the smallest cache")
    args = ap.parse_args()
    trace = make_trace(args.requests)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"trace: {args.requests} requests, {trace.num_tokens} tokens, {len(trace.iterations)} iterations; "
          f"{cores} cores visible, load average {os.getloadavg()[0]:.1f} (other work inflates times)")
    run_engine(make_trace(2), "lru", 64)  # numba compiles (or loads its cache) once, outside the timings
    print(f"{'slots':>6} {'hit rate':>8} {'layer-steps':>11} {'engine ls/s':>12} {'reference':>10} {'inline off':>11} "
          f"{'fast off':>10} {'bare LRU ls/s':>13} {'engine/bare':>11} {'ref/bare':>8} {'engine/ref':>10}")
    for slots in (int(s) for s in args.slots.split(",")):
        best = min((run_engine(trace, "lru", slots) for _ in range(args.repeat)), key=lambda x: x[1])
        rec, sec = best
        ref = min(run_engine(trace, "lru", slots, compiled=False)[1] for _ in range(args.repeat))
        simpy_copies = min(run_engine(trace, "lru", slots, inline_misses=False, compiled=False)[1]
                           for _ in range(args.repeat))
        slow = min(run_engine(trace, "lru", slots, fast_path=False, compiled=False)[1] for _ in range(args.repeat))
        bare = min((bare_lru(trace, slots) for _ in range(args.repeat)), key=lambda x: x[2])
        n = rec.layer_steps
        print(f"{slots:>6} {rec.hit_rate:>8.3f} {n:>11,} {n / sec:>12,.0f} {n / ref:>10,.0f} {n / simpy_copies:>11,.0f} "
              f"{n / slow:>10,.0f} {n / bare[2]:>13,.0f} {bare[2] / sec:>10.2f}x {bare[2] / ref:>7.2f}x {ref / sec:>9.1f}x")
    print("ls/s: layer-steps per second of one run (best of --repeat). engine: as a sweep runs it (the compiled "
          "path where it applies); reference: SimEngine(compiled=False); inline off: the reference with every copy "
          "a SimPy event; fast off: the reference with a SimPy sync at every layer and expert.")
    if args.profile:
        slots = int(args.slots.split(",")[0])
        prof = cProfile.Profile()
        prof.enable()
        run_engine(trace, "lru", slots)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(out.getvalue())


if __name__ == "__main__":
    main()
