"""The bracket [bound, oracle] in simulate's table and in the report, on hand-made results."""

from __future__ import annotations

from test_plots import make_result
from test_report import _hand_study

from finemoe.cli.simulate import results_table

# 12 slots: lru 10 ms, finemoe 6 ms, oracle 2 ms, the bound the oracle records 1 ms.
BRACKET = [("lru", 12, 0.010, {"bound_tpot_p50_s": 0.001}), ("finemoe", 12, 0.006, {"bound_tpot_p50_s": 0.001}),
           ("oracle", 12, 0.002, {"bound_tpot_p50_s": 0.001})]


def test_bracket_sentence_gives_each_policys_share_of_both_gaps(tmp_path):
    from finemoe.plots.summary import bracket_sentence, findings, gap_share, study_cells

    assert gap_share(10.0, 6.0, 2.0) == 0.5 and gap_share(10.0, 6.0, 1.0) == 4 / 9
    (found,) = findings(study_cells(_hand_study(tmp_path, BRACKET)))
    # finemoe closes (10 - 6) / (10 - 2) = 50% of the gap to the oracle and 4 / 9 = 44% of that to the bound.
    assert bracket_sentence(found, ("ms", 1e3)) == (
        "[bound, oracle] on median time per output token: [1 ms, 2 ms]; of the gap from lru to the oracle / "
        "to the bound: finemoe 50% / 44%.")


def test_no_bracket_without_a_recorded_bound(tmp_path):
    from finemoe.plots.summary import bracket_sentence, findings, study_cells

    (found,) = findings(study_cells(_hand_study(tmp_path, [(p, s, t, {}) for p, s, t, _ in BRACKET])))
    assert bracket_sentence(found, ("ms", 1e3)) == ""


def test_report_says_the_bracket_per_budget(tmp_path):
    from finemoe.plots.report import _summary

    _, per_budget, *_ = _summary(_hand_study(tmp_path, BRACKET))
    assert per_budget[0][0] == "12 slots" and "[bound, oracle] on median time per output token: [1 ms, 2 ms]" in per_budget[0][1]


def test_simulate_table_shows_the_bound_beside_the_policy(tmp_path):
    summary = {"bound_tpot_p50_s": 0.0015, "ondemand_loads": 40, "prefetch_started": 2, "bound_loads": 30}
    path = tmp_path / "oracle.parquet"
    make_result("oracle", 0, 0.5, slots=12, extra_summary=summary).write(path)
    header, row = results_table([path]).splitlines()
    cells = dict(zip(header.replace("TPOT p50 ms", "TPOT_p50_ms").replace("bound TPOT p50", "bound_TPOT_p50")
                     .replace("bound loads", "bound_loads").replace("hit rate", "hit_rate").replace("gpu mem", "gpu_mem")
                     .replace("TTFT p50 ms", "TTFT_p50").replace("TPOT p99 ms", "TPOT_p99").replace("H2D GB", "h2d").replace("D2H GB", "d2h").replace("on cpu", "on_cpu")
                     .replace("stall s", "stall").split(), row.split(), strict=True))
    assert cells["bound_TPOT_p50"] == "1.50" and cells["loads"] == "42" and cells["bound_loads"] == "30"
