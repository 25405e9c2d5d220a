"""The simulator's entry point: a trace and a SimConfig in, a RunResult out.

`run_config(config)` reads the trace (projected onto `config.model_profile` when set) and calls
`simulate`, which splits the requests into history and measurement, fits the policy on the history,
builds the workload, runs the SimPy engine and records everything the run depended on.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import replace

from finemoe import __version__
from finemoe.policies.registry import make_policy
from finemoe.policies.support import check_support
from finemoe.results import RunResult
from finemoe.sim.bounds import lower_bounds, lower_bounds_at, planned_step_costs, steps_are_fixed
from finemoe.sim.config import SimConfig
from finemoe.sim.costs import TICKS_PER_S, CostModel
from finemoe.sim.engine import SimEngine
from finemoe.sim.memory import plan_for_config
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.workload import arrival_times, build_batcher, split_requests
from finemoe.traces.schema import Trace


def load_trace_for(config: SimConfig) -> Trace:
    """The configuration's trace, projected onto its model profile's geometry when one is named."""
    from finemoe.traces.io import read_trace

    trace = read_trace(config.trace_path)
    if config.layers_as_consecutive:
        trace = trace.logged_layers_only()
    if config.model_profile:
        from finemoe.traces.profiles import get_profile

        trace = trace.with_geometry(get_profile(config.model_profile).geometry())
    return trace


def run_config(config: SimConfig) -> RunResult:
    return simulate(load_trace_for(config), config)


def check_fields(policy, trace: Trace) -> None:
    """MissingFieldError naming the policy and what the trace lacks for it (a field, or on a partial
    log the layers its predictions reach)."""
    check_support(policy, trace)


def simulate(trace: Trace, config: SimConfig) -> RunResult:
    """Simulate `config` over `trace` (already projected if it should be); `oracle` without a
    `prefetch` parameter is the offline schedule, the best of its clairvoyant candidates."""
    from finemoe.sim.offline import is_offline_schedule, offline_schedule

    if config.expert_dtype is not None:
        trace = trace.with_geometry(config.run_geometry(trace.geometry))
    if is_offline_schedule(config):
        return offline_schedule(trace, config, simulate_policy)
    return simulate_policy(trace, config, make_policy(config.policy, **dict(config.policy_params)), bounds=True)


def _workload(trace: Trace, config: SimConfig):
    """The configuration's split, memory plan, arrival ticks and a fresh batcher."""
    wl = config.workload
    split = split_requests(trace, wl, config.seed)
    plan = plan_for_config(trace.geometry, trace.requests, config)
    arrivals_s = arrival_times(len(split.measure), wl, config.seed)
    ticks = [int(round(a * TICKS_PER_S)) for a in arrivals_s]
    return split, plan, ticks, build_batcher(trace, split.measure, ticks, wl.max_batch)


BOUNDS_KEPT = 64  # bounds remembered per process (`bounds_for`): a sweep's budgets x workloads at a time
_BOUNDS: OrderedDict[tuple, dict] = OrderedDict()
_NOT_BOUND_INPUTS = ("policy", "policy_params", "timeline_steps")  # what a run's bounds do not depend on


def bounds_for(trace: Trace, config: SimConfig, start: frozenset) -> dict:
    """The lower bounds of `config` from the start state `start` (sim/bounds.py): the same for every
    policy that starts cold (a policy that starts warm, such as static-hot, gets its own). Computed
    once per trace, configuration (its policy aside) and start state in a process, so a sweep's
    policies at one budget share them: they took a sixth of a prefetching run's time."""
    inputs = {k: v for k, v in config.to_dict().items() if k not in _NOT_BOUND_INPUTS}
    key = (trace.content_hash(), json.dumps(inputs, sort_keys=True, default=str), tuple(sorted(start)))
    got = _BOUNDS.get(key)
    if got is None:
        got = _BOUNDS[key] = compute_bounds(trace, config, start)
        while len(_BOUNDS) > BOUNDS_KEPT:
            _BOUNDS.popitem(last=False)
    else:
        _BOUNDS.move_to_end(key)
    return dict(got)


def compute_bounds(trace: Trace, config: SimConfig, start: frozenset) -> dict:
    """`bounds_for` computed afresh."""
    _, plan, _, batcher = _workload(trace, config)
    wl = config.workload
    return lower_bounds(trace, CostModel(config.hardware, trace.geometry), batcher, plan.expert_cache_slots,
                        start, steps_are_fixed(wl.arrival, wl.max_batch))


def position_sets(trace: Trace, config: SimConfig) -> list[tuple]:
    """The (layer, expert) keys each (step, layer) position of the configuration's planned steps
    needs, in order: what the loads bound reads, and the input of the exact optimum (sim/exact.py).
    These are the steps a run takes when they are fixed (`steps_are_fixed`)."""
    _, _, _, batcher = _workload(trace, config)
    steps, _ = planned_step_costs(trace, CostModel(config.hardware, trace.geometry), batcher)
    return [keys for s in steps for keys in s.keys]


def bounds_over(trace: Trace, configs: list[SimConfig], start: frozenset) -> list[dict]:
    """`bounds_for` of configurations that differ only in their GPU memory (a plan's curve): the
    workload is planned and its compute costed once."""
    if not configs:
        return []
    _, _, _, batcher = _workload(trace, configs[0])
    wl = configs[0].workload
    slots = [plan_for_config(trace.geometry, trace.requests, c).expert_cache_slots for c in configs]
    return lower_bounds_at(trace, CostModel(configs[0].hardware, trace.geometry), batcher, slots, start,
                           steps_are_fixed(wl.arrival, wl.max_batch))


def cpu_for(config: SimConfig, policy):
    """The configuration's CPU; for a policy that computes experts there and a configuration that
    names none, the default preset (recorded with the result)."""
    if config.cpu is not None or not policy.executes_on_cpu:
        return config.cpu
    from finemoe.sim.cpu import CPU_PRESETS, DEFAULT_CPU

    return CPU_PRESETS[DEFAULT_CPU]


def host_tier_for(config: SimConfig, policy, trace: Trace, recorder):
    """Host memory in front of the SSD when `--host-mem` limits it (sim/storage.py), else None."""
    if config.host_mem_bytes is None:
        return None
    from finemoe.errors import ConfigError
    from finemoe.sim.storage import HostTier

    if policy.executes_on_cpu:
        raise ConfigError(f"--host-mem with {policy.name}: experts computed on the CPU from an SSD tier "
                          "are not modelled yet (only copies to the GPU read through host memory)")
    g = trace.geometry
    return HostTier(int(config.host_mem_bytes // max(g.bytes_per_expert, 1)),
                    config.storage or _default_storage(), g.bytes_per_expert, g.num_layers,
                    g.num_experts, recorder)


def _default_storage():
    from finemoe.sim.storage import DEFAULT_STORAGE, STORAGE_PRESETS

    return STORAGE_PRESETS[DEFAULT_STORAGE]


def simulate_policy(trace: Trace, config: SimConfig, policy, bounds: bool = False,
                    compiled: bool | None = None) -> RunResult:
    """One engine run of the policy object `policy` under `config`; `bounds`: with the lower bounds
    for the start state it ran from as `bound_*` summary fields; `compiled`: whether sim/compiled.py
    runs the steps it supports (the same results): True whenever it can, False never (the
    reference throughout), None where it pays (`SimEngine._compiled_pays`)."""
    wall0 = time.perf_counter()
    check_fields(policy, trace)
    wl = config.workload
    split, plan, ticks, batcher = _workload(trace, config)
    if config.memory.layer_capacity is not None:
        from finemoe.sim.layer_capacity import resolve

        caps = resolve(config.memory.layer_capacity, trace, [] if wl.online else list(split.history),
                       plan.expert_cache_slots, wl.max_batch)
        plan = replace(plan, layer_capacity=caps)
    requests = {r.request_id: r for r in trace.requests}
    recorder = MetricsRecorder(trace.geometry.num_layers, config.timeline_steps)
    by_req = trace.iterations_by_request
    for rid, a in zip(split.measure, ticks, strict=True):
        # Each iteration run emits one token (the prefill its first), so tpot = mean decode step.
        recorder.request_arrived(rid, a / TICKS_PER_S, requests[rid].prompt_tokens, len(by_req.get(rid, ())))
    costs = CostModel(config.hardware, trace.geometry, cpu_for(config, policy))
    engine = SimEngine(trace, policy, costs, plan, batcher, recorder, seed=config.seed, online=wl.online,
                       host_tier=host_tier_for(config, policy, trace, recorder), compiled=compiled)
    if policy.uses_history and not wl.online:
        policy.fit(trace.select_requests(split.history))
    if not wl.online:
        policy.prepare(trace, list(split.measure))
    makespan_s = engine.run()
    cfg = config.to_dict()
    cfg.update(
        engine="sim",
        engine_path=engine.path,
        trace_hash=trace.content_hash(),
        geometry=trace.geometry.to_dict(),
        split=split.to_dict(),
        policy_info=policy.describe(),
        memory_plan=plan.to_dict(),
        expert_load_s=costs.expert_load_s,
        finemoe_version=__version__,
    )
    if costs.cpu is not None:
        cfg["cpu"] = costs.cpu.to_dict()
    if engine.host_tier is not None:
        cfg["storage"] = (config.storage or _default_storage()).to_dict()
        cfg["host_expert_slots"] = engine.host_tier.slots
    cfg["start_residents"] = len(engine.start_residents)
    result = recorder.to_result(cfg, wall_s=time.perf_counter() - wall0, makespan_s=makespan_s)
    if bounds and not policy.executes_on_cpu and not policy.lossy:
        # The bounds are of lossless copy-on-miss (sim/bounds.py): computing a miss on the CPU, or
        # copying it at a lower precision, can beat them.
        result.summary.update(bounds_for(trace, config, engine.start_residents))
    return result
