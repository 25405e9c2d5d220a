"""The host CPU of a replay: one thread that computes a layer's CPU-placed experts from host memory
while the compute ("device") thread runs the layer's resident and copied experts.

A job is what a runtime hands its CPU side per MoE layer (llama.cpp, ktransformers, Fiddler): the
step's hidden states copied to a host buffer, each expert's SwiGLU on its tokens straight from the
host weights, the combined output copied back. The compute thread posts the job once the routing
is known (`start`) and, before the next layer, waits for it (`finish`): that wait is the GPU's wait
for the CPU the simulator charges. The thread runs on the copy cores (`copy_thread_started`): the
host's cores, not the device's. Timings are taken on the worker itself and handed back with the
job, so nothing but the job's hand-off crosses threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finemoe.replay.compute import ExpertShape, expert_views, swiglu
from finemoe.replay.device import copy_thread_started


@dataclass(eq=False)
class CpuJob:
    """One layer's CPU side: (expert key, tokens) in order, over `step_tokens` hidden states."""

    experts: list[tuple[tuple[int, int], int]]
    step_tokens: int
    posted_s: float = float("nan")  # the compute thread posted it
    start_s: float = float("nan")  # the worker picked it up
    spans: list[tuple[float, float]] = field(default_factory=list)  # each expert's (start, end)
    end_s: float = float("nan")  # the output is back in the device buffer
    waited_s: float = float("nan")  # the compute thread asked for it (`finish`)
    resumed_s: float = float("nan")  # the compute thread had it

    @property
    def handoff_s(self) -> float:
        """What the job cost the device beyond its experts: the worker's wake-up and activation
        copies, and the compute thread's wake-up after it when it was waiting."""
        worker = self.end_s - self.posted_s - sum(b - a for a, b in self.spans)
        return worker + (self.resumed_s - self.end_s if self.waited_s < self.end_s else 0.0)


class CpuWorker:
    """One host thread computing posted jobs in order; `finish` blocks until the current one is done."""

    def __init__(self, source: Callable[[int, int], Any], shape: ExpertShape, device_x: Any, device_out: Any,
                 clock: Callable[[], float]) -> None:
        import torch

        self.source, self.shape, self.clock = source, shape, clock
        self.device_x, self.device_out = device_x, device_out
        rows, width = device_x.shape
        pinned = str(device_x.device).startswith("cuda")
        # The CPU's side of the hand-off (pinned when the other side is a GPU, as runtimes do).
        self.host_x = torch.zeros((rows, width), dtype=device_x.dtype, pin_memory=pinned)
        self.host_out = torch.zeros((rows, width), dtype=device_x.dtype, pin_memory=pinned)
        self._views: dict[tuple[int, int], tuple] = {}
        self._cond = threading.Condition()
        self._job: CpuJob | None = None
        self._done: CpuJob | None = None
        self._stop = False
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.jobs = 0
        self._thread = threading.Thread(target=self._run, name="finemoe-cpu-experts", daemon=True)
        self._thread.start()

    def views(self, key: tuple[int, int]) -> tuple:
        got = self._views.get(key)
        if got is None:
            got = self._views[key] = expert_views(self.source(*key), self.shape)
        return got

    # --- the compute thread's side ----------------------------------------------------------------
    def start(self, job: CpuJob) -> None:
        with self._cond:
            if self._job is not None or self._done is not None:
                raise RuntimeError("a CPU job was posted before the previous one was collected")
            job.posted_s = self.clock()
            self._job = job
            self._cond.notify()

    def finish(self) -> CpuJob:
        """The posted job, once done (blocks until then)."""
        waited = self.clock()
        with self._cond:
            while self._done is None:
                if self.error is not None:
                    raise RuntimeError(f"the CPU expert thread failed: {self.error!r}") from self.error
                if self._job is None and self._done is None:
                    raise RuntimeError("no CPU job was posted")
                self._cond.wait(0.5)
            job, self._done = self._done, None
        job.waited_s, job.resumed_s = waited, self.clock()
        return job

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # --- the worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        copy_thread_started()
        self._own_threads()
        try:
            while True:
                with self._cond:
                    while self._job is None and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    job = self._job
                self._compute(job)
                with self._cond:
                    self._job, self._done = None, job
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced to the compute thread by `finish`
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    @staticmethod
    def _own_threads() -> None:
        """torch's thread count, set again on this thread: MKL keeps one per calling thread and gives
        a new thread the machine's core count, and two threads spinning on one core made a one-token
        expert take 11 ms (a scheduler slice) instead of 20 us. (OpenMP's count is process-wide for
        threads it did not start, so this thread cannot have fewer than the compute thread.)"""
        import torch

        torch.set_num_threads(torch.get_num_threads())

    def _compute(self, job: CpuJob) -> None:
        n = job.step_tokens
        job.start_s = self.clock()
        self.host_x[:n].copy_(self.device_x[:n])  # hidden states to the CPU
        for key, tokens in job.experts:
            t0 = self.clock()
            self.host_out[:tokens] = swiglu(self.host_x[:tokens], *self.views(key))
            job.spans.append((t0, self.clock()))
        self.device_out[:n].copy_(self.host_out[:n])  # the outputs back
        job.end_s = self.clock()
        self.busy_s += job.end_s - job.start_s
        self.jobs += 1


def job_spans(job: CpuJob) -> list[tuple[int, float, float]]:
    """(expert, start, end) of a finished job's experts, as the run's counters take them."""
    return [(key[1], a, b) for (key, _), (a, b) in zip(job.experts, job.spans, strict=True)]
