"""The default executor: this process for one job, else a local process pool.

Workers come from a fork server that has already imported the simulator, so starting one costs a
fork, not a fresh interpreter; each worker reads a trace once and keeps it for later tasks. A worker
that dies (killed, out of memory, a crash in native code) breaks the pool: unfinished
configurations are resubmitted to a new pool, up to `max_retries` times, and finished ones are kept.

Workers die with the sweep: on an interrupt (Ctrl-C, or SIGTERM, which the CLI raises as one) the
pool is shut down and its workers are killed instead of finishing their configurations, and on
Linux each worker asks the kernel to kill it when its parent (the fork server, which exits when the
sweep's process dies, even by SIGKILL) goes away, so no worker outlives the sweep.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from finemoe.sim.executors.work import TaskFailure, Work, describe_exception, execute

_PRELOAD = ["finemoe.sim.executors.work", "finemoe.sim.executors.preload", "pyarrow.parquet"]


def _pool_context():
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sweep_pid: int) -> None:
    """Pool initializer: SIGKILL this worker when its parent dies (Linux), and exit now if the
    sweep's process is already gone (it died between the fork and this call)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the interrupt path still kills workers
            pass
    try:
        os.kill(sweep_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass


def _kill_workers(workers) -> None:
    for proc in workers:
        if proc.is_alive():
            proc.kill()
    for proc in workers:
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
            before = set(multiprocessing.active_children())
            pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(attempts)), mp_context=ctx,
                                       initializer=die_with_parent, initargs=(os.getpid(),))
            broken = False
            workers: set = set()
            try:
                futures = {pool.submit(execute, work, configs[i]): i for i in attempts}
                workers = set(multiprocessing.active_children()) - before
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = futures[fut]
                        try:
                            outcome = fut.result()
                        except BrokenProcessPool:
                            broken = True
                            continue
                        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
                            outcome = TaskFailure(describe_exception(exc))
                        del attempts[i]
                        yield i, outcome
            except BaseException:
                # An interrupt: drop queued work and kill the running configurations' workers
                # (finished ones were handed out already); waiting could take as long as a configuration.
                pool.shutdown(wait=False, cancel_futures=True)
                _kill_workers(workers)
                raise
            finally:
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


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
