"""Figures render from small result files, skip what the results cannot support, and fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finemoe.results import RunResult, read_result, requests_frame

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
                seed=0, extra_summary=None, slots=None, hardware=None, extra_config=None) -> RunResult:
    """A result shaped like the simulator's: latency follows misses at ~11 ms per expert copy.
    `slots` sets the expert cache directly (gpu_mem_gib is then ignored); `extra_summary` and
    `extra_config` override what the hand-made cases need exactly."""
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
              "policy": policy, "policy_params": dict(params or {}), "hardware": hardware or HW,
              "memory": {"gpu_mem_bytes": int(gpu_mem_gib * GiB), "expert_cache_slots": None}
              if slots is None else {"gpu_mem_bytes": None, "expert_cache_slots": int(slots)},
              "model_profile": "mixtral-8x7b", "seed": seed, **(extra_config or {})}
    return RunResult(config, summary, requests, per_layer_hit_rate=[hit_rate] * 4,
                     timeline=_timeline(seed, 1 - hit_rate))


def simulate_study(directory: Path) -> Path:
    """A real small study: the simulator over a synthetic trace (3 cache sizes x lru, finemoe,
    oracle; no-offload; FineMoE at d = 1, 2, 3) and two configurations replayed on this CPU with
    their simulated counterparts (calibrated profile). Returns the trace path."""
    from finemoe.replay.compare import attach_simulation, simulate_same
    from finemoe.replay.executor import ReplayOptions, replay
    from finemoe.replay.run import calibrated_hardware
    from finemoe.sim.config import MemoryConfig, SimConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.run import simulate
    from finemoe.traces.io import write_trace
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=8), num_requests=10,
                            prompt_tokens=(6, 12), generated_tokens=12, seed=1)
    trace_path = write_trace(trace, directory / "trace.parquet")

    def config(policy, slots, hw=PRESETS["rtx3090"], **params):
        return SimConfig(trace_path=str(trace_path), policy=policy, hardware=hw, policy_params=params,
                         memory=MemoryConfig(expert_cache_slots=slots))

    for slots in (8, 16, 24):
        for policy in ("lru", "finemoe", "oracle"):
            simulate(trace, config(policy, slots)).write(directory / f"{policy}-{slots}.parquet")
    simulate(trace, config("no-offload", 32)).write(directory / "no-offload-32.parquet")
    for d in (1, 2):
        simulate(trace, config("finemoe", 16, distance=d)).write(directory / f"finemoe-16-d{d}.parquet")
    # calibrated as `finemoe validate` does: the trace's own expert GEMM in its dtype
    options = ReplayOptions(device="cpu", threads=1)
    hw, _ = calibrated_hardware(trace, options, slots=16)
    for policy in ("lru", "finemoe"):
        cfg = config(policy, 16, hw)
        sim_path = simulate_same(trace, cfg).write(directory / f"cpu-sim-{policy}-16.parquet")
        replayed = replay(trace, cfg, options)
        attach_simulation(replayed, read_result(sim_path), str(sim_path)).write(
            directory / f"replay-{policy}-16.parquet")
    return trace_path


_STUDY: dict[str, Path] = {}


def shared_study(tmp_path_factory) -> Path:
    """The study, simulated once per session for this module and test_report."""
    if "dir" not in _STUDY:
        d = tmp_path_factory.mktemp("study")
        simulate_study(d)
        _STUDY["dir"] = d
    return _STUDY["dir"]


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    return shared_study(tmp_path_factory)


@pytest.fixture(scope="module")
def trace_file(study) -> Path:
    return study / "trace.parquet"


@pytest.fixture(scope="module")
def rendered(study, trace_file, tmp_path_factory):
    from finemoe.plots.render import render_all

    return render_all([study], tmp_path_factory.mktemp("figs"), trace=trace_file)


# lines, bars or bar collections each figure must draw from the study below
MIN_ARTISTS = {"latency_memory": 8, "hit_rate_memory": 4, "prefetch_distance": 2, "latency_bars": 24,
               "routing_entropy": 9, "sim_vs_replay": 12, "engine_timeline": 20, "expert_placement": 6}


@pytest.mark.slow
def test_every_figure_renders_non_trivially(rendered):
    from finemoe.plots.render import FIGURES

    assert rendered.skipped == []
    assert {r.name for r in rendered.rendered} == set(FIGURES)
    for fig in rendered.rendered:
        assert {f.suffix for f in fig.files} == {".png", ".svg"}
        assert fig.png.stat().st_size > 15_000, fig.name
        assert fig.artists >= MIN_ARTISTS[fig.name], fig.name
        assert "trace:" in fig.caption and "hardware:" in fig.caption and "seed:" in fig.caption


@pytest.mark.slow
def test_tradeoff_draws_one_line_per_policy(rendered):
    by_name = {r.name: r for r in rendered.rendered}
    # per panel: lru, finemoe at d=3 (its d=1,2 points at one size belong to the distance figure),
    # oracle and the no-offload floor; the replays' calibrated-CPU simulations are left out
    assert by_name["latency_memory"].lines == 2 * 4
    assert by_name["hit_rate_memory"].lines == 4
    assert by_name["prefetch_distance"].lines == 2  # finemoe's hit rate and TPOT over d = 1, 2, 3


def test_study_reads_as_the_simulator_wrote_it(study):
    from finemoe.plots.data import load_runs, memory_axis, sim_runs

    runs = load_runs([study])  # the trace beside the results is passed over, not an error
    assert len(runs) == 9 + 1 + 2 + 2 + 2
    sims = sim_runs(runs)
    assert {r.hardware for r in sims} == {"rtx3090"} and len(sims) == 12
    label, x_of = memory_axis(sims)
    assert label == "expert cache (slots of 32 experts)"
    assert sorted({x_of(r) for r in sims}) == [8, 16, 24, 32]
    oracle = [r for r in sims if r.policy == "oracle"]
    assert all(r.is_bound for r in oracle) and all(r.metric("hit_rate") > 0 for r in oracle)


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

    out = render_all([study], tmp_path, only=["latency_bars"], budget="24")
    assert out.rendered[0].title.endswith("24 slots")
    out = render_all([study], tmp_path, only=["latency_bars"], budget="7")
    assert "no results at budget 7" in out.skipped[0][1]


def test_budget_in_bytes(tmp_path):
    from finemoe.plots.render import render_all

    for mem in (24, 48):
        for policy, hr in (("lru", 0.4), ("finemoe", 0.6)):
            make_result(policy, mem, hr + mem / 100).write(tmp_path / "r" / f"{policy}-{mem}.parquet")
    out = render_all([tmp_path / "r"], tmp_path / "f", only=["latency_bars", "latency_memory"], budget="48G")
    assert [r.name for r in out.rendered] == ["latency_bars", "latency_memory"]
    assert out.rendered[0].title.endswith("48 GiB") and out.rendered[0].patches == 2 * 2 * 3


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


def test_seeds_are_averaged_into_one_point(tmp_path):
    from finemoe.plots.data import load_runs
    from finemoe.plots.render import render_all

    for seed, hr in ((0, 0.4), (1, 0.6)):
        for mem in (24, 48):
            make_result("lru", mem, hr, seed=seed).write(tmp_path / "r" / f"lru-{mem}-{seed}.parquet")
    out = render_all([tmp_path / "r"], tmp_path / "f", only=["hit_rate_memory"])
    assert out.rendered[0].lines == 1
    assert "mean over seeds" in out.rendered[0].caption
    from finemoe.plots.common import mean_by_x
    from finemoe.plots.data import memory_axis

    runs = load_runs([tmp_path / "r"])
    _, x_of = memory_axis(runs)
    xs, ys = mean_by_x(runs, x_of, lambda r: r.metric("hit_rate"))
    assert xs == [24.0, 48.0] and ys == [pytest.approx(0.5), pytest.approx(0.5)]


def test_timeline_shows_fewer_steps_when_they_are_crowded(study):
    from finemoe.plots.data import load_runs
    from finemoe.plots.timeline import pick_runs, steps_to_show

    chosen = pick_runs(load_runs([study]))
    assert [r.policy for r in chosen] == ["finemoe", "lru", "oracle"]  # FineMoE first, then baselines
    assert steps_to_show(chosen) == 3
    assert steps_to_show(chosen, max_events=10) == 1


def test_byte_budget_does_not_match_a_slot_sweep(study, tmp_path):
    """A slot sweep on a 24 GiB preset must not answer --budget 24G with whatever slot count."""
    from finemoe.plots.render import render_all

    out = render_all([study], tmp_path, only=["latency_bars"], budget="24G")
    assert out.skipped and "8 slots, 16 slots, 24 slots" in out.skipped[0][1]


def test_same_results_give_the_same_files(study, tmp_path):
    from finemoe.plots.render import render_all

    names = ["latency_memory", "engine_timeline"]
    a = render_all([study], tmp_path / "a", only=names)
    b = render_all([study], tmp_path / "b", only=names)
    for fa, fb in zip((f for r in a.rendered for f in r.files), (f for r in b.rendered for f in r.files), strict=True):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
