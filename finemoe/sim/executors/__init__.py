"""Where a sweep's configurations run: in this process, a local process pool, or a Ray cluster.

Every executor has one method, `map(configs, work)`, that yields `(index, RunResult | TaskFailure)`
as configurations finish, in any order. Executors compute; `run_sweep` writes the result files, so
file names and atomic writes are the same whichever executor ran a configuration.
"""

from __future__ import annotations

from finemoe.errors import ConfigError
from finemoe.sim.executors.local import LocalExecutor
from finemoe.sim.executors.work import TaskFailure, Work, cached_trace, execute

EXECUTORS = ("local", "ray")
TRACE_TRANSPORTS = ("object-store", "path")


def make_executor(
    name: str,
    *,
    jobs: int | None = 1,
    ray_address: str | None = None,
    trace_transport: str = "object-store",
    max_retries: int = 2,
):
    """The executor called `name` ("local" or "ray"); Ray is imported only when asked for."""
    if max_retries < 0:
        raise ConfigError("--max-retries must be at least 0")
    if name == "local":
        if ray_address:
            raise ConfigError("--ray-address applies only to --executor ray")
        return LocalExecutor(jobs=jobs or 1, max_retries=max_retries)
    if name == "ray":
        if trace_transport not in TRACE_TRANSPORTS:
            raise ConfigError(f"trace transport {trace_transport!r}: choose one of {', '.join(TRACE_TRANSPORTS)}")
        from finemoe.sim.executors.ray_cluster import RayExecutor

        return RayExecutor(jobs=jobs, address=ray_address, trace_transport=trace_transport, max_retries=max_retries)
    raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "LocalExecutor", "TaskFailure", "Work", "cached_trace", "execute", "make_executor"]
