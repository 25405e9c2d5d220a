"""Figures render from small result files, skip what the results cannot support, and fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finemoe.results import RunResult, requests_frame

GiB = 1024**3
HW = {"name": "rtx3090", "gpu_mem_bytes": 24 * GiB, "pcie_gbps": 32.0, "copy_engines": 2}


def _timeline(seed: int, miss_rate: float) -> list[dict]:
    """Events of three engine steps with two layers: dense, then experts after (maybe) a copy."""
    rng = np.random.default_rng(seed)
    events, t = [], 0.0
    for step in range(3):
        for layer in range(2):
            events.append(dict(lane="compute", kind="dense", step=step, layer=layer, expert=-1,
                               start_s=t, end_s=t + 2e-4, miss=False))
            t += 2e-4
            for expert in rng.choice(8, 2, replace=False).tolist():
                miss = bool(rng.random() < miss_rate)
                if miss:
                    events.append(dict(lane=f"copy{expert % 2}", kind="demand", step=step, layer=layer,
                                       expert=expert, start_s=t, end_s=t + 1.1e-2, miss=True))
                    t += 1.1e-2
                else:
                    events.append(dict(lane="copy1", kind="prefetch", step=step, layer=layer, expert=expert,
                                       start_s=max(0.0, t - 1.1e-2), end_s=t, miss=False))
                events.append(dict(lane="compute", kind="expert", step=step, layer=layer, expert=expert,
                                   start_s=t, end_s=t + 3e-4, miss=miss))
                t += 3e-4
    return events


def make_result(policy: str, gpu_mem_gib: float, hit_rate: float, *, params=None, engine="sim",
                seed=0, extra_summary=None) -> RunResult:
    """A result shaped like the simulator's: latency follows misses at ~11 ms per expert copy."""
    rng = np.random.default_rng(abs(hash((policy, gpu_mem_gib, engine, str(params)))) % 2**32)
    rows = []
    miss_s = (1 - hit_rate) * 2 * 32 * 0.011
    for i in range(6):
        gen = int(rng.integers(20, 40))
        ttft = 0.05 + miss_s * 1.5 * rng.uniform(0.8, 1.2)
        tpot = 0.02 + miss_s * rng.uniform(0.8, 1.2)
        rows.append(dict(request_id=i, arrival_s=0.0, first_token_s=ttft, finish_s=ttft + tpot * (gen - 1),
                         prompt_tokens=int(rng.integers(30, 50)), generated_tokens=gen))
    from finemoe.results import latency_summary

    requests = requests_frame(rows)
    summary = {"hit_rate": hit_rate, "hits": int(hit_rate * 1000), "misses": int((1 - hit_rate) * 1000),
               "bytes_h2d": int((1 - hit_rate) * 1000 * 352 * 2**20), "stall_s": miss_s * 100,
               **latency_summary(requests)}
    summary.update(extra_summary or {})
    config = {"engine": engine, "trace_path": "traces/mixtral-lmsys.parquet", "trace_hash": "abc123",
              "policy": policy, "policy_params": dict(params or {}), "hardware": HW,
              "memory": {"gpu_mem_bytes": int(gpu_mem_gib * GiB), "expert_cache_slots": None},
              "model_profile": "mixtral-8x7b", "seed": seed}
    return RunResult(config, summary, requests, per_layer_hit_rate=[hit_rate] * 4,
                     timeline=_timeline(seed, 1 - hit_rate))


def write_study(directory: Path, *, replay: bool = True) -> list[Path]:
    """A small study: 4 budgets x (lru, finemoe, oracle), no-offload, a d sweep, replays."""
    paths = []
    budgets = (30, 40, 60, 90)

    def add(res: RunResult, name: str):
        paths.append(res.write(directory / f"{name}.parquet"))

    for i, mem in enumerate(budgets):
        add(make_result("lru", mem, 0.35 + 0.15 * i), f"lru-{mem}")
        add(make_result("finemoe", mem, 0.5 + 0.12 * i, params={"d": 3}), f"finemoe-{mem}")
        add(make_result("oracle", mem, 0.7 + 0.09 * i), f"oracle-{mem}")
    add(make_result("no-offload", 100, 1.0), "no-offload-100")
    for d, hr in ((1, 0.55), (2, 0.66), (4, 0.70), (6, 0.61)):
        add(make_result("finemoe", 40, hr, params={"d": d}), f"finemoe-d{d}")
    if replay:
        add(make_result("lru", 40, 0.5, engine="replay"), "replay-lru-40")
        add(make_result("finemoe", 40, 0.63, params={"d": 3}, engine="replay",
                        extra_summary={"sim_hit_rate": 0.62, "sim_ttft_p50_s": 0.3, "sim_tpot_p50_s": 0.2}),
            "replay-finemoe-40")
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    write_study(d)
    return d


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory) -> Path:
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace

    return write_trace(synthetic_trace(num_requests=6, seed=3), tmp_path_factory.mktemp("tr") / "t.parquet")


@pytest.fixture(scope="module")
def rendered(study, trace_file, tmp_path_factory):
    from finemoe.plots.render import render_all

    return render_all([study], tmp_path_factory.mktemp("figs"), trace=trace_file)


# lines, bars or bar collections each figure must draw from the study below
MIN_ARTISTS = {"latency_memory": 8, "hit_rate_memory": 4, "prefetch_distance": 2, "latency_bars": 24,
               "routing_entropy": 9, "sim_vs_replay": 12, "engine_timeline": 20}


def test_every_figure_renders_non_trivially(rendered):
    from finemoe.plots.render import FIGURES

    assert rendered.skipped == []
    assert {r.name for r in rendered.rendered} == set(FIGURES)
    for fig in rendered.rendered:
        assert {f.suffix for f in fig.files} == {".png", ".svg"}
        assert fig.png.stat().st_size > 15_000, fig.name
        assert fig.artists >= MIN_ARTISTS[fig.name], fig.name
        assert "trace:" in fig.caption and "hardware:" in fig.caption and "seed:" in fig.caption


def test_tradeoff_draws_one_line_per_policy(rendered):
    by_name = {r.name: r for r in rendered.rendered}
    # per panel: lru, finemoe (d varies in the study, so d=1,2,3,4,6 are separate series), oracle, floor
    assert by_name["latency_memory"].lines >= 2 * 4
    assert by_name["hit_rate_memory"].lines >= 4


def test_figures_without_support_are_skipped_not_failed(tmp_path):
    from finemoe.plots.render import render_all

    d = tmp_path / "one"
    make_result("lru", 24, 0.5).write(d / "lru.parquet")
    out = render_all([d], tmp_path / "figs")
    skipped = dict(out.skipped)
    assert "latency_memory" in skipped and "two or more memory budgets" in skipped["latency_memory"]
    assert "routing_entropy" in skipped and "--trace" in skipped["routing_entropy"]
    assert "sim_vs_replay" in skipped
    assert {r.name for r in out.rendered} >= {"latency_bars", "engine_timeline"}


def test_no_results_is_a_clear_error(tmp_path):
    from finemoe.plots.data import PlotError
    from finemoe.plots.render import render_all

    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="no result files"):
        render_all([tmp_path / "empty"], tmp_path / "figs")
    with pytest.raises(PlotError, match="no such result file"):
        render_all([tmp_path / "missing.parquet"], tmp_path / "figs")


def test_budget_option_picks_and_rejects(study, tmp_path):
    from finemoe.plots.render import render_all

    out = render_all([study], tmp_path, only=["latency_bars"], budget="60G")
    assert out.rendered[0].title.endswith("60 GiB")
    out = render_all([study], tmp_path, only=["latency_bars"], budget="7G")
    assert "no results at budget 7G" in out.skipped[0][1]


def test_entropy_coarse_exceeds_fine(trace_file):
    from finemoe.plots.entropy import coarse_fine_entropy
    from finemoe.traces.io import read_trace

    coarse, fine = coarse_fine_entropy(read_trace(trace_file))
    assert coarse.shape == fine.shape == (4,)
    assert np.all(coarse > fine)
    assert np.all(coarse <= 3.0 + 1e-9)


def test_entropy_of_hand_made_routing():
    """One request, two iterations: fine = mean of per-iteration entropies, coarse = of the union."""
    from finemoe.plots.entropy import coarse_fine_entropy
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    t = synthetic_trace(tiny_geometry(num_layers=1, num_experts=4, top_k=1), num_requests=1,
                        prompt_tokens=1, generated_tokens=1, with_probs=False, with_spec=False)
    t.experts[:, 0, 0] = [0, 1]
    t.weights[:] = 1.0
    coarse, fine = coarse_fine_entropy(t)
    assert fine[0] == pytest.approx(0.0)
    assert coarse[0] == pytest.approx(1.0)


def test_corrupt_result_is_a_result_error(tmp_path):
    from finemoe.errors import FinemoeError
    from finemoe.plots.render import render_all

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(FinemoeError, match="bad.parquet"):
        render_all([bad], tmp_path / "figs")
