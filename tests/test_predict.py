"""`finemoe predict` and its library: scoring predictions per layer without timing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError, MissingFieldError
from finemoe.policies.base import Policy, Prefetch
from finemoe.sim.predict import evaluate_predictions, score_policy, split_request_ids
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace


class NextLayerAll(Policy):
    """Predicts every expert of the next layer, plus junk the scorer must ignore."""

    name = "test-next-layer-all"

    def on_layer_routed(self, routing):
        g = self.ctx.geometry
        out = []
        if routing.layer + 1 < g.num_layers:
            out += [Prefetch(1.0, routing.step.step, routing.layer + 1, e) for e in range(g.num_experts)]
        out.append(Prefetch(1.0, routing.step.step + 5, 0, 0))  # another step: not a prediction here
        out.append(Prefetch(1.0, routing.step.step, routing.layer, 0))  # this layer: already routed
        return out

    def choose_victim(self, evictable, for_prefetch, now_s):
        return None


def test_scores_count_distinct_routed_experts_per_step_and_layer(small_trace):
    ids = [r.request_id for r in small_trace.requests]
    report = score_policy(NextLayerAll(), small_trace, [], ids)
    g = small_trace.geometry
    per = report.per_layer.set_index("layer")
    steps = len(small_trace.iterations)
    routed = [sum(len(set(small_trace.experts[it.start:it.stop, layer].ravel().tolist()))
                  for it in small_trace.iterations) for layer in range(g.num_layers)]
    assert per["routed"].tolist() == routed
    assert per["steps"].tolist() == [steps] * g.num_layers
    assert per.loc[0, "predicted"] == 0 and np.isnan(per.loc[0, "precision"]) and per.loc[0, "recall"] == 0
    for layer in range(1, g.num_layers):
        assert per.loc[layer, "predicted"] == steps * g.num_experts
        assert per.loc[layer, "recall"] == 1.0
        assert per.loc[layer, "precision"] == pytest.approx(routed[layer] / (steps * g.num_experts))
    assert report.totals["correct"] == sum(routed[1:])


def test_split_matches_the_simulator_and_is_disjoint():
    trace = synthetic_trace(num_requests=10, seed=1)
    hist, meas = split_request_ids(trace, 0.7, seed=3)
    assert len(hist) == 7 and len(meas) == 3 and not set(hist) & set(meas)
    assert split_request_ids(trace, 0.7, seed=3) == (hist, meas)
    report = evaluate_predictions(trace, "moe-infinity", seed=3)
    assert report.config["measured_requests"] == meas and report.config["history_requests"] == hist
    online = evaluate_predictions(trace, "moe-infinity", online=True)
    assert online.config["history_requests"] == [] and len(online.config["measured_requests"]) == 10


def test_missing_fields_and_oracles_are_refused():
    bare = synthetic_trace(with_probs=False, semantic_dim=None, with_spec=False)
    with pytest.raises(MissingFieldError, match="router_probs, semantic_key"):
        evaluate_predictions(bare, "finemoe")
    assert evaluate_predictions(bare, "finemoe-topk").totals["steps"] > 0

    class Cheat(NextLayerAll):
        name = "test-cheat"
        is_oracle = True

    with pytest.raises(ConfigError, match="oracle"):
        score_policy(Cheat(), bare, [], [0])


def test_report_is_deterministic(small_trace):
    a = evaluate_predictions(small_trace, "promoe", seed=1)
    b = evaluate_predictions(small_trace, "promoe", seed=1)
    assert a.per_layer.equals(b.per_layer)


@pytest.fixture
def trace_file(tmp_path):
    return str(write_trace(synthetic_trace(num_requests=8, seed=5), tmp_path / "t.parquet"))


def test_cli_json_and_parquet(trace_file, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["predict", trace_file, "--policy", "finemoe,moe-infinity", "--json",
                              "--policy-param", "finemoe.distance=2"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [d["policy"] for d in data] == ["finemoe", "moe-infinity"]
    assert data[0]["config"]["policy"]["params"]["distance"] == 2
    assert 0 <= data[0]["totals"]["precision"] <= 1 and len(data[0]["per_layer"]) == 4
    out = tmp_path / "p.parquet"
    res = runner.invoke(cli, ["predict", trace_file, "--policy", "promoe", "-o", str(out), "--per-layer"])
    assert res.exit_code == 0, res.output
    assert "precision" in res.output and "promoe" in res.output
    table = pq.read_table(out)
    assert table.num_rows == 4 and set(table.column("policy").to_pylist()) == {"promoe"}
    meta = json.loads(table.schema.metadata[b"finemoe_predict"])
    assert meta[0]["config"]["policy"]["stats"]["train_s"] >= 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "nonsense"], "unknown policy 'nonsense'"),
        (["--policy", "finemoe", "--policy-param", "finemoe.distance=2,3"], "one value"),
        (["--policy", "finemoe", "--policy-param", "promoe.epochs=3"], "not among those scored"),
        (["--policy", "finemoe", "--policy-param", "finemoe.bogus=3"], "bogus"),
        (["--policy", "finemoe", "-o", "x.txt"], ".parquet or .json"),
    ],
)
def test_cli_errors_are_one_sentence(trace_file, args, message):
    res = CliRunner().invoke(cli, ["predict", trace_file, *args])
    assert res.exit_code == 1 and "error:" in res.output and message in res.output
    assert "Traceback" not in res.output


def test_cli_missing_trace_and_missing_field(tmp_path):
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "nope.parquet")])
    assert res.exit_code == 1 and "error:" in res.output
    bare = write_trace(synthetic_trace(with_probs=False, semantic_dim=None, with_spec=False), tmp_path / "b.parquet")
    res = CliRunner().invoke(cli, ["predict", str(bare), "--policy", "mixtral-offloading"])
    assert res.exit_code == 1 and "spec_experts" in res.output
    res = CliRunner().invoke(cli, ["predict", str(bare)])  # 'all' skips what the trace cannot serve
    assert res.exit_code == 0 and "skipping mixtral-offloading: trace lacks spec_experts" in res.output


@pytest.mark.shared
@pytest.mark.slow
def test_real_mixtral_logs(mixtral_trace_path):
    """The imported Mixtral logs carry top-2 ids and weights only: FineMoE proper and the speculative
    baseline refuse them by name; the degraded FineMoE predicts better than chance (2 of 8)."""
    from finemoe.traces.io import read_trace

    trace = read_trace(mixtral_trace_path)
    with pytest.raises(MissingFieldError, match="router_probs"):
        evaluate_predictions(trace, "finemoe")
    with pytest.raises(MissingFieldError, match="spec_experts"):
        evaluate_predictions(trace, "mixtral-offloading")
    report = evaluate_predictions(trace, "finemoe-topk", seed=2)  # measures gsm8k/1 (79 tokens)
    assert report.config["policy"]["params"]["maps_from"] == "topk"
    assert report.totals["precision"] > 0.3 and report.totals["recall"] > 0.3
