"""Small real functions that sweeps run in tests in place of the simulator (no tests here).

`lru_run` replays a trace's routing through an LRU cache of `expert_cache_slots` experts and
times it with the hardware's link bandwidth: a genuine, deterministic, cheap computation whose
result depends on every field a sweep varies, so wrong wiring shows up as wrong numbers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from finemoe.results import RunResult, latency_summary, requests_frame
from finemoe.sim.executors import Work
from finemoe.traces.io import read_trace

# Test knobs travel in policy_params (workers come from a fork server whose environment was fixed
# when it started, so environment variables set later in a test would not reach them).


def load(config):
    """Reads the trace; with policy param `load_log` (a folder), leaves a file named by pid per read."""
    log = config.policy_params.get("load_log")
    if log:
        Path(log, f"{os.getpid()}-{os.urandom(4).hex()}").write_text(config.trace_path)
    return read_trace(config.trace_path)


def lru_run(trace, config) -> RunResult:
    g = trace.geometry
    slots = config.memory.expert_cache_slots or g.num_layers * g.num_experts
    link = config.hardware.pcie_gbps * 1e9
    cache: OrderedDict = OrderedDict()
    hits = misses = 0
    now = 0.0
    rows = []
    for req in trace.requests:
        start = now
        first = None
        for it in trace.iterations_by_request[req.request_id]:
            for layer in range(g.num_layers):
                for e in np.unique(trace.experts[it.start:it.stop, layer]):
                    key = (layer, int(e))
                    if key in cache:
                        hits += 1
                        cache.move_to_end(key)
                    else:
                        misses += 1
                        now += g.bytes_per_expert / link
                        cache[key] = True
                        if len(cache) > slots:
                            cache.popitem(last=False)
                now += 1e-4
            if first is None:
                first = now
        rows.append(dict(request_id=req.request_id, arrival_s=start, first_token_s=first, finish_s=now,
                         prompt_tokens=req.prompt_tokens, generated_tokens=req.generated_tokens))
    requests = requests_frame(rows)
    summary = dict(hit_rate=hits / (hits + misses), hits=hits, misses=misses,
                   bytes_h2d=misses * g.bytes_per_expert, stall_s=misses * g.bytes_per_expert / link,
                   expert_cache_slots=slots, wall_s=0.0)
    summary.update(latency_summary(requests))
    return RunResult(config=config.to_dict(), summary=summary, requests=requests)


def failing_run(trace, config) -> RunResult:
    """Fails for one policy only, so tests see one failure among successes."""
    if config.policy == "lfu":
        raise ValueError("boom for lfu")
    return lru_run(trace, config)


def dying_run(trace, config) -> RunResult:
    """Kills its worker process on the first attempt of each configuration (a marker file records
    the attempt), then runs normally: what a crash or the OOM killer does to a worker."""
    marker = Path(config.policy_params["markers"]) / config.key()
    if not marker.exists():
        marker.write_text("died once")
        os._exit(17)
    return lru_run(trace, config)


WORK = Work(run=lru_run, load=load)
FAILING = Work(run=failing_run, load=load)
DYING = Work(run=dying_run, load=load)
