"""`finemoe plot`: figures from result files (and a trace, for the routing-entropy figure)."""

from __future__ import annotations

import click

from finemoe.cli.options import output_option

_FIGURE_HELP = """
\b
Figures (each skipped with a note when the results cannot support it):
  latency_memory     TPOT and TTFT against GPU memory, one line per policy;
                     no-offload (floor) and oracle (bound) dashed
  hit_rate_memory    expert hit rate against GPU memory, per policy
  prefetch_distance  hit rate and TPOT against prefetch distance d (runs of
                     one policy differing in its d parameter)
  latency_bars       TTFT and TPOT p50/p90/p99 per policy at --budget
  routing_entropy    per-request (coarse) vs per-iteration (fine) routing
                     entropy per layer, from --trace
  sim_vs_replay      simulated vs replayed metrics per configuration
  engine_timeline    a few engine steps: compute and copy engines as lanes

\b
Examples:
  finemoe simulate trace.parquet --gpu-mem 8G:48G:8G --policy lru,finemoe,oracle -o runs
  finemoe plot runs -o figs --trace trace.parquet --budget 24G
  finemoe plot runs/lru-*.parquet -o figs --only latency_memory,hit_rate_memory
"""


@click.command("plot", epilog=_FIGURE_HELP)
@click.argument("results", nargs=-1, type=click.Path(), required=True)
@output_option("out_dir", kind="dir", default="figures", help="Folder for the figures (PNG and SVG of each).")
@click.option("--trace", type=click.Path(), default=None,
              help="Trace for the routing-entropy figure (default: the trace the results were made from, "
                   "if it is still where they say).")
@click.option("--budget", default=None, metavar="SIZE",
              help="Memory budget of the per-policy latency bars, e.g. 24G, or a slot count such as 96 for an "
                   "--expert-cache sweep (default: the budget most policies share).")
@click.option("--only", default=None, metavar="NAMES", help="Comma-separated figure names to draw (default: all).")
def plot_command(results, out_dir, trace, budget, only) -> None:
    """Draw the figures of a study from its RESULTS (result files or folders holding them).

    Figures come from the result files alone: each records its full configuration, so the
    captions name the trace, model profile, hardware and seed without asking you.
    """
    from finemoe.plots.render import render_all

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    outcome = render_all(results, out_dir, trace=trace, budget=budget, only=names)
    click.echo(f"{len(outcome.runs)} result files -> {out_dir}/")
    for fig in outcome.rendered:
        click.echo(f"  wrote   {fig.name:18s} {', '.join(f.name for f in fig.files)}  ({fig.title})")
    for name, why in outcome.skipped:
        click.echo(f"  skipped {name:18s} {why}")


COMMANDS = [plot_command]
