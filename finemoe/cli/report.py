"""`finemoe report`: the figures and key tables of a study in one page."""

from __future__ import annotations

import click

from finemoe.cli.options import output_option


@click.command("report", epilog="""
\b
Examples:
  finemoe report runs -o report.html                 # self-contained, open in a browser
  finemoe report runs -o report.md --trace t.parquet # Markdown, figures in report-figures/
  finemoe report plan-out/results --plan plan-out/plan.json  # with the plan's section
""")
@click.argument("results", nargs=-1, type=click.Path(), required=True)
@output_option("out_path", default="report.html",
               help="Report file; .html embeds the figures, .md links them from a folder beside it.")
@click.option("--trace", type=click.Path(), default=None, help="Trace for the routing-entropy figure (default: the one the results name).")
@click.option("--budget", default=None, metavar="SIZE", help="Budget of the per-policy latency bars, e.g. 24G or a slot count.")
@click.option("--title", default="finemoe study", show_default=True, help="Heading of the report.")
@click.option("--plan", "plan_path", type=click.Path(), default=None,
              help="A plan.json from `finemoe plan`: adds a section with its curves, recommendation and settings.")
def report_command(results, out_path, trace, budget, title, plan_path) -> None:
    """Write one page with the figures, a table per policy and budget (hit rate, TTFT and TPOT
    p50/p99, bytes moved) and the configuration and provenance of RESULTS."""
    from finemoe.plan.io import read_plan
    from finemoe.plots.report import write_report

    plan = read_plan(plan_path) if plan_path else None
    path, outcome = write_report(results, out_path, trace=trace, budget=budget, title=title, plan=plan)
    click.echo(f"wrote {path} ({len(outcome.runs)} results, {len(outcome.rendered)} figures"
               + (f", {len(outcome.skipped)} skipped: {', '.join(n for n, _ in outcome.skipped)})" if outcome.skipped else ")"))


COMMANDS = [report_command]
