"""Host-to-device copies off the compute path: CUDA streams with events, or worker threads on CPU.

The copier only moves bytes; it never decides what to copy. The executor's main thread owns the
cache and the policy, hands a copier at most one job per copy engine (so an on-demand load is never
stuck behind prefetches that were handed over early), and polls for completions between kernels.
On CPU, "device" memory is another host buffer and a copy is a `copy_` on a worker thread; torch
releases the GIL for it, so copies overlap compute as DMA engines do.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from finemoe.replay.device import copy_thread_started


@dataclass(eq=False)
class CopyJob:
    """One expert (or calibration buffer) copy: `src` into `dst`, on copy engine `engine`."""

    src: Any  # torch.Tensor (host)
    dst: Any  # torch.Tensor (device slot)
    tag: Any = None  # what the caller needs back (e.g. the cache's transfer record)
    engine: int = 0
    submit_s: float = 0.0
    start_s: float = float("nan")  # wall time the bytes started moving (CPU: measured; CUDA: set on poll)
    end_s: float = float("nan")
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _cuda_start: Any = field(default=None, repr=False)
    _cuda_end: Any = field(default=None, repr=False)


class ThreadCopier:
    """`engines` worker threads, each copying one job at a time (the CPU stand-in for copy engines)."""

    def __init__(self, engines: int = 1) -> None:
        if engines < 1:
            raise ValueError("a copier needs at least one copy engine")
        self.engines = engines
        self._inbox: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(engines)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = [0] * engines
        self._threads = [
            threading.Thread(target=self._work, args=(e,), name=f"finemoe-copy{e}", daemon=True)
            for e in range(engines)
        ]
        for t in self._threads:
            t.start()

    def _work(self, engine: int) -> None:
        copy_thread_started()
        inbox = self._inbox[engine]
        while True:
            job = inbox.get()
            if job is None:
                return
            job.start_s = time.perf_counter()
            job.dst.copy_(job.src)
            job.end_s = time.perf_counter()
            job.done.set()
            self._done.put(job)

    def idle_engine(self) -> int | None:
        """An engine with nothing handed to it, or None when all are busy."""
        for e, n in enumerate(self._busy):
            if n == 0:
                return e
        return None

    def submit(self, job: CopyJob, engine: int | None = None, after: Any = None) -> CopyJob:
        # `after` (a CUDA event on the GPU path) is moot here: CPU compute is synchronous, so a slot
        # is no longer read by the time the main thread hands out a copy into it.
        e = self.idle_engine() if engine is None else engine
        if e is None:
            e = min(range(self.engines), key=self._busy.__getitem__)
        job.engine = e
        job.submit_s = time.perf_counter()
        self._busy[e] += 1
        self._inbox[e].put(job)
        return job

    def poll(self) -> list[CopyJob]:
        """Jobs finished since the last poll (or wait), in completion order."""
        out = []
        while True:
            try:
                job = self._done.get_nowait()
            except queue.Empty:
                return out
            self._busy[job.engine] -= 1
            out.append(job)

    def wait(self, job: CopyJob) -> list[CopyJob]:
        """Block until `job` is done; returns every job finished meanwhile (including it)."""
        job.done.wait()
        return self.poll()

    def wait_all(self) -> list[CopyJob]:
        out: list[CopyJob] = []
        while any(self._busy):
            job = self._done.get()
            self._busy[job.engine] -= 1
            out.append(job)
        return out

    @property
    def in_flight(self) -> int:
        return sum(self._busy)

    def close(self) -> None:
        for box in self._inbox:
            box.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> ThreadCopier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CudaCopier:
    """One CUDA stream per copy engine; completion is an event the host polls.

    `guard(slot_event)` lets the caller make a copy wait for the last kernel that read the slot it
    overwrites (slot reuse is otherwise a race between the compute and copy streams).
    """

    def __init__(self, engines: int = 1, device: Any = None) -> None:
        import torch

        if engines < 1:
            raise ValueError("a copier needs at least one copy engine")
        self.torch = torch
        self.engines = engines
        self.device = device or torch.device("cuda")
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(engines)]
        self._jobs: list[list[CopyJob]] = [[] for _ in range(engines)]
        self._t0_event = torch.cuda.Event(enable_timing=True)
        self._t0_event.record()
        torch.cuda.synchronize(self.device)
        self._t0_s = time.perf_counter()

    def idle_engine(self) -> int | None:
        for e, jobs in enumerate(self._jobs):
            if not jobs:
                return e
        return None

    def submit(self, job: CopyJob, engine: int | None = None, after: Any = None) -> CopyJob:
        torch = self.torch
        e = self.idle_engine() if engine is None else engine
        if e is None:
            e = min(range(self.engines), key=lambda i: len(self._jobs[i]))
        job.engine = e
        job.submit_s = time.perf_counter()
        stream = self.streams[e]
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            job._cuda_start = torch.cuda.Event(enable_timing=True)
            job._cuda_end = torch.cuda.Event(enable_timing=True)
            job._cuda_start.record(stream)
            job.dst.copy_(job.src, non_blocking=True)
            job._cuda_end.record(stream)
        self._jobs[e].append(job)
        return job

    def _finish(self, job: CopyJob) -> None:
        job.start_s = self._t0_s + self._t0_event.elapsed_time(job._cuda_start) / 1e3
        job.end_s = self._t0_s + self._t0_event.elapsed_time(job._cuda_end) / 1e3
        job.done.set()

    def poll(self) -> list[CopyJob]:
        out = []
        for jobs in self._jobs:
            while jobs and jobs[0]._cuda_end.query():
                job = jobs.pop(0)
                self._finish(job)
                out.append(job)
        return out

    def wait(self, job: CopyJob) -> list[CopyJob]:
        job._cuda_end.synchronize()
        return self.poll()

    def wait_all(self) -> list[CopyJob]:
        for s in self.streams:
            s.synchronize()
        return self.poll()

    @property
    def in_flight(self) -> int:
        return sum(len(j) for j in self._jobs)

    def close(self) -> None:
        for s in self.streams:
            s.synchronize()

    def __enter__(self) -> CudaCopier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_copier(device: str, engines: int):
    """The copier for `device` ("cpu" or "cuda[:n]")."""
    if device.startswith("cuda"):
        import torch

        return CudaCopier(engines, torch.device(device))
    return ThreadCopier(engines)
