"""`finemoe simulate`: replay traces against policies, memory budgets and hardware, one result file
per configuration, on a local process pool or a Ray cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from finemoe.cli.options import json_option, output_option, quiet_option
from finemoe.cli.partial import layers_as_consecutive_option
from finemoe.cli.policy_file import policy_file_option

EPILOG = """\b
Examples:
  # LRU and FineMoE on the paper's testbed (RTX 3090, PCIe 4.0) at three budgets
  finemoe simulate trace.parquet --policy lru,finemoe --gpu-mem 16G,24G,48G -o results/
\b
  # every policy, expert cache from 16 to 128 slots, 4 worker processes
  finemoe simulate trace.parquet --policy all --expert-cache 16:128:16 --jobs 4 -o results/
\b
  # how much does the link matter? PCIe 8..64 GB/s on an H100, with FineMoE's distance swept
  finemoe simulate trace.parquet --hardware h100 --pcie-gbps 8:64:8 \\
      --policy finemoe --policy-param finemoe.distance=2,3,4 -o results/
\b
  # a Mixtral trace projected onto Qwen's geometry, Poisson arrivals, batches of 4
  finemoe simulate trace.parquet --model-profile qwen1.5-moe-a2.7b --arrival poisson \\
      --rate 2.91 --batch-size 4 -o results/
\b
  # the same sweep on a Ray cluster (started with `ray start --head`); resumes what is done
  finemoe simulate trace.parquet --policy all --gpu-mem 8G:48G:4G \\
      --executor ray --ray-address auto -o results/
\b
Lists are comma-separated (16G,24G); ranges are START:STOP:STEP and include STOP when a step lands
on it (8G:48G:4G is 8G, 12G, ..., 48G). Every list is one axis of the sweep: the configurations are
all their combinations. Sizes: K/M/G/T and KiB/MiB/GiB/TiB are binary (24G is 24 GiB),
KB/MB/GB/TB decimal. Results: one Parquet file per configuration in --output, named
<policy>-<memory>-<hardware>-<key>.parquet, and sweep.json listing every configuration. Rerunning
the same command skips configurations whose file is already there (--no-resume redoes them).
"""

HARDWARE_FIELDS = [
    # option, HardwareSpec field, kind, divisor (typed unit -> field unit), help
    ("--pcie-gbps", "pcie_gbps", "float", 1.0, "host-to-device link bandwidth, GB/s (peak, one direction)"),
    ("--hbm-gbps", "hbm_gbps", "float", 1.0, "GPU memory bandwidth, GB/s (peak)"),
    ("--flops", "flops", "si", 1.0, "peak dense FLOP/s of the GPU, e.g. 71T or 71e12"),
    ("--copy-engines", "copy_engines", "int", 1, "copies on the wire at once (they share the link)"),
    ("--transfer-latency-us", "transfer_latency_s", "float", 1e6, "fixed cost of one host-to-device copy, µs"),
    ("--kernel-launch-us", "kernel_launch_s", "float", 1e6, "fixed cost of one kernel, µs"),
    ("--compute-efficiency", "compute_efficiency", "float", 1.0, "achieved / peak FLOP/s (0-1]"),
    ("--memory-efficiency", "memory_efficiency", "float", 1.0, "achieved / peak HBM bandwidth (0-1]"),
    ("--pcie-efficiency", "pcie_efficiency", "float", 1.0, "achieved / peak link bandwidth (0-1]"),
]


class SimulateCommand(click.Command):
    """Adds the policies and hardware presets to the help, looked up only when help is shown."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        from finemoe.policies.registry import policy_names
        from finemoe.sim.cpu import CPU_PRESETS
        from finemoe.sim.hardware import PRESETS

        formatter.write_paragraph()
        for title, names in (("Policies", policy_names()), ("Hardware presets", list(PRESETS)),
                             ("CPU presets", list(CPU_PRESETS))):
            for line in _wrap_names(f"{title}: ", names, width=(formatter.width or 80) - 4):
                formatter.write(f"  {line}\n")


def _wrap_names(head: str, names: list[str], width: int) -> list[str]:
    """Names joined by commas, wrapped between names only (never inside `finemoe-lru`)."""
    lines, line = [], head
    for i, name in enumerate(names):
        item = name + ("," if i < len(names) - 1 else ".")
        if len(line) + len(item) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = " " * len(head)
        line += item + " "
    lines.append(line.rstrip())
    return lines


def _hardware_options(fn):
    for option, _field, _kind, _scale, text in reversed(HARDWARE_FIELDS):
        fn = click.option(option, metavar="LIST", default=None, help=f"Override: {text}; list or range.")(fn)
    return fn


@click.command("simulate", cls=SimulateCommand, epilog=EPILOG, context_settings={"max_content_width": 100})
@click.argument("traces", nargs=-1, required=True, metavar="TRACE...")
@click.option("--policy", "policies", default="all", show_default=True, metavar="LIST",
              help="Policies to run, comma-separated, or `all` (the list is at the end).")
@policy_file_option
@click.option("--policy-param", "policy_params", multiple=True, metavar="POLICY.NAME=VALUE",
              help="A policy parameter, e.g. finemoe.distance=3; a comma list makes it a sweep axis. Repeatable.")
@click.option("--gpu-mem", metavar="SIZES", default=None,
              help="GPU memory budgets, e.g. 24G, 16G,24G,48G or 8G:48G:4G (default: the hardware's memory). "
                   "Expert slots are what is left after dense weights, KV cache and --reserve.")
@click.option("--expert-cache", metavar="SLOTS", default=None,
              help="Expert cache size in experts instead of a budget, e.g. 64 or 16:128:16.")
@click.option("--reserve", default=None, metavar="SIZE",
              help="GPU memory kept for activations and the CUDA context [default: 512M].")
@click.option("--kv-tokens", type=int, default=None,
              help="Size the KV cache for this many tokens (default: batch size x longest request).")
@click.option("--hardware", "hardware", default="rtx3090", show_default=True, metavar="LIST",
              help="Hardware presets or profile .json files from `finemoe calibrate`, comma-separated.")
@_hardware_options
@click.option("--cpu", "cpu", default="desktop-ddr5", show_default=True, metavar="LIST",
              help="The host CPU for policies that compute experts there (static, cpu-all, fiddler, "
                   "cache-cpu-miss): presets (listed at the end) or profile .json files from `finemoe calibrate "
                   "--device cpu`, comma-separated. Other policies ignore it.")
@click.option("--model-profile", default=None, metavar="NAME",
              help="Project the trace onto another model's geometry (expert size, dense weights, KV).")
@click.option("--expert-dtype", "expert_dtype", default=None, metavar="LIST",
              help="Store the routed experts as bf16, fp16, fp8, int8 (GGUF Q8_0), q6_k, int4 (GGUF Q4_0), "
                   "q4_k or mxfp4, block scales counted; a list is a sweep axis. Below 16 bits it is lossy "
                   "and labelled so [default: the trace's dtype].")
@click.option("--layer-capacity", "layer_capacity", default=None, metavar="LIST",
              help="How the expert slots split between layers: shared (one pool, the default), uniform, "
                   "demand (by each layer's effective number of experts on the history split), dp (the split "
                   "maximising a per-layer LRU's hits on the history split) or a file of one size per layer; "
                   "a list is a sweep axis.")
@click.option("--host-mem", "host_mem", default=None, metavar="SIZES",
              help="Host memory for experts, e.g. 32G; experts beyond it live on --storage and are read into "
                   "host memory (an LRU) before their copy to the GPU; a list is a sweep axis "
                   "[default: every expert in host memory].")
@click.option("--storage", "storage", default=None, metavar="NAME",
              help="The SSD behind --host-mem: pcie4-ssd or pcie5-ssd (sequential-read presets, with sources) "
                   "[default: pcie4-ssd].")
@layers_as_consecutive_option
@click.option("--arrival", type=click.Choice(["all", "poisson", "file"]), default="all", show_default=True,
              help="Request arrivals: all at time 0, Poisson at --rate, or --timestamps.")
@click.option("--rate", default=None, metavar="LIST", help="Requests per second for --arrival poisson; list or range.")
@click.option("--timestamps", default=None, type=click.Path(dir_okay=False),
              help="Arrival times for --arrival file: one time in seconds per line.")
@click.option("--batch-size", default="1", show_default=True, metavar="LIST",
              help="Sequences decoded together (continuous batching); list or range.")
@click.option("--history-fraction", type=float, default=0.7, show_default=True,
              help="Share of requests that build policies' history; the rest are measured.")
@click.option("--online", is_flag=True, help="Start with no history; policies learn as requests finish.")
@click.option("--max-requests", type=int, default=None, help="Measure at most this many requests (quick runs).")
@click.option("--seed", default="0", show_default=True, metavar="LIST", help="Random seeds; a list repeats each run.")
@output_option("out_dir", kind="dir", default="results", help="Folder for the result files and sweep.json.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip configurations whose result file already exists and reads back.")
@click.option("-j", "--jobs", type=int, default=None,
              help="Worker processes (local) or CPUs of a local Ray instance [default: all cores].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where configurations run: a local process pool, or Ray tasks (pip install 'finemoe[ray]').")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to use: `auto` (the cluster on this machine) or ray://HOST:10001; "
                   "without it a local Ray instance is started.")
@click.option("--ray-trace-transport", type=click.Choice(["object-store", "path"]), default="object-store",
              show_default=True,
              help="How Ray workers get the trace: loaded once and shared through Ray's object store, "
                   "or read by each worker from the path (needs a file system all nodes see).")
@click.option("--max-retries", type=int, default=2, show_default=True,
              help="Reruns of a configuration whose worker process died.")
@click.option("--dry-run", is_flag=True, help="List the configurations and exit without running them.")
@quiet_option()
@json_option("Print the summary rows (one per configuration) as a JSON list on stdout instead of the table.")
def simulate_command(traces, policies, policy_params, gpu_mem, expert_cache, reserve, kv_tokens, hardware, cpu,
                     model_profile, expert_dtype, layer_capacity, host_mem, storage, layers_as_consecutive, arrival, rate, timestamps, batch_size, history_fraction, online,
                     max_requests, seed, out_dir, resume, jobs, executor, ray_address, ray_trace_transport,
                     max_retries, dry_run, quiet, as_json, **hardware_overrides) -> None:
    """Simulate MoE expert offloading: which policy, memory budget and hardware give what latency.

    Replays each TRACE (from `finemoe collect` or `finemoe import`) through the discrete-event
    simulator for every combination of the options below and writes one result file per
    configuration. Ends with a table: where the routed experts ran (resident on the GPU, copied to
    it, on the CPU), time to first token, time per output token, bytes moved each way and stall
    time per configuration.
    """
    from finemoe.errors import ConfigError
    from finemoe.sim.sweep import run_sweep, supported_configs

    configs = build_configs(
        traces, policies=policies, policy_params=policy_params, gpu_mem=gpu_mem, expert_cache=expert_cache,
        reserve=reserve, kv_tokens=kv_tokens, hardware=hardware, hardware_overrides=hardware_overrides,
        model_profile=model_profile, arrival=arrival, rate=rate, timestamps=timestamps, batch_size=batch_size,
        history_fraction=history_fraction, online=online, max_requests=max_requests, seed=seed,
        layers_as_consecutive=layers_as_consecutive, cpu=cpu, expert_dtype=expert_dtype,
        layer_capacity=layer_capacity, host_mem=host_mem, storage=storage,
    )
    configs, skipped = supported_configs(configs, explicit={p.strip() for p in policies.split(",")} - {"all"})
    for name, reason in skipped:
        click.echo(f"skipped {name}: it {reason}", err=True)
    if jobs is not None and jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    configs = check_memory_plans(configs, say=lambda line: click.echo(line, err=True))
    if dry_run:
        from finemoe.sim.sweep import result_filename

        for c in configs:
            click.echo(result_filename(c))
        click.echo(f"{len(configs)} configuration(s); nothing run (--dry-run)", err=True)
        return
    if executor == "local":
        from finemoe.sim.executors.local import default_jobs

        jobs = jobs or min(default_jobs(), len(configs))
    outcome = run_sweep(
        configs, out_dir, executor=executor, jobs=jobs, resume=resume, ray_address=ray_address,
        ray_trace_transport=ray_trace_transport, max_retries=max_retries, progress=not quiet,
    )
    if as_json:
        click.echo(json.dumps(summary_rows(outcome.paths), indent=1))
    elif outcome.paths:
        click.echo(results_table(outcome.paths))
    done_before = f", {outcome.skipped} already there" if outcome.skipped else ""
    left_out = f"; {len(skipped)} polic{'y' if len(skipped) == 1 else 'ies'} the trace cannot serve skipped " \
        "(listed above)" if skipped else ""
    click.echo(f"{len(outcome.paths)} result(s) in {out_dir}{done_before}; configurations in "
               f"{Path(out_dir) / 'sweep.json'}{left_out}", err=True)
    if outcome.failures:
        for failure in outcome.failures:
            click.echo(f"failed: {failure.line()}", err=True)
        raise ConfigError(f"{len(outcome.failures)} of {len(configs)} configuration(s) failed (listed above); "
                          "rerun the same command to retry only those")


def build_configs(traces, *, policies, policy_params, gpu_mem, expert_cache, reserve, kv_tokens, hardware,
                  hardware_overrides, model_profile, arrival, rate, timestamps, batch_size, history_fraction,
                  online, max_requests, seed, layers_as_consecutive=False, cpu="desktop-ddr5",
                  expert_dtype: str | None = None, layer_capacity: str | None = None, host_mem: str | None = None,
                  storage: str | None = None) -> list:
    """Options as typed -> SimConfigs, checking everything that can be checked before running."""
    from finemoe.cli.options import size_option_value
    from finemoe.errors import ConfigError
    from finemoe.policies.registry import make_policy, policy_names
    from finemoe.sim.cpu import load_cpu
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.storage import load_storage
    from finemoe.sim.sweep import (
        SweepSpec,
        expand_sweep,
        parse_floats,
        parse_ints,
        parse_policy_params,
        parse_sizes,
        parse_values,
    )
    from finemoe.traces.io import read_trace

    if storage is not None and host_mem is None:
        raise ConfigError("--storage is the tier behind --host-mem; give --host-mem too")
    for trace in traces:
        # Read and validated once here, before any worker starts: a missing, foreign or empty trace,
        # or one with NaN router probabilities, is one sentence, not a failure per configuration.
        read_trace(trace)
    if model_profile is not None:
        from finemoe.traces.profiles import get_profile

        get_profile(model_profile)
    overrides = {}
    for option, field, kind, scale, _text in HARDWARE_FIELDS:
        text = hardware_overrides.get(option.lstrip("-").replace("-", "_"))
        if text is None:
            continue
        if kind == "int":
            values = parse_ints(text, option, minimum=1)
        elif kind == "si":
            values = parse_values(text, _si_number, option)
        else:
            values = parse_floats(text, option)
        if field.endswith("_efficiency") and any(v > 1 for v in values):
            raise ConfigError(f"{option}: an efficiency is a fraction in (0, 1]")
        overrides[field] = [v / scale if scale != 1 else v for v in values]  # 20 / 1e6 is exactly 2e-05
    specs = [load_hardware(h.strip()) for h in hardware.split(",") if h.strip()]
    params = parse_policy_params(policy_params)
    common = dict(
        policies=[p.strip() for p in policies.split(",")],
        hardware=specs,
        gpu_mem_bytes=parse_sizes(gpu_mem, "--gpu-mem") if gpu_mem is not None else (None,),
        expert_cache_slots=(parse_ints(expert_cache, "--expert-cache", minimum=1) if expert_cache is not None
                            else (None,)),
        reserve_bytes=size_option_value(reserve, "--reserve", positive=False),
        kv_tokens=kv_tokens,
        hardware_overrides=overrides,
        policy_params=params,
        arrival=arrival,
        rates_rps=parse_floats(rate, "--rate") if rate is not None else (None,),
        timestamps_path=timestamps,
        max_batch=parse_ints(batch_size, "--batch-size", minimum=1),
        history_fraction=history_fraction,
        online=online,
        max_requests=max_requests,
        model_profile=model_profile,
        seeds=parse_ints(seed, "--seed", minimum=0),
        layers_as_consecutive=layers_as_consecutive,
        cpus=[load_cpu(c.strip()) for c in cpu.split(",") if c.strip()] or [None],
        expert_dtypes=_expert_dtypes(expert_dtype),
        layer_capacities=_layer_capacities(layer_capacity),
        host_mem_bytes=parse_sizes(host_mem, "--host-mem") if host_mem is not None else (None,),
        storage=load_storage(storage or "pcie4-ssd"),
    )
    known = policy_names()
    configs = []
    for trace in traces:
        configs.extend(expand_sweep(SweepSpec(trace_path=trace, **common), known))
    checked = set()
    for c in configs:  # unknown parameter names fail now, not in every worker
        key = (c.policy, tuple(sorted(c.policy_params.items(), key=lambda kv: kv[0])))
        if key not in checked:
            checked.add(key)
            try:
                make_policy(c.policy, **c.policy_params)
            except ConfigError:
                raise
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"policy {c.policy} with {c.policy_params}: {exc}") from None
    return configs


def _expert_dtypes(text: str | None) -> list[str | None]:
    """--expert-dtype as typed -> format names, each checked (one sentence for an unknown one)."""
    if text is None:
        return [None]
    from finemoe.errors import ConfigError
    from finemoe.traces.precision import expert_format

    names = [expert_format(t).name for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("--expert-dtype names no format")
    return list(dict.fromkeys(names))


def _layer_capacities(text: str | None) -> list[str | None]:
    """--layer-capacity as typed -> modes (None for shared) or files, checked now (one sentence)."""
    if text is None:
        return [None]
    from finemoe.errors import ConfigError
    from finemoe.sim.layer_capacity import MODES

    out: list[str | None] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item not in MODES and not Path(item).is_file():
            raise ConfigError(f"--layer-capacity: {item!r} is none of {', '.join(MODES)} and no such file")
        out.append(None if item == "shared" else (item if item in MODES else str(Path(item).resolve())))
    if not out:
        raise ConfigError("--layer-capacity names nothing")
    return list(dict.fromkeys(out))


def check_memory_plans(configs, say) -> list:
    """Plan every configuration's memory from its trace's metadata before anything runs: a budget
    that cannot hold the model is one error now, not a failure per configuration later; a budget
    above the card's own memory is simulated (a hypothetical bigger card) with one warning. A
    per-layer split a budget's slots cannot give every layer is skipped with one line (a sweep of
    budgets and splits keeps the rest), and is the error when nothing else is left. Returns the
    configurations to run."""
    from finemoe.errors import ConfigError
    from finemoe.sim.memory import budget_above_card, plan_for_config
    from finemoe.traces.io import read_metadata, trace_files

    metadata: dict[tuple, tuple] = {}
    warned = set()
    kept, unfit = [], []
    for c in configs:
        key = (c.trace_path, c.model_profile)
        if key not in metadata:
            meta = read_metadata(trace_files(c.trace_path)[0])
            geometry = meta["geometry"]
            if c.layers_as_consecutive:
                from dataclasses import replace

                from finemoe.policies.support import TraceShape

                geometry = replace(geometry, num_layers=TraceShape.of_metadata(meta).consecutive().num_layers)
            if c.model_profile:
                from finemoe.traces.profiles import get_profile

                geometry = get_profile(c.model_profile).geometry()
            requests = [r for f in trace_files(c.trace_path) for r in read_metadata(f)["requests"]]
            metadata[key] = geometry, requests
        geometry, requests = metadata[key]
        g = c.run_geometry(geometry)
        plan = plan_for_config(g, requests, c)
        if c.memory.layer_capacity is not None and not plan.all_resident:
            from finemoe.sim.layer_capacity import check_split_fits

            try:
                check_split_fits(c.memory.layer_capacity, plan.expert_cache_slots, g, c.workload.max_batch)
            except ConfigError as exc:
                unfit.append((c, str(exc)))
                continue
        if c.host_mem_bytes is not None and c.host_mem_bytes < g.bytes_per_expert:
            raise ConfigError(f"--host-mem {c.host_mem_bytes / 2**30:.3g} GiB holds no expert of "
                              f"{g.bytes_per_expert / 2**30:.3g} GiB")
        kept.append(c)
        above = budget_above_card(c.memory.gpu_mem_bytes, c.hardware)
        if above and above not in warned:
            warned.add(above)
            say(f"warning: {above}; simulated as a card with that much memory")
    if unfit and not kept:
        raise ConfigError(unfit[0][1])
    for c, why in unfit:
        from finemoe.sim.sweep import result_filename

        say(f"skipped {result_filename(c)}: {why}")
    return kept


def summary_rows(paths) -> list[dict]:
    """One JSON-ready dict per result file: its summary metrics and flattened configuration (NaN
    and missing values as null), plus the file it came from."""
    from finemoe.results import summary_frame

    if not paths:
        return []
    return [{k: _json_value(v) for k, v in record.items()} for record in summary_frame(paths).to_dict(orient="records")]


def _json_value(v):
    """numpy scalars as Python numbers, NaN as None; anything else as text if JSON cannot hold it."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)


def _expert_label(name) -> str:
    """A result's expert format as the table shows it: `int4 (lossy)`, or `as traced`."""
    if _missing(name):
        return "as traced"
    from finemoe.traces.precision import EXPERT_FORMATS

    fmt = EXPERT_FORMATS.get(str(name))
    return f"{name} (lossy)" if fmt is None or fmt.lossy else str(name)


def _layer_label(mode) -> str:
    """A result's per-layer split as the table shows it: `dp`, a file's name, or `shared`."""
    return "shared" if _missing(mode) else Path(str(mode)).name


def _si_number(text: str) -> float:
    """'71T' -> 71e12, '1.5P' -> 1.5e15, '71e12' -> 71e12 (decimal, as FLOP/s are quoted)."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
    text = text.strip()
    factor = scale.get(text[-1:].lower()) if text else None
    value = float(text[:-1]) * factor if factor else float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


# --- the table at the end -------------------------------------------------------------------------


def results_table(paths) -> str:
    """One line per result: the axes that vary, then where the experts ran (resident, copied, on the
    CPU), latency, bytes moved per direction and stalls."""
    from finemoe.results import summary_frame

    df = summary_frame(paths)
    if df.empty:
        return "(no results)"
    axes = [
        ("trace", "trace_path", lambda v: Path(str(v)).name),
        ("hardware", "hardware.name", str),
        ("pcie GB/s", "hardware.pcie_gbps", _num),
        ("copy eng", "hardware.copy_engines", _num),
        ("cpu", "cpu.name", _text),
        ("batch", "workload.max_batch", _num),
        ("rate/s", "workload.rate_rps", _num),
        ("seed", "seed", _num),
    ]
    axes += [(col.split(".", 1)[1], col, _text) for col in df.columns if col.startswith("policy_params.")]
    lossy = df["policy_info.lossy"] if "policy_info.lossy" in df.columns else [None] * len(df)
    cols: list[tuple[str, list[str]]] = [("policy", [f"{v} (lossy)" if not _missing(x) else str(v)
                                                     for v, x in zip(df["policy"], lossy, strict=True)])]
    if "expert_dtype" in df.columns and df["expert_dtype"].notna().any():  # always shown: lossy is said
        cols.append(("experts", [_expert_label(v) for v in df["expert_dtype"]]))
    if "memory.layer_capacity" in df.columns and df["memory.layer_capacity"].notna().any():
        cols.append(("layers", [_layer_label(v) for v in df["memory.layer_capacity"]]))
    for title, col, fmt in axes:
        if col in df.columns and df[col].astype(str).nunique() > 1:
            cols.append((title, [fmt(v) for v in df[col]]))
    budget = _first(df, ["memory.gpu_mem_bytes"])
    if "memory_plan.source" in df.columns:  # the hardware's memory, when the budget was not given
        derived = df["memory_plan.gpu_mem_bytes"].where(df["memory_plan.source"] == "budget")
        budget = budget.where(budget.notna(), derived)
    cols.append(("gpu mem", [_mem(v) for v in budget]))
    cols.append(("slots", [_num(v) for v in _first(df, ["memory_plan.expert_cache_slots", "expert_cache_slots",
                                                       "memory.expert_cache_slots"])]))
    cols.append(("hit rate", [_pct(v) for v in _first(df, ["hit_rate"])]))  # ran resident on the GPU
    # where the other routed experts ran: on the GPU after a copy, or on the CPU (docs/cpu-execution.md)
    routed = [h + m if not (_missing(h) or _missing(m)) else None
              for h, m in zip(_first(df, ["hits"]), _first(df, ["misses"]), strict=True)]
    for title, name in (("copied", "ran_gpu_copied"), ("on cpu", "ran_cpu")):
        cols.append((title, [_pct(v / n) if n and not _missing(v) else "-"
                             for v, n in zip(_first(df, [name]), routed, strict=True)]))
    cols.append(("TTFT p50 ms", [_ms(v) for v in _first(df, ["ttft_p50_s"])]))
    cols.append(("TPOT p50 ms", [_ms(v) for v in _first(df, ["tpot_p50_s"])]))
    cols.append(("bound TPOT p50", [_ms(v) for v in _first(df, ["bound_tpot_p50_s"])]))  # sim/bounds.py
    cols.append(("TPOT p99 ms", [_ms(v) for v in _first(df, ["tpot_p99_s"])]))
    cols.append(("loads", [_num(a + b) if not (_missing(a) or _missing(b)) else "-"
                           for a, b in zip(_first(df, ["ondemand_loads"]), _first(df, ["prefetch_started"]),
                                           strict=True)]))
    cols.append(("bound loads", [_num(v) for v in _first(df, ["bound_loads"])]))
    cols.append(("H2D GB", [_gb(a + (0 if _missing(b) else b)) if not _missing(a) else "-"
                            for a, b in zip(_first(df, ["bytes_h2d"]), _first(df, ["bytes_h2d_activations"]),
                                            strict=True)]))
    cols.append(("D2H GB", [_gb(v) for v in _first(df, ["bytes_d2h"])]))
    if "host_mem_bytes" in df.columns and df["host_mem_bytes"].notna().any():  # the SSD tier
        cols.append(("host mem", [_mem(v) if not _missing(v) else "all" for v in df["host_mem_bytes"]]))
        cols.append(("SSD GB", [_gb(v) for v in _first(df, ["bytes_ssd"])]))
    cols.append(("stall s", [_fixed(v, 3) for v in _first(df, ["stall_s"])]))
    widths = [max(len(title), *(len(x) for x in values)) for title, values in cols]
    lines = ["  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, ((t, _), w) in enumerate(zip(cols, widths, strict=True)))]
    for r in range(len(df)):
        lines.append("  ".join(v[r].ljust(w) if i == 0 else v[r].rjust(w)
                               for i, ((_, v), w) in enumerate(zip(cols, widths, strict=True))))
    return "\n".join(lines)


def _first(df, names):
    """The first of `names` that the results carry (summaries differ a little between engines)."""
    import pandas as pd

    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for name in names:
        if name in df.columns:
            out = out.where(out.notna(), df[name])
    return out


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v) -> str:
    if _missing(v):
        return "-"
    return f"{int(v)}" if float(v).is_integer() else f"{float(v):g}"


def _text(v) -> str:
    return "-" if _missing(v) else str(v)


def _mem(v) -> str:
    from finemoe.sim.sweep import format_size

    return "-" if _missing(v) else format_size(int(v))


def _pct(v) -> str:
    return "-" if _missing(v) else f"{100 * float(v):.1f}%"


def _ms(v) -> str:
    return "-" if _missing(v) else f"{1e3 * float(v):.2f}"


def _gb(v) -> str:
    return "-" if _missing(v) else f"{float(v) / 1e9:.2f}"


def _fixed(v, digits: int) -> str:
    return "-" if _missing(v) else f"{float(v):.{digits}f}"


COMMANDS = [simulate_command]
