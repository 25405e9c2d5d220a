"""`finemoe validate`: replay a few configurations on this machine, round after round, and report
how far the simulator's figures are from what the replays measured (a measurement, never a failure)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from finemoe.cli.options import json_option, output_option, quiet_option


@click.command("validate", context_settings={"max_content_width": 100})
@click.argument("trace", type=click.Path(), required=False)
@click.option("--policy", "policies", default="lru,finemoe", show_default=True, metavar="LIST",
              help="Policies to replay, comma-separated (one configuration each).")
@click.option("--rounds", type=int, default=None,
              help="Replays of each configuration, interleaved round by round [default: 5; --quick 2].")
@click.option("--quick", is_flag=True,
              help="A short run: a smaller demo trace (3 prompts x 24 tokens) and 2 rounds.")
@click.option("--expert-cache", type=int, default=None, metavar="SLOTS",
              help="Expert slots [default: 20 for the demo trace, 40% of the experts of TRACE].")
@click.option("--hardware", default=None, metavar="PROFILE",
              help="Profile .json from `finemoe calibrate` [default: calibrate before and after each replay].")
@click.option("--device", default="cpu", show_default=True, help="Where to replay: cpu or cuda.")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: cores - 1 on cpu].")
@click.option("--model-profile", default=None, metavar="NAME", help="Project TRACE onto another model's geometry.")
@click.option("--expert-scale", type=float, default=1.0, show_default=True,
              help="Scale TRACE's expert sizes so they fit this machine (the demo trace always uses x4).")
@click.option("--dtype", default=None, help="TRACE's weights dtype for the replay [default: the trace's].")
@click.option("--history-fraction", type=float, default=None, help="Share of TRACE's requests used as history [0.7].")
@click.option("--tolerance", type=float, default=0.15, show_default=True,
              help="The verdict line's bound on the median TPOT p50 error (a fraction).")
@output_option("out_path", default="validate.json",
               help="The JSON report (written atomically; the full configuration recorded).")
@json_option("Print the JSON report on stdout instead of the table.")
@quiet_option("No progress lines (one per replay on stderr otherwise).")
def validate_command(trace, policies, rounds, quick, expert_cache, hardware, device, threads, model_profile,
                     expert_scale, dtype, history_fraction, tolerance, out_path, as_json, quiet) -> None:
    """Do the simulator's numbers hold on this machine? Replay, simulate, compare, N times.

    \b
    Calibrates this machine (or takes --hardware), replays each configuration for real, simulates
    it with the calibrated profile, and prints per metric the median of the simulation's error over
    the rounds with its range, and the load average at the start and the end. Without TRACE the
    configurations are the embedded demo model's routing (collected now) with experts scaled x4.
    It exits 0 whatever the error; the last line is a verdict on TPOT p50.
      finemoe validate --quick
      finemoe validate --rounds 5 -o validate.json
      finemoe validate gsm8k.parquet --policy lru --expert-cache 96 --expert-scale 0.05 \\
          --history-fraction 0.5
    """
    from finemoe.errors import ConfigError
    from finemoe.replay import validate as v
    from finemoe.replay.executor import ReplayOptions
    from finemoe.traces.io import read_trace

    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise ConfigError("--policy: give at least one policy")
    if expert_scale <= 0:
        raise ConfigError(f"--expert-scale must be positive, got {expert_scale}")
    rounds = rounds if rounds is not None else (2 if quick else 5)
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be positive, got {tolerance}")

    from finemoe.files import check_writable

    check_writable(Path(out_path).resolve().parent)  # before minutes of replays, not after them

    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    settings = {"trace": trace, "policies": names, "quick": quick, "expert_cache": expert_cache}
    if trace is None:
        size = v.DEMO_QUICK if quick else v.DEMO_FULL
        say(f"collecting the embedded demo model's routing over {size.prompts} ShareGPT prompts, "
            f"{size.max_new_tokens} new tokens each ...")
        with tempfile.TemporaryDirectory(prefix="finemoe-validate-") as tmp:
            loaded = read_trace(v.collect_demo_trace(Path(tmp) / "demo.parquet", size))
        cases = v.demo_cases(loaded, names, expert_cache)
        settings["demo"] = {"prompts": size.prompts, "max_new_tokens": size.max_new_tokens}
    else:
        cases = v.trace_cases(read_trace(trace), trace, names, expert_cache, model_profile=model_profile,
                              expert_scale=expert_scale, dtype=dtype, history_fraction=history_fraction)
    options = ReplayOptions(device=device, threads=threads,
                            expert_scale=v.DEMO_EXPERT_SCALE if trace is None else expert_scale)
    run = v.validate(cases, rounds=rounds, options=options, hardware=hardware, tolerance=tolerance,
                     settings=settings, say=say)
    v.write_report(run.report, out_path)
    if as_json:
        click.echo(json.dumps(run.report, indent=2, default=str))
    else:
        click.echo(v.format_report(run.report))
    say(f"wrote {out_path}")


COMMANDS = [validate_command]
