"""Measure a machine and fit the simulator's hardware profile to it.

Every figure is measured here, on this machine, with the replayer's own code paths: host-to-device
copies go through the same copier (CUDA streams, or a copy worker thread on CPU), expert compute
through the same SwiGLU function. The profile's numbers are *fits* to those measurements: the link's
latency and bandwidth are the intercept and inverse slope of a least-squares line of copy time
against bytes, the compute and memory efficiencies are what expert GEMMs achieve relative to the
best GEMM and the best memory stream measured, and `kernel_launch_s` is the time of an expert FFN
too small to do any work. The raw tables travel with the profile so the fit can be checked.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from finemoe.files import atomic_write_json
from finemoe.replay.compute import ExpertShape, expert_ffn
from finemoe.replay.copier import CopyJob, make_copier
from finemoe.replay.device import (
    check_device,
    cpu_threads,
    device_memory_bytes,
    device_name,
    split_cores,
    synchronize,
    torch_dtype,
    torch_threads,
)
from finemoe.sim.hardware import HardwareSpec

MiB = 1024**2


@dataclass(frozen=True)
class CalibrationPlan:
    """How much to measure: `quick` takes seconds, `thorough` tens of seconds."""

    copy_sizes: tuple[int, ...]
    copy_repeats: int
    overlap_size: int
    max_copy_engines: int
    token_counts: tuple[int, ...]
    gemm_repeats: int
    stream_bytes: int  # memory-bandwidth buffer; also the minimum working set (defeats CPU caches)
    square_gemm: int

    @classmethod
    def quick(cls, device: str) -> CalibrationPlan:
        cuda = device.startswith("cuda")
        return cls(
            copy_sizes=(64 * 1024, 256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB),
            copy_repeats=7,
            overlap_size=4 * MiB,
            max_copy_engines=4 if cuda else 2,
            token_counts=(1, 2, 4, 16, 64, 256),
            gemm_repeats=9,
            stream_bytes=(512 if cuda else 64) * MiB,
            square_gemm=4096 if cuda else 1024,
        )

    @classmethod
    def thorough(cls, device: str) -> CalibrationPlan:
        cuda = device.startswith("cuda")
        return cls(
            copy_sizes=(16 * 1024, 64 * 1024, 256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB),
            copy_repeats=21,
            overlap_size=16 * MiB,
            max_copy_engines=4,
            token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            gemm_repeats=21,
            stream_bytes=(2048 if cuda else 256) * MiB,
            square_gemm=8192 if cuda else 2048,
        )


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Mean time of `fn` after warm-up, with its median kept by `_timings` for the tables.

    The mean, not the median: a replay pays every slow sample (a preempted thread on a shared
    machine, a cache refill), so the cost the simulator needs is the average one.
    """
    return _timings(fn, repeats, warmup)["mean_s"]


def _timings(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"mean_s": statistics.fmean(times), "median_s": statistics.median(times), "min_s": min(times)}


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of y against x."""
    A = np.vstack([np.ones(len(x)), np.asarray(x, dtype=float)]).T
    (intercept, slope), *_ = np.linalg.lstsq(A, np.asarray(y, dtype=float), rcond=None)
    return float(intercept), float(slope)


def fit_link(rows: list[dict]) -> tuple[float, float]:
    """(latency_s, bytes_per_s) of `time_s = latency_s + bytes / bytes_per_s` over copy rows.

    Weighted by 1/time so that small, latency-bound copies count as much as large ones (each row's
    relative error matters, not its absolute error); the latency is clamped at zero.
    """
    x = np.asarray([r["bytes"] for r in rows], dtype=float)
    y = np.asarray([r["time_s"] for r in rows], dtype=float)
    w = 1.0 / y
    A = np.vstack([np.ones_like(x), x]).T * w[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(A, y * w, rcond=None)
    if slope <= 0:  # degenerate (noise): fall back to the largest copy's plain rate
        slope = y[-1] / x[-1]
    return max(float(intercept), 0.0), float(1.0 / slope)


# --- copies ------------------------------------------------------------------------------------


def measure_copies(device: str, sizes: tuple[int, ...], pinned: bool, repeats: int, pool_bytes: int) -> list[dict]:
    """Median time of one host-to-device copy per size, through the replayer's copier (1 engine).

    Sources and destinations rotate through buffers of at least `pool_bytes` so that on CPU a copy
    reads memory, not a cache that a real expert copy would never find warm.
    """
    import torch

    copier = make_copier(device, 1)
    rows = []
    try:
        for size in sizes:
            n = max(pool_bytes, 2 * size)
            src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            src.fill_(1)
            dst = torch.empty(max(n // 2, size), dtype=torch.uint8, device=device)
            nsrc, ndst = n // size, max(dst.numel() // size, 1)
            state = {"i": 0}

            def one(src=src, dst=dst, size=size, nsrc=nsrc, ndst=ndst, state=state):
                i = state["i"]
                state["i"] += 1
                s = (i % nsrc) * size
                d = (i % ndst) * size
                job = copier.submit(CopyJob(src[s : s + size], dst[d : d + size]))
                copier.wait(job)

            t = _median_time(one, repeats)
            rows.append({"bytes": size, "time_s": t, "gbps": size / t / 1e9})
            del src, dst
    finally:
        copier.close()
    return rows


LANE_COPIES = 200  # expert-sized copies queued back to back when timing a CPU copy lane (40 varied +-17%, 200 +-5%)


def measure_lane(device: str, copy_bytes: int, pool_bytes: int, slot_bytes: int,
                 copies: int = LANE_COPIES) -> dict:
    """A CPU copy lane as a replay's prefetches use it: expert-sized copies queued back to back on
    one copy thread, from sources as cold as the replay's host experts (rotating through
    `pool_bytes`) into destinations as warm as its slot pool (`slot_bytes`, written once first).
    Returns the mean copy (start to end) and the mean gap between two copies (the thread's own work
    between them); a warm-up round first. Timed one size this way, a copy of the replayed expert
    took what the replay's copy threads measured (570-620 us for 2.36 MB), where the line fitted
    over 64 KB-16 MB copies, each handed to an idle thread, predicted 900-980 us."""
    import torch

    n = max(pool_bytes, 2 * copy_bytes)
    src = torch.empty(n, dtype=torch.uint8).fill_(1)
    ndst = max(2, slot_bytes // copy_bytes)
    dst = torch.zeros(ndst * copy_bytes, dtype=torch.uint8, device=device)  # pages touched, as a slot pool's
    nsrc = n // copy_bytes
    copier = make_copier(device, 1)
    i = 0
    try:
        for _ in range(2):  # warm-up, then timed
            jobs = []
            for _ in range(copies):
                s, d = (i % nsrc) * copy_bytes, (i % ndst) * copy_bytes
                jobs.append(copier.submit(CopyJob(src[s : s + copy_bytes], dst[d : d + copy_bytes]), engine=0))
                i += 1
            for job in jobs:
                copier.wait(job)
    finally:
        copier.close()
    spans = [j.end_s - j.start_s for j in jobs]
    gaps = [b.start_s - a.end_s for a, b in zip(jobs, jobs[1:])]  # noqa: B905 (consecutive pairs)
    return {"bytes": copy_bytes, "copies": len(jobs), "copy_s": statistics.fmean(spans),
            "gap_s": statistics.fmean(gaps), "gbps": copy_bytes / statistics.fmean(spans) / 1e9}


def measure_overlap(device: str, size: int, max_engines: int, pinned: bool, repeats: int) -> list[dict]:
    """Aggregate bandwidth with 1..max_engines copies on the wire at once (one per engine)."""
    import torch

    rows = []
    for engines in range(1, max_engines + 1):
        copier = make_copier(device, engines)
        try:
            srcs = [torch.empty(size, dtype=torch.uint8, pin_memory=pinned).fill_(1) for _ in range(engines)]
            dsts = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(engines)]

            def batch(copier=copier, srcs=srcs, dsts=dsts):
                jobs = [copier.submit(CopyJob(s, d), engine=e) for e, (s, d) in enumerate(zip(srcs, dsts, strict=True))]
                for j in jobs:
                    copier.wait(j)
                copier.poll()

            t = _median_time(batch, repeats)
        finally:
            copier.close()
        rows.append({"engines": engines, "bytes_each": size, "time_s": t, "aggregate_gbps": engines * size / t / 1e9})
    return rows


def pick_copy_engines(rows: list[dict], tolerance: float = 0.05) -> int:
    """The fewest engines within `tolerance` of the best aggregate bandwidth."""
    best = max(r["aggregate_gbps"] for r in rows)
    for r in rows:
        if r["aggregate_gbps"] >= (1 - tolerance) * best:
            return int(r["engines"])
    return 1


# --- compute and memory ------------------------------------------------------------------------


FEW_TOKEN_REPEATS = 5  # memory-bound expert rows are timed this many times more often


def measure_expert(device: str, dtype: str, shape: ExpertShape, token_counts: tuple[int, ...], repeats: int,
                   working_set_bytes: int) -> list[dict]:
    """Median time of one SwiGLU expert FFN per token count, cycling through cache-cold experts."""
    import torch

    tdt = torch_dtype(dtype)
    elem = torch.empty((), dtype=tdt).element_size()
    bytes_per_expert = shape.numel * elem
    copies = max(2, -(-working_set_bytes // bytes_per_expert))  # more than any cache (H200's L2 is 50 MB)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = torch.empty((copies, shape.numel), dtype=tdt, device=device)
    for k in range(copies):  # row by row: no float32 staging copy of the whole working set
        pool[k].copy_(torch.randn(shape.numel, generator=gen) * 0.02)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, shape.hidden_size, generator=gen).to(dtype=tdt, device=device)
        state = {"i": 0}

        def one(x=x, state=state):
            state["i"] += 1
            expert_ffn(x, pool[state["i"] % copies], shape)
            synchronize(device)

        # The few-token rows fit `memory_efficiency`, which decode time follows: timed 5x as often
        # (9 repeats let it vary 0.25-0.30 between calibrations, and a Mixtral x0.05 replay's
        # simulated time per token with it, -6% to -18%).
        t = _median_time(one, repeats * FEW_TOKEN_REPEATS if tokens <= 4 else repeats)
        flops = 2.0 * 3 * shape.hidden_size * shape.intermediate_size * tokens
        rows.append({"tokens": tokens, "time_s": t, "tflops": flops / t / 1e12,
                     "weight_gbps": bytes_per_expert / t / 1e9})
    return rows


def measure_copy_interference(device: str, dtype: str, shape: ExpertShape, repeats: int, working_set_bytes: int,
                              copy_bytes: int, pool_bytes: int, engines: int = 1) -> dict:
    """How much slower one-token expert FFNs run while the replayer's copier keeps `engines` copy
    engines busy with expert-sized copies, and how much slower those copies run while the FFNs do
    (CPU: memcpy threads share the cores and the memory bandwidth with compute; on a GPU the copy
    engines are separate hardware and both ratios are about 1)."""
    import threading

    import torch

    n = max(pool_bytes, 2 * copy_bytes * engines)
    src = torch.empty(n, dtype=torch.uint8, pin_memory=device.startswith("cuda")).fill_(1)
    dst = torch.zeros(max(n // 2, copy_bytes * engines), dtype=torch.uint8, device=device)  # pages touched
    nsrc, ndst = n // copy_bytes, max(dst.numel() // copy_bytes, 1)
    copier = make_copier(device, engines)

    def copies(during: Callable[[], Any] | None) -> tuple[float, float, Any]:
        """Mean seconds per copy and per hand-off (submit to start) with every engine busy, while
        `during` runs on this thread (else a fixed number of copies), and what `during` returned."""
        stop = threading.Event()
        times: list[list[float]] = [[] for _ in range(engines)]
        waits: list[list[float]] = [[] for _ in range(engines)]  # hand-off: submitted -> bytes moving
        budget = max(4, repeats // 2)

        def feed(engine: int) -> None:
            i = engine
            while not stop.is_set() and (during is not None or len(times[engine]) < budget):
                s, d = (i % nsrc) * copy_bytes, (i % ndst) * copy_bytes
                t = time.perf_counter()
                job = copier.submit(CopyJob(src[s : s + copy_bytes], dst[d : d + copy_bytes]), engine=engine)
                copier.wait(job)
                times[engine].append(time.perf_counter() - t)
                if job.start_s == job.start_s:  # CPU copiers time the start; CUDA ones leave it NaN
                    waits[engine].append(max(job.start_s - job.submit_s, 0.0))
                i += engines
                time.sleep(0.0002)  # each copy handed over to an idle engine, as a miss is

        feeders = [threading.Thread(target=feed, args=(e,), name=f"finemoe-calibrate-feed{e}", daemon=True)
                   for e in range(engines)]
        for f in feeders:
            f.start()
        try:
            out = during() if during is not None else None
        finally:
            stop.set()
            for f in feeders:
                f.join()
        flat = [t for ts in times for t in ts[1:]] or [t for ts in times for t in ts]
        handoff = [w for ws in waits for w in ws]
        return statistics.fmean(flat), statistics.fmean(handoff) if handoff else 0.0, out

    def ffn() -> float:
        return measure_expert(device, dtype, shape, (1,), repeats, working_set_bytes)[0]["time_s"]

    # Alternate the measurements a few times: a shared machine's speed drifts within seconds, and a
    # ratio of two measurements taken at different moments would measure the drift.
    rounds = []
    try:
        for _ in range(3):
            alone = ffn()
            copy_alone, handoff_idle, _ = copies(None)
            copy_during, handoff_busy, during = copies(ffn)
            rounds.append((alone, copy_alone, handoff_idle, copy_during, handoff_busy, during))
    finally:
        copier.close()
    alone, copy_alone, handoff_idle, copy_during, handoff_busy, during = (
        statistics.fmean(col) for col in zip(*rounds, strict=True))
    return {"expert_alone_s": alone, "expert_during_copies_s": during, "copy_alone_s": copy_alone,
            "copy_during_compute_s": copy_during, "copy_bytes": copy_bytes, "engines": engines,
            "handoff_idle_s": handoff_idle, "handoff_during_compute_s": handoff_busy,
            "compute_slowdown": max(1.0, during / alone), "copy_slowdown": max(1.0, copy_during / copy_alone),
            "copy_start_delay_s": max(0.0, handoff_busy - handoff_idle)}


def measure_launch(device: str, dtype: str, repeats: int) -> float:
    """Time of an expert FFN with 16x16 matrices: the fixed cost each expert pays (dispatch, launch)."""
    rows = measure_expert(device, dtype, ExpertShape(16, 16), (1,), max(repeats, 21), 0)
    return rows[0]["time_s"]


def measure_memory_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Device memory bandwidth in GB/s from a buffer-to-buffer copy (bytes read + bytes written)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)

    def one():
        b.copy_(a)
        synchronize(device)

    t = _median_time(one, repeats)
    return 2 * nbytes / t / 1e9


PEAK_GEMM_ENOUGH_S = 0.05  # one GEMM this long is compute-bound: growing it further measures nothing new


def measure_peak_flops(device: str, dtype: str, n: int, repeats: int) -> tuple[int, float]:
    """(size, FLOP/s) of a square GEMM, the best this machine's matmul does.

    The size doubles from 256 up to `n` while one GEMM takes under `PEAK_GEMM_ENOUGH_S`: where the
    dtype has fast hardware that reaches `n` as before, and where it has none (bfloat16 on a CPU
    without AVX-512 BF16 or AMX runs ~100x slower than float32) it stops while a GEMM is already
    long enough to be compute-bound, instead of spending tens of seconds on one number.
    """
    import torch

    tdt = torch_dtype(dtype)
    size = min(256, n)
    while True:
        a = torch.randn(size, size).to(dtype=tdt, device=device)
        b = torch.randn(size, size).to(dtype=tdt, device=device)

        def one(a=a, b=b):
            a @ b
            synchronize(device)

        one()  # first call: allocation and kernel selection, not timed
        t = time.perf_counter()
        one()
        if size >= n or time.perf_counter() - t >= PEAK_GEMM_ENOUGH_S:
            break
        size = min(2 * size, n)
    return size, 2.0 * size**3 / _median_time(one, max(3, repeats // 2))


PROBE_HIDDEN = 16  # the probe model's experts are 16x16, like `measure_launch`'s: next to no arithmetic


def _probe(top_k: int, slots_per_layer: int, layers: int, tokens: int, seed: int, dtype: str, engines: int):
    """A tiny model (one request, one token per step) and its configuration; `slots_per_layer` 8 is
    all resident (no copies), fewer makes LRU miss."""
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    h = PROBE_HIDDEN
    g = tiny_geometry(num_layers=layers, num_experts=8, top_k=top_k, hidden_size=h, expert_intermediate_size=h,
                      dtype=dtype, bytes_per_expert=3 * h * h * 2, dense_bytes=layers * h * h * 2,
                      kv_bytes_per_token=layers * 2 * h * 2, model_name="dispatch-probe")
    trace = synthetic_trace(g, num_requests=1, prompt_tokens=4, generated_tokens=tokens, with_prefill=False,
                            seed=seed)
    cfg = SimConfig(trace_path="dispatch-probe", policy="lru",
                    hardware=PRESETS["rtx3090"].with_overrides(copy_engines=engines),
                    memory=MemoryConfig(expert_cache_slots=layers * slots_per_layer),
                    workload=WorkloadConfig(online=True), seed=seed)
    return trace, cfg


PROBES = ((1, 8), (4, 8), (2, 2), (4, 4))  # (top-k, slots per layer): all resident, then missing


def measure_dispatch(device: str, dtype: str, threads: int, repeats: int, engines: int, layers: int = 8,
                     tokens: int = 24) -> list[dict]:
    """Replay tiny probe models with the replayer itself, recording every kernel: with 16x16 experts
    the time outside kernels and stalls is the replayer's own driving of the work (routing, policy
    and cache calls, locks, waking copy threads), which the cost model charges nowhere else."""
    import pandas as pd

    from finemoe.replay.executor import ReplayOptions, replay

    rows = []
    for rep in range(max(1, repeats)):
        for k, per_layer in PROBES:
            trace, cfg = _probe(k, per_layer, layers, tokens, rep, dtype, engines)
            r = replay(trace, replace(cfg, timeline_steps=10**6), ReplayOptions(device=device, threads=threads))
            tl = pd.DataFrame(r.timeline)
            comp = tl[tl.lane == "compute"]
            experts = comp[comp.kind == "expert"]
            kernel_s = float((comp.end_s - comp.start_s).sum())
            s = r.summary
            rows.append({"top_k": k, "slots_per_layer": per_layer, "seed": rep, "time_s": float(s["makespan_s"]),
                         "kernel_s": kernel_s, "stall_s": float(s["stall_s"]),
                         "outside_s": float(s["makespan_s"]) - kernel_s - float(s["stall_s"]),
                         "layer_steps": int(s["layer_steps"]), "kernels": len(experts),
                         "misses": int(experts.miss.sum()), "hit_rate": float(s["hit_rate"])})
    return rows


def fit_dispatch(rows: list[dict]) -> dict:
    """Per layer, per expert kernel and per on-demand load: the replayer's time outside kernels and
    stalls, fitted over the probes by least squares (relative errors) as
    layer_steps x layer_overhead_s + kernels x expert_overhead_s + misses x miss_overhead_s.
    The kernels' own time (launch included) is measured separately, so nothing is counted twice."""
    a = np.array([[r["layer_steps"], r["kernels"], r["misses"]] for r in rows], dtype=float)
    y = np.array([r["outside_s"] for r in rows])
    w = 1.0 / np.maximum(y, 1e-9)
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    layer, expert, miss = (float(max(c, 0.0)) for c in coef)
    return {"layer_overhead_s": layer, "expert_overhead_s": expert, "miss_overhead_s": miss}


# --- the fit -----------------------------------------------------------------------------------


def predict_expert_s(hw: HardwareSpec, shape: ExpertShape, dtype_bytes: float, tokens: int) -> float:
    """The simulator's roofline for one expert: fixed cost + max(compute time, weight-read time)."""
    flops = 2.0 * 3 * shape.hidden_size * shape.intermediate_size * tokens
    nbytes = shape.numel * dtype_bytes
    return hw.kernel_launch_s + max(flops / hw.compute_flops_per_s, nbytes / hw.hbm_bytes_per_s)


def fit_roofline(expert_rows: list[dict], shape: ExpertShape, dtype_bytes: float, launch_s: float,
                 stream_gbps: float, peak_flops: float) -> dict[str, float]:
    """The roofline through measured expert FFN rows: the memory-bound end (bytes/s, and its share
    of the streamed peak) from the few-token rows, the compute-bound end (FLOP/s, and its share of
    the peak GEMM) from the largest; `launch_s`, the fixed cost, taken off both."""
    nbytes = shape.numel * dtype_bytes
    # Memory-bound end: a few tokens read the whole expert and do little arithmetic; the median
    # over those rows resists the odd slow sample of a shared machine.
    small = [r for r in expert_rows if r["tokens"] <= 4] or [min(expert_rows, key=lambda r: r["tokens"])]
    weight_bps = float(np.median([nbytes / max(r["time_s"] - launch_s, 1e-9) for r in small]))
    mem_bps = max(stream_gbps * 1e9, weight_bps)
    big = max(expert_rows, key=lambda r: r["tokens"])
    big_flops = 2.0 * 3 * shape.hidden_size * shape.intermediate_size * big["tokens"]
    expert_fps = big_flops / max(big["time_s"] - launch_s, 1e-9)
    flops = max(peak_flops, expert_fps)
    return {"mem_bps": mem_bps, "memory_efficiency": weight_bps / mem_bps, "flops": flops,
            "compute_efficiency": expert_fps / flops}


def fit_hardware(name: str, device: str, gpu_mem_bytes: int, link_rows: list[dict], overlap_rows: list[dict],
                 expert_rows: list[dict], shape: ExpertShape, dtype_bytes: float, launch_s: float,
                 stream_gbps: float, peak_flops: float, copy_cores: int = 0,
                 lane: dict | None = None) -> tuple[HardwareSpec, dict]:
    """A HardwareSpec whose cost model reproduces the measurements, and the fit's residuals.
    (`copy_compute_slowdown` and the replayer's overheads are measured with the copy engines this
    picks, and set afterwards.) `lane` (CPU, `measure_lane`): the link is that lane's (bytes per
    mean copy, the mean gap between copies as latency) instead of the line through `link_rows`,
    whose residuals then show how far the sized copies are from it."""
    latency_s, link_bps = fit_link(link_rows)
    engines = pick_copy_engines(overlap_rows)
    if copy_cores and not device.startswith("cuda"):
        engines = min(engines, copy_cores)
    if lane is not None:
        latency_s, link_bps = lane["gap_s"], lane["gbps"] * 1e9
    elif engines > 1:  # the simulator's copy engines share one link: its bandwidth is the aggregate
        agg = max(r["aggregate_gbps"] for r in overlap_rows if r["engines"] == engines) * 1e9
        link_bps = max(link_bps, agg)
    roof = fit_roofline(expert_rows, shape, dtype_bytes, launch_s, stream_gbps, peak_flops)
    hw = HardwareSpec(
        name=name,
        gpu_mem_bytes=int(gpu_mem_bytes),
        flops=float(roof["flops"]),
        hbm_gbps=float(roof["mem_bps"] / 1e9),
        pcie_gbps=float(link_bps / 1e9),
        transfer_latency_s=float(latency_s),
        copy_engines=int(engines),
        compute_efficiency=float(roof["compute_efficiency"]),
        memory_efficiency=float(roof["memory_efficiency"]),
        pcie_efficiency=1.0,  # pcie_gbps is the achieved bandwidth, not a datasheet peak
        kernel_launch_s=float(launch_s),
        source=f"finemoe calibrate on {device} ({time.strftime('%Y-%m-%d %H:%M:%S')})",
    )
    residuals = []
    for r in expert_rows:
        pred = predict_expert_s(hw, shape, dtype_bytes, r["tokens"])
        residuals.append({"tokens": r["tokens"], "measured_s": r["time_s"], "model_s": pred,
                          "rel_error": pred / r["time_s"] - 1})
    for r in link_rows:
        pred = hw.transfer_latency_s + r["bytes"] / hw.link_bytes_per_s
        residuals.append({"copy_bytes": r["bytes"], "measured_s": r["time_s"], "model_s": pred,
                          "rel_error": pred / r["time_s"] - 1})
    return hw, {"residuals": residuals}


def calibrate(device: str = "cpu", *, dtype: str = "bfloat16", thorough: bool = False,
              shape: ExpertShape | None = None, threads: int | None = None, working_set_bytes: int | None = None,
              copy_pool_bytes: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Measure `device` and return the profile: {"hardware": HardwareSpec fields, "measurements": ...}.

    `shape` is the expert GEMM to measure (default 1024 x 2048, or the replayed model's own).
    `threads` sets torch's CPU threads for the measurement (default: `cpu_threads(device)`), which
    must match the replay's: on a shared CPU, more threads than free cores is many times slower.
    `working_set_bytes`: how many bytes of distinct expert weights the GEMMs cycle through (default
    the plan's stream buffer); a replay passes its slot pool's size, the reuse distance it will see.
    `copy_pool_bytes`: the host buffer copies read from, in turn (default half the stream buffer); a
    replay passes its host experts' size, so copies read memory as cold as its expert copies do.
    """

    device = check_device(device)
    nthreads = cpu_threads(device) if threads is None else threads
    with torch_threads(nthreads), split_cores(device, nthreads) as copy_cores:
        return _calibrate(device, dtype, thorough, shape, nthreads, working_set_bytes, copy_pool_bytes, progress,
                          copy_cores)


def _calibrate(device: str, dtype: str, thorough: bool, shape: ExpertShape | None, threads: int,
               working_set_bytes: int | None, copy_pool_bytes: int | None,
               progress: Callable[[str], None] | None, copy_cores: int = 0) -> dict:
    import torch

    cuda = device.startswith("cuda")
    tdt = torch_dtype(dtype)
    dtype_bytes = torch.empty((), dtype=tdt).element_size()
    shape = shape or ExpertShape(1024, 2048)
    plan = CalibrationPlan.thorough(device) if thorough else CalibrationPlan.quick(device)
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    pool = plan.stream_bytes // 2 if copy_pool_bytes is None else max(copy_pool_bytes, max(plan.copy_sizes))

    say("host-to-device copies (pageable)")
    copies = {"pageable": measure_copies(device, plan.copy_sizes, False, plan.copy_repeats, pool)}
    if cuda:
        say("host-to-device copies (pinned)")
        copies["pinned"] = measure_copies(device, plan.copy_sizes, True, plan.copy_repeats, pool)
    link_kind = "pinned" if cuda else "pageable"
    say("overlapping copies")
    overlap = measure_overlap(device, plan.overlap_size, plan.max_copy_engines, cuda, plan.copy_repeats)
    say("expert GEMMs")
    launch_s = measure_launch(device, dtype, plan.gemm_repeats)
    working_set = plan.stream_bytes if working_set_bytes is None else working_set_bytes
    experts = measure_expert(device, dtype, shape, plan.token_counts, plan.gemm_repeats, working_set)
    say("memory bandwidth and peak GEMM")
    stream_gbps = measure_memory_bandwidth(device, plan.stream_bytes, plan.gemm_repeats)
    peak_n, peak = measure_peak_flops(device, dtype, plan.square_gemm, plan.gemm_repeats)

    lane = None
    if not cuda:
        # A CPU copy is a memcpy by a thread: time it as the replay's prefetches run it, at the
        # replayed expert's size; the link is that (the sized copies above stay a table).
        say("copies back to back at the expert's size")
        lane = measure_lane(device, int(shape.numel * dtype_bytes), pool, working_set)

    name = ("cuda-" if cuda else "cpu-") + device_name(device).split(" (")[0].replace(" ", "-").lower()
    hw, fit = fit_hardware(name, device, device_memory_bytes(device), copies[link_kind], overlap, experts,
                           shape, dtype_bytes, launch_s, stream_gbps, peak, copy_cores=copy_cores, lane=lane)
    say("compute while copies run")
    interference = measure_copy_interference(device, dtype, shape, max(5 * plan.gemm_repeats, 45), working_set,
                                             shape.numel * dtype_bytes, pool, hw.copy_engines)
    hw = replace(hw, copy_compute_slowdown=float(interference["compute_slowdown"]),
                 compute_copy_slowdown=float(interference["copy_slowdown"]),
                 # With the lane timed back to back (CPU), a copy handed to a sleeping copy thread
                 # pays the whole hand-off on top; otherwise the sized line's latency holds the idle part.
                 copy_start_delay_s=float(interference["handoff_during_compute_s"] if lane is not None
                                          else interference["copy_start_delay_s"]))
    say("the replayer's own per-layer, per-expert and per-miss costs")
    probes = measure_dispatch(device, dtype, threads, 2 if not thorough else 5, hw.copy_engines)
    overheads = fit_dispatch(probes)
    hw = replace(hw, **overheads)
    dispatch = {"probes": probes, "fit": overheads}
    say("experts on the host CPU thread (CPU placement)")
    from finemoe.replay.calibrate_cpu import fit_cpu, measure_cpu_side

    cpu_side = measure_cpu_side(device, dtype, shape, plan.token_counts, plan.gemm_repeats, pool)
    # On a CPU "device" the host's memory and GEMM peaks are those just measured; under CUDA they
    # are the GPU's, so the host's expert rows stand alone (efficiencies of 1).
    activation_s = hw.transfer_latency_s + shape.hidden_size * dtype_bytes / hw.link_bytes_per_s
    cpu = fit_cpu(f"{name} (measured)", cpu_side, shape, dtype_bytes, 0.0 if cuda else stream_gbps,
                  0.0 if cuda else peak, activation_s, f"finemoe calibrate on {device}: host CPU thread "
                  f"({time.strftime('%Y-%m-%d %H:%M:%S')})")
    measurements = {
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "dtype": dtype,
        "cpu_threads": threads,
        "plan": "thorough" if thorough else "quick",
        "copy": copies,
        "copy_lane": lane,
        "link_fit_from": link_kind,
        "overlap": overlap,
        "expert_shape": {"hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size},
        "expert_gemm": experts,
        "expert_working_set_bytes": int(working_set),
        "copy_pool_bytes": int(pool),
        "expert_fixed_cost_s": launch_s,
        "replayer_dispatch": dispatch,
        "cpu_side": cpu_side,
        "copy_interference": interference,
        "memory_stream_gbps": stream_gbps,
        "square_gemm": {"n": peak_n, "flops": peak},
        "fit": fit,
        "duration_s": time.perf_counter() - t0,
    }
    profile = {"hardware": hw.to_dict(), "measurements": measurements, "cpu": cpu.to_dict()}
    profile["warnings"] = fit_warnings(profile)
    return profile


# A fit that says more than was measured: the fitted link faster than any copy actually timed (by
# this margin), or a measurement the fitted model misses by more than this share.
FIT_BANDWIDTH_MARGIN = 1.10
FIT_RESIDUAL_LIMIT = 0.25


def fit_warnings(profile: dict) -> list[str]:
    """Sentences saying where a profile's fit cannot be trusted as it stands: the fitted
    host-to-device bandwidth exceeds the best single copy measured (e.g. the aggregate of
    overlapping copies, which the simulator gives a lone copy), or a residual exceeds 25%."""
    hw, m = profile["hardware"], profile["measurements"]
    warnings = []
    copies = m["copy"].get(m.get("link_fit_from", "pageable")) or m["copy"]["pageable"]
    best = max(r["gbps"] for r in copies)
    fitted = hw["pcie_gbps"] * hw.get("pcie_efficiency", 1.0)
    if fitted > best * FIT_BANDWIDTH_MARGIN:
        lane = m.get("copy_lane")
        source = (f" (the link is the {lane['gbps']:.2f} GB/s of expert-sized copies back to back)" if lane
                  else "")
        warnings.append(f"the fitted host-to-device bandwidth {fitted:.2f} GB/s exceeds the best measured copy, "
                        f"{best:.2f} GB/s{source}")
    residuals = m["fit"]["residuals"]
    if residuals:
        worst = max(residuals, key=lambda r: abs(r["rel_error"]))
        if abs(worst["rel_error"]) > FIT_RESIDUAL_LIMIT:
            what = f"{worst['tokens']}-token expert GEMM" if "tokens" in worst else f"{worst['copy_bytes']}-byte copy"
            warnings.append(f"the fit misses the {what} by {worst['rel_error']:+.0%} (limit "
                            f"{FIT_RESIDUAL_LIMIT:.0%})")
    return warnings


def write_profile(profile: dict, path: str | os.PathLike) -> Path:
    """Write a profile JSON atomically (temporary file, then rename)."""
    return atomic_write_json(path, profile, default=None)


def profile_hardware(profile: dict) -> HardwareSpec:
    return HardwareSpec(**profile["hardware"])


def mean_hardware(a, b):
    """Field-wise mean of two calibrations of one machine (e.g. before and after a replay), so a
    comparison uses the machine as it was over the whole replay, not at one moment before it
    (a HardwareSpec, or the CpuSpec of its host CPU)."""
    from dataclasses import fields, replace

    means = {f.name: (getattr(a, f.name) + getattr(b, f.name)) / 2 for f in fields(a)
             if isinstance(getattr(a, f.name), float)}
    return replace(a, **means, source=f"mean of two calibrations: {a.source}; {b.source}")
