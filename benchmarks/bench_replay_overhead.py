"""How much of a replay step is the replayer's own Python bookkeeping?

Runs the same trace, policy and cache size twice on this machine:
  * "model": the given expert/dense shapes (real GEMMs and copies),
  * "floor": the same routing with 1x1 experts and dense part, so kernels and copies cost next to
    nothing and what remains is the replayer's bookkeeping (policy calls, cache, lock, dispatch).
Prints per-step times of both, the floor's share of the model's step (the overhead the simulator
does not model), and, from the model run's timeline, the time inside compute kernels and copies.

    python3 benchmarks/bench_replay_overhead.py            # quick (seconds)
    python3 benchmarks/bench_replay_overhead.py --policy finemoe --hidden 1024 --inter 2048
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import pandas as pd

from finemoe.replay.executor import ReplayOptions, replay
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def geometry(layers: int, hidden: int, inter: int):
    return tiny_geometry(num_layers=layers, num_experts=8, hidden_size=hidden, expert_intermediate_size=inter,
                         dtype="bfloat16", bytes_per_expert=3 * hidden * inter * 2,
                         dense_bytes=layers * 4 * hidden * hidden * 2, kv_bytes_per_token=layers * 2 * hidden * 2 // 4)


def run(policy: str, layers: int, hidden: int, inter: int, slots: int, requests: int, tokens: int, repeats: int):
    trace = synthetic_trace(geometry(layers, hidden, inter), num_requests=requests, prompt_tokens=8,
                            generated_tokens=tokens, seed=0)
    cfg = SimConfig(trace_path="bench", policy=policy, hardware=PRESETS["rtx3090"],
                    memory=MemoryConfig(expert_cache_slots=slots), workload=WorkloadConfig(), timeline_steps=10**6)
    out = []
    for _ in range(repeats):
        r = replay(trace, cfg, ReplayOptions())
        steps = r.summary["steps"]
        tl = pd.DataFrame(r.timeline)
        compute = tl[tl.lane == "compute"]
        copies = tl[tl.lane.str.startswith("copy")]
        out.append({
            "step_ms": r.summary["makespan_s"] / steps * 1e3,
            "compute_ms": float((compute.end_s - compute.start_s).sum()) / steps * 1e3,
            "copy_ms": float((copies.end_s - copies.start_s).sum()) / steps * 1e3,
            "stall_ms": r.summary["stall_s"] / steps * 1e3,
            "hit_rate": r.summary["hit_rate"],
            "kernels_per_step": len(compute) / steps,
        })
    return {k: statistics.median(o[k] for o in out) for k in out[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=24)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = run(a.policy, a.layers, a.hidden, a.inter, a.slots, a.requests, a.tokens, a.repeats)
    floor = run(a.policy, a.layers, 1, 1, a.slots, a.requests, a.tokens, a.repeats)
    mb = 3 * a.hidden * a.inter * 2 / 1e6
    print(f"policy {a.policy}, {a.layers} layers x 8 experts, {a.slots} slots, expert {a.hidden}x{a.inter} "
          f"bf16 ({mb:.2f} MB), medians of {a.repeats} runs")
    print(f"{'':28s} {'model':>10s} {'floor (1x1)':>12s}")
    for key, label in (("step_ms", "step time (ms)"), ("compute_ms", "in compute kernels (ms)"),
                       ("copy_ms", "copies on the wire (ms)"), ("stall_ms", "stalled on loads (ms)"),
                       ("kernels_per_step", "kernels per step"), ("hit_rate", "hit rate")):
        print(f"{label:28s} {model[key]:10.3f} {floor[key]:12.3f}")
    share = floor["step_ms"] / model["step_ms"]
    per_kernel = floor["step_ms"] / max(floor["kernels_per_step"], 1) * 1e3
    print(f"bookkeeping floor = {share:.1%} of a model step ({per_kernel:.0f} us per kernel dispatched, "
          f"policy and cache calls included)")
    outside = model["step_ms"] - model["compute_ms"] - model["stall_ms"]
    print(f"model step outside kernels and stalls: {outside:.3f} ms ({outside / model['step_ms']:.1%})")
    if not np.isfinite(share):
        raise SystemExit("no steps measured")


if __name__ == "__main__":
    main()
