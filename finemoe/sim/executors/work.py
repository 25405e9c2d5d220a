"""One configuration's work, as every executor runs it: load the trace (once per process), simulate.

`Work` holds two module-level functions, so it pickles by reference and costs nothing to send with
each task. Errors never escape a task: they come back as a `TaskFailure` carrying one line that
names the error, so one bad configuration cannot stop a sweep.
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finemoe.errors import FinemoeError

if TYPE_CHECKING:
    from finemoe.results import RunResult
    from finemoe.sim.config import SimConfig
    from finemoe.traces.schema import Trace

TRACE_CACHE_SIZE = 2  # traces kept per process; sweeps are ordered so a worker sees few traces

_TRACES: OrderedDict[tuple, object] = OrderedDict()


@dataclass(frozen=True)
class TaskFailure:
    """A configuration that did not produce a result, and why (one line)."""

    error: str


@dataclass(frozen=True)
class Work:
    """`run(trace, config) -> RunResult` and `load(config) -> Trace` (the trace, projected onto
    `config.model_profile` when set). Tests and benchmarks swap in their own functions."""

    run: Callable[[Trace, SimConfig], RunResult]
    load: Callable[[SimConfig], Trace]
    # Where policies keep what they computed from content alone, for the sweep's other runs
    # (policies/memo.py; a sweep's `predictions/` beside its results); None: memory only.
    predictions_dir: str | None = None

    @classmethod
    def default(cls) -> Work:
        return cls(run=simulate_trace, load=load_trace)


def simulate_trace(trace: Trace, config: SimConfig) -> RunResult:
    from finemoe.sim.run import simulate

    return simulate(trace, config)


def load_trace(config: SimConfig) -> Trace:
    """The trace a configuration runs on, as the engine prepares it (read, then projected)."""
    from finemoe.sim import run

    return run.load_trace_for(config)


def trace_identity(work: Work, config: SimConfig) -> tuple:
    """What makes two configurations share a loaded trace."""
    return (_qualname(work.load), config.trace_path, config.model_profile, config.layers_as_consecutive)


def cached_trace(work: Work, config: SimConfig) -> Trace:
    """The configuration's trace, read once per process and kept for the next configurations."""
    key = trace_identity(work, config)
    if key in _TRACES:
        _TRACES.move_to_end(key)
        return _TRACES[key]
    trace = work.load(config)
    _TRACES[key] = trace
    while len(_TRACES) > TRACE_CACHE_SIZE:
        _TRACES.popitem(last=False)
    return trace


def clear_trace_cache() -> None:
    """Forget loaded traces (a trace file was rewritten in place, or memory is wanted back)."""
    _TRACES.clear()


def execute(work: Work, config: SimConfig, trace: Trace | None = None) -> RunResult | TaskFailure:
    """Run one configuration; `trace` is given when the executor shipped it (Ray's object store)."""
    from finemoe.policies.memo import stored_in

    try:
        if trace is None:
            trace = cached_trace(work, config)
        with stored_in(work.predictions_dir):
            return work.run(trace, config)
    except FinemoeError as exc:
        return TaskFailure(str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug in one configuration must not stop the sweep
        return TaskFailure(describe_exception(exc))


def describe_exception(exc: BaseException) -> str:
    """`TypeError: message (at finemoe/sim/engine.py:123)`: enough to find a bug, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {_short_path(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}{where}"


def _short_path(filename: str) -> str:
    marker = "finemoe/"
    return filename[filename.rfind(marker):] if marker in filename else filename


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
