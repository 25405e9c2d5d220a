"""The default executor: this process for one job, else a local process pool.

Workers come from a fork server that has already imported the simulator, so starting one costs a
fork, not a fresh interpreter; each worker reads a trace once and keeps it for later tasks. A worker
that dies (killed, out of memory, a crash in native code) breaks the pool: unfinished
configurations are resubmitted to a new pool, up to `max_retries` times, and finished ones are kept.

Workers die with the sweep: on an interrupt (Ctrl-C, or SIGTERM, which the CLI raises as one) the
pool is shut down and its workers are killed instead of finishing their configurations; and each
worker watches the sweep's process (a pidfd on Linux, else a poll each second) and exits when it is
gone, even by SIGKILL. (PR_SET_PDEATHSIG would not do: a worker's parent is the fork server, which
itself waits for every worker to close its copy of the server's pipe, and idle workers hold the
task queue's write end, so without the watch they would wait for work forever.)
"""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time
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


def die_with_parent(sweep_pid: int) -> None:
    """Pool initializer: exit this worker as soon as the sweep's process is gone (now, if it
    already is), from a daemon thread that waits on a pidfd of it."""
    try:
        fd = os.pidfd_open(sweep_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): poll instead
        fd = None
    threading.Thread(target=_exit_when_gone, args=(sweep_pid, fd), name="finemoe-sweep-watch", daemon=True).start()


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
