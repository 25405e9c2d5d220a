"""The workload, engine-neutral (the simulator and the replayer share it): which requests build the
history and which are measured, when measured requests arrive, and which sequences each engine step
runs (continuous batching). No SimPy here: callers pass the current time in."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies.base import Sequence
from finemoe.sim.config import WorkloadConfig
from finemoe.traces.schema import Iteration, RequestInfo, Trace


@dataclass(frozen=True)
class Split:
    """Request ids per side of the evaluation protocol (disjoint)."""

    history: tuple[int, ...]
    measure: tuple[int, ...]
    source: str  # "seeded" (drawn with the run's seed), "trace" (the trace's own labels) or "online"

    def to_dict(self) -> dict:
        return {"history": list(self.history), "measure": list(self.measure), "source": self.source}


def split_requests(trace: Trace, workload: WorkloadConfig, seed: int) -> Split:
    """History/measure split of the trace's requests (see `split_request_infos`)."""
    return split_request_infos(trace.requests, workload, seed)


def split_request_infos(requests: list[RequestInfo], workload: WorkloadConfig, seed: int) -> Split:
    """History/measure split by request, from the requests alone (a trace's metadata has them, so
    a sweep can plan memory before it reads any routing).

    Online runs start with an empty history and measure every request. Otherwise the trace's own
    labels are used when every request carries one ("history"/"measure"), else a seeded shuffle puts
    `history_fraction` of the requests (rounded) in the history. `max_requests` caps the measured side.
    """
    ids = [r.request_id for r in requests]
    if not 0.0 <= workload.history_fraction < 1.0:
        raise ConfigError(f"history_fraction must be in [0, 1), got {workload.history_fraction}")
    if workload.online:
        history, measure, source = [], sorted(ids), "online"
    elif ids and all(r.split in ("history", "measure") for r in requests) and any(
        r.split == "measure" for r in requests
    ):
        history = sorted(r.request_id for r in requests if r.split == "history")
        measure = sorted(r.request_id for r in requests if r.split == "measure")
        source = "trace"
    else:
        order = np.random.default_rng(seed).permutation(len(ids))
        n_hist = int(round(workload.history_fraction * len(ids)))
        if len(ids) > 1:
            n_hist = min(n_hist, len(ids) - 1)  # always measure something
        else:
            n_hist = 0
        history = sorted(ids[i] for i in order[:n_hist])
        measure = sorted(ids[i] for i in order[n_hist:])
        source = "seeded"
    if workload.max_requests is not None:
        if workload.max_requests < 1:
            raise ConfigError(f"max_requests must be at least 1, got {workload.max_requests}")
        measure = measure[: workload.max_requests]
    if not measure:
        raise ConfigError("the workload measures no requests (the trace is empty)")
    return Split(tuple(history), tuple(measure), source)


def arrival_times(n: int, workload: WorkloadConfig, seed: int) -> np.ndarray:
    """Arrival time (s) of each of `n` measured requests, in measurement order, non-decreasing."""
    if workload.arrival == "all":
        return np.zeros(n)
    if workload.arrival == "poisson":
        if workload.rate_rps is None or not workload.rate_rps > 0:
            raise ConfigError(f"poisson arrivals need a positive rate_rps, got {workload.rate_rps}")
        # The first request arrives at 0; gaps are exponential with mean 1/rate.
        gaps = np.random.default_rng([seed, 1]).exponential(1.0 / workload.rate_rps, size=n)
        gaps[0] = 0.0
        return np.cumsum(gaps)
    if workload.arrival == "file":
        return _read_timestamps(workload.timestamps_path, n)
    raise ConfigError(f"unknown arrival process {workload.arrival!r}; use all, poisson or file")


def _read_timestamps(path: str | None, n: int) -> np.ndarray:
    if not path:
        raise ConfigError("arrival 'file' needs timestamps_path")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"arrival timestamps file {p} not found")
    values = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            v = float(line.split(",")[0])
        except ValueError:
            raise ConfigError(f"{p} line {lineno}: {line!r} is not an arrival time in seconds") from None
        if not np.isfinite(v) or v < 0:
            raise ConfigError(f"{p} line {lineno}: arrival time {line!r} must be a non-negative number")
        values.append(v)
    if len(values) < n:
        raise ConfigError(f"{p} holds {len(values)} arrival times but the workload measures {n} requests")
    arr = np.asarray(values[:n])
    if np.any(np.diff(arr) < 0):
        raise ConfigError(f"{p}: arrival times must be non-decreasing")
    return arr


@dataclass
class _Running:
    request_id: int
    iterations: tuple[Iteration, ...]
    next_index: int = 0


@dataclass
class ContinuousBatcher:
    """Decides each engine step's sequences: running requests advance one iteration, free places go
    to arrived requests in arrival order (their first step is their prefill when it is recorded).

    Times are plain numbers in whatever unit the arrivals are given (seconds, or engine ticks).
    """

    arrivals: list[tuple[int, float, tuple[Iteration, ...]]]  # (request_id, arrival, iterations)
    max_batch: int = 1
    _queue: deque = field(init=False, repr=False)
    _running: list[_Running] = field(init=False, repr=False)
    admitted: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        self._queue = deque(sorted((a for a in self.arrivals if a[2]), key=lambda a: a[1]))
        self._running = []

    @property
    def done(self) -> bool:
        return not self._queue and not self._running

    def next_arrival(self) -> float | None:
        """When the next not yet admitted request arrives (None if none is left)."""
        return self._queue[0][1] if self._queue else None

    def last_arrival(self) -> float | None:
        """When the last not yet admitted request arrives (None if none is left): from then on the
        steps no longer depend on the clock."""
        return self._queue[-1][1] if self._queue else None

    def arrived_count(self, now: float) -> int:
        """Requests admitted so far plus those queued and already arrived at `now`."""
        return self.admitted + sum(1 for a in self._queue if a[1] <= now)

    def next_step(self, now: float) -> tuple[Sequence, ...]:
        """Sequences of the next step at time `now` (empty if nothing has arrived yet)."""
        while self._queue and len(self._running) < self.max_batch and self._queue[0][1] <= now:
            rid, _, its = self._queue.popleft()
            self._running.append(_Running(rid, its))
            self.admitted += 1
        return tuple(
            Sequence(r.request_id, it.iteration, it.start, it.stop)
            for r in self._running
            for it in (r.iterations[r.next_index],)
        )

    def finish_step(self) -> list[int]:
        """Advance every running request by the iteration it just ran; return ids that completed."""
        finished = []
        still = []
        for r in self._running:
            r.next_index += 1
            if r.next_index >= len(r.iterations):
                finished.append(r.request_id)
            else:
                still.append(r)
        self._running = still
        return finished

    def skip_to_end(self) -> None:
        """Done, as if every remaining step had run (a caller that knows the steps from an equal
        `plan_key` runs them itself)."""
        self.admitted += len(self._queue)
        self._queue.clear()
        self._running = []

    def plan_key(self, now: float | None = None) -> tuple:
        """What `plan(now)` depends on besides the trace, hashable: equal keys, equal plans."""

        def its(iterations) -> tuple:
            return (len(iterations), iterations[0].start, iterations[-1].stop) if iterations else (0,)

        queued = tuple((rid, its(i)) for rid, t, i in self._queue if now is None or t <= now)
        running = tuple((r.request_id, r.next_index, its(r.iterations)) for r in self._running)
        return self.max_batch, self.admitted, queued, running

    def plan(self, now: float | None = None) -> list[tuple[Sequence, ...]]:
        """The steps that would follow if no further requests arrived after `now` (all queued
        requests count as arrived when `now` is None): used for oracle views of the future."""
        twin = ContinuousBatcher.__new__(ContinuousBatcher)
        twin.arrivals = self.arrivals
        twin.max_batch = self.max_batch
        queued = [a for a in self._queue if now is None or a[1] <= now]
        twin._queue = deque((rid, 0.0, its) for rid, _, its in queued)
        twin._running = [_Running(r.request_id, r.iterations, r.next_index) for r in self._running]
        twin.admitted = self.admitted
        steps = []
        while not twin.done:
            seqs = twin.next_step(0.0)
            steps.append(seqs)
            twin.finish_step()
        return steps


def build_batcher(
    trace: Trace, measure: tuple[int, ...], arrivals, max_batch: int
) -> ContinuousBatcher:
    """A batcher over the measured requests of `trace`, the k-th arriving at `arrivals[k]`."""
    by_req = trace.iterations_by_request
    items = [(rid, float(t), by_req.get(rid, ())) for rid, t in zip(measure, arrivals, strict=True)]
    return ContinuousBatcher(items, max_batch)
