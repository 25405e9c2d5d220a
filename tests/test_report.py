"""`finemoe report` and `finemoe plot`: one self-contained page, clear errors, exit codes."""

from __future__ import annotations

import base64
import re

import pytest
from click.testing import CliRunner
from test_plots import make_result, shared_study

from finemoe.cli.main import cli


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


@pytest.mark.slow
def test_html_report_is_self_contained(study, tmp_path):
    from finemoe.plots.report import write_report

    path, outcome = write_report([study], tmp_path / "r.html")
    text = path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(outcome.rendered) >= 6
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert 'src="http' not in text and "<link" not in text  # nothing fetched from elsewhere
    # the key table: every policy and budget, with hit rate and latency columns
    for needle in ("hit rate (%)", "TTFT p50 (ms)", "TPOT p99 (ms)", "bytes moved", "oracle (bound)",
                   "no-offload (floor)", "8 slots", "24 slots", "rtx3090", "replay", str(study / "trace.parquet")):
        assert needle in text, needle
    assert list(tmp_path.iterdir()) == [path]  # no figure folder or temporary files left behind


@pytest.mark.slow
def test_markdown_report_links_its_figures(study, tmp_path):
    from finemoe.plots.report import write_report

    path, outcome = write_report([study], tmp_path / "study.md")
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(outcome.rendered)
    assert all((tmp_path / link).is_file() for link in links)
    assert re.search(r"\| sim \| lru \| rtx3090 \| 16 slots \| 16 \| 1 \| [0-9.]+ \|", text)
    # the policy x size grid of hit rates: lru's row has one cell per cache size
    assert re.search(r"\| lru \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| - \|", text)


def test_metrics_table_values_come_from_the_summaries(tmp_path):
    from finemoe.plots.data import load_runs
    from finemoe.plots.report import metrics_table, pivot

    a = make_result("lru", 24, 0.625, seed=0)
    b = make_result("lru", 24, 0.5, seed=1)
    a.write(tmp_path / "a.parquet")
    b.write(tmp_path / "b.parquet")
    make_result("lru", 48, 0.9).write(tmp_path / "c.parquet")
    runs = load_runs([tmp_path])
    row = metrics_table(runs).iloc[0]  # seeds 0 and 1 at 24 GiB: one row, their mean
    assert row["runs"] == 2 and row["budget"] == "24 GiB"
    assert row["hit rate (%)"] == pytest.approx(56.25)
    assert row["TPOT p50 (ms)"] == pytest.approx(1e3 * (a.summary["tpot_p50_s"] + b.summary["tpot_p50_s"]) / 2)
    grid = pivot(runs, "hit rate (%)")
    assert list(grid.columns) == ["policy", "24 GiB", "48 GiB"]
    assert grid.iloc[0].tolist() == ["lru", pytest.approx(56.25), pytest.approx(90.0)]


def test_report_rejects_unknown_extension(study, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(study), "-o", str(tmp_path / "r.pdf")])
    assert result.exit_code == 1
    assert "error:" in result.output and ".html or .md" in result.output


def test_plot_cli_writes_and_notes_skips(study, tmp_path):
    result = CliRunner().invoke(cli, ["plot", str(study), "-o", str(tmp_path / "f"), "--only",
                                      "latency_memory,sim_vs_replay,routing_entropy"])
    assert result.exit_code == 0, result.output
    assert "wrote   latency_memory" in result.output
    # the trace the results name is found without --trace
    assert "wrote   routing_entropy" in result.output
    assert "wrote   sim_vs_replay" in result.output
    make_result("lru", 24, 0.5).write(tmp_path / "one" / "lru.parquet")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "one"), "-o", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "skipped latency_memory" in result.output and "two or more memory budgets" in result.output
    assert "skipped routing_entropy" in result.output and "--trace" in result.output
    assert (tmp_path / "f" / "latency_memory.svg").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["plot", "/nonexistent/runs"], "no such result file"),
    (["plot", "{empty}"], "no result files"),
    (["plot", "{study}", "--only", "pie_chart"], "unknown figure"),
    (["plot", "{study}", "--budget", "24Q"], "24Q"),
    (["report", "{bad}"], "bad.parquet"),
])
def test_cli_errors_are_one_sentence(study, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.parquet").write_text("not a parquet file")
    args = [a.format(study=study, empty=tmp_path / "empty", bad=tmp_path / "bad.parquet") for a in args]
    result = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "out.html" if args[0] == "report" else tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output
