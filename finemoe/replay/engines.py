"""Copy engines for a replay: one thread per engine that, like the simulator's copier processes,
takes the next transfer from the shared expert cache as soon as it is free (on-demand loads first),
copies, and marks the expert resident.

The cache and the policy are shared with the main (compute) thread, so every touch of them happens
under one lock; the bytes move without it. Two conditions share that lock: idle engines wait on
`work` (the main thread wakes only as many as it has work for), the main thread waits on `done`
(an engine wakes it when a copy lands). Waking a thread costs tens to hundreds of microseconds on
a busy machine, so nobody is woken for nothing. On CUDA a copy is
issued on the engine's own stream, after the last kernel that read the reused slot, and the thread
waits on an event; on CPU it is a `copy_` (torch releases the GIL for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from finemoe.replay.device import copy_thread_started
from finemoe.sim.cache import ExpertCache
from finemoe.sim.metrics import MetricsRecorder


class CopyEngines:
    def __init__(self, engines: int, cache: ExpertCache, rec: MetricsRecorder, done: threading.Condition,
                 work: threading.Condition, source: Callable[[tuple[int, int]], Any], pool, device: str,
                 clock: Callable[[], float], step: Callable[[], int]) -> None:
        import torch

        self.torch = torch
        self.cache, self.rec, self.lock, self.work, self.source, self.pool = cache, rec, done, work, source, pool
        self.idle = 0  # engines waiting on `work` (read and written under the lock)
        self.cuda = device.startswith("cuda")
        self.clock, self.step = clock, step
        self.engines = max(1, engines)
        self.streams = [torch.cuda.Stream(device=device) for _ in range(self.engines)] if self.cuda else None
        self.error: BaseException | None = None
        self.busy_s = [0.0] * self.engines
        self.kicked_at: float | None = None  # when the main thread last woke idle engines (under the lock)
        self.handoff_s: list[float] = []  # per wake-up: notify -> this engine holding its next transfer
        self.last_done: tuple | None = None  # (expert key, end time) of the last copy that landed
        # Of `work_s`, the time in the cache's (and so the policy's) calls that start and land the
        # copies: victim choice and load notification (recorded to show that share).
        self.lane_cache_s = 0.0
        self.copies = 0
        # Everything the copy threads do per copy besides the copy itself and waiting for work:
        # taking the lock (which the main thread holds through its policy calls), the transfer
        # and the slot, then landing the copy and waking the main thread. A copy lane's own gap
        # between two copies; it includes `lane_cache_s`.
        self.work_s = 0.0
        self._stop = False
        self._threads = [threading.Thread(target=self._run, args=(e,), name=f"finemoe-copy{e}", daemon=True)
                         for e in range(self.engines)]
        for t in self._threads:
            t.start()

    def _run(self, e: int) -> None:
        copy_thread_started()
        try:
            self._loop(e)
        except BaseException as exc:  # surfaced to the main thread, which raises it
            with self.lock:
                self.error = exc
                self.lock.notify_all()
                self.work.notify_all()

    def _loop(self, e: int) -> None:
        cache, lock = self.cache, self.lock
        while True:
            top = self.clock()
            with lock:
                while True:
                    if self._stop:
                        return
                    c0 = self.clock()
                    tr = cache.next_transfer(c0) if cache.has_work else None
                    if tr is not None:
                        self.lane_cache_s += self.clock() - c0
                        break
                    self.idle += 1
                    w0 = self.clock()
                    self.work.wait()
                    top += self.clock() - w0
                    self.idle -= 1
                    woken = self.kicked_at
                    if woken is not None and cache.has_work:
                        self.handoff_s.append(self.clock() - woken)
                slot = self.pool.assign(tr.key, tr.victim)
                guard = self.pool.guard(slot)
                step = self.step()
            src, dst = self.source(*tr.key), self.pool.buffers[slot]
            start = self.clock()
            self.work_s += start - top
            if self.cuda:
                stream = self.streams[e]
                with self.torch.cuda.stream(stream):
                    if guard is not None:
                        stream.wait_event(guard)
                    dst.copy_(src, non_blocking=True)
                stream.synchronize()
            else:
                dst.copy_(src)
            end = self.clock()
            self.busy_s[e] += end - start
            with lock:
                c0 = self.clock()
                cache.complete(tr, end)
                self.lane_cache_s += self.clock() - c0
                self.copies += 1
                self.last_done = (tr.key, end)
                self.rec.event(f"copy{e}", tr.kind, step, tr.key[0], tr.key[1], start, end, tr.prefetch is None)
                lock.notify()  # the main thread, if it waits for this copy
            self.work_s += self.clock() - end

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.work.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def drain(self) -> None:
        """Wait until nothing is queued or on the wire (the end of a run)."""
        with self.lock:
            while self.cache.busy and self.error is None:
                if not self.cache.in_flight and self.cache.blocked:
                    break
                self.lock.wait(0.05)


def now_s(t0: float) -> float:
    return time.perf_counter() - t0
