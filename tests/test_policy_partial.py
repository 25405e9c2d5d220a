"""Policies on a log of only some layers: a policy that predicts across layers refuses in one
sentence unless the user takes the logged layers as consecutive (--layers-as-consecutive), and
`--policy all` runs what the trace can serve and lists the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import MissingFieldError
from finemoe.policies.registry import make_policy
from finemoe.policies.support import TraceShape, check_support, unreached_layers
from finemoe.sim.config import SimConfig
from finemoe.sim.hardware import load_hardware
from finemoe.traces.io import read_metadata, write_trace
from finemoe.traces.schema import LAYERS_LOGGED_KEY, MISSING_EXPERT, RequestInfo, Trace
from finemoe.traces.synthetic import tiny_geometry

L, J, K = 8, 8, 2
LOGGED = [0, 2, 4, 6]


def partial_trace(requests: int = 12, prompt: int = 2, decode: int = 6) -> Trace:
    """A top-k-only log of layers 0, 2, 4, 6 of an 8-layer model (the others missing). At the i-th
    logged layer a token routes to (c + i) % J and (c + i + 4) % J, c fixed per token, so the logged
    layer i + 3 is predictable from logged layer i (ProMoE can learn it) while consecutive tokens
    use different experts (LRU at a small cache misses)."""
    rows = [(r, it, pos) for r in range(requests) for it, pos in
            [(0, p) for p in range(prompt)] + [(d + 1, prompt + d) for d in range(decode)]]
    n = len(rows)
    experts = np.full((n, L, K), MISSING_EXPERT, np.int16)
    weights = np.zeros((n, L, K), np.float16)
    for row, (r, _, pos) in enumerate(rows):
        c = (3 * r + 5 * pos) % J
        for i, layer in enumerate(LOGGED):
            experts[row, layer] = ((c + i) % J, (c + i + 4) % J)
            weights[row, layer] = (0.75, 0.25)
    return Trace(
        geometry=tiny_geometry(num_layers=L, num_experts=J, top_k=K),
        requests=tuple(RequestInfo(r, prompt, decode + 1, True, label=f"r/{r}") for r in range(requests)),
        request_id=np.array([r for r, _, _ in rows], np.int32),
        iteration=np.array([it for _, it, _ in rows], np.int32),
        position=np.array([p for _, _, p in rows], np.int32),
        experts=experts, weights=weights,
        metadata={LAYERS_LOGGED_KEY: LOGGED, "source": {"gate": "top-k weights only"}},
    )


@pytest.fixture()
def partial_file(tmp_path):
    return str(write_trace(partial_trace(), tmp_path / "partial.parquet"))


def test_unreached_layers_by_hand():
    shape = TraceShape(8, frozenset(), (0, 2, 4, 6))
    assert unreached_layers(make_policy("promoe"), shape) == [1, 3, 5, 7]  # 0 -> 1..3, 6 -> 7
    assert unreached_layers(make_policy("promoe", distance=1), TraceShape(8, frozenset(), (4, 5, 6, 7))) == []
    assert unreached_layers(make_policy("layerwise"), TraceShape(8, frozenset(), (0, 1, 5))) == [2, 6]
    assert unreached_layers(make_policy("lru"), shape) == []
    assert unreached_layers(make_policy("promoe"), TraceShape(8, frozenset(), tuple(range(8)))) == []
    assert shape.consecutive() == TraceShape(4, frozenset(), (0, 1, 2, 3))


def test_prediction_distance_of_the_builtin_policies():
    assert make_policy("promoe", distance=2).layers_ahead() == 2
    assert make_policy("finemoe-topk", distance=4).layers_ahead() == 4
    assert make_policy("moe-infinity").layers_ahead() == 3
    assert make_policy("layerwise").layers_ahead() == 1
    assert make_policy("mixtral-offloading").layers_ahead() == 1
    for name in ("lru", "lfu", "arc", "oracle", "no-offload"):
        assert make_policy(name).layers_ahead() == 0


def test_shape_from_metadata_matches_the_trace(partial_file):
    trace = partial_trace()
    assert TraceShape.of_metadata(read_metadata(partial_file)) == TraceShape.of_trace(trace)
    assert TraceShape.of_trace(trace).fields == frozenset()


def test_check_support_names_fields_before_layers():
    trace = partial_trace()
    with pytest.raises(MissingFieldError, match="policy finemoe needs trace field.s. router_probs, semantic_key"):
        check_support(make_policy("finemoe"), trace)
    with pytest.raises(MissingFieldError, match=r"predicts 3 layers ahead, into layers this trace lacks "
                                                r"\(it logs 4 of 8 layers: 0, 2, 4, 6; its predictions reach layer 1\)"):
        check_support(make_policy("promoe"), trace)
    check_support(make_policy("promoe"), trace.logged_layers_only())
    check_support(make_policy("lru"), trace)


def _simulate(args):
    return CliRunner().invoke(cli, ["simulate", *args, "--hardware", "h100", "-q", "--jobs", "1"])


def test_promoe_on_a_partial_trace_refuses_in_one_sentence(partial_file, tmp_path):
    res = _simulate([partial_file, "--policy", "promoe", "--expert-cache", "6", "-o", str(tmp_path / "r")])
    assert res.exit_code == 1
    line = res.output.strip()
    assert line.startswith("error: policy promoe predicts 3 layers ahead, into layers this trace lacks")
    assert "--layers-as-consecutive" in line and "\n" not in line and "Traceback" not in res.output
    assert not list((tmp_path / "r").glob("*.parquet"))


def test_promoe_with_layers_as_consecutive_runs_and_differs_from_lru(partial_file, tmp_path):
    res = _simulate([partial_file, "--policy", "promoe,lru", "--expert-cache", "6", "--layers-as-consecutive",
                     "--history-fraction", "0.5", "--json", "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    rows = {r["policy"]: r for r in json.loads(res.stdout)}
    assert rows["promoe"]["layers_as_consecutive"] is True
    assert rows["promoe"]["geometry.num_layers"] == 4 and rows["promoe"]["memory_plan.expert_cache_slots"] == 6
    assert rows["promoe"]["hit_rate"] > rows["lru"]["hit_rate"]  # it predicts what LRU cannot


def test_policy_all_on_a_topk_partial_trace_runs_what_it_can(partial_file, tmp_path):
    res = _simulate([partial_file, "--policy", "all", "--expert-cache", str(L * J), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    skipped = {line.split(":")[0].removeprefix("skipped "): line for line in res.stderr.splitlines()
               if line.startswith("skipped ")}
    assert "needs trace field(s) router_probs, semantic_key" in skipped["finemoe"]
    assert "spec_experts" in skipped["mixtral-offloading"]
    for name in ("promoe", "moe-infinity", "layerwise", "prev-token", "finemoe-topk"):
        assert "into layers this trace lacks" in skipped[name]
    ran = {p.name.split("-")[0] for p in (tmp_path / "r").glob("*.parquet")}
    assert {"lru", "lfu", "arc", "oracle"} <= ran and "promoe" not in ran
    assert f"{len(skipped)} policies the trace cannot serve skipped" in res.stderr


def test_a_sweep_with_nothing_the_trace_can_serve_is_one_error(partial_file):
    from finemoe.sim.sweep import supported_configs

    configs = [SimConfig(trace_path=partial_file, policy=p, hardware=load_hardware("h100"))
               for p in ("promoe", "layerwise", "finemoe")]
    with pytest.raises(MissingFieldError, match="no policy can run on this trace: promoe predicts 3 layers"):
        supported_configs(configs)
    kept, skipped = supported_configs(configs + [SimConfig(trace_path=partial_file, policy="lru",
                                                           hardware=load_hardware("h100"))])
    assert [c.policy for c in kept] == ["lru"] and [name for name, _ in skipped] == ["promoe", "layerwise", "finemoe"]
    with pytest.raises(MissingFieldError, match="^policy layerwise predicts 1 layer ahead"):
        supported_configs(configs, explicit={"layerwise"})


def test_layers_as_consecutive_leaves_other_keys_alone():
    plain = SimConfig(trace_path="t", policy="lru", hardware=load_hardware("h100"))
    assert "layers_as_consecutive" not in plain.to_dict()
    packed = SimConfig(trace_path="t", policy="lru", hardware=load_hardware("h100"), layers_as_consecutive=True)
    assert packed.to_dict()["layers_as_consecutive"] is True and packed.key() != plain.key()


def test_predict_refuses_then_scores_with_the_flag(partial_file):
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", partial_file, "--policy", "promoe"])
    assert res.exit_code == 1 and "into layers this trace lacks" in res.output
    res = runner.invoke(cli, ["predict", partial_file, "--policy", "promoe", "--layers-as-consecutive",
                              "--history-fraction", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)[0]
    assert report["totals"]["precision"] > 0.5
    res = runner.invoke(cli, ["predict", partial_file, "--policy", "all"])
    assert res.exit_code == 0, res.output
    assert "skipping promoe: predicts 3 layers ahead" in res.stderr


def test_replay_refuses_a_cross_layer_policy_on_a_partial_trace(partial_file, tmp_path):
    res = CliRunner().invoke(cli, ["replay", partial_file, "--policy", "layerwise", "--expert-cache", "6",
                                   "--hardware", "h100", "-q", "-o", str(tmp_path / "rp")])
    assert res.exit_code == 1
    assert res.output.startswith("error: policy layerwise predicts 1 layer ahead, into layers this trace lacks")
