"""`--executor ray`: each configuration is one Ray task, on a local instance or a cluster.

Traces travel through Ray's object store by default: the driver loads each distinct trace once and
`ray.put`s it; every task gets the reference, and Ray hands workers the numpy arrays zero-copy from
shared memory on their node (one transfer per node, not per task). That works whether or not the
workers can see the driver's files. With `trace_transport="path"` tasks get only the path and each
worker process reads the trace once (from a file system all nodes share), which avoids holding a
large trace in the object store.

Tasks return their RunResult and the driver writes the file, exactly as the local executor does,
so the output folder needs to exist only where the driver runs. A task whose worker dies is retried
by Ray (`max_retries`); one that raises comes back as a TaskFailure and is not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from finemoe.errors import ConfigError
from finemoe.sim.executors.work import (
    TaskFailure,
    Work,
    describe_exception,
    execute,
    trace_identity,
)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'finemoe[ray]'") from None
    return ray


def _ray_task(work: Work, config, trace):
    return execute(work, config, trace)


class RayExecutor:
    def __init__(self, jobs: int | None = None, address: str | None = None,
                 trace_transport: str = "object-store", max_retries: int = 2):
        self.jobs = jobs
        self.address = address
        self.trace_transport = trace_transport
        self.max_retries = max_retries

    def connect(self):
        """Ray, initialised: reuses a running session, connects to `address`, or starts a local one.
        Returns (ray, started) where `started` says whether this call must shut it down."""
        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        try:
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=self.jobs, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.address or "a local Ray instance"
            raise ConfigError(f"could not start or reach Ray at {where}: {str(exc).splitlines()[0]}") from None
        return ray, True

    def map(self, configs: Sequence, work: Work) -> Iterator[tuple[int, object]]:
        ray, started = self.connect()
        try:
            yield from self._run(ray, configs, work)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, configs: Sequence, work: Work) -> Iterator[tuple[int, object]]:
        task = ray.remote(num_cpus=1, max_retries=self.max_retries)(_ray_task)
        refs: dict = {}
        shipped: dict[tuple, object] = {}
        for i, config in enumerate(configs):
            trace_ref = None
            if self.trace_transport == "object-store":
                key = trace_identity(work, config)
                if key not in shipped:
                    try:
                        shipped[key] = ray.put(work.load(config))
                    except Exception as exc:  # noqa: BLE001 - a bad trace fails its configurations only
                        shipped[key] = TaskFailure(describe_exception(exc))
                trace_ref = shipped[key]
                if isinstance(trace_ref, TaskFailure):
                    yield i, trace_ref
                    continue
            refs[task.remote(work, config, trace_ref)] = i
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if pending:  # take every other finished task too: one wait per batch, not per task
                more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                done += more
            for ref in done:
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    outcome = TaskFailure(f"Ray task failed after {self.max_retries} retries: "
                                          f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                yield refs[ref], outcome
