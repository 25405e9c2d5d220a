"""Measure the host CPU's side of expert execution through the replayer's own CPU thread
(`finemoe.replay.cpu_worker`), and fit the `CpuSpec` the simulator charges for it.

What a CPU-executing replay pays per layer is what is timed here, with the same code: a job posted
to the host thread, the hidden states copied to it, each expert's SwiGLU read from cold host
weights, the output copied back, the compute thread woken. An empty job's round trip is the fixed
cost of a layer with CPU work; jobs of `EXPERTS_PER_JOB` experts at each token count, less the
empty job's time on the worker, give one expert's cost, from which the roofline's two ends and its
fixed cost are fitted as for the device (`fit_roofline`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from finemoe.replay.compute import ExpertShape
from finemoe.replay.cpu_worker import CpuJob, CpuWorker
from finemoe.replay.device import torch_dtype

EXPERTS_PER_JOB = 4  # experts per timed job: the per-expert cost is the job's minus an empty one's, / this
ROUND_TRIPS = 41  # empty jobs timed for the hand-off


def _pool(dtype: Any, shape: ExpertShape, working_set_bytes: int, seed: int = 0):
    import torch

    elem = torch.empty((), dtype=dtype).element_size()
    count = max(2 * EXPERTS_PER_JOB, -(-working_set_bytes // (shape.numel * elem)))
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty((count, shape.numel), dtype=dtype)
    for k in range(count):
        pool[k].copy_(torch.randn(shape.numel, generator=gen) * 0.02)
    return pool


def measure_cpu_side(device: str, dtype: str, shape: ExpertShape, token_counts: tuple[int, ...], repeats: int,
                     working_set_bytes: int) -> dict:
    """Round trips of empty jobs and per-expert times per token count on the host thread (seconds)."""
    import torch

    tdt = torch_dtype(dtype)
    rows = max(token_counts)
    tiny_shape = ExpertShape(16, 16)
    pools = {shape: _pool(tdt, shape, working_set_bytes), tiny_shape: _pool(tdt, tiny_shape, 0)}

    def run(s: ExpertShape, tokens: int, experts: int, times: int, warmup: int = 3) -> tuple[list[float], list[float]]:
        """`times` jobs of `experts` experts at `tokens` tokens: (round trips, busy times on the worker)."""
        pool = pools[s]
        state = {"i": 0}

        def source(_layer: int, e: int):
            return pool[e]

        x = torch.randn((rows, s.hidden_size)).to(device=device, dtype=tdt)
        worker = CpuWorker(source, s, x, torch.zeros_like(x), time.perf_counter)
        trips, busy = [], []
        try:
            for k in range(warmup + times):
                keys = []
                for _ in range(experts):
                    state["i"] = (state["i"] + 1) % pool.shape[0]
                    keys.append(((0, state["i"]), tokens))
                job = CpuJob(keys, tokens)
                t0 = time.perf_counter()
                worker.start(job)
                worker.finish()
                trip = time.perf_counter() - t0
                if k >= warmup:
                    trips.append(trip)
                    busy.append(job.end_s - job.start_s)
        finally:
            worker.close()
        return trips, busy

    trips, empty_busy = run(shape, 1, 0, ROUND_TRIPS)
    empty = statistics.fmean(empty_busy)
    per_expert = []
    for tokens in token_counts:
        n = repeats * 3 if tokens <= 4 else repeats
        _, busy = run(shape, tokens, EXPERTS_PER_JOB, n)
        t = max(statistics.fmean(busy) - empty, 1e-9) / EXPERTS_PER_JOB
        flops = 2.0 * 3 * shape.hidden_size * shape.intermediate_size * tokens
        per_expert.append({"tokens": tokens, "time_s": t, "tflops": flops / t / 1e12,
                           "weight_gbps": shape.numel * torch.empty((), dtype=tdt).element_size() / t / 1e9})
    _, tiny = run(tiny_shape, 1, EXPERTS_PER_JOB, max(repeats, 21))
    launch = max(statistics.fmean(tiny) - empty, 0.0) / EXPERTS_PER_JOB
    return {"round_trip_s": statistics.fmean(trips), "round_trip_median_s": statistics.median(trips),
            "empty_job_s": empty, "expert_fixed_cost_s": launch, "expert": per_expert,
            "experts_per_job": EXPERTS_PER_JOB, "working_set_bytes": int(working_set_bytes)}


def fit_cpu(name: str, measured: dict, shape: ExpertShape, dtype_bytes: float, stream_gbps: float,
            peak_flops: float, activation_s: float, source: str):
    """The CpuSpec whose expert roofline reproduces the host thread's rows, and whose `sync_s` is
    the empty job's round trip less the two activation copies the cost model charges apart
    (`activation_s`, one direction at one token)."""
    from finemoe.replay.calibrate import fit_roofline
    from finemoe.sim.cpu import CpuSpec

    roof = fit_roofline(measured["expert"], shape, dtype_bytes, measured["expert_fixed_cost_s"], stream_gbps,
                        peak_flops)
    return CpuSpec(name=name, mem_gbps=roof["mem_bps"] / 1e9, flops=roof["flops"],
                   memory_efficiency=min(1.0, roof["memory_efficiency"]),
                   compute_efficiency=min(1.0, roof["compute_efficiency"]),
                   expert_overhead_s=float(measured["expert_fixed_cost_s"]),
                   sync_s=float(max(0.0, measured["round_trip_s"] - 2 * activation_s)), source=source)
