"""`finemoe demo`: the whole pipeline out of the box, on the embedded model and real prompts.

collect (embedded MoE over ShareGPT prompts) -> simulate (policies x expert-cache sizes, and a
prefetch-distance sweep) -> replay one configuration on this machine's CPU -> figures -> report.
Everything lands in one folder; rerunning replaces the demo's own files there.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from finemoe.cli.options import at_least, output_option, quiet_option
from finemoe.errors import ConfigError
from finemoe.files import atomic_write_json, atomic_write_text, ensure_dir

MARKER = ".finemoe-demo"
OWN_ENTRIES = ("trace.parquet", "results", "figures", "report.html", "demo.json", "replay", "plan")
HARDWARE = "rtx3090"  # the paper's testbed: PCIe 4.0 at 32 GB/s


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; `--quick` shrinks every axis (tests run it in seconds)."""

    prompts: int
    max_new_tokens: int
    cache_fractions: tuple[float, ...]  # expert cache sizes as shares of all experts
    policies: tuple[str, ...]
    distances: tuple[int, ...]  # FineMoE prefetch distances, swept at the middle cache size
    batch_size: int = 8  # prompts per generate() call: batching doubles collection speed on a CPU
    max_prompt_tokens: int = 256  # bytes of prompt kept (the demo model's tokens are bytes)
    replay_policy: str = "finemoe"
    replay_requests: int = 4
    seed: int = 0
    hardware: str = HARDWARE
    plan_strategies: tuple[str, ...] | None = None  # `finemoe plan`'s strategies (None: every one)
    extra: dict = field(default_factory=dict)


FULL = DemoPlan(
    prompts=32,
    max_new_tokens=48,
    cache_fractions=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875),
    policies=("lru", "lfu", "layerwise", "mixtral-offloading", "moe-infinity", "promoe", "finemoe", "oracle"),
    distances=(1, 2, 3, 4),
)
QUICK = DemoPlan(
    prompts=6,
    max_new_tokens=8,
    cache_fractions=(0.25, 0.5, 0.75),
    policies=("lru", "finemoe", "oracle"),
    distances=(1, 2),
    replay_requests=2,
    plan_strategies=("lru", "static first", "fiddler", "cache-cpu-miss", "stream first"),
)


def cache_slots(total_experts: int, top_k: int, fractions) -> list[int]:
    """Distinct slot counts for the given shares of all experts, never below one layer's top-k."""
    slots = sorted({max(top_k, min(total_experts, round(f * total_experts))) for f in fractions})
    return [s for s in slots if s < total_experts] or [max(top_k, total_experts - 1)]


def prepare_out_dir(out: Path) -> None:
    """Use `out` for the demo: new, empty, or a previous demo's folder (its own files are replaced)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{out} is not empty and was not written by finemoe demo; choose another -o folder")
    ensure_dir(out)
    atomic_write_text(out / MARKER, "written by finemoe demo; rerunning the demo replaces its files here\n")
    for name in OWN_ENTRIES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(out: Path, plan: DemoPlan, *, jobs: int, replay: bool, echo=click.echo, progress: bool = True) -> dict:
    """Run every stage into `out`; returns what was made (paths and timings per stage)."""
    prepare_out_dir(out)
    timings: dict[str, float] = {}
    stages = 6 if replay else 5
    made: dict = {"plan": asdict(plan), "timings_s": timings}

    def stage(i: int, text: str) -> float:
        echo(click.style(f"[{i}/{stages}] {text}", bold=True))
        return time.perf_counter()

    t = stage(1, f"collect: the embedded MoE over {plan.prompts} ShareGPT prompts, {plan.max_new_tokens} new tokens each")
    trace_path = _collect(out / "trace.parquet", plan, progress)
    timings["collect"] = time.perf_counter() - t
    made["trace"] = str(trace_path)

    from finemoe.traces.io import read_metadata

    geometry = read_metadata(trace_path)["geometry"]
    total = geometry.num_layers * geometry.num_experts
    slots = cache_slots(total, geometry.top_k, plan.cache_fractions)
    echo(f"      {geometry.model_name}: {geometry.num_layers} MoE layers x {geometry.num_experts} experts, "
         f"top-{geometry.top_k}: {total} experts in all")

    t = stage(2, f"simulate: {len(plan.policies)} policies x expert caches of {','.join(map(str, slots))} of "
                 f"{total} experts, plus no-offload and FineMoE at d={','.join(map(str, plan.distances))} "
                 f"({plan.hardware} link)")
    sim_paths = _simulate(trace_path, out / "results", plan, slots, total, geometry.num_layers, jobs, progress)
    timings["simulate"] = time.perf_counter() - t
    made["results"] = [str(p) for p in sim_paths]

    i = 3
    if replay:
        middle = slots[len(slots) // 2]
        t = stage(i, f"replay: {plan.replay_policy} with {middle} expert slots on this machine's CPU, "
                     "against the simulator on a calibrated profile")
        made["replay"] = _replay(trace_path, out / "results", plan, middle, progress)
        timings["replay"] = time.perf_counter() - t
        i += 1

    middle = slots[len(slots) // 2]
    t = stage(i, f"plan: what to run on {plan.hardware} with GPU memory for {middle} of the {total} experts")
    plan_made = _plan(trace_path, out / "plan", plan, middle, progress)
    for line in plan_made["lines"]:
        echo(f"      {line}")
    timings["plan"] = time.perf_counter() - t
    made["plan_json"] = plan_made["path"]
    i += 1

    from finemoe.plan.io import read_plan
    from finemoe.plots.render import render_all
    from finemoe.plots.report import write_report

    t = stage(i, "plot: figures from the result files")
    outcome = render_all([out / "results"], out / "figures", trace=trace_path)
    for fig in outcome.rendered:
        echo(f"      {fig.png}")
    for name, why in outcome.skipped:
        echo(f"      skipped {name}: {why}")
    timings["plot"] = time.perf_counter() - t
    t = stage(i + 1, "report")
    report, _ = write_report([out / "results"], out / "report.html", trace=trace_path,
                             title=f"finemoe demo: {geometry.model_name} on ShareGPT prompts",
                             plan=read_plan(plan_made["path"]))
    timings["report"] = time.perf_counter() - t
    made.update(figures=[str(f.png) for f in outcome.rendered], skipped=outcome.skipped, report=str(report))
    _write_json(out / "demo.json", made)
    return made


def _collect(path: Path, plan: DemoPlan, progress: bool = True) -> Path:
    from finemoe.traces.collect import CollectConfig, collect
    from finemoe.traces.collect.loader import load_model
    from finemoe.traces.prompts import load_prompts

    prompts = load_prompts("sharegpt", limit=plan.prompts)
    model, tokenizer, name = load_model(None)
    config = CollectConfig(max_new_tokens=plan.max_new_tokens, batch_size=plan.batch_size, seed=plan.seed,
                           greedy=True, max_prompt_tokens=plan.max_prompt_tokens)
    settings = {"model": name, "prompts": "sharegpt", "limit": plan.prompts, "by": "finemoe demo"}
    result = collect(model, tokenizer, prompts, path, config, model_name=name, metadata=settings, progress=progress)
    if result is None:
        raise ConfigError("collection finished no request; nothing to simulate")
    return Path(result)


def _simulate(trace_path: Path, out: Path, plan: DemoPlan, slots: list[int], total: int, num_layers: int,
              jobs: int, progress: bool = True) -> list[Path]:
    from finemoe.policies.registry import policy_names
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.sweep import SweepSpec, expand_sweep, run_sweep

    known = policy_names()
    policies = [p for p in plan.policies if p in known]
    hardware = [load_hardware(plan.hardware)]
    common = dict(trace_path=str(trace_path), hardware=hardware, seeds=(plan.seed,))
    configs = expand_sweep(SweepSpec(policies=policies, expert_cache_slots=slots, **common))
    configs += expand_sweep(SweepSpec(policies=["no-offload"], expert_cache_slots=[total], **common))
    distances = [d for d in plan.distances if d < num_layers]
    if "finemoe" in policies and len(distances) > 1:
        middle = slots[len(slots) // 2]
        configs += expand_sweep(SweepSpec(policies=["finemoe"], expert_cache_slots=[middle],
                                          policy_params={"finemoe": {"distance": distances}}, **common))
    seen, unique = set(), []
    for c in configs:  # the sweep at the middle size repeats FineMoE's default distance
        if c.key() not in seen:
            seen.add(c.key())
            unique.append(c)
    outcome = run_sweep(unique, out, jobs=jobs, resume=False, progress=progress)
    if outcome.failures:
        lines = [f.line() for f in outcome.failures]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise ConfigError(f"{len(lines)} simulations failed: " + "; ".join(lines[:3]) + more)
    return outcome.paths


def _plan(trace_path: Path, out: Path, demo: DemoPlan, slots: int, progress: bool = True) -> dict:
    """`finemoe plan` at the budget that holds `slots` experts beside the dense part (no reserve:
    the embedded model is tiny), over the curve from one layer's experts to all of them."""
    from dataclasses import replace

    from finemoe.cli.plan import run_plan
    from finemoe.plan.text import plan_text
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import load_hardware
    from finemoe.sim.memory import plan_for_config
    from finemoe.traces.io import read_trace

    trace = read_trace(trace_path)
    probe = plan_for_config(trace.geometry, trace.requests, SimConfig(
        str(trace_path), "lru", load_hardware(demo.hardware), memory=replace(MemoryConfig(), gpu_mem_bytes=2**62,
                                                                            reserve_bytes=0),
        workload=WorkloadConfig(), seed=demo.seed))
    budget = probe.dense_bytes + probe.kv_bytes + slots * probe.bytes_per_expert
    result = run_plan(trace_path, hardware=demo.hardware, gpu_mem=budget, reserve="0", seed=demo.seed,
                      strategies=",".join(demo.plan_strategies) if demo.plan_strategies else None, jobs=1,
                      out_dir=out, progress=progress, say=lambda _m: None)
    text = plan_text(result).splitlines()
    start = next(n for n, line in enumerate(text) if line.startswith("At "))
    return {"path": str(out / "plan.json"), "lines": text[start:start + 4]}


def _replay(trace_path: Path, out: Path, plan: DemoPlan, slots: int, progress: bool = True) -> list[str]:
    """`finemoe replay --compare` on this CPU with the embedded model's real expert weights."""
    from finemoe.cli.replay import replay_command

    before = set(out.glob("*.parquet"))
    args = [str(trace_path), "--policy", plan.replay_policy, "--expert-cache", str(slots), "--device", "cpu",
            "--compare", "--max-requests", str(plan.replay_requests), "--seed", str(plan.seed), "-o", str(out)]
    if not progress:
        args.append("--quiet")
    weights = _demo_weights()
    if weights is not None:
        args += ["--weights", str(weights)]
    replay_command.main(args, prog_name="finemoe replay", standalone_mode=False)
    return sorted(str(p) for p in set(out.glob("*.parquet")) - before)


def _demo_weights() -> Path | None:
    try:
        from finemoe.demo_model.model import demo_model_dir
    except ImportError:
        return None
    path = Path(demo_model_dir())
    return path if path.is_dir() and any(path.iterdir()) else None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


@click.command("demo", epilog="""
\b
Examples:
  finemoe demo                    # everything, into demo-out/ (a few minutes on 2 cores)
  finemoe demo --quick -o /tmp/d  # a reduced run in well under a minute
  open demo-out/report.html
""")
@output_option("out_dir", kind="dir", default="demo-out",
               help="Folder for the trace, result files, figures and report.html.")
@click.option("--quick", is_flag=True, help="6 prompts, 8 tokens, three cache sizes, three policies: under a minute.")
@click.option("--prompts", type=int, default=None, help="ShareGPT prompts to collect (default 32; --quick 6).")
@click.option("--max-new-tokens", type=int, default=None, help="Decode steps per prompt (default 48; --quick 8).")
@click.option("-j", "--jobs", type=int, default=None, help="Simulation worker processes [default: up to 2; 1 with --quick].")
@click.option("--replay/--no-replay", default=True, show_default=True,
              help="Replay one configuration for real on this machine's CPU and compare with the simulator.")
@quiet_option("No progress bars (the stage lines still show; progress is on stderr otherwise).")
def demo_command(out_dir, quick, prompts, max_new_tokens, jobs, replay, quiet) -> None:
    """Run the whole pipeline on the embedded MoE and real ShareGPT prompts, then open report.html.

    Records the embedded model's routing (`finemoe collect`), simulates every policy over a range
    of expert-cache sizes on the paper's RTX 3090 / PCIe 4.0 testbed (`finemoe simulate`), replays
    one configuration with real copies and compute on this CPU (`finemoe replay --compare`), draws
    the figures (`finemoe plot`) and writes a self-contained HTML report (`finemoe report`).
    """
    from dataclasses import replace

    plan = QUICK if quick else FULL
    if prompts is not None:
        if prompts < 2:
            raise ConfigError("--prompts must be at least 2 (history and measured requests)")
        plan = replace(plan, prompts=prompts)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be positive")
        plan = replace(plan, max_new_tokens=max_new_tokens)
    at_least(jobs, 1, "--jobs")
    if jobs is None:  # a quick sweep is over before a process pool has started
        jobs = 1 if quick else max(1, min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    made = run_demo(Path(out_dir), plan, jobs=jobs, replay=replay, progress=not quiet)
    click.echo(click.style(f"done in {time.perf_counter() - t0:.0f} s: ", bold=True)
               + f"{len(made['results']) + len(made.get('replay', []))} result files, {len(made['figures'])} figures")
    click.echo(f"  open {made['report']}")


COMMANDS = [demo_command]
