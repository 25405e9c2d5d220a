"""The simulate entry point: recorded configuration, split, projection, errors, result files."""

from __future__ import annotations

import numpy as np
import pytest

from finemoe import __version__
from finemoe.errors import ConfigError, MissingFieldError
from finemoe.policies.base import Policy
from finemoe.policies.registry import POLICIES
from finemoe.results import TIMELINE_FIELDS, read_result
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import run_config, simulate
from finemoe.traces.io import write_trace
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


class NeedsSpec(Policy):
    name = "test-needs-spec"
    needs = ("spec_experts",)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return None


class Learner(Policy):
    """Records what it learns from, to check the history/online protocol."""

    name = "test-learner"
    uses_history = True
    seen: dict = {}

    def fit(self, history):
        Learner.seen["fit"] = sorted(r.request_id for r in history.requests)

    def on_request_finished(self, request_id, trace):
        Learner.seen.setdefault("finished", []).append(request_id)

    def choose_victim(self, evictable, for_prefetch, now_s):
        return None if for_prefetch else next((k for k in sorted(self._res) if evictable(k)), None)

    def bind(self, ctx):
        super().bind(ctx)
        self._res = set()

    def on_loaded(self, key, now_s):
        self._res.add(key)

    def on_evicted(self, key, now_s):
        self._res.discard(key)


@pytest.fixture(autouse=True)
def test_policies():
    """Register this file's policies for its tests only, so `--policy all` elsewhere never sees them."""
    added = {c.name: c for c in (NeedsSpec, Learner)}
    POLICIES.update(added)
    yield
    for name in added:
        POLICIES.pop(name, None)


def cfg(policy="lru", slots=12, **workload):
    return SimConfig("synthetic.parquet", policy, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                     workload=WorkloadConfig(**workload), seed=3, timeline_steps=2)


def test_result_records_everything_the_run_depended_on():
    t = synthetic_trace(num_requests=6, seed=1)
    r = simulate(t, cfg())
    c = r.config
    assert c["engine"] == "sim" and c["trace_hash"] == t.content_hash() and c["finemoe_version"] == __version__
    assert c["policy"] == "lru" and c["policy_info"]["name"] == "lru" and c["seed"] == 3
    assert c["memory_plan"]["expert_cache_slots"] == 12 and c["memory_plan"]["bytes_per_expert"] == t.geometry.bytes_per_expert
    assert set(c["split"]["measure"]) == set(r.requests["request_id"]) and len(c["split"]["history"]) == 4
    assert c["hardware"]["name"] == "rtx3090" and c["workload"]["max_batch"] == 1
    s = r.summary
    for key in ("hit_rate", "hits", "misses", "ondemand_loads", "stall_s", "bytes_h2d", "prefetch_issued",
                "prefetch_in_time", "prefetch_late", "prefetch_unused_evicted", "prefetch_dropped",
                "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "e2e_p99_s", "layer_steps", "wall_s"):
        assert key in s
    assert s["hits"] + s["misses"] > 0 and len(r.per_layer_hit_rate) == t.geometry.num_layers
    assert r.timeline and set(r.timeline[0]) == set(TIMELINE_FIELDS)
    assert {e["step"] for e in r.timeline} <= {0, 1}
    assert (r.requests["ttft_s"] > 0).all() and (r.requests["e2e_s"] >= r.requests["ttft_s"]).all()


def test_same_seed_same_result_and_a_result_file_round_trips(tmp_path):
    t = synthetic_trace(num_requests=6, seed=2)
    a, b = simulate(t, cfg("layerwise")), simulate(t, cfg("layerwise"))
    strip = lambda s: {k: v for k, v in s.items() if "wall" not in k}  # noqa: E731
    assert strip(a.summary) == strip(b.summary) and a.requests.equals(b.requests) and a.timeline == b.timeline
    back = read_result(a.write(tmp_path / "r.parquet"))
    assert back.config["trace_hash"] == a.config["trace_hash"] and back.summary["hits"] == a.summary["hits"]


def test_policy_needing_an_absent_field_names_both():
    t = synthetic_trace(num_requests=2, with_spec=False)
    with pytest.raises(MissingFieldError, match="test-needs-spec.*spec_experts"):
        simulate(t, cfg("test-needs-spec"))


def test_history_is_fitted_offline_and_online_learns_as_requests_finish():
    t = synthetic_trace(num_requests=5, seed=0, generated_tokens=3, prompt_tokens=3)
    Learner.seen.clear()
    r = simulate(t, cfg("test-learner", history_fraction=0.6))
    assert Learner.seen["fit"] == r.config["split"]["history"] and "finished" not in Learner.seen
    Learner.seen.clear()
    r = simulate(t, cfg("test-learner", online=True))
    assert "fit" not in Learner.seen and sorted(Learner.seen["finished"]) == [0, 1, 2, 3, 4]
    assert r.config["split"]["history"] == []


def test_run_config_reads_the_trace_and_projects_onto_a_profile(tmp_path):
    mixtral = get_profile("mixtral-8x7b").geometry()
    small = tiny_geometry(num_layers=32, num_experts=8, top_k=2)
    t = synthetic_trace(small, num_requests=3, generated_tokens=4, prompt_tokens=3)
    path = write_trace(t, tmp_path / "t.parquet")
    base = SimConfig(str(path), "lru", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=64))
    own = run_config(base)
    projected = run_config(SimConfig(str(path), "lru", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=64),
                                     model_profile="mixtral-8x7b"))
    assert own.config["geometry"]["model_name"] == small.model_name
    assert projected.config["geometry"]["bytes_per_expert"] == mixtral.bytes_per_expert
    assert projected.summary["hits"] == own.summary["hits"]  # same routing, same cache decisions
    assert projected.summary["e2e_mean_s"] > 100 * own.summary["e2e_mean_s"]  # 352 MB experts vs 98 KB
    with pytest.raises(ConfigError, match="cannot project"):
        run_config(SimConfig(str(path), "lru", PRESETS["rtx3090"], model_profile="qwen1.5-moe-a2.7b"))


def test_budget_from_gpu_memory_and_percentiles_are_ordered():
    t = synthetic_trace(num_requests=8, seed=6)
    g = t.geometry
    need = g.dense_bytes + 512 * 2**20 + 10 * g.bytes_per_expert + 100 * g.kv_bytes_per_token
    c = SimConfig("x", "lru", PRESETS["rtx3090"], memory=MemoryConfig(gpu_mem_bytes=need, kv_tokens=100))
    r = simulate(t, c)
    assert r.config["memory_plan"]["expert_cache_slots"] == 10
    s = r.summary
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"] and np.isfinite(s["tpot_p50_s"])
