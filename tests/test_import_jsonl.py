"""`finemoe import`: real Mixtral logs, synthetic logs in every layout, and clear errors on bad logs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError, TraceError
from finemoe.traces.importers import FieldMap, import_jsonl
from finemoe.traces.importers.jsonl import explicit_geometry
from finemoe.traces.io import read_trace, write_trace
from finemoe.traces.profiles import get_profile
from finemoe.traces.stats import routing_stats
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

MIXTRAL = get_profile("mixtral-8x7b").geometry()


# ---------------------------------------------------------------------------------------------
# the real logs


@pytest.fixture(scope="module")
def mixtral_decode(mixtral_logs):
    files = [mixtral_logs / "gsm8k_2_routing.jsonl", mixtral_logs / "humaneval_2_routing.jsonl"]
    return import_jsonl(files, MIXTRAL)


def test_real_decode_logs_give_the_figures_of_the_readme(mixtral_decode):
    trace, report = mixtral_decode
    assert [r.label for r in trace.requests] == ["gsm8k/0", "gsm8k/1", "humaneval/0", "humaneval/1"]
    assert [r.generated_tokens for r in trace.requests] == [168, 79, 83, 255]
    assert not any(r.has_prefill for r in trace.requests)
    g = trace.geometry
    assert (g.num_layers, g.num_experts, g.top_k) == (32, 8, 2)
    assert trace.num_tokens == 585 and set(np.unique(trace.iteration)) == set(range(1, 256))
    # 18,668 records of 585 x 32 possible: 52 absent, all in 8 tokens
    assert report.records_read == 18_668
    assert trace.num_missing == 585 * 32 - 18_668 == 52
    assert int(trace.missing_mask.any(axis=1).sum()) == 8 == report.tokens_with_gaps
    stats = routing_stats(trace)
    assert 2.9 < stats.usage_entropy_bits.mean() < 3.0
    assert stats.usage_entropy_bits.min() > 2.9  # README: 2.91 to 3.00
    assert abs(stats.top1_weight_share - 0.71) < 0.01  # README: 0.71
    # fine-grained routing is far more concentrated than request-level routing
    assert stats.fine_entropy_bits < 1.0 < 2.5 < stats.coarse_entropy_bits


def test_real_records_land_on_the_right_token_and_layer(mixtral_decode, mixtral_logs):
    trace, _ = mixtral_decode
    with open(mixtral_logs / "humaneval_2_routing.jsonl") as fh:
        records = [json.loads(next(fh)) for _ in range(50)]
    for rec in records:
        rid = 2 + rec["problem_id"]  # humaneval requests follow the two gsm8k ones
        row = np.flatnonzero((trace.request_id == rid) & (trace.iteration == rec["token_idx"] + 1))[0]
        order = np.argsort(rec["gating_probs"])[::-1]
        assert list(trace.experts[row, rec["layer"]]) == [rec["experts"][i] for i in order]
        np.testing.assert_allclose(trace.weights[row, rec["layer"]], sorted(rec["gating_probs"], reverse=True), atol=1e-3)


def test_real_prefill_decode_log_splits_at_the_first_engine_step(mixtral_logs):
    trace, report = import_jsonl([mixtral_logs / "humaneval_0_prefill_decode_routing.jsonl"], MIXTRAL)
    (req,) = trace.requests
    assert (req.label, req.prompt_tokens, req.generated_tokens, req.has_prefill) == ("humaneval/0", 135, 84, True)  # 83 decode steps + the prefill's token
    assert report.files[0]["layout"] == "steps"
    assert int((trace.iteration == 0).sum()) == 135 and trace.iteration.max() == 83
    # its decode steps are the decode-only log's tokens of the same problem: routing agrees closely
    dec, _ = import_jsonl([mixtral_logs / "humaneval_2_routing.jsonl"], MIXTRAL)
    a = trace.experts[trace.iteration > 0, :, 0]
    b = dec.experts[dec.request_id == 0, :, 0]
    both = (a >= 0) & (b >= 0)
    assert (a == b)[both].mean() > 0.8


def test_prompt_length_can_come_from_the_prefill_log(mixtral_logs):
    trace, report = import_jsonl(
        [mixtral_logs / "humaneval_2_routing.jsonl"], MIXTRAL,
        prompt_tokens_from=[mixtral_logs / "humaneval_0_prefill_decode_routing.jsonl"],
    )
    assert [(r.label, r.prompt_tokens) for r in trace.requests] == [("humaneval/0", 135), ("humaneval/1", 0)]
    assert trace.metadata["source"]["prompt_tokens_unknown"] == ["humaneval/1"]
    assert trace.position[trace.request_id == 0][0] == 135  # decode token 0 sits after the prompt
    with pytest.raises(ConfigError, match="records no prefill"):
        import_jsonl([mixtral_logs / "humaneval_2_routing.jsonl"], MIXTRAL,
                     prompt_tokens_from=[mixtral_logs / "gsm8k_2_routing.jsonl"])


def test_cli_import_then_info(tmp_path, mixtral_logs):
    out = tmp_path / "mixtral.parquet"
    runner = CliRunner()
    res = runner.invoke(cli, ["import", str(mixtral_logs / "gsm8k_2_routing.jsonl"),
                              str(mixtral_logs / "humaneval_2_routing.jsonl"),
                              "--model-profile", "mixtral-8x7b", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "8 token(s) lack some layer (52 missing" in res.output
    res = runner.invoke(cli, ["trace", "info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["requests"] == 4 and info["generated_tokens_per_request"] == [168, 79, 83, 255]
    assert info["tokens_with_missing_layers"] == 8 and info["missing_records"] == 52
    assert 2.9 < info["routing"]["usage_entropy_bits"]["mean"] < 3.0
    res = runner.invoke(cli, ["trace", "info", str(out)])
    assert res.exit_code == 0 and "52 (token, layer) records missing, in 8 token(s)" in res.output


# ---------------------------------------------------------------------------------------------
# synthetic logs: write a known trace as a log, import it back


def _records(trace, layout: str, fields: FieldMap | None = None):
    """One dict per (token, layer) of a trace, in the given log layout."""
    fields = fields or FieldMap()
    out = []
    for i in range(trace.num_tokens):
        r = trace.request(int(trace.request_id[i]))
        it, pos = int(trace.iteration[i]), int(trace.position[i])
        if layout == "decode":
            if it == 0:
                continue
            tok_field, tok = fields.token_key, it - 1
        elif layout == "positions":
            tok_field, tok = fields.position_key, pos
        else:  # steps
            tok_field, tok = fields.position_key, pos if it == 0 else 0
        for layer in range(trace.geometry.num_layers):
            if trace.experts[i, layer, 0] < 0:
                continue
            ds, pid = r.label.split("/")
            out.append({
                fields.request_key[0]: ds, fields.request_key[1]: int(pid), fields.layer_key: layer,
                tok_field: tok, fields.experts_key: trace.experts[i, layer].tolist(),
                fields.weights_key: trace.weights[i, layer].astype(float).tolist(),
                "iteration": it,
            })
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def known():
    t = synthetic_trace(num_requests=3, prompt_tokens=(3, 6), generated_tokens=(2, 7), with_probs=False,
                        semantic_dim=None, with_spec=False, seed=5)
    t.experts[4, 2] = -1  # a gap
    t.weights[4, 2] = 0
    return t


def _same_routing(a, b):
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.iteration, b.iteration)
    np.testing.assert_array_equal(a.position, b.position)


def test_decode_layout_shuffled_records(tmp_path, known):
    recs = _records(known, "decode")
    np.random.default_rng(0).shuffle(recs)
    trace, report = import_jsonl([_write(tmp_path / "d.jsonl", recs)], known.geometry,
                                 prompt_tokens={r.label: r.prompt_tokens for r in known.requests})
    assert report.files[0]["layout"] == "decode"
    _same_routing(trace, _decode_part(known))
    # without the prefill, one token fewer was produced by the recorded iterations
    assert [r.generated_tokens for r in trace.requests] == [r.generated_tokens - 1 for r in known.requests]


def _decode_part(t):
    mask = t.iteration > 0
    from finemoe.traces.schema import RequestInfo, Trace

    return Trace(t.geometry, tuple(RequestInfo(r.request_id, r.prompt_tokens, r.generated_tokens - 1, False, r.label)
                                   for r in t.requests),
                 t.request_id[mask], t.iteration[mask], t.position[mask], t.experts[mask], t.weights[mask])


def test_positions_layout_needs_and_uses_the_prompt_length(tmp_path, known):
    recs = _records(known, "positions")
    np.random.default_rng(1).shuffle(recs)
    log = _write(tmp_path / "p.jsonl", recs)
    with pytest.raises(ConfigError, match="does not say where the prompt ends"):
        import_jsonl([log], known.geometry, layout="positions")
    prompts = {r.label: r.prompt_tokens for r in known.requests}
    trace, report = import_jsonl([log], known.geometry, layout="positions", prompt_tokens=prompts)
    _same_routing(trace, known)
    assert trace.requests == known.requests
    assert report.missing_records == 1 and report.tokens_with_gaps == 1
    # or from a decode-only log of the same requests
    dec = _write(tmp_path / "d.jsonl", _records(known, "decode"))
    trace2, _ = import_jsonl([log], known.geometry, layout="positions", decode_tokens_from=[dec])
    assert trace2.requests == known.requests


def test_steps_layout_in_write_order(tmp_path, known):
    # a logger that writes the prefill layer by layer, then one record per layer per decode step
    recs = _records(known, "steps")
    recs.sort(key=lambda r: (r["problem_id"], r["iteration"], r["layer"] if r["iteration"] else 0,
                             r["layer"] * 1000 + r["token_pos"]))
    trace, report = import_jsonl([_write(tmp_path / "s.jsonl", recs)], known.geometry)
    assert report.files[0]["layout"] == "steps"
    _same_routing(trace, known)
    assert trace.requests == known.requests


def test_identical_duplicates_are_dropped_conflicting_ones_rejected(tmp_path, known):
    recs = _records(known, "decode")
    trace, report = import_jsonl([_write(tmp_path / "a.jsonl", recs + recs[:3])], known.geometry)
    assert report.duplicate_records_dropped == 3
    bad = dict(recs[0], experts=recs[0]["experts"][::-1], gating_probs=[0.9, 0.1])
    with pytest.raises(TraceError, match="two different records"):
        import_jsonl([_write(tmp_path / "b.jsonl", recs + [bad])], known.geometry)


def test_custom_field_names_and_file_key(tmp_path, known):
    fields = FieldMap(request_key=("task", "n"), token_key="step", layer_key="l", experts_key="ids",
                      weights_key="w")
    recs = _records(known, "decode", fields)
    a = _write(tmp_path / "run-a.jsonl", recs)
    b = _write(tmp_path / "run-b.jsonl", recs)
    with pytest.raises(TraceError, match="also appears in"):
        import_jsonl([a, b], known.geometry, fields=fields)
    both = FieldMap(**{**fields.__dict__, "request_key": ("@file", "task", "n")})
    trace, _ = import_jsonl([a, b], known.geometry, fields=both)
    assert [r.label for r in trace.requests][:2] == ["run-a/synthetic/0", "run-a/synthetic/1"]
    assert len(trace.requests) == 2 * len(known.requests)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("layer"), "lacks field"),
    (lambda r: r.update(experts=[1, 2, 3], gating_probs=[0.5, 0.3, 0.2]), "every record must list the same top-k"),
    (lambda r: r.update(experts=[9, 1]), "names expert 9"),
    (lambda r: r.update(layer=7), "names layer 7"),
    (lambda r: r.update(experts=[1, 1]), "same expert twice"),
    (lambda r: r.update(gating_probs=[-0.5, 0.2]), "negative or non-finite gate weight"),
    (lambda r: r.update(layer="three"), "cannot parse|not valid"),
    (lambda r: r.update(experts=[1, None]), "record 6 has a null value in 'experts'"),
    (lambda r: r.update(experts=3), "cannot parse"),
])
def test_malformed_records_are_clear_errors(tmp_path, known, edit, message):
    recs = _records(known, "decode")
    edit(recs[5])
    with pytest.raises(TraceError, match=message):
        import_jsonl([_write(tmp_path / "bad.jsonl", recs)], known.geometry)


def test_broken_json_names_the_line(tmp_path, known):
    text = "".join(json.dumps(r) + "\n" for r in _records(known, "decode"))
    lines = text.splitlines(keepends=True)
    lines[6] = lines[6][:20] + "\n"
    log = tmp_path / "broken.jsonl"
    log.write_text("".join(lines))
    with pytest.raises(TraceError, match="line 7 is not valid JSON"):
        import_jsonl([log], known.geometry)


def test_cli_errors_are_one_line(tmp_path, known):
    runner = CliRunner()
    log = _write(tmp_path / "d.jsonl", _records(known, "decode"))
    res = runner.invoke(cli, ["import", str(log), "-o", str(tmp_path / "t.parquet")])
    assert res.exit_code == 1 and res.output.startswith("error: routing logs do not say which model")
    res = runner.invoke(cli, ["import", str(tmp_path / "nope.jsonl"), "--model-profile", "mixtral-8x7b",
                              "-o", str(tmp_path / "t.parquet")])
    assert res.exit_code == 1 and "no such routing log" in res.output and "Traceback" not in res.output
    g = known.geometry
    res = runner.invoke(cli, ["import", str(log), "-o", str(tmp_path / "t.parquet"), "--num-layers", str(g.num_layers),
                              "--num-experts", str(g.num_experts), "--top-k", str(g.top_k), "--hidden-size", "64",
                              "--expert-intermediate-size", "128", "--prompt-tokens", "4"])
    assert res.exit_code == 0, res.output
    back = read_trace(tmp_path / "t.parquet")
    assert back.geometry == explicit_geometry(num_layers=g.num_layers, num_experts=g.num_experts, top_k=g.top_k,
                                              hidden_size=64, expert_intermediate_size=128)
    assert all(r.prompt_tokens == 4 for r in back.requests)
    write_trace(back, tmp_path / "again.parquet")  # what import wrote is a valid trace
    assert g == tiny_geometry(g.num_layers, g.num_experts, g.top_k)
