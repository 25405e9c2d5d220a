"""The default executor: this process for one job, else a local process pool.

Workers come from a fork server that has already imported the simulator, so starting one costs a
fork, not a fresh interpreter; each worker reads a trace once and keeps it for later tasks. A worker
that dies (killed, out of memory, a crash in native code) breaks the pool: unfinished
configurations are resubmitted to a new pool, up to `max_retries` times, and finished ones are kept.

Workers die with the sweep. On an interrupt (Ctrl-C, or SIGTERM, which the CLI raises as one) the
results already finished are handed out, then the pool is shut down and its workers are stopped
instead of finishing their configurations. Neither side may be cut inside concurrent.futures' own
code, or the pool never shuts down: the interrupt waits for the pool's code to return (see
`finemoe.interrupts`), and a worker stops inside a configuration, never half-way through sending a
result. And each worker watches the sweep's process (a pidfd on Linux, else a poll each second)
and exits when it is gone, even by SIGKILL. (PR_SET_PDEATHSIG would not do: a worker's parent is
the fork server, which itself waits for every worker to close its copy of the server's pipe, and
idle workers hold the task queue's write end, so without the watch they would wait for work
forever.)
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from finemoe.interrupts import deferred, take_pending
from finemoe.sim.executors.work import TaskFailure, Work, describe_exception, execute

_POLL_S = 0.2  # how long an interrupt may wait for the pool loop to take it
STOP_SIGNAL = getattr(signal, "SIGUSR1", signal.SIGTERM)  # (Windows has no SIGUSR1)
STOP_GRACE_S = 3.0  # then a worker that has not stopped is killed

_PRELOAD = ["finemoe.sim.executors.local", "finemoe.sim.executors.work", "finemoe.sim.executors.preload", "pyarrow.parquet"]


def _pool_context():
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_setup(sweep_pid: int) -> None:
    """Pool initializer: Ctrl-C is the sweep's to handle (a worker cut while sending a result would
    leave the pool waiting forever for its end); `STOP_SIGNAL` stops this worker (`_on_stop`); and it
    exits as soon as the sweep's process is gone (now, if it already is)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _on_stop)
    try:
        fd = os.pidfd_open(sweep_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): poll instead
        fd = None
    threading.Thread(target=_exit_when_gone, args=(sweep_pid, fd), name="finemoe-sweep-watch", daemon=True).start()


class _ThisWorker:
    in_task = False  # running a configuration (not sending a result, not waiting for work)
    stopping = False


def _task(work: Work, config):
    """One configuration in a worker that `STOP_SIGNAL` may stop."""
    if _ThisWorker.stopping:
        os._exit(1)
    _ThisWorker.in_task = True
    try:
        return execute(work, config)
    finally:
        _ThisWorker.in_task = False


def _on_stop(signum, frame) -> None:
    """The sweep was interrupted: leave now if inside a configuration, else (perhaps half-way
    through sending a result, which must not be cut) before the next one."""
    if _ThisWorker.in_task:
        os._exit(1)
    _ThisWorker.stopping = True


def _exit_when_gone(pid: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the process has exited
    else:
        while _alive(pid):
            time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_workers(workers) -> None:
    """Stop the workers at once, each where it can be stopped (see `_on_stop`); kill any still
    there after `STOP_GRACE_S`."""
    for proc in workers:
        if proc.is_alive():
            try:
                os.kill(proc.pid, STOP_SIGNAL)
            except ProcessLookupError:  # it exited since
                pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in workers:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


class LocalExecutor:
    def __init__(self, jobs: int = 1, max_retries: int = 2):
        self.jobs = max(1, int(jobs))
        self.max_retries = max_retries

    def map(self, configs: Sequence, work: Work) -> Iterator[tuple[int, object]]:
        if self.jobs == 1 or len(configs) <= 1:
            for i, config in enumerate(configs):
                yield i, execute(work, config)
            return
        yield from self._pool_map(configs, work)

    def _pool_map(self, configs: Sequence, work: Work) -> Iterator[tuple[int, object]]:
        attempts = dict.fromkeys(range(len(configs)), 0)
        ctx = _pool_context()
        while attempts:
            pool = None
            workers: set = set()
            broken = False
            try:
                # Interrupts wait while concurrent.futures runs in this thread (it would keep a
                # future's lock, and the pool could never shut down); they are taken every
                # _POLL_S, after the finished results are handed out.
                with deferred():
                    before = set(multiprocessing.active_children())
                    pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(attempts)), mp_context=ctx,
                                               initializer=_worker_setup, initargs=(os.getpid(),))
                    futures = {pool.submit(_task, work, configs[i]): i for i in attempts}
                    workers = set(multiprocessing.active_children()) - before
                running = set(futures)
                while running:
                    with deferred():
                        done, running = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                        finished = []
                        for fut in done:
                            outcome = _outcome(fut)
                            if outcome is _BROKEN:
                                broken = True
                            else:
                                finished.append((futures[fut], outcome))
                        interrupt = take_pending()
                    for i, outcome in finished:
                        del attempts[i]
                        yield i, outcome
                    if interrupt is not None:
                        raise interrupt
            except BaseException:
                # An interrupt (or the consumer stopped): drop queued work and stop the running
                # configurations' workers; waiting could take as long as a configuration.
                with deferred():
                    if pool is not None:
                        pool.shutdown(wait=False, cancel_futures=True)
                    _stop_workers(workers)
                raise
            finally:
                if pool is not None:
                    with deferred():
                        pool.shutdown(wait=not attempts, cancel_futures=True)
            if broken:
                for i in sorted(attempts):
                    attempts[i] += 1
                    if attempts[i] > self.max_retries:
                        del attempts[i]
                        yield i, TaskFailure(
                            f"worker process died while running it ({self.max_retries + 1} attempts); "
                            "out of memory or killed?"
                        )


_BROKEN = object()  # a future whose worker died


def _outcome(fut):
    try:
        return fut.result()
    except BrokenProcessPool:
        return _BROKEN
    except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
        return TaskFailure(describe_exception(exc))


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
