"""The replayer: its building blocks, its decisions against the simulator's (same policy code, same
workload), its result files, and its CLI. Its mechanics against the simulator's, on a modelled clock,
are in test_replay_mechanics.py; wall-clock fidelity is measured by `finemoe validate`, not tested."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.replay.compare import comparison_rows, format_comparison
from finemoe.replay.compute import ExpertShape, expert_ffn, expert_views
from finemoe.replay.copier import CopyJob, ThreadCopier
from finemoe.replay.executor import ReplayOptions, needed_experts, replay
from finemoe.replay.run import prepare_trace, run_replay
from finemoe.replay.slots import SlotPool
from finemoe.replay.weights import HostExperts, check_host_memory, scale_geometry
from finemoe.results import read_result
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.run import simulate
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

# A fixed, plausible CPU profile: decisions do not depend on it beyond expert_load_s, and tests that
# compare decisions must not pay for a calibration.
CPU_HW = HardwareSpec("test-cpu", 16 * 10**9, 5e11, 10.0, 8.0, transfer_latency_s=50e-6, copy_engines=1,
                      compute_efficiency=0.5, memory_efficiency=0.5, pcie_efficiency=1.0, kernel_launch_s=20e-6)


def small_geometry(**kw):
    h, i = kw.pop("hidden_size", 64), kw.pop("expert_intermediate_size", 128)
    return tiny_geometry(num_layers=kw.pop("num_layers", 4), num_experts=8, hidden_size=h, expert_intermediate_size=i,
                         dtype=kw.pop("dtype", "float32"), bytes_per_expert=3 * h * i * 4,
                         dense_bytes=kw.pop("dense_bytes", 4 * h * h * 4 * 2), kv_bytes_per_token=4 * 2 * h * 4, **kw)


@pytest.fixture
def trace():
    return synthetic_trace(small_geometry(), num_requests=6, prompt_tokens=6, generated_tokens=10, seed=3)


def config(policy="lru", slots=12, **wl):
    return SimConfig(trace_path="synthetic", policy=policy, hardware=CPU_HW,
                     memory=MemoryConfig(expert_cache_slots=slots), workload=WorkloadConfig(**wl))


# --- building blocks ---------------------------------------------------------------------------


def test_expert_ffn_is_swiglu():
    import torch

    shape = ExpertShape(8, 16)
    flat = torch.randn(shape.numel)
    x = torch.randn(3, 8)
    gate, up, down = expert_views(flat, shape)
    want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(expert_ffn(x, flat, shape), want, atol=1e-5)


def test_thread_copier_copies_and_reports_each_job_once():
    import torch

    src = torch.arange(4 * 1000, dtype=torch.float32).view(4, 1000)
    dst = torch.zeros(4, 1000)
    with ThreadCopier(2) as copier:
        jobs = [copier.submit(CopyJob(src[k], dst[k], tag=k)) for k in range(4)]
        seen = copier.wait(jobs[0])
        seen += copier.wait_all()
        seen += copier.poll()
    assert sorted(j.tag for j in seen) == [0, 1, 2, 3]
    assert torch.equal(src, dst)
    assert all(j.end_s >= j.start_s >= j.submit_s for j in jobs)


def test_slot_pool_reuses_the_victims_slot():
    import torch

    pool = SlotPool(2, 10, torch.float32, "cpu")
    a = pool.assign((0, 1), None)
    b = pool.assign((0, 2), None)
    assert {a, b} == {0, 1}
    c = pool.assign((1, 5), (0, 1))
    assert c == a and (0, 1) not in pool.slot_of
    with pytest.raises(RuntimeError):
        pool.assign((2, 2), None)  # full and no victim: cache and pool would disagree


def test_scale_geometry_keeps_bytes_consistent():
    from finemoe.traces.profiles import get_profile

    g = get_profile("mixtral-8x7b").geometry()
    s = scale_geometry(g, 0.05)
    assert (s.hidden_size, s.expert_intermediate_size) == (205, 717)
    assert s.bytes_per_expert == 3 * 205 * 717 * 2
    assert s.dense_bytes == pytest.approx(g.dense_bytes * 0.05**2, rel=1e-6)
    assert "x0.05" in s.model_name and (s.num_layers, s.num_experts, s.top_k) == (32, 8, 2)
    assert scale_geometry(g, 1.0) is g
    assert scale_geometry(g, 1.0, "float32").bytes_per_expert == 2 * g.bytes_per_expert
    with pytest.raises(ConfigError):
        scale_geometry(g, 0)


def test_unscaled_mixtral_does_not_fit_and_the_error_says_what_to_do():
    from finemoe.traces.profiles import get_profile

    g = get_profile("mixtral-8x7b").geometry()
    with pytest.raises(ConfigError) as err:
        check_host_memory(g, 64, on_cuda=False, available=16 * 10**9)
    msg = str(err.value)
    assert "90.19 GB" in msg and "16.00 GB is free" in msg and "--expert-scale" in msg and "--model-profile" in msg


def test_host_experts_random_weights_are_seeded():
    g = small_geometry(num_layers=2)
    a, b = HostExperts(g, pinned=False, seed=1), HostExperts(g, pinned=False, seed=1)
    assert a.weights.shape == (2, 8, 3 * 64 * 128)
    assert bool((a.weights == b.weights).all()) and float(a.weights.std()) > 0


@pytest.mark.slow
def test_host_experts_load_a_mixtral_checkpoint(tmp_path):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    model = MixtralForCausalLM(cfg)
    model.save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    g = tiny_geometry(num_layers=2, num_experts=4, hidden_size=16, expert_intermediate_size=32,
                      bytes_per_expert=3 * 16 * 32 * 4)
    host = HostExperts(g, pinned=False)
    host.load_checkpoint(tmp_path / "ckpt")
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj[2]
    gate, up, down = expert_views(host.expert(1, 2), ExpertShape(16, 32))
    assert torch.allclose(gate, gate_up[:32]) and torch.allclose(up, gate_up[32:])
    assert torch.allclose(down, experts.down_proj[2])
    wrong = tiny_geometry(num_layers=2, num_experts=4, hidden_size=16, expert_intermediate_size=64,
                          bytes_per_expert=3 * 16 * 64 * 4)
    with pytest.raises(ConfigError, match="shape"):
        HostExperts(wrong, pinned=False).load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="no checkpoint"):
        host.load_checkpoint(tmp_path / "nothing-here")


def test_needed_experts_follows_the_simulators_access_order(trace):
    from finemoe.policies.base import Sequence

    it = next(i for i in trace.iterations if i.num_tokens == 1)
    seq = (Sequence(it.request_id, it.iteration, it.start, it.stop),)
    assert [e for e, _ in needed_experts(trace, seq, 2)] == sorted(trace.experts[it.start, 2].tolist())
    pre = next(i for i in trace.iterations if i.num_tokens > 1)
    seqs = (Sequence(pre.request_id, 0, pre.start, pre.stop),)
    got = needed_experts(trace, seqs, 1)
    assert [e for e, _ in got] == sorted(e for e, _ in got)
    assert sum(c for _, c in got) == pre.num_tokens * trace.geometry.top_k


# --- decisions: the same as the simulator's ------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_demand_only_policies_match_the_simulator(trace, policy):
    # No prefetching: the decisions differ only where a victim is chosen while a different set of
    # experts is pinned (a copy engine starting a little earlier or later than modelled). On this
    # small trace one access is 0.6 points, and the profile is not this machine's, hence 5 points.
    cfg = config(policy, 12, max_batch=2)
    rep = replay(trace, cfg, ReplayOptions(warmup=False))
    sim = simulate(trace, cfg)
    for key in ("steps", "tokens", "layer_steps", "requests"):
        assert rep.summary[key] == sim.summary[key], key
    assert rep.summary["hits"] + rep.summary["misses"] == sim.summary["hits"] + sim.summary["misses"]
    assert abs(rep.summary["hit_rate"] - sim.summary["hit_rate"]) <= 0.05
    assert rep.summary["ondemand_loads"] == rep.summary["misses"] and rep.summary["prefetch_issued"] == 0
    assert rep.summary["bytes_h2d"] == rep.summary["ondemand_loads"] * trace.geometry.bytes_per_expert
    assert rep.config["engine"] == "replay" and sim.config["engine"] == "sim"
    assert list(rep.requests.columns) == list(sim.requests.columns)
    assert len(rep.per_layer_hit_rate) == trace.geometry.num_layers
    assert rep.summary["tpot_p50_s"] > 0 and rep.summary["wall_s"] > 0


def test_no_offload_keeps_everything_resident(trace):
    rep = replay(trace, config("no-offload", 32), ReplayOptions(warmup=False))
    assert rep.summary["hit_rate"] == 1.0 and rep.summary["ondemand_loads"] == 0


@pytest.mark.parametrize("policy", ["lru", "finemoe", "layerwise"])
def test_a_cache_smaller_than_a_batch_layer_still_completes(trace, policy):
    # A prefill layer of a 2-sequence batch needs up to all 8 experts; 4 slots force loads to wait
    # for pinned experts to be computed and released, as in the simulator.
    cfg = config(policy, 2 * trace.geometry.top_k, max_batch=2)
    rep, sim = replay(trace, cfg, ReplayOptions(warmup=False)), simulate(trace, cfg)
    assert rep.summary["steps"] == sim.summary["steps"]
    assert rep.summary["hits"] + rep.summary["misses"] == sim.summary["hits"] + sim.summary["misses"]


def test_oracle_is_refused_with_a_reason(trace):
    with pytest.raises(ConfigError, match="oracle"):
        replay(trace, config("oracle", 12), ReplayOptions(warmup=False))


def test_poisson_arrivals_wait_in_real_time(trace):
    rep = replay(trace, config("lru", 12, arrival="poisson", rate_rps=50.0), ReplayOptions(warmup=False))
    req = rep.requests
    assert (req["first_token_s"] > req["arrival_s"]).all()
    assert rep.summary["makespan_s"] >= req["arrival_s"].max()


# --- run_replay, comparison and result files -----------------------------------------------------


def test_run_replay_compare_writes_both_results(tmp_path, trace):
    out = run_replay(trace, config("lru", 12), ReplayOptions(warmup=False), hardware="rtx3090", compare=True,
                     out_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("replay-") and files[1].startswith("sim-")
    rep = read_result(tmp_path / files[0])
    sim = read_result(tmp_path / files[1])
    assert rep.config["engine"] == "replay" and sim.config["engine"] == "sim"
    assert rep.summary["sim_hit_rate"] == sim.summary["hit_rate"]
    assert rep.summary["sim_tpot_p50_s"] == sim.summary["tpot_p50_s"]
    assert rep.config["compare"]["sim_result"].endswith(files[1])
    rows = {r["metric"]: r for r in out.rows}
    assert rows["hit_rate"]["error"] == pytest.approx((sim.summary["hit_rate"] - rep.summary["hit_rate"]) * 100)
    t = rows["tpot_p50_s"]
    assert t["error"] == pytest.approx(t["sim"] / t["replay"] - 1)
    assert "time per output token p50" in format_comparison(out.rows)


def test_comparison_rows_handle_missing_metrics():
    from finemoe.results import RunResult

    a = RunResult({}, {"hit_rate": 0.5, "tpot_p50_s": 0.01}, None)
    b = RunResult({}, {"hit_rate": 0.52, "tpot_p50_s": 0.011}, None)
    rows = {r["metric"]: r for r in comparison_rows(a, b)}
    assert rows["hit_rate"]["error"] == pytest.approx(2.0)
    assert rows["tpot_p50_s"]["error"] == pytest.approx(0.1)
    assert math.isnan(rows["makespan_s"]["error"])


def test_prepare_trace_scales_and_records(trace):
    scaled = prepare_trace(trace, model_profile=None, expert_scale=0.5, dtype="bfloat16")
    assert scaled.geometry.hidden_size == 32 and scaled.geometry.dtype == "bfloat16"
    assert scaled.metadata["expert_scale"] == 0.5
    assert np.array_equal(scaled.experts, trace.experts)


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def trace_file(tmp_path, trace):
    return str(write_trace(trace, tmp_path / "t.parquet"))


def test_cli_replay_compare(tmp_path, trace_file):
    res = CliRunner().invoke(cli, ["replay", trace_file, "--policy", "lru", "--expert-cache", "12", "--compare",
                                   "--hardware", "rtx3090", "-o", str(tmp_path / "res"), "-q"])
    assert res.exit_code == 0, res.output
    assert "expert hit rate" in res.output and "sim error" in res.output
    assert len(list((tmp_path / "res").glob("*.parquet"))) == 2


def test_cli_replay_calibrates_on_the_fly_and_saves_the_profile(tmp_path, trace_file):
    prof = tmp_path / "p.json"
    res = CliRunner().invoke(cli, ["replay", trace_file, "--policy", "lru", "--expert-cache", "12",
                                   "-o", str(tmp_path / "res"), "-q", "--save-profile", str(prof)])
    assert res.exit_code == 0, res.output
    rep = read_result(next((tmp_path / "res").glob("replay-*.parquet")))
    assert rep.config["replay"]["hardware_from"] == "calibrated now"
    assert rep.config["hardware"]["name"].startswith("cpu-")
    assert rep.config["calibration"]["expert_shape"] == {"hidden_size": 64, "intermediate_size": 128}
    assert prof.is_file()


@pytest.mark.parametrize("args, message", [
    (["--policy", "lru"], "--gpu-mem"),
    (["--policy", "nope", "--expert-cache", "8"], "unknown policy"),
    (["--policy", "lru", "--expert-cache", "8", "--device", "cuda:7"], "cuda"),
    (["--policy", "lru", "--expert-cache", "8", "--expert-scale", "-1"], "--expert-scale"),
    (["--policy", "lru", "--gpu-mem", "1M"], "budget cannot hold"),
    (["--policy", "lru", "--expert-cache", "8", "--policy-param", "finemoe.distance=3"], "replayed policy is lru"),
])
def test_cli_replay_bad_input_is_one_line(tmp_path, trace_file, args, message):
    res = CliRunner().invoke(cli, ["replay", trace_file, "--hardware", "rtx3090", "-o", str(tmp_path / "r"),
                                   "-q", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def test_cli_replay_refuses_an_unfitting_geometry_before_calibrating(tmp_path, monkeypatch):
    """Calibration cycles through a slot pool's worth of experts: it must not run (and exhaust host
    memory) for a geometry the replay would refuse anyway."""
    from finemoe.replay import run as replay_run
    from finemoe.traces.io import write_trace
    from finemoe.traces.profiles import get_profile
    from finemoe.traces.synthetic import synthetic_trace

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before checking host memory")

    monkeypatch.setattr(replay_run, "calibrated_hardware", no_calibration)
    path = tmp_path / "mixtral.parquet"
    write_trace(synthetic_trace(get_profile("mixtral-8x7b").geometry(), num_requests=2, prompt_tokens=4,
                                generated_tokens=4, with_probs=False, semantic_dim=None, with_spec=False), path)
    res = CliRunner().invoke(cli, ["replay", str(path), "--policy", "lru", "--expert-cache", "64", "--device", "cpu",
                                   "-o", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 1, res.output
    assert "needs" in res.output and "--expert-scale" in res.output and "Traceback" not in res.output


def test_cli_replay_missing_trace(tmp_path):
    res = CliRunner().invoke(cli, ["replay", str(tmp_path / "none.parquet"), "--policy", "lru", "--expert-cache", "4"])
    assert res.exit_code == 1 and "error:" in res.output


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_replay_matches_simulator_decisions(trace):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = config("lru", 12)
    rep = replay(trace, cfg, ReplayOptions(device="cuda"))
    sim = simulate(trace, cfg)
    assert rep.summary["hits"] + rep.summary["misses"] == sim.summary["hits"] + sim.summary["misses"]
    assert abs(rep.summary["hit_rate"] - sim.summary["hit_rate"]) <= 0.05
    assert rep.config["replay"]["host_pinned"] is True and rep.config["replay"]["inline_copies"] == 0


@pytest.mark.gpu
def test_cuda_slot_reuse_never_races_the_compute_stream(trace):
    """Few slots and many misses: every copy into a reused slot must wait for the kernel reading it.
    The replay's expert outputs are not compared, but a race shows as a CUDA error or a hang."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rep = replay(trace, config("finemoe", 2 * trace.geometry.top_k, max_batch=2), ReplayOptions(device="cuda"))
    assert rep.summary["ondemand_loads"] > 0 and rep.summary["steps"] > 0


def test_comparison_charges_the_policy_time_the_replay_measured():
    from types import SimpleNamespace

    from finemoe.replay.run import with_policy_time
    from finemoe.sim.hardware import PRESETS

    cfg = SimConfig(trace_path="t", policy="finemoe", hardware=PRESETS["rtx3090"])
    replayed = SimpleNamespace(config={"replay": {"device": "cpu", "policy_s": 0.03}}, summary={"layer_steps": 300})
    got = with_policy_time(cfg, replayed)
    assert got.hardware.layer_overhead_s == pytest.approx(1e-4)  # 30 ms over 300 layer-steps
    assert "policy time" in got.hardware.source and cfg.hardware.layer_overhead_s == 0.0
    assert got.policy_params == {"search_charge": "none"}  # its search is in the measured time already
    assert with_policy_time(replace(cfg, policy="lru"), replayed).policy_params == {}
    for replay_info in ({"device": "cpu", "policy_s": 0.0}, {"device": "cuda:0", "policy_s": 0.03}):
        assert with_policy_time(cfg, SimpleNamespace(config={"replay": replay_info}, summary={"layer_steps": 300})) is cfg
    # The copy threads' whole work per copy (not only its cache and policy calls) and the replay's
    # hand-offs are charged too.
    lane = {"device": "cpu", "policy_s": 0.03, "lane_cache_s": 0.01, "lane_work_s": 0.02, "lane_copies": 200,
            "handoff_mean_s": 1.5e-4, "handoffs": 40}
    got = with_policy_time(cfg, SimpleNamespace(config={"replay": lane}, summary={"layer_steps": 300}))
    assert got.hardware.transfer_latency_s == pytest.approx(cfg.hardware.transfer_latency_s + 1e-4)
    assert got.hardware.copy_start_delay_s == pytest.approx(1.5e-4) and "hand-offs" in got.hardware.source
    no_handoffs = with_policy_time(cfg, SimpleNamespace(config={"replay": {**lane, "handoffs": 0}},
                                                        summary={"layer_steps": 300}))
    assert no_handoffs.hardware.copy_start_delay_s == cfg.hardware.copy_start_delay_s


def test_replay_records_the_copy_threads_own_time(trace):
    r = replay(trace, config("lru", slots=10), ReplayOptions())
    info = r.config["replay"]
    assert info["lane_copies"] == r.summary["ondemand_loads"] + r.summary.get("prefetch_started", 0) - info["inline_copies"]
    assert 0 < info["lane_cache_s"] < info["lane_work_s"] < r.summary["makespan_s"]


def test_split_cores_keeps_copy_threads_off_the_compute_core():
    import os
    import threading

    from finemoe.replay.device import copy_thread_started, split_cores

    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("needs two cores")
    seen = {}

    def copy_thread():
        copy_thread_started()
        seen["copy"] = os.sched_getaffinity(0)

    with split_cores("cpu", 1) as copy_cores:
        seen["compute"] = os.sched_getaffinity(0)
        t = threading.Thread(target=copy_thread)
        t.start()
        t.join()
    assert len(seen["compute"]) == 1 and copy_cores == len(before) - 1
    assert seen["copy"] == before - seen["compute"]
    assert os.sched_getaffinity(0) == before  # restored
    with split_cores("cuda", 1) as copy_cores:  # GPU copy engines are hardware: nothing pinned
        assert copy_cores == 0 and os.sched_getaffinity(0) == before


def test_replay_records_the_time_inside_policy_calls(trace):
    r = replay(trace, config("finemoe", slots=10), ReplayOptions())
    assert 0 < r.config["replay"]["policy_s"] < r.summary["makespan_s"]


def test_attention_masks_bucket_the_keys_and_mask_each_row_to_its_context():
    import torch

    from finemoe.replay.compute import KEY_BUCKET, AttentionMasks, attend

    masks = AttentionMasks(256, torch.float32, "cpu")
    assert masks.rows([KEY_BUCKET] * 3) == (KEY_BUCKET, None)
    keys, bias = masks.rows([5, 70])
    assert keys == 2 * KEY_BUCKET and bias.shape == (2, keys)
    assert torch.isinf(bias[0, 5:]).all() and (bias[0, :5] == 0).all() and (bias[1, :70] == 0).all()
    assert torch.isinf(bias[1, 70:]).all()
    keys, bias = masks.rows([150])  # one row: a view, no new tensor
    assert keys == 3 * KEY_BUCKET and bias.shape == (1, keys) and bias.data_ptr() != 0
    assert (bias[0, :150] == 0).all() and torch.isinf(bias[0, 150:]).all()
    assert AttentionMasks(100, torch.float32, "cpu").rows([5, 70])[0] == 100  # capped at the KV cache
    # One batched attention equals each row's own attention over its context.
    gen = torch.Generator().manual_seed(0)
    kv, q = torch.randn(2, 256, 16, generator=gen), torch.randn(3, 16, generator=gen)
    contexts = [3, 90, 150]
    keys, bias = masks.rows(contexts)
    got = attend(q, kv, keys, bias)
    for r, c in enumerate(contexts):
        want = torch.softmax(q[r : r + 1] @ kv[0, :c].T, dim=-1) @ kv[1, :c]
        assert torch.allclose(got[r : r + 1], want, atol=1e-5)
