"""One replay from start to finish, callable from Python: prepare the trace (project, scale), get a
hardware profile (given, or calibrated now on this machine with the replay's own expert shape),
replay, and optionally simulate the very same configuration and attach the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.replay.compare import attach_simulation, comparison_rows, simulate_same
from finemoe.replay.executor import ReplayOptions, replay
from finemoe.replay.weights import expert_shape, scale_geometry
from finemoe.results import RunResult
from finemoe.sim.config import SimConfig
from finemoe.sim.hardware import HardwareSpec, load_hardware
from finemoe.traces.schema import Trace

COPY_POOL_CAP_BYTES = 1024**3  # calibration copies read from at most this much host memory


@dataclass
class ReplayOutcome:
    result: RunResult  # the replay (with sim_* fields when compared)
    simulated: RunResult | None
    rows: list[dict]  # comparison rows (empty without --compare)
    profile: dict | None  # the calibration made for this run, if any
    calibrate_s: float = 0.0


def prepare_trace(trace: Trace, *, model_profile: str | None, expert_scale: float, dtype: str | None) -> Trace:
    """Project onto `model_profile`, then scale hidden/intermediate sizes (and dtype) for the replay."""
    if model_profile:
        from finemoe.traces.profiles import get_profile

        trace = trace.with_geometry(get_profile(model_profile).geometry())
    g = scale_geometry(trace.geometry, expert_scale, dtype)
    if g is not trace.geometry:
        meta = dict(trace.metadata)
        meta["replay_scaled_from"] = trace.geometry.to_dict()
        meta["expert_scale"] = expert_scale
        trace = replace(trace, geometry=g, metadata=meta)  # (not __dict__: it holds caches)
    return trace


def calibrated_hardware(trace: Trace, options: ReplayOptions, thorough: bool = False, slots: int | None = None,
                        progress: Callable[[str], None] | None = None) -> tuple[HardwareSpec, dict]:
    """Calibrate this machine now, measuring the trace's own expert GEMM in its dtype and threads,
    cycling through as many experts as the replay's slot pool holds (its reuse distance)."""
    from finemoe.replay.calibrate import calibrate, profile_hardware

    g = trace.geometry
    working_set = max(2, slots or 0) * g.bytes_per_expert if slots else None
    copy_pool = min(g.total_expert_bytes, COPY_POOL_CAP_BYTES)
    profile = calibrate(options.device, dtype=g.dtype, thorough=thorough, shape=expert_shape(g),
                        threads=options.threads, working_set_bytes=working_set, copy_pool_bytes=copy_pool,
                        progress=progress)
    return profile_hardware(profile), profile


def _slots(trace: Trace, config: SimConfig) -> int:
    """Expert slots the replay will have (the same arithmetic as the simulator's memory plan)."""
    from finemoe.sim.memory import plan_for_config

    return plan_for_config(trace.geometry, trace.requests, config).expert_cache_slots


def replay_cpu(config: SimConfig, profile: dict | None, hardware: str | None):
    """The CPU a replay of a CPU-executing policy runs its host experts on: this machine's, as the
    calibration made now measured it, or as the given profile's "cpu" object holds it (None for a
    policy that copies every miss, or a CPU the configuration names itself)."""
    from finemoe.policies.registry import make_policy
    from finemoe.sim.cpu import cpu_from_profile, load_cpu

    if config.cpu is not None or not make_policy(config.policy, **config.policy_params).executes_on_cpu:
        return config.cpu
    if profile is not None:
        return cpu_from_profile(profile, "calibration")
    if hardware is None or not Path(hardware).is_file():
        raise ConfigError(f"policy {config.policy} computes experts on this machine's CPU, and --hardware {hardware} "
                          "holds no measured CPU (a \"cpu\" object); omit --hardware to calibrate now, or pass a "
                          "profile written by this version of `finemoe calibrate`")
    return load_cpu(hardware)  # the file's "cpu" object, checked field by field


def with_policy_time(config: SimConfig, replayed: RunResult) -> SimConfig:
    """The simulation of a replay on the CPU charges, per layer, the time the replay measured inside
    the policy's calls (the replayer makes them on the compute path; the simulator's policy costs
    nothing): the mean per layer-step, added to `layer_overhead_s`. Likewise per copy the copy
    threads' own work around it (the lock, the cache's and policy's calls that start and land it,
    the slot: `lane_work_s` per copy, added to `transfer_latency_s`), and as `copy_start_delay_s`
    the replay's mean hand-off to a sleeping copy thread. Recorded in the hardware's source.
    With CPU jobs, the CPU's `sync_s` is their measured mean hand-off (`CpuJob.handoff_s`: the
    host thread's wake-up and copies, the compute thread's wake-up after it) less the two activation
    copies the cost model charges apart: a Python thread's wake-up is not what the calibration's
    isolated round trip measures (there the poster blocks at once; in a replay it first runs the
    layer's bookkeeping, and the woken thread waits for the GIL).
    A policy that models its own search time on a thread of its own (FineMoE's `search_charge`) is
    simulated without it, as the replay ran it: on the compute path, already charged."""
    from finemoe.policies.registry import make_policy

    policy_s = float(replayed.config.get("replay", {}).get("policy_s", 0.0))
    layer_steps = int(replayed.summary.get("layer_steps", 0) or 0)
    if policy_s <= 0 or layer_steps <= 0 or not replayed.config["replay"].get("device", "cpu").startswith("cpu"):
        return config
    per_layer = policy_s / layer_steps
    info = replayed.config["replay"]
    copies = int(info.get("lane_copies", 0) or 0)
    per_copy = float(info.get("lane_work_s", 0.0)) / copies if copies else 0.0
    handoff = float(info.get("handoff_mean_s", 0.0)) if int(info.get("handoffs", 0) or 0) else None
    hw = config.hardware
    hw = replace(hw, layer_overhead_s=hw.layer_overhead_s + per_layer,
                 transfer_latency_s=hw.transfer_latency_s + per_copy,
                 copy_start_delay_s=hw.copy_start_delay_s if handoff is None else handoff,
                 source=f"{hw.source}; + {per_layer * 1e6:.1f} us per layer of policy time and {per_copy * 1e6:.1f} us "
                        "per copy of the copy threads' own work, measured in the replay"
                        + ("" if handoff is None else f", hand-offs of {handoff * 1e6:.0f} us as measured there"))
    cpu = config.cpu
    if cpu is not None and int(info.get("cpu_handoffs", 0) or 0):
        from finemoe.sim.costs import CostModel
        from finemoe.traces.geometry import Geometry

        costs = CostModel(hw, Geometry.from_dict(replayed.config["geometry"]), cpu)
        tokens = max(1, round(float(info["cpu_handoff_tokens_mean"])))
        measured = float(info["cpu_handoff_mean_s"])
        cpu = replace(cpu, sync_s=max(0.0, measured - 2 * costs.activation_copy_s(tokens)),
                      source=f"{cpu.source}; hand-offs of {measured * 1e6:.0f} us per layer as measured in the replay")
    params = dict(config.policy_params)
    if "search_charge" in make_policy(config.policy, **params).params:
        params["search_charge"] = "none"
    return replace(config, hardware=hw, cpu=cpu, policy_params=params)


def run_replay(trace: Trace, config: SimConfig, options: ReplayOptions, *, hardware: str | None = None,
               compare: bool = False, out_dir: str | Path | None = None,
               progress: Callable[[int, int], None] | None = None,
               say: Callable[[str], None] | None = None) -> ReplayOutcome:
    """Replay `config` on an already prepared `trace`; `hardware` None means calibrate first.

    With `out_dir`, writes `replay-<key>.parquet` (and `sim-<key>.parquet` when comparing), keyed by
    the configuration as sweeps do.
    """
    from finemoe.replay.weights import check_host_memory

    say = say or (lambda _m: None)
    profile = None
    t0 = time.perf_counter()
    slots = _slots(trace, config)
    # Refuse a geometry that cannot fit before calibrating: calibration cycles through a working
    # set as large as the slot pool, which alone could exhaust host memory.
    check_host_memory(trace.geometry, slots, options.device.startswith("cuda"))
    if hardware is None:
        say(f"calibrating {options.device} for {trace.geometry.model_name} experts ...")
        hw, profile = calibrated_hardware(trace, options, slots=slots)
    else:
        hw = load_hardware(hardware)
    calibrate_s = time.perf_counter() - t0
    if config.policy == "all" or "," in config.policy:
        raise ConfigError("replay runs one policy at a time; pass a single --policy")
    config = replace(config, hardware=hw, cpu=replay_cpu(config, profile, hardware))
    result = replay(trace, config, options, progress=progress)
    result.config["replay"]["hardware_from"] = "calibrated now" if profile else hardware
    simulated, rows = None, []
    key = config.key()
    result.config["replay_key"] = key
    sim_path = None
    after = None
    if compare:
        sim_config = config
        if profile is not None:
            # Calibrate again: the simulation gets the mean of the machine before and after the
            # replay, which halves the drift of a shared machine's speed over the run.
            say(f"calibrating {options.device} again (after the replay) ...")
            from finemoe.replay.calibrate import mean_hardware

            hw_after, after = calibrated_hardware(trace, options, slots=slots)
            sim_config = replace(config, hardware=mean_hardware(hw, hw_after))
            if config.cpu is not None:
                from finemoe.sim.cpu import cpu_from_profile

                sim_config = replace(sim_config, cpu=mean_hardware(config.cpu, cpu_from_profile(after, "calibration")))
        sim_config = with_policy_time(sim_config, result)
        say("simulating the same configuration ...")
        simulated = simulate_same(trace, sim_config)
        simulated.config["compare"] = {"replay_key": key}
        rows = comparison_rows(result, simulated)
        if out_dir is not None:
            sim_path = str(Path(out_dir) / f"sim-{key}.parquet")
            simulated.write(sim_path)
        result = attach_simulation(result, simulated, sim_path)
    if profile is not None:
        result.config["calibration"] = profile["measurements"] | {"duration_s": calibrate_s}
        if after is not None:
            result.config["calibration_after"] = after["measurements"]
    if out_dir is not None:
        result.write(Path(out_dir) / f"replay-{key}.parquet")
    return ReplayOutcome(result, simulated, rows, profile, calibrate_s)
