"""The default executor: this process for one job, else a local process pool.

Workers come from a fork server that has already imported the simulator, so starting one costs a
fork, not a fresh interpreter; each worker reads a trace once and keeps it for later tasks. A worker
that dies (killed, out of memory, a crash in native code) breaks the pool: unfinished
configurations are resubmitted to a new pool, up to `max_retries` times, and finished ones are kept.
"""

from __future__ import annotations

import multiprocessing
import os
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
            pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(attempts)), mp_context=ctx)
            broken = False
            try:
                futures = {pool.submit(execute, work, configs[i]): i for i in attempts}
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
            finally:
                # On a normal end nothing is left; on an interrupt, do not wait for queued work.
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
