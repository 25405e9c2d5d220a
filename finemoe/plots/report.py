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
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from finemoe.files import atomic_write_text, ensure_dir, output_errors
from finemoe.plots.data import (
    PlotError,
    Run,
    find_key,
    format_budget,
    format_bytes,
    load_runs,
    memory_axis,
    series_label,
    sim_runs,
    varying_params,
)
from finemoe.plots.render import FIGURES, PlotOutcome, render_all

_KEYS = ["engine", "policy", "hardware", "budget", "slots"]
_MEANS = {"hit rate (%)": ("hit_rate", 100.0), "TTFT p50 (ms)": ("ttft_p50_s", 1e3),
          "TTFT p99 (ms)": ("ttft_p99_s", 1e3), "TPOT p50 (ms)": ("tpot_p50_s", 1e3),
          "TPOT p99 (ms)": ("tpot_p99_s", 1e3), "bytes moved": ("bytes_h2d", 1.0), "stall (s)": ("stall_s", 1.0)}


def run_table(runs: list[Run]) -> pd.DataFrame:
    """One row per result file: policy, hardware, budget, hit rate, TTFT/TPOT p50/p99 (ms), bytes
    moved, stall time, seed, measured requests and the file."""
    varying = varying_params(runs)
    rows = []
    for r in runs:
        row = {"engine": r.engine, "policy": series_label(r, varying), "hardware": r.hardware,
               "budget": format_budget(r), "slots": r.cache_slots if r.cache_slots is not None else "",
               "_budget_sort": r.gpu_mem_bytes if not r.slots_set_directly else r.cache_slots}
        row.update({col: scale * r.metric(key) for col, (key, scale) in _MEANS.items()})
        row.update(seed=str(r.seed), requests=len(r.result.requests), file=r.path.name)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_sim_first"] = df["engine"] != "sim"
    df = df.sort_values(["_sim_first", "engine", "hardware", "_budget_sort", "policy", "seed"], kind="stable")
    return df.reset_index(drop=True)


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """One row per configuration (runs differing only in seed averaged; `runs` counts them)."""
    df = run_table(runs)
    grouped = df.groupby(_KEYS, sort=False, dropna=False)
    out = grouped[list(_MEANS)].mean()
    out.insert(0, "runs", grouped.size())
    out = out.reset_index()
    out["bytes moved"] = out["bytes moved"].map(format_bytes)
    return out


def pivot(runs: list[Run], column: str) -> pd.DataFrame:
    """`column` of the study's simulated runs as a policy x budget grid (the table a reader wants)."""
    from finemoe.plots.common import drop_single_points, series

    study = sim_runs(runs)
    _, x_of = memory_axis(study)
    lines = drop_single_points(series(study, x_of), x_of)  # the memory figures' lines, not the d sweep
    df = run_table([r for members in lines.values() for r in members])
    order = df.drop_duplicates("budget")["budget"].tolist()
    table = df.pivot_table(index="policy", columns="budget", values=column, aggfunc="mean", sort=False)
    table = table.reindex(columns=[b for b in order if b in table.columns])
    refs = [p for p in table.index if p.endswith(("(bound)", "(floor)"))]
    table = table.reindex([p for p in table.index if p not in refs] + refs)
    return table.reset_index()


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
            hardware[hw.get("name", "?")] = (
                f"{hw.get('name')}: {format_bytes(hw.get('gpu_mem_bytes'))} GPU memory, "
                f"PCIe {hw.get('pcie_gbps', '?')} GB/s x {hw.get('copy_engines', '?')} copy engine(s)"
            )
    workloads = {_workload_text(r.config.get("workload")) for r in runs if r.config.get("workload")}
    return [
        ("result files", f"{len(runs)} ({distinct(r.engine for r in runs)})"),
        ("traces", distinct(f"{r.config.get('trace_path')} (hash {r.config.get('trace_hash', '-')})" for r in runs)),
        ("model", distinct(r.model for r in runs)),
        ("hardware", "; ".join(sorted(hardware.values())) or "-"),
        ("policies", distinct(r.policy for r in runs)),
        ("memory budgets", distinct(format_budget(r) for r in runs)),
        ("workload", "; ".join(sorted(workloads)) or "-"),
        ("seeds", distinct(from_config("seed"))),
        ("finemoe version", distinct(find_key(r.config, "finemoe_version") or find_key(r.config, "version") for r in runs)),
        ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _workload_text(workload) -> str:
    if not isinstance(workload, dict):
        return str(workload)
    return ", ".join(f"{k}={v}" for k, v in workload.items() if v is not None)


def write_report(
    results: Iterable[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    trace: str | os.PathLike | None = None,
    budget: str | None = None,
    title: str = "finemoe study",
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, PlotOutcome]:
    """Write an .html (self-contained) or .md report of the given results; returns its path."""
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
            text = _html(title, runs, outcome)
    else:
        fig_dir = out_path.with_name(out_path.stem + "-figures")
        outcome = render_all(runs, fig_dir, trace=trace, budget=budget, progress=progress)
        text = _markdown(title, runs, outcome, fig_dir, out_path.parent)
    _write_atomic(out_path, text)
    return out_path, outcome


def _fmt(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table_rows(df: pd.DataFrame, percent: bool = False) -> list[list[str]]:
    """Cells as text; percentages (a `(%)` column, or every cell of a percent table) to 0.1."""
    pct = [percent or "(%)" in str(c) for c in df.columns]
    return [[_pct(v) if p and isinstance(v, float) else _fmt(v) for v, p in zip(row, pct, strict=True)]
            for row in df.itertuples(index=False)]


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


PIVOTS = (("hit rate (%)", "Expert hit rate (%)"), ("TPOT p50 (ms)", "Time per output token, median (ms)"),
          ("TTFT p50 (ms)", "Time to first token, median (ms)"))
INTRO = ("Latencies are medians (p50) and 99th percentiles over the measured requests; hit rate counts "
         "routed experts resident when their layer needed them. Runs that differ only in seed are averaged "
         "(the runs column counts them).")


def _sections(runs: list[Run]) -> list[tuple[str, pd.DataFrame]]:
    """(heading, table) of the key tables: the policy x budget grids, then every configuration."""
    out = [(heading, pivot(runs, column)) for column, heading in PIVOTS]
    return out + [("Every configuration", metrics_table(runs))]


def _html(title: str, runs: list[Run], outcome: PlotOutcome) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f0f0f0}td:nth-child(-n+4){text-align:left}figure{margin:2em 0}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}"
        ".note{color:#666;font-size:13px}dt{font-weight:600}dd{margin:0 0 .5em 1em}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{len(runs)} result files; {len(outcome.rendered)} figures. {e(INTRO)}</p>",
        "<h2>Results per policy and memory budget</h2>",
    ]
    for heading, table in _sections(runs):
        parts += [f"<h3>{e(heading)}</h3>", _html_table(table, percent="(%)" in heading)]
    parts += ["<details><summary>Every result file</summary>", _html_table(_files(runs)), "</details>",
              "<h2>Figures</h2>"]
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


def _html_table(df: pd.DataFrame, percent: bool = False) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    rows = _table_rows(df, percent)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _files(runs: list[Run]) -> pd.DataFrame:
    df = run_table(runs).drop(columns=["_budget_sort", "_sim_first"])
    df["bytes moved"] = df["bytes moved"].map(format_bytes)
    return df


def _markdown(title: str, runs: list[Run], outcome: PlotOutcome, fig_dir: Path, base: Path) -> str:
    lines = [f"# {title}", "", f"{len(runs)} result files; {len(outcome.rendered)} figures. {INTRO}", "",
             "## Results per policy and memory budget", ""]
    for heading, table in _sections(runs):
        lines += [f"### {heading}", "", "| " + " | ".join(map(str, table.columns)) + " |",
                  "|" + "|".join("---" for _ in table.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in _table_rows(table, "(%)" in heading)] + [""]
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
