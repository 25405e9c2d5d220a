"""A study on one page: the figures, the key tables and where every number came from.

HTML reports are self-contained (figures embedded as base64 PNG) so one file can be mailed or
opened anywhere; Markdown reports link their PNGs from a folder next to the file.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from finemoe.files import atomic_write_text, ensure_dir, output_errors
from finemoe.plots.common import time_units
from finemoe.plots.data import (
    PlotError,
    Run,
    budget_column,
    find_key,
    format_budget,
    load_runs,
    memory_kind,
    series_label,
    sim_runs,
    sorted_budgets,
    varying_params,
)
from finemoe.plots.numbers import format_bytes, format_number
from finemoe.plots.render import FIGURES, PlotOutcome, render_all
from finemoe.plots.summary import (
    bracket_sentence,
    budgets_of,
    finding_sentence,
    findings,
    headline,
    odd_results,
    replay_sentences,
    study_cells,
)

_KEYS = ["engine", "policy", "hardware", "budget", "slots"]


def _columns(units: dict[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """Displayed metric columns -> (summary field, scale), each time in its metric's one unit."""
    t, p, s = units["ttft"], units["tpot"], units["stall"]
    return {"hit rate (%)": ("hit_rate", 100.0), f"TTFT p50 ({t[0]})": ("ttft_p50_s", t[1]),
            f"TTFT p99 ({t[0]})": ("ttft_p99_s", t[1]), f"TPOT p50 ({p[0]})": ("tpot_p50_s", p[1]),
            f"TPOT p99 ({p[0]})": ("tpot_p99_s", p[1]), "bytes moved": ("bytes_h2d", 1.0),
            f"stall ({s[0]})": ("stall_s", s[1])}


def run_table(runs: list[Run], units: dict[str, tuple[str, float]] | None = None) -> pd.DataFrame:
    """One row per result file: policy, hardware, budget, hit rate, TTFT/TPOT p50/p99, bytes
    moved, stall time, seed, measured requests and the file; times in `units` (default: the
    units of these runs, time_units)."""
    columns = _columns(units or time_units(runs))
    varying = varying_params(runs)
    rows = []
    for r in runs:
        row = {"engine": r.engine, "policy": series_label(r, varying), "hardware": r.hardware,
               "budget": format_budget(r), "slots": r.cache_slots if r.cache_slots is not None else "",
               "_budget_sort": r.budget_order}
        row.update({col: scale * r.metric(key) for col, (key, scale) in columns.items()})
        row.update(seed=str(r.seed), requests=len(r.result.requests), file=r.path.name)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_sim_first"] = df["engine"] != "sim"
    df = df.sort_values(["_sim_first", "engine", "hardware", "_budget_sort", "policy", "seed"], kind="stable")
    return df.reset_index(drop=True)


def metrics_table(runs: list[Run], units: dict[str, tuple[str, float]] | None = None) -> pd.DataFrame:
    """One row per configuration (runs differing only in seed averaged; `runs` counts them); the
    budget column is headed by what the budget is (budget_column: GPU memory only on GPUs)."""
    columns = list(_columns(units or time_units(runs)))
    df = run_table(runs, units)
    grouped = df.groupby(_KEYS, sort=False, dropna=False)
    out = grouped[columns].mean()
    out.insert(0, "runs", grouped.size())
    out = out.reset_index()
    out["bytes moved"] = out["bytes moved"].map(format_bytes)
    return out.rename(columns={"budget": budget_column(runs)})


def pivot(runs: list[Run], column: str, units: dict[str, tuple[str, float]] | None = None) -> pd.DataFrame:
    """`column` (a metrics_table column) of the study's simulated runs as a policy x budget grid,
    budgets smallest first: the memory figures' lines (summary.study_cells), seeds averaged."""
    key, scale = _columns(units or time_units(runs))[column]
    cells = study_cells(runs)
    budgets = budgets_of(cells)
    rows: dict[str, dict[str, float]] = {}
    for c in cells:
        rows.setdefault(c.label, {})[c.budget] = scale * c.metric(key)
    table = pd.DataFrame([[label] + [values.get(b, math.nan) for b in budgets] for label, values in rows.items()],
                         columns=["policy", *budgets])
    return table


def provenance(runs: list[Run]) -> list[tuple[str, str]]:
    """What a reader needs to rerun the study: traces, hardware, model, workload, seeds, versions."""

    def distinct(values) -> str:
        vals = sorted({str(v) for v in values if v not in (None, "")})
        return ", ".join(vals) if vals else "-"

    def from_config(key):
        return [r.config.get(key) for r in runs]

    hardware = {}
    for r in runs:
        hw = r.config.get("hardware")
        if isinstance(hw, dict):
            memory, link = ("device memory (a CPU profile)", "host-to-device copies") if r.on_cpu else ("GPU memory", "PCIe")
            hardware[hw.get("name", "?")] = (
                f"{hw.get('name')}: {format_bytes(hw.get('gpu_mem_bytes'))} {memory}, "
                f"{link} {format_number(hw.get('pcie_gbps'))} GB/s x {hw.get('copy_engines', '?')} copy engine(s)"
            )
    workloads = {_workload_text(r.config.get("workload")) for r in runs if r.config.get("workload")}
    return [
        ("result files", f"{len(runs)} ({distinct(r.engine for r in runs)})"),
        ("traces", distinct(f"{r.config.get('trace_path')} (hash {r.config.get('trace_hash', '-')})" for r in runs)),
        ("model", distinct(r.model for r in runs)),
        ("hardware", "; ".join(sorted(hardware.values())) or "-"),
        ("policies", distinct(r.policy for r in runs)),
        ("memory budgets", ", ".join(sorted_budgets(runs))),
        ("workload", "; ".join(sorted(workloads)) or "-"),
        ("seeds", distinct(from_config("seed"))),
        ("finemoe version", distinct(find_key(r.config, "finemoe_version") or find_key(r.config, "version") for r in runs)),
        ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _workload_text(workload) -> str:
    if not isinstance(workload, dict):
        return str(workload)
    return ", ".join(f"{k}={format_number(v) if isinstance(v, float) else v}" for k, v in workload.items()
                     if v is not None)


def write_report(
    results: Iterable[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    trace: str | os.PathLike | None = None,
    budget: str | None = None,
    title: str = "finemoe study",
    progress: Callable[[str], None] | None = None,
    plan: dict | None = None,
) -> tuple[Path, PlotOutcome]:
    """Write an .html (self-contained) or .md report of the given results; returns its path.
    `plan`: a `finemoe plan` result (plan.json), shown as its own section with its figure."""
    out_path = Path(out_path)
    fmt = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}.get(out_path.suffix.lower())
    if fmt is None:
        raise PlotError(f"{out_path}: report must end in .html or .md")
    runs = load_runs(results)
    ensure_dir(out_path.parent)
    if fmt == "html":
        with output_errors(out_path):
            scratch = tempfile.TemporaryDirectory(prefix=".figs-", dir=out_path.parent)
        with scratch as tmp:
            outcome = render_all(runs, tmp, trace=trace, budget=budget, progress=progress)
            plan_fig = _plan_figure(plan, Path(tmp))
            text = _html(title, runs, outcome, plan, plan_fig)
    else:
        fig_dir = out_path.with_name(out_path.stem + "-figures")
        outcome = render_all(runs, fig_dir, trace=trace, budget=budget, progress=progress)
        text = _markdown(title, runs, outcome, fig_dir, out_path.parent, plan, _plan_figure(plan, fig_dir))
    _write_atomic(out_path, text)
    return out_path, outcome


def _plan_figure(plan: dict | None, out_dir: Path):
    if plan is None:
        return None
    from finemoe.plots.plan import plan_figure

    return plan_figure(plan, out_dir)


PLAN_INTRO = ("What to run at the budget, from `finemoe plan`: every strategy's time per output token and "
              "to first token over GPU memory (* simulated, the rest closed-form estimates), the lower bound "
              "of copy-on-miss schedules and the offline schedule, the recommendation and the runtime "
              "settings that realise it.")


def _cell_text(value, percent: bool) -> str:
    """A table cell for people: percentages to 0.1, other numbers through format_number."""
    if isinstance(value, np.integer):  # pandas hands back numpy scalars
        value = int(value)
    elif isinstance(value, np.floating):
        value = float(value)
    if percent and isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.1f}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format_number(value)
    return str(value)


@dataclass(frozen=True)
class Section:
    """One table of the report, the sentence that says what it shows, and its best cells."""

    heading: str
    sentence: str
    table: pd.DataFrame
    percent: bool = False  # every numeric cell is a percentage
    best: frozenset = frozenset()  # (row position, column) of the cells to mark

    def rows(self) -> list[list[tuple[str, bool]]]:
        """Cells as (text, is best)."""
        pct = [self.percent or "(%)" in str(c) for c in self.table.columns]
        return [[(_cell_text(v, p), (i, c) in self.best) for v, p, c in zip(row, pct, self.table.columns, strict=True)]
                for i, row in enumerate(self.table.itertuples(index=False))]


def _higher_is_better(column: str) -> bool:
    return str(column).startswith("hit rate")


def best_cells(df: pd.DataFrame, columns, groups=(), higher=_higher_is_better) -> frozenset:
    """(row position, column) of the best contender value per column within each group of rows
    (the oracle bound and the no-offload floor are references, not contenders); a group needs
    two contenders with a value, or there is nothing to win."""
    contender = ~df["policy"].astype(str).str.endswith(("(bound)", "(floor)")).to_numpy()
    keys = [tuple(str(df[g].iloc[i]) for g in groups) for i in range(len(df))]
    out = set()
    for column in columns:
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
        by_group: dict[tuple, list[int]] = {}
        for i in range(len(df)):
            if contender[i] and not math.isnan(values[i]):
                by_group.setdefault(keys[i], []).append(i)
        for members in by_group.values():
            if len(members) < 2:
                continue
            target = (max if higher(column) else min)(values[i] for i in members)
            out |= {(i, column) for i in members if values[i] == target}
    return frozenset(out)


INTRO = ("Latencies are medians (p50) and 99th percentiles over the measured requests; hit rate counts "
         "routed experts resident when their layer needed them. Runs that differ only in seed are averaged "
         "(the runs column counts them). Each time metric has one unit across the page and its figures.")


def _sections(runs: list[Run]) -> list[Section]:
    """The key tables: the policy x budget grids, then every configuration, each with its sentence."""
    units = time_units(runs)
    cols = list(_columns(units))
    hit, ttft, tpot = cols[0], cols[1], cols[3]
    study = sim_runs(runs)
    where = "expert-cache size" if budget_column(study) == "expert cache" else f"{memory_kind(study)} budget"
    grids = []
    for column, heading, sentence in (
        (hit, "Expert hit rate (%)",
         f"The share of routed experts already resident when their layer needed them, per policy (rows) and "
         f"{where} (columns, smallest first); higher is better."),
        (tpot, f"Time per output token, median ({units['tpot'][0]})",
         f"The median time per output token over the measured requests, in {units['tpot'][0]}: what a user "
         f"waits for each token once the answer streams; lower is better."),
        (ttft, f"Time to first token, median ({units['ttft'][0]})",
         f"The median time from a request's arrival to its first token (queueing and prefill), in "
         f"{units['ttft'][0]}; lower is better."),
    ):
        table = pivot(runs, column, units)
        mark = " The best policy per column is in bold (the oracle bound and the no-offload floor excluded)."
        higher = _higher_is_better(column)  # the grid's columns are budgets: the metric sets the direction
        grids.append(Section(heading, sentence + mark, table, percent="(%)" in heading,
                             best=best_cells(table, table.columns[1:], higher=lambda _, h=higher: h)))
    every = metrics_table(runs, units)
    budget = budget_column(runs)
    sentence = (f"One row per engine (simulated or replayed), policy, hardware and budget (the {budget} column); bytes moved "
                f"is host-to-device traffic and stall the time compute waited for copies. The best value per "
                f"engine, hardware and budget is in bold.")
    metric_cols = [c for c in cols if c != "bytes moved"]
    return grids + [Section("Every configuration", sentence, every,
                            best=best_cells(every, metric_cols, groups=("engine", "hardware", budget)))]


def _files_section(runs: list[Run]) -> Section:
    return Section("Every result file", "Every result file as recorded, with its seed, the requests it measured "
                   "and its file name.", _files(runs))


def _summary(runs: list[Run]) -> tuple[str, list[tuple[str, str]], list[str], list[str], str]:
    """(headline, [(budget, sentence)], odd-result sentences, replay sentences, where the numbers
    come from)."""
    units = time_units(runs)
    cells = study_cells(runs)
    found = findings(cells)
    study = sim_runs(runs)
    source = (f"From the simulated runs on {', '.join(sorted({r.hardware for r in study}))}, per "
              f"{'expert-cache size' if budget_column(study) == 'expert cache' else memory_kind(study) + ' budget'}"
              f" ({len(found)} budget{'s' if len(found) != 1 else ''}); every replay is in the tables below.")
    return (headline(found), [(f.budget, " ".join(filter(None, (finding_sentence(f, units["tpot"]),
                                                                  bracket_sentence(f, units["tpot"])))))
                              for f in found],
            odd_results(cells, units), replay_sentences(runs, units), source)


def _html(title: str, runs: list[Run], outcome: PlotOutcome, plan: dict | None = None, plan_fig=None) -> str:
    e = html.escape
    head_line, per_budget, odd, replays, source = _summary(runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f0f0f0}td:nth-child(-n+4){text-align:left}figure{margin:2em 0}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}"
        "td.best{font-weight:700;background:#eaf4ea}.summary li{margin:.3em 0}"
        ".note{color:#666;font-size:13px}dt{font-weight:600}dd{margin:0 0 .5em 1em}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        '<h2 id="what-this-says">What this says</h2>',
        f"<p>{e(head_line)}</p>",
        f'<p class="note">{e(source)}</p>',
        '<ul class="summary">',
        *[f"<li><b>{e(budget)}</b>: {e(text)}</li>" for budget, text in per_budget],
        "</ul>",
    ]
    if odd:
        parts += ["<p>Results that look odd, explained from the same result columns:</p>", '<ul class="summary">',
                  *[f"<li>{e(text)}</li>" for text in odd], "</ul>"]
    if replays:
        parts += ["<p>The simulator against a real run:</p>", '<ul class="summary">',
                  *[f"<li>{e(text)}</li>" for text in replays], "</ul>"]
    if plan is not None:
        from finemoe.plan.text import plan_text

        data = base64.b64encode(plan_fig.png.read_bytes()).decode("ascii")
        parts += ['<h2 id="plan">Plan: what to run</h2>', f'<p class="note">{e(PLAN_INTRO)}</p>',
                  f'<pre style="font-size:12px">{e(plan_text(plan))}</pre>',
                  f'<figure id="plan-figure"><img alt="{e(plan_fig.title)}" src="data:image/png;base64,{data}">'
                  f"<figcaption><b>{e(plan_fig.title)}</b>. {e(plan_fig.caption)}</figcaption></figure>"]
    parts += [f"<p>{len(runs)} result files; {len(outcome.rendered)} figures. {e(INTRO)}</p>",
              "<h2>Results per policy and memory budget</h2>"]
    for section in _sections(runs):
        parts += [f"<h3>{e(section.heading)}</h3>", f'<p class="note">{e(section.sentence)}</p>', _html_table(section)]
    files = _files_section(runs)
    parts += ["<details><summary>Every result file</summary>", f'<p class="note">{e(files.sentence)}</p>',
              _html_table(files), "</details>", "<h2>Figures</h2>"]
    for fig in outcome.rendered:
        data = base64.b64encode(fig.png.read_bytes()).decode("ascii")
        parts.append(
            f'<figure id="{e(fig.name)}"><img alt="{e(fig.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{e(fig.title)}</b>: {e(FIGURES.get(fig.name, ''))}. {e(fig.caption)}</figcaption></figure>"
        )
    if outcome.skipped:
        parts.append("<h3>Figures not drawn</h3><ul>")
        parts += [f'<li class="note"><b>{e(n)}</b>: {e(why)}</li>' for n, why in outcome.skipped]
        parts.append("</ul>")
    parts.append("<h2>Configuration and provenance</h2><dl>")
    parts += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in provenance(runs)]
    parts.append("</dl></body></html>")
    return "\n".join(parts) + "\n"


def _html_table(section: Section) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in section.table.columns)
    body = "".join("<tr>" + "".join(f'<td class="best">{e(v)}</td>' if best else f"<td>{e(v)}</td>"
                                    for v, best in row) + "</tr>" for row in section.rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _files(runs: list[Run]) -> pd.DataFrame:
    df = run_table(runs).drop(columns=["_budget_sort", "_sim_first"])
    df["bytes moved"] = df["bytes moved"].map(format_bytes)
    return df.rename(columns={"budget": budget_column(runs)})


def _markdown(title: str, runs: list[Run], outcome: PlotOutcome, fig_dir: Path, base: Path, plan: dict | None = None,
              plan_fig=None) -> str:
    head_line, per_budget, odd, replays, source = _summary(runs)
    lines = [f"# {title}", "", "## What this says", "", head_line, "", f"*{source}*", ""]
    lines += [f"- **{budget}**: {text}" for budget, text in per_budget] + [""]
    if odd:
        lines += ["Results that look odd, explained from the same result columns:", ""]
        lines += [f"- {text}" for text in odd] + [""]
    if replays:
        lines += ["The simulator against a real run:", ""] + [f"- {text}" for text in replays] + [""]
    if plan is not None:
        from finemoe.plan.text import plan_text

        lines += ["## Plan: what to run", "", PLAN_INTRO, "", "```text", plan_text(plan), "```", "",
                  f"![{plan_fig.title}]({os.path.relpath(plan_fig.png, base)})", ""]
    lines += [f"{len(runs)} result files; {len(outcome.rendered)} figures. {INTRO}", "",
              "## Results per policy and memory budget", ""]
    for section in _sections(runs):
        table = section.table
        lines += [f"### {section.heading}", "", section.sentence, "",
                  "| " + " | ".join(map(str, table.columns)) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
        lines += ["| " + " | ".join(f"**{v}**" if best else v for v, best in row) + " |" for row in section.rows()]
        lines.append("")
    lines += ["## Figures", ""]
    for fig in outcome.rendered:
        rel = os.path.relpath(fig.png, base)
        lines += [f"### {fig.title}", "", f"![{fig.title}]({rel})", "",
                  f"*{FIGURES.get(fig.name, '')}. {fig.caption}*", ""]
    if outcome.skipped:
        lines += ["Figures not drawn:", ""] + [f"- **{n}**: {why}" for n, why in outcome.skipped] + [""]
    lines += ["## Configuration and provenance", ""] + [f"- **{k}**: {v}" for k, v in provenance(runs)]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)
