"""`finemoe report` and `finemoe plot`: one self-contained page, clear errors, exit codes."""

from __future__ import annotations

import base64
import re

import pytest
from click.testing import CliRunner
from test_plots import GiB, make_result, shared_study

from finemoe.cli.main import cli


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    return shared_study(tmp_path_factory)


@pytest.mark.slow
def test_html_report_is_self_contained(study, tmp_path):
    from finemoe.plots.common import time_units
    from finemoe.plots.data import load_runs
    from finemoe.plots.report import write_report

    path, outcome = write_report([study], tmp_path / "r.html")
    text = path.read_text()
    ttft, tpot = (time_units(load_runs([study]))[m][0] for m in ("ttft", "tpot"))
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(outcome.rendered) >= 6
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert 'src="http' not in text and "<link" not in text  # nothing fetched from elsewhere
    # the key table: every policy and budget, with hit rate and latency columns
    for needle in ("hit rate (%)", f"TTFT p50 ({ttft})", f"TPOT p99 ({tpot})", "bytes moved", "oracle (bound)",
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
    assert re.search(r"\| sim \| lru \| rtx3090 \| 16 slots \| 16 \| 1 \| (\*\*)?[0-9.]+(\*\*)? \|", text)
    # the policy x size grid of hit rates: lru's row has one cell per cache size (the best in bold)
    cell = r"(\*\*)?[0-9.]+(\*\*)?"
    assert re.search(rf"\| lru \| {cell} \| {cell} \| {cell} \| - \|", text)


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
    assert row["runs"] == 2 and row["GPU memory"] == "24 GiB"
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


# --- what the report says: hand-made studies whose winners, margins and shares are computed by hand


def _hand_study(directory, rows, **kw):
    """rows: (policy, slots, tpot_s, extra summary fields); hit rate and TTFT fixed unless given."""
    for policy, slots, tpot, extra in rows:
        summary = {"tpot_p50_s": tpot, "tpot_p99_s": tpot, "ttft_p50_s": 0.05, "ttft_p99_s": 0.05,
                   "hit_rate": 0.5, **extra}
        make_result(policy, 0, summary["hit_rate"], slots=slots, extra_summary=summary, **kw).write(
            directory / f"{policy}-{slots}.parquet")
    from finemoe.plots.data import load_runs

    return load_runs([directory])


PLAIN = [  # at 12 slots: finemoe 6 ms, lfu 8, lru 10, oracle 2; at 6: lfu 12 ms, finemoe 15, lru 20, oracle 10;
    # at 48: finemoe 3 ms, lru 5, oracle 2 and the no-offload floor at 1 (never a winner)
    ("lru", 12, 0.010, {}), ("lfu", 12, 0.008, {}), ("finemoe", 12, 0.006, {}), ("oracle", 12, 0.002, {}),
    ("lru", 6, 0.020, {}), ("lfu", 6, 0.012, {}), ("finemoe", 6, 0.015, {}), ("oracle", 6, 0.010, {}),
    ("lru", 48, 0.005, {}), ("finemoe", 48, 0.003, {}), ("oracle", 48, 0.002, {}), ("no-offload", 48, 0.001, {}),
]


def test_summary_names_winner_margins_and_oracle_share(tmp_path):
    from finemoe.plots.summary import finding_sentence, findings, headline, study_cells

    runs = _hand_study(tmp_path, PLAIN)
    found = findings(study_cells(runs))
    assert [f.budget for f in found] == ["6 slots", "12 slots", "48 slots"]  # by size, not "12" < "48" < "6"
    at = {f.budget: f for f in found}
    f12 = at["12 slots"]
    assert f12.winner.policy == "finemoe" and f12.runner_up.policy == "lfu" and f12.worst.policy == "lru"
    assert f12.below(f12.runner_up) == pytest.approx(0.25)  # (8 - 6) / 8
    assert f12.below(f12.worst) == pytest.approx(0.40)  # (10 - 6) / 10
    assert f12.oracle_share == pytest.approx(0.50)  # (10 - 6) / (10 - 2)
    assert finding_sentence(f12, ("ms", 1e3)) == (
        "finemoe is fastest at 6 ms per output token, 25% below the runner-up lfu (8 ms) and 40% below the "
        "slowest, lru (10 ms); it closes 50% of the gap from lru to the oracle (2 ms).")
    assert at["6 slots"].winner.policy == "lfu" and at["6 slots"].oracle_share == pytest.approx(0.8)  # 8 / 10
    f48 = at["48 slots"]  # the floor is faster but a reference; two contenders: runner-up is the slowest
    assert f48.winner.policy == "finemoe" and f48.oracle_share == pytest.approx(2 / 3)
    assert finding_sentence(f48, ("ms", 1e3)) == (
        "finemoe is fastest at 3 ms per output token, 40% below the runner-up lru (5 ms); it closes 67% of the "
        "gap from lru to the oracle (2 ms).")
    assert headline(found).endswith("finemoe at 2 of 3; lfu at 1 of 3 budgets.")


def test_report_opens_with_what_it_says_and_marks_best_cells(tmp_path):
    from finemoe.plots.report import write_report

    _hand_study(tmp_path / "r", PLAIN)
    path, _ = write_report([tmp_path / "r"], tmp_path / "r.html")
    text = path.read_text()
    assert text.index("What this says") < text.index("<table>")
    assert text.index("<b>6 slots</b>") < text.index("<b>12 slots</b>") < text.index("<b>48 slots</b>")
    assert "closes 50% of the gap from lru to the oracle" in text
    # the TPOT grid: budgets smallest first, finemoe's 6 ms at 12 slots the marked best cell
    grid = text[text.index("Time per output token, median (ms)</h3>"):]
    grid = grid[:grid.index("</table>")]
    assert re.search(r"<th>policy</th><th>6 slots</th><th>12 slots</th><th>48 slots</th>", grid)
    assert re.search(r'<tr><td>finemoe</td><td>15</td><td class="best">6</td><td class="best">3</td></tr>', grid)
    assert re.search(r'<tr><td>lfu</td><td class="best">12</td><td>8</td><td>-</td></tr>', grid)
    assert '<td class="best">2</td>' not in grid  # the oracle's 2 ms is a bound, not a winner
    # every table is introduced by one sentence saying what it shows
    assert text.count("<table>") == len(re.findall(r'<p class="note">[^<]+</p>\n?<table>', text)) == 5
    assert "look odd" not in text  # nothing odd in this study
    md, _ = write_report([tmp_path / "r"], tmp_path / "r.md")
    md_text = md.read_text()
    assert md_text.startswith("# finemoe study\n\n## What this says")
    assert "| finemoe | 15 | **6** | **3** |" in md_text


def test_budgets_sort_by_size_everywhere(tmp_path):
    from finemoe.plots.data import load_runs, sorted_budgets
    from finemoe.plots.report import pivot, provenance

    runs = _hand_study(tmp_path, PLAIN)
    assert list(pivot(runs, "hit rate (%)").columns) == ["policy", "6 slots", "12 slots", "48 slots"]
    assert dict(provenance(runs))["memory budgets"] == "6 slots, 12 slots, 48 slots"
    for mem in (24, 0.5, 2):
        make_result("lru", mem, 0.5).write(tmp_path / "b" / f"lru-{mem}.parquet")
    assert sorted_budgets(load_runs([tmp_path / "b"])) == ["512 MiB", "2 GiB", "24 GiB"]


def test_numbers_for_people():
    from finemoe.plots.numbers import format_bytes, format_number, format_time

    assert [format_number(v) for v in (894.46, 12345.6, 56.13, 0.1204, 0.000123456, 0.0, 999.6, -2.5, 7)] == [
        "894", "12,346", "56.1", "0.12", "0.000123", "0", "1,000", "-2.5", "7"]
    assert format_number(float("nan")) == "-" and format_number(1e21).startswith("1,000,000,000")
    assert [format_bytes(b) for b in (512, 1536, 874 * 2**20, 1010 * 2**20, 24 * 2**30, 3 * 2**40)] == [
        "512 B", "1.5 KiB", "874 MiB", "0.986 GiB", "24 GiB", "3 TiB"]
    assert format_time(0.0001936, ("µs", 1e6)) == "194 µs"


def test_page_has_no_scientific_notation(tmp_path):
    from finemoe.plots.report import write_report

    extra = {"bytes_h2d": 1010 * 2**20, "stall_s": 1.234e-5}  # once '1.01e+03 MiB' and '1.23e-05'
    _hand_study(tmp_path / "r", [(p, s, t, {**e, **extra}) for p, s, t, e in PLAIN])
    path, _ = write_report([tmp_path / "r"], tmp_path / "r.html")
    text = re.sub(r'src="data:image/png;base64,[^"]+"', "", path.read_text())
    assert "0.986 GiB" in text
    assert not re.search(r"\de[+-]\d", text), re.search(r".{40}\de[+-]\d.{20}", text).group(0)


def test_one_time_unit_per_metric_in_tables_and_figures(tmp_path):
    """TPOT in µs where its median is below 1 ms, TTFT in ms: the same in every table and figure,
    even in a figure whose own values (the 48-slot bars, all above 1 ms) would suggest another."""
    from finemoe.plots.report import write_report

    rows = [(p, s, t, {"ttft_p50_s": 0.03, "ttft_p99_s": 0.04, "tpot_p90_s": t})
            for p, s, t, _ in PLAIN]
    rows = [(p, s, t / 100 if s != 48 else t, e) for p, s, t, e in rows]  # 48 slots: 1-5 ms, the rest 20-200 µs
    _hand_study(tmp_path / "r", rows)
    path, outcome = write_report([tmp_path / "r"], tmp_path / "r.html", budget="48")
    text = path.read_text()
    table_units = set(re.findall(r"TPOT p[59]9? \(([^)]+)\)", text))
    labels = [lab for fig in outcome.rendered for lab in fig.axis_labels]
    tpot_units = {re.search(r"\(([^)]+)\)$", lab).group(1) for lab in labels if "time per output token" in lab}
    ttft_units = {re.search(r"\(([^)]+)\)$", lab).group(1) for lab in labels if "time to first token" in lab}
    assert {f.name for f in outcome.rendered} >= {"latency_memory", "latency_bars"}
    assert table_units == tpot_units == {"µs"}
    assert ttft_units == {"ms"} and "TTFT p50 (ms)" in text
    assert "Time per output token, median (µs)" in text and "finemoe is fastest at 3,000 µs" in text


def test_memory_column_says_what_the_memory_is(tmp_path):
    from finemoe.plots.data import load_runs, memory_axis
    from finemoe.plots.report import metrics_table, provenance

    cpu = {"name": "cpu-xeon", "gpu_mem_bytes": 64 * GiB, "pcie_gbps": 8.170282685853422, "copy_engines": 1,
           "source": "finemoe calibrate on cpu (2026-12-03 07:32:59)"}
    for mem in (8, 16):
        make_result("lru", mem, 0.5, hardware=cpu).write(tmp_path / "cpu" / f"lru-{mem}.parquet")
        make_result("lru", mem, 0.5).write(tmp_path / "gpu" / f"lru-{mem}.parquet")
    cpu_runs, gpu_runs = load_runs([tmp_path / "cpu"]), load_runs([tmp_path / "gpu"])
    assert "expert cache (device memory, CPU)" in metrics_table(cpu_runs).columns
    assert "GPU memory" not in " ".join(metrics_table(cpu_runs).columns)
    assert "GPU memory" in metrics_table(gpu_runs).columns
    assert memory_axis(cpu_runs)[0] == "expert cache (device memory, CPU) budget (GiB)"
    assert memory_axis(gpu_runs)[0] == "GPU memory budget (GiB)"
    hardware = dict(provenance(cpu_runs))["hardware"]
    assert hardware == "cpu-xeon: 64 GiB device memory (a CPU profile), host-to-device copies 8.17 GB/s x 1 copy engine(s)"
    # a replay on the CPU is a CPU profile whatever its hardware is called
    make_result("lru", 8, 0.5, engine="replay", extra_config={"replay": {"device": "cpu"}}).write(
        tmp_path / "replay" / "r.parquet")
    assert load_runs([tmp_path / "replay"])[0].on_cpu
    mixed = metrics_table(load_runs([tmp_path / "replay", tmp_path / "gpu"]))
    assert "memory (GPU; device memory for CPU profiles)" in mixed.columns


ODD = [  # at 6 slots layerwise is fastest while hitting 0.3% (lfu hits 30%): 60 of its 100 misses were late
    # prefetches and it stalled 4 ms against lfu's 9 ms; at 12 slots lfu hits more than lru (60% vs 40%) but
    # takes 12 ms per token against 10, having moved 3 GiB against 1 GiB with 250 of 1,000 prefetches unused;
    # the oracle's first token (10 ms) comes 5x sooner than the best policy's (50 ms)
    ("layerwise", 6, 0.010, {"hit_rate": 0.003, "misses": 100, "prefetch_late": 60, "stall_s": 0.004}),
    ("lfu", 6, 0.014, {"hit_rate": 0.30, "stall_s": 0.009}),
    ("oracle", 6, 0.005, {"hit_rate": 0.9, "ttft_p50_s": 0.010}),
    ("lru", 12, 0.010, {"hit_rate": 0.40, "bytes_h2d": 1 * GiB, "stall_s": 0.003}),
    ("lfu", 12, 0.012, {"hit_rate": 0.60, "bytes_h2d": 3 * GiB, "prefetch_started": 1000,
                        "prefetch_unused_evicted": 250, "stall_s": 0.005}),
]


def test_odd_results_are_explained_from_the_data(tmp_path):
    from finemoe.plots.common import time_units
    from finemoe.plots.summary import odd_results, study_cells

    runs = _hand_study(tmp_path, ODD)
    lines = odd_results(study_cells(runs), time_units(runs))
    assert len(lines) == 3
    low_hit = next(x for x in lines if x.startswith("layerwise"))
    assert low_hit.startswith("layerwise has the lowest time per output token at 6 slots (10 ms) with a hit rate "
                              "of only 0.3% (lfu: 30.0%): 60 of its 100 misses (60.0%) were experts already queued")
    assert "it waited 4 ms on copies in all, against 9 ms for lfu." in low_hit
    slower = next(x for x in lines if x.startswith("lfu"))
    assert slower == ("lfu is slower than on-demand lru at 12 slots (12 ms against 10 ms per token) despite a "
                      "higher hit rate (60.0% against 40.0%): it moved 3 GiB host-to-device, 2 GiB more; 25.0% of "
                      "the 1,000 prefetches it started were evicted before any use; it waited 5 ms on copies "
                      "against 3 ms.")
    oracle = next(x for x in lines if x.startswith("The oracle"))
    assert oracle.startswith("The oracle's time to first token at 6 slots (10 ms) is 5x below the best policy's "
                             "(layerwise, 50 ms): in its first engine step it missed")


def test_no_odd_result_sentence_without_an_odd_result(tmp_path):
    from finemoe.plots.common import time_units
    from finemoe.plots.summary import odd_results, study_cells

    # the same study with the oddities taken out: the fastest policy hits most, lfu is faster than lru
    # when it hits more, and the oracle's first token is not far ahead
    calm = [(p, s, t, {**e, "hit_rate": 0.5, "ttft_p50_s": 0.05}) for p, s, t, e in ODD]
    runs = _hand_study(tmp_path, calm)
    assert odd_results(study_cells(runs), time_units(runs)) == []


def test_best_cell_is_the_highest_hit_rate_and_the_lowest_time(tmp_path):
    from finemoe.plots.report import write_report

    _hand_study(tmp_path / "r", ODD)
    text = write_report([tmp_path / "r"], tmp_path / "r.md")[0].read_text()
    hits = text[text.index("### Expert hit rate"):text.index("### Time per output token")]
    assert "| lfu | **30.0** | **60.0** |" in hits and "| layerwise | 0.3 | - |" in hits
    assert "| lru | - | 40.0 |" in hits and "| oracle (bound) | 90.0 | - |" in hits  # a bound is never marked
    tpot = text[text.index("### Time per output token"):text.index("### Time to first token")]
    assert "| layerwise | **10** | - |" in tpot and "| lfu | 14 | 12 |" in tpot and "| lru | - | **10** |" in tpot
    every = text[text.index("### Every configuration"):text.index("## Figures")]
    assert "One row per engine (simulated or replayed), policy, hardware and budget (the expert cache column)" in every


def test_a_policy_faster_than_the_oracle_is_an_odd_result(tmp_path):
    from finemoe.plots.common import time_units
    from finemoe.plots.summary import odd_results, study_cells

    rows = [("lru", 12, 0.010, {"stall_s": 0.003}), ("finemoe", 12, 0.004, {"hit_rate": 0.7, "stall_s": 0.002}),
            ("oracle", 12, 0.005, {"hit_rate": 0.9, "stall_s": 0.001})]
    runs = _hand_study(tmp_path, rows, extra_config={"policy_info": {"bound": "upper bound on hit rate"}})
    assert odd_results(study_cells(runs), time_units(runs)) == [
        "finemoe takes less time per output token than the oracle at 12 slots (4 ms against 5 ms): its hit rate "
        "is 70.0% against 90.0%, its wait on copies 2 ms against 1 ms; the oracle's result records its bound as: "
        "upper bound on hit rate."]


def test_what_this_says_compares_a_replay_with_its_simulation(tmp_path):
    from finemoe.plots.report import write_report

    _hand_study(tmp_path / "r", PLAIN)
    cpu = {"name": "cpu-xeon", "gpu_mem_bytes": 64 * GiB, "pcie_gbps": 8.0, "copy_engines": 1}
    make_result("finemoe", 0, 0.8, slots=24, engine="replay", hardware=cpu,
                extra_summary={"tpot_p50_s": 0.002, "sim_tpot_p50_s": 0.0015, "sim_hit_rate": 0.75},
                extra_config={"replay": {"device": "cpu"}}).write(tmp_path / "r" / "replay.parquet")
    text = write_report([tmp_path / "r"], tmp_path / "r.md")[0].read_text()
    summary = text[:text.index("## Results per policy")]
    assert ("- Replayed for real on cpu-xeon, finemoe @ 24 slots took 2 ms per output token against 1.5 ms "
            "simulated (the simulator 25% optimistic); hit rate 80.0% measured, 75.0% simulated.") in summary
    assert "24 slots" not in summary.split("The simulator against a real run")[0]  # the replay is no study budget
