"""`finemoe replay`: run one configuration for real (copies and compute) and check the simulator."""

from __future__ import annotations

from pathlib import Path

import click

from finemoe.cli.options import output_option, quiet_option, seed_option
from finemoe.cli.partial import layers_as_consecutive_option
from finemoe.cli.policy_file import policy_file_option


@click.command("replay", context_settings={"max_content_width": 100})
@click.argument("trace", type=click.Path())
@click.option("--policy", required=True, help="The policy to replay (one; see `finemoe simulate --help`).")
@policy_file_option
@click.option("--policy-param", "policy_params", multiple=True, metavar="POLICY.NAME=VALUE",
              help="A policy parameter, e.g. finemoe.distance=3. Repeatable.")
@click.option("--gpu-mem", default=None, metavar="SIZE",
              help="Device memory budget, e.g. 24G; expert slots are what is left after dense weights, KV and --reserve.")
@click.option("--expert-cache", type=int, default=None, metavar="SLOTS", help="Expert slots instead of a budget.")
@click.option("--reserve", default=None, metavar="SIZE", help="Memory kept for activations [default: 512M].")
@click.option("--kv-tokens", type=int, default=None, help="Size the KV cache for this many tokens.")
@click.option("--device", default="cpu", show_default=True,
              help="cuda: pinned host experts, copy streams. cpu: device memory is another host buffer, "
                   "copies run on copy threads.")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: cores - 1 on cpu].")
@click.option("--hardware", default=None, metavar="PROFILE",
              help="Profile .json from `finemoe calibrate` (or a preset) for the memory plan, the policies' "
                   "load-time estimate and --compare [default: calibrate now, with this trace's expert shape].")
@click.option("--model-profile", default=None, metavar="NAME", help="Project the trace onto another model's geometry.")
@layers_as_consecutive_option
@click.option("--expert-scale", type=float, default=1.0, show_default=True,
              help="Scale hidden and intermediate sizes by this factor so the experts fit this machine's RAM "
                   "(recorded; --compare simulates the same scaled geometry).")
@click.option("--dtype", default=None, help="Weights dtype: bfloat16, float16 or float32 [default: the trace's].")
@click.option("--weights", type=click.Path(exists=True), default=None,
              help="Checkpoint the trace was collected from (real expert weights); default: random weights.")
@click.option("--arrival", type=click.Choice(["all", "poisson", "file"]), default="all", show_default=True)
@click.option("--rate", type=float, default=None, help="Requests per second for --arrival poisson.")
@click.option("--timestamps", default=None, type=click.Path(dir_okay=False), help="Arrival times for --arrival file.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Sequences decoded together.")
@click.option("--history-fraction", type=float, default=0.7, show_default=True)
@click.option("--online", is_flag=True, help="Start with no history; policies learn as requests finish.")
@click.option("--max-requests", type=int, default=None, help="Measure at most this many requests.")
@seed_option("Seed of the history/measure split and the random weights.")
@click.option("--compare", is_flag=True,
              help="Also simulate the same configuration with the same profile and print replay vs simulation.")
@output_option("out_dir", kind="dir", default="replays",
               help="Folder for replay-<key>.parquet (and sim-<key>.parquet with --compare).")
@click.option("--save-profile", default=None, type=click.Path(dir_okay=False),
              help="Also write the on-the-fly calibration here (when --hardware is not given).")
@quiet_option()
def replay_command(trace, policy, policy_params, gpu_mem, expert_cache, reserve, kv_tokens, device, threads, hardware,
                   model_profile, layers_as_consecutive, expert_scale, dtype, weights, arrival, rate, timestamps,
                   batch_size, history_fraction, online, max_requests, seed, compare, out_dir, save_profile, quiet) -> None:
    """Execute a configuration with real expert copies and compute, timed by the clock.

    \b
    The workload, batching, cache and policy objects are the simulator's; only time is measured
    instead of modelled. The result file has the simulator's schema (engine "replay").
      finemoe replay trace.parquet --policy lru --gpu-mem 2G --device cpu --compare
      finemoe replay gsm8k.parquet --policy lru --expert-cache 96 --expert-scale 0.05 --compare
    --gpu-mem is checked against the memory of --hardware (or of --device when calibrating now).
  Policies that compute experts on the CPU (static, cpu-all, fiddler, cache-cpu-miss) run them on
  a host thread, timed against this machine's CPU as calibrated through that thread:
    finemoe replay trace.parquet --policy static --expert-cache 20 --compare
    """
    from tqdm import tqdm

    from finemoe.errors import ConfigError
    from finemoe.policies.registry import make_policy
    from finemoe.replay.calibrate import write_profile
    from finemoe.replay.compare import format_comparison
    from finemoe.replay.executor import ReplayOptions
    from finemoe.replay.run import prepare_trace, run_replay
    from finemoe.sim.config import SimConfig, WorkloadConfig
    from finemoe.sim.sweep import parse_policy_params
    from finemoe.traces.io import read_trace

    params = {}
    for name, values in parse_policy_params(policy_params).items():
        if name != policy:
            raise ConfigError(f"--policy-param {name}.*: the replayed policy is {policy}")
        for k, v in values.items():
            if len(v) != 1:
                raise ConfigError(f"--policy-param {name}.{k}: replay takes one value, not a list")
            params[k] = v[0]
    # an unknown policy or parameter fails here, not after calibrating
    make_policy(policy, **params)
    memory, spec = replay_memory(gpu_mem, expert_cache, reserve, kv_tokens, hardware, device)
    check_replay_numbers(threads=threads, expert_scale=expert_scale, rate=rate, batch_size=batch_size,
                         max_requests=max_requests)
    workload = WorkloadConfig(arrival=arrival, rate_rps=rate, timestamps_path=timestamps, max_batch=batch_size,
                              history_fraction=history_fraction, online=online, max_requests=max_requests)
    recorded = read_trace(trace)
    if layers_as_consecutive:
        recorded = recorded.logged_layers_only()
    loaded = prepare_trace(recorded, model_profile=model_profile, expert_scale=expert_scale, dtype=dtype)
    # The absolute path: `finemoe plot` finds the trace from wherever it runs, as for simulate's results.
    config = SimConfig(trace_path=str(Path(trace).expanduser().resolve()), policy=policy, hardware=spec,
                       policy_params=params, memory=memory, workload=workload, model_profile=model_profile, seed=seed,
                       layers_as_consecutive=layers_as_consecutive)
    options = ReplayOptions(device=device, threads=threads, weights_path=weights, expert_scale=expert_scale)
    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = tqdm(total=total, unit="step", desc=f"replay {policy}", leave=False)
        bar.update(done - bar.n)

    try:
        outcome = run_replay(loaded, config, options, hardware=hardware, compare=compare, out_dir=out_dir,
                             progress=on_step, say=lambda m: click.echo(m, err=True))
    finally:
        if bar is not None:
            bar.close()
    if save_profile and outcome.profile is not None:
        write_profile(outcome.profile, save_profile)
    s, c = outcome.result.summary, outcome.result.config
    g = loaded.geometry
    click.echo(f"replayed {policy} on {c['replay']['device']}: {g.model_name}, {g.num_layers} layers x "
               f"{g.num_experts} experts of {g.bytes_per_expert / 1e6:.2f} MB, "
               f"{c['memory_plan']['expert_cache_slots']} slots, {s['requests']} requests, {s['steps']} steps, "
               f"{s['wall_s']:.1f} s")
    if outcome.rows:
        click.echo(format_comparison(outcome.rows))
    else:
        click.echo(f"hit rate {s['hit_rate']:.1%}, time per output token p50 {s['tpot_p50_s'] * 1e3:.2f} ms, "
                   f"time to first token p50 {s['ttft_p50_s'] * 1e3:.2f} ms")
    if s.get("ran_cpu"):
        click.echo(f"where experts ran: {s['ran_gpu_resident']} resident on the device, {s['ran_gpu_copied']} after a "
                   f"copy, {s['ran_cpu']} on the CPU (busy {s['cpu_busy_s'] * 1e3:.1f} ms; the device waited "
                   f"{s['cpu_wait_s'] * 1e3:.1f} ms for it)")
    key = outcome.result.config["replay_key"]
    folder = Path(out_dir)  # (as Path, `-o dir/` prints no double slash)
    click.echo(f"wrote {folder / f'replay-{key}.parquet'}" + (f" and {folder / f'sim-{key}.parquet'}" if compare else ""))


def replay_memory(gpu_mem: str | None, expert_cache: int | None, reserve: str | None, kv_tokens: int | None,
                  hardware: str | None, device: str):
    """The MemoryConfig of the options, and the hardware the budget is checked against: the
    --hardware profile, or (calibrating now) a stand-in with this device's memory. ConfigError for
    a missing, doubled, malformed or impossible budget, before any work starts."""
    from dataclasses import replace

    from finemoe.cli.options import at_least, size_option_value
    from finemoe.errors import ConfigError
    from finemoe.replay.device import check_device, device_memory_bytes
    from finemoe.sim.config import MemoryConfig
    from finemoe.sim.hardware import PRESETS, load_hardware
    from finemoe.sim.memory import budget_above_card

    if gpu_mem is None and expert_cache is None:
        raise ConfigError("give the device memory budget (--gpu-mem SIZE) or the cache size (--expert-cache SLOTS)")
    if gpu_mem is not None and expert_cache is not None:
        raise ConfigError("give --gpu-mem or --expert-cache, not both (a slot count overrides the budget)")
    at_least(expert_cache, 1, "--expert-cache")
    at_least(kv_tokens, 0, "--kv-tokens")
    budget = size_option_value(gpu_mem, "--gpu-mem")
    reserve_bytes = size_option_value(reserve, "--reserve", positive=False)
    if hardware is not None:
        spec = load_hardware(hardware)
    else:  # calibrated later; until then only the device's memory matters (the memory plan)
        d = check_device(device)
        spec = replace(PRESETS["rtx3090"], name=d, gpu_mem_bytes=device_memory_bytes(d),
                       source="stand-in until calibration")
    above = budget_above_card(budget, spec)
    if above:
        raise ConfigError(f"{above}; a replay cannot use more memory than its device has")
    memory = MemoryConfig(gpu_mem_bytes=budget, expert_cache_slots=expert_cache,
                          reserve_bytes=MemoryConfig().reserve_bytes if reserve_bytes is None else reserve_bytes,
                          kv_tokens=kv_tokens)
    return memory, spec


def check_replay_numbers(*, threads: int | None, expert_scale: float, rate: float | None, batch_size: int,
                         max_requests: int | None) -> None:
    """ConfigError for a numeric option no replay can run with."""
    from finemoe.cli.options import at_least, positive_number

    at_least(threads, 1, "--threads")
    at_least(batch_size, 1, "--batch-size")
    at_least(max_requests, 1, "--max-requests")
    positive_number(expert_scale, "--expert-scale")
    positive_number(rate, "--rate")


COMMANDS = [replay_command]
