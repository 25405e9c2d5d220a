"""`finemoe plan`: from a trace and a machine to what to run, how fast, and how far from the best."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import click

from finemoe.cli.options import json_option, output_option, quiet_option, seed_option
from finemoe.cli.policy_file import policy_file_option

EPILOG = """\b
Examples:
  # Mixtral-8x7B on an RTX 3090 and a desktop CPU: what to run at 24G, and the curve around it
  finemoe plan mixtral.parquet --model-profile mixtral-8x7b --hardware rtx3090 --gpu-mem 24G
\b
  # a model finemoe has no profile of: its Hugging Face config.json, or a GGUF file's tensor index
  finemoe plan trace.parquet --model-config path/to/config.json --cpu server-8ch-ddr5
  finemoe plan trace.parquet --model-gguf model-Q4_K_M.gguf --gpu-mem 12G
\b
  # also the offline schedule at your budget and the strategies with no closed form (slower), as JSON
  finemoe plan trace.parquet --oracle budget --thorough --json
\b
What it does: one pass over the measured requests gives LRU's, LFU's, per-layer LRU's and Belady
MIN's misses at every cache size (stack distances) and each layer's expert counts, from which every
strategy with a closed form (caches, static placements, Fiddler, CPU-on-miss, CPU-only, vLLM-style
streaming) gets an estimate at every budget of the curve. The simulator then confirms, at your
budget, the strategies within --margin of the best estimate and the runtimes' own defaults
(--confirm-everywhere: at every budget). The lower bound is computed at your budget and four others;
the offline schedule only with --oracle. The recommendation is the simulated strategy with the
lowest time per output token at your budget, with the llama.cpp, vLLM and finemoe settings that
realise it. Writes plan.json, plan.png/.svg, the simulations' results and
(when the model was changed) the projected trace into -o.
"""


@click.command("plan", epilog=EPILOG)
@click.argument("trace_path", metavar="TRACE", type=click.Path())
@click.option("--hardware", default="rtx3090", show_default=True,
              help="GPU and link: a preset or a profile .json from `finemoe calibrate`.")
@click.option("--cpu", default=None, help="The host CPU: a preset or a profile .json [default: desktop-ddr5].")
@click.option("--gpu-mem", default=None, metavar="SIZE", help="Your GPU memory, e.g. 24G [default: the hardware's].")
@click.option("--curve", default=None, metavar="SIZES",
              help="The curve's budgets, e.g. 8G:48G:8G [default: from the smallest that runs to one holding every expert].")
@click.option("--model-profile", default=None, help="Project the trace onto a built-in model profile.")
@click.option("--model-config", type=click.Path(), default=None,
              help="Project the trace onto the model a Hugging Face config.json describes.")
@click.option("--model-gguf", type=click.Path(), default=None,
              help="Project the trace onto a GGUF file's model: exact bytes from its tensor index (weights not read).")
@click.option("--expert-dtype", default=None, help="Store the routed experts as bf16, fp8, int8, int4, ... (lossy below 16 bits).")
@click.option("--strategy", "strategies", default=None, metavar="LIST",
              help="Only these strategies (comma-separated; the list is in --help's epilog of `finemoe plan --list`).")
@click.option("--list", "list_only", is_flag=True, help="List the strategies and exit.")
@policy_file_option
@click.option("--oracle", "oracle_at", type=click.Choice(["none", "budget", "all"]), default="none", show_default=True,
              help="Also run the offline schedule (a full simulation each): nowhere, at your budget, or everywhere.")
@click.option("--thorough", is_flag=True,
              help="Also every other policy of the simulator (cost-aware, FineMoE, ARC, SLRU, ...): a simulation each, slower.")
@click.option("--confirm-everywhere", is_flag=True,
              help="Confirm the front with the simulator at every budget of the curve, not only at yours.")
@click.option("--margin", type=float, default=0.15, show_default=True,
              help="Simulate, at your budget, the estimated strategies within this share of the best estimate.")
@click.option("--reserve", default="512M", show_default=True, help="GPU memory kept for activations and the context.")
@click.option("--history-fraction", type=float, default=0.7, show_default=True,
              help="Share of requests whose routing the strategies learn from; the rest are measured.")
@seed_option("Seed of the history/measure split.")
@click.option("-j", "--jobs", type=int, default=None, help="Simulation worker processes [default: all cores].")
@output_option("out_dir", kind="dir", default="plan-out", help="Folder for plan.json, the figure and the results.")
@json_option("Print the plan as JSON on stdout.")
@quiet_option()
def plan_command(trace_path, hardware, cpu, gpu_mem, curve, model_profile, model_config, model_gguf, expert_dtype,
                 strategies, list_only, oracle_at, thorough, confirm_everywhere, margin, reserve, history_fraction, seed, jobs, out_dir, as_json,
                 quiet) -> None:
    """What to put where for this workload on this machine, how fast it runs, and how far that is from the best.

    Compares every strategy finemoe can express (copy-on-miss caches, static placements, experts on
    the CPU, per-layer capacities, streaming) over a range of GPU memory, recommends one at your
    budget, and writes the runtime settings that realise it.
    """
    from finemoe.errors import ConfigError
    from finemoe.plan.strategies import all_strategies

    if list_only:
        for s in all_strategies():
            how = ("simulated only" if s.place is None else "exact closed form where it copies nothing" if s.exact
                   else "closed form, always simulated" if s.loose else "closed form") + (", --thorough" if s.costly else "")
            click.echo(f"{s.name:18s} {s.what} [{how}]")
        return
    say = (lambda _m: None) if quiet else (lambda m: click.echo(m, err=True))
    if sum(x is not None for x in (model_profile, model_config, model_gguf)) > 1:
        raise ConfigError("give one of --model-profile, --model-config and --model-gguf")
    if not 0 <= margin < 10:
        raise ConfigError(f"--margin must be between 0 and 10, got {margin}")
    plan = run_plan(trace_path, hardware=hardware, cpu=cpu, gpu_mem=gpu_mem, curve=curve, model_profile=model_profile,
                    model_config=model_config, model_gguf=model_gguf, expert_dtype=expert_dtype, strategies=strategies,
                    oracle=oracle_at, thorough=thorough,
                    confirm_everywhere=confirm_everywhere, margin=margin, reserve=reserve,
                    history_fraction=history_fraction, seed=seed, jobs=jobs, out_dir=Path(out_dir),
                    progress=not quiet, say=say)
    if as_json:
        click.echo(json.dumps(plan, indent=2, default=str))
    else:
        from finemoe.plan.text import plan_text

        click.echo(plan_text(plan))
        click.echo(f"\nwrote {Path(out_dir) / 'plan.json'} and {Path(out_dir) / 'plan.png'}")


def run_plan(trace_path, *, hardware="rtx3090", cpu=None, gpu_mem=None, curve=None, model_profile=None,
             model_config=None, model_gguf=None, expert_dtype=None, strategies=None, oracle="none",
             thorough=False, confirm_everywhere=False,
             margin=0.15, reserve="512M", history_fraction=0.7, seed=0, jobs=None, out_dir=Path("plan-out"),
             progress=True, say=print) -> dict:
    """Read, project, plan, write plan.json and the figure; the plan as a dict."""
    from finemoe.cli.options import size_option_value
    from finemoe.files import check_writable, ensure_dir
    from finemoe.plan.io import write_plan
    from finemoe.plan.planner import PlanRequest, make_plan
    from finemoe.plots.plan import plan_figure
    from finemoe.sim.config import MemoryConfig, WorkloadConfig
    from finemoe.sim.cpu import DEFAULT_CPU, load_cpu
    from finemoe.sim.executors.local import default_jobs
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.sweep import check_split, parse_sizes
    from finemoe.traces.io import read_trace, write_trace
    from finemoe.traces.precision import expert_format

    check_split(history_fraction, None)
    hw = load_hardware(hardware)
    cpu_spec = load_cpu(cpu or DEFAULT_CPU)
    if expert_dtype is not None:
        expert_format(expert_dtype)
    memory = MemoryConfig(reserve_bytes=size_option_value(reserve, "--reserve", positive=False))
    budget = size_option_value(gpu_mem, "--gpu-mem") if gpu_mem else hw.gpu_mem_bytes
    curve_sizes = tuple(parse_sizes(curve, "--curve")) if curve else None
    trace = read_trace(trace_path)
    if cpu is None:
        say(f"--cpu not given: planning with the {DEFAULT_CPU} preset (see `finemoe simulate --help` for others)")
    created = not Path(out_dir).exists()
    out_dir = ensure_dir(out_dir)
    try:
        check_writable(out_dir)
        geometry, expert_tensors, moe_blocks = None, None, None
        if model_profile or model_config:
            if model_profile:
                from finemoe.traces.profiles import get_profile

                profile = get_profile(model_profile)
            else:
                from finemoe.traces.model_config import profile_from_config

                profile = profile_from_config(model_config)
            geometry, moe_blocks = profile.geometry(), list(profile.moe_blocks)
        elif model_gguf:
            from finemoe.traces.gguf_index import read_gguf_index

            index = read_gguf_index(model_gguf)
            geometry, expert_tensors, moe_blocks = index.geometry(), index.expert_tensor_regex, list(index.moe_blocks)
        sim_trace_path = str(trace_path)
        if geometry is not None:
            trace = trace.with_geometry(geometry)
            sim_trace_path = str(write_trace(trace, out_dir / "trace.parquet"))
        model = trace.geometry.model_name
        workload = WorkloadConfig(history_fraction=history_fraction)
        budgets = curve_sizes or default_curve(trace, hw, memory, workload, seed, expert_dtype)
        names = tuple(n.strip() for n in strategies.split(",") if n.strip()) if strategies else None
        req = PlanRequest(sim_trace_path, hw, cpu_spec, budget, budgets, memory, workload, seed, expert_dtype, margin,
                          oracle, names, thorough, confirm_everywhere)
        plan = make_plan(trace, req, out_dir, jobs=jobs or default_jobs(), progress=progress, say=say, model=model,
                         settings_context={"trace": sim_trace_path, "hardware": hardware,
                                           "expert_tensors": expert_tensors, "moe_blocks": moe_blocks})
        write_plan(plan, out_dir / "plan.json")
        plan_figure(plan, out_dir)
        return plan
    except BaseException:
        # A plan that failed leaves no folder behind, unless simulations finished in it (a rerun
        # reuses them; a rerun's folder keeps what it had).
        if created and not any((out_dir / "results").glob("*.parquet")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def default_curve(trace, hw, memory, workload, seed, expert_dtype, points: int = 20) -> tuple[int, ...]:
    """Round budgets (whole GiB; MiB for a model under 4 GiB) from the smallest that holds the dense
    part and one layer's experts to the smallest that holds every expert, at least `points` of them where the range allows."""
    from dataclasses import replace

    from finemoe.sim.config import SimConfig
    from finemoe.sim.memory import plan_for_config

    everything = replace(memory, gpu_mem_bytes=2**62)  # a budget holding every expert: the fixed part alone
    config = SimConfig("", "lru", hw, memory=everything, workload=workload, seed=seed, expert_dtype=expert_dtype)
    g = config.run_geometry(trace.geometry) if expert_dtype else trace.geometry
    probe = plan_for_config(g, trace.requests, config)
    fixed = probe.dense_bytes + probe.kv_bytes + probe.reserve_bytes
    full = fixed + g.num_layers * g.num_experts * g.bytes_per_expert
    gib = 2**30 if full >= 4 * 2**30 else 2**20
    low = math.ceil((fixed + g.top_k * g.bytes_per_expert) / gib)
    high = math.ceil(full / gib)
    nice = (1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64, 80, 128, 160, 256, 320, 512)
    step = max([s for s in nice if (high - low) / s >= points - 1] or [1])  # the coarsest giving `points`
    values = [low] + [v for v in range(step * (low // step + 1), high + step, step) if v - low >= step / 2]
    return tuple(gib * v for v in values if v <= high + step - 1)


COMMANDS = [plan_command]
