"""Routing logs of real serving engines, as they are: meta headers, record types, batched engine steps,
warm-up passes, partial layers, the route_trace v1 CSV with the engine's own cache hits, --inspect."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import TraceError
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import load_hardware
from finemoe.sim.run import simulate
from finemoe.traces.importers import import_jsonl
from finemoe.traces.importers.batched import map_batched
from finemoe.traces.io import read_trace
from finemoe.traces.synthetic import tiny_geometry

G = tiny_geometry(num_layers=4, num_experts=8, top_k=2)


def _route(layer, row, experts, weights=(0.7, 0.3), req="engine"):
    return {"type": "route", "req_id": req, "token_idx": row, "layer": layer, "topk_ids": list(experts),
            "topk_weights": list(weights)}


def _expert(seq, pos, layer):
    """Deterministic routing per (sequence, position, layer) so the import can be checked exactly."""
    a = (3 * seq + 5 * pos + layer) % G.num_experts
    return a, (a + 1 + seq) % G.num_experts if (a + 1 + seq) % G.num_experts != a else (a + 2) % G.num_experts


def _batched_log(prompts, decodes, layers, warmup_rows=0, uniform_steps=0):
    """Records of a batched engine: warm-up steps, a prefill of all prompts, then decode steps with
    sequences leaving after their decode count (layer-major within a step)."""
    recs = []
    if warmup_rows:
        for layer in layers:
            recs += [_route(layer, r, (0, 1)) for r in range(warmup_rows)]
    for _ in range(uniform_steps):
        for layer in layers:
            recs += [_route(layer, r, (2, 3), (0.5, 0.5)) for r in range(2)]
    # prefill: prompts back to back
    rows = [(q, p) for q, n in enumerate(prompts) for p in range(n)]
    steps = [rows]
    done = [0] * len(prompts)
    while True:
        running = [q for q in range(len(prompts)) if done[q] < decodes[q]]
        if not running:
            break
        steps.append([(q, prompts[q] + done[q]) for q in running])
        for q in running:
            done[q] += 1
    for step in steps:
        for layer in layers:
            recs += [_route(layer, r, _expert(q, p, layer)) for r, (q, p) in enumerate(step)]
    return recs


def _write(path, records, meta=None):
    lines = ([json.dumps({"type": "meta", **meta})] if meta else []) + [json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


ARGS = ["--request-key", "req_id", "--experts-key", "topk_ids", "--weights-key", "topk_weights",
        "--num-layers", "4", "--num-experts", "8", "--top-k", "2", "--hidden-size", "16",
        "--expert-intermediate-size", "32"]


def test_batched_log_with_meta_warmup_and_partial_layers_imports_from_flags(tmp_path):
    prompts, decodes, layers = [3, 2, 4], [2, 4, 1], [0, 2]
    log = _write(tmp_path / "qwen.jsonl", _batched_log(prompts, decodes, layers, warmup_rows=40, uniform_steps=2),
                 meta={"model_id": "x", "top_k": 2, "layers_logged": layers})
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(cli, ["import", str(log), *ARGS, "--where", "type=route", "--layout", "batched",
                                   "--prompt-tokens", "3,2,4", "--generated-tokens", "2,4,1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 warm-up step(s) dropped" in res.output and "layers logged: 2 (0, 2)" in res.output
    t = read_trace(out)
    assert [(r.prompt_tokens, r.generated_tokens, r.has_prefill) for r in t.requests] == [(3, 3, True), (2, 5, True), (4, 2, True)]
    assert t.logged_layers == (0, 2) and t.is_partial
    for i in range(t.num_tokens):
        q, pos = int(t.request_id[i]), int(t.position[i])
        for layer in range(4):
            if layer in layers:
                assert sorted(t.experts[i, layer].tolist()) == sorted(_expert(q, pos, layer))
            else:
                assert (t.experts[i, layer] == -1).all()
    # unlogged layers are not counted as gaps, by the importer nor by `trace info`
    assert t.metadata["source"]["missing_records"] == 0
    info = CliRunner().invoke(cli, ["trace", "info", str(out)])
    assert info.exit_code == 0, info.output
    assert "layers       2 of 4 logged (0, 2)" in info.output
    assert "gaps         0 (token, layer) records missing in the logged layers" in info.output


def test_the_naive_import_fails_with_a_hint_to_batched(tmp_path):
    log = _write(tmp_path / "b.jsonl", _batched_log([2, 2], [3, 3], [0, 1]))
    with pytest.raises(TraceError, match="layout batched"):
        from finemoe.traces.importers.jsonl import FieldMap

        import_jsonl([log], G, fields=FieldMap(request_key=("req_id",), experts_key="topk_ids",
                                               weights_key="topk_weights"))


def test_meta_header_without_where_is_skipped_and_checked(tmp_path):
    from finemoe.errors import ConfigError
    from finemoe.traces.importers.jsonl import FieldMap

    recs = [{"req": 0, "layer": layer, "token_idx": t, "experts": [1, 2], "gating_probs": [0.6, 0.4]}
            for t in range(3) for layer in range(4)]
    log = _write(tmp_path / "m.jsonl", recs, meta={"top_k": 2, "num_experts": 8})
    trace, report = import_jsonl([log], G, fields=FieldMap(request_key=("req",)))
    assert trace.num_tokens == 3 and report.files[0]["header"] == {"top_k": 2, "num_experts": 8}
    bad = _write(tmp_path / "m2.jsonl", recs, meta={"top_k": 4})
    with pytest.raises(ConfigError, match="header says top_k=4"):
        import_jsonl([bad], G, fields=FieldMap(request_key=("req",)))


def test_batched_rules_are_checked():
    layer = np.array([0, 0, 0, 0, 0])
    row = np.array([0, 1, 2, 0, 1])  # prefill of 3 rows, then a decode step of 2 rows
    w = np.tile([0.7, 0.3], (5, 1))
    m = map_batched(layer, row, w, [2, 1], [1, 1])
    assert m.sequence.tolist() == [0, 0, 1, 0, 1] and m.position.tolist() == [0, 1, 0, 2, 1]
    with pytest.raises(TraceError, match="which sequences ended is not in the log"):
        map_batched(np.zeros(6, int), np.array([0, 1, 2, 0, 1, 0]), np.tile([0.7, 0.3], (6, 1)), [2, 1])
    with pytest.raises(TraceError, match="not the prompts of the next sequences"):
        map_batched(layer, row, w, [2, 2])
    # a new prompt admitted later goes after the running sequences' decode rows
    m = map_batched(np.zeros(5, int), np.array([0, 1, 0, 1, 2]), np.tile([0.7, 0.3], (5, 1)), [2, 2])
    assert m.sequence.tolist() == [0, 0, 0, 1, 1] and m.position.tolist() == [0, 1, 2, 0, 1]
    # --skip-steps drops exactly that many leading steps
    m = map_batched(np.zeros(6, int), np.array([0, 0, 1, 2, 0, 0]), np.tile([0.7, 0.3], (6, 1)), [3],
                    skip_steps=1, detect_warmup=False)
    assert m.warmup_steps == 1 and m.sequence.tolist() == [0, 0, 0, 0, 0]


def _plain_lru(trace, slots):
    """A plain LRU count over the trace's (layer, expert) accesses: one per distinct expert per
    (iteration, layer), in row order."""
    cache, hits, n = OrderedDict(), 0, 0
    for it in trace.iterations:
        for layer in range(trace.geometry.num_layers):
            ids = trace.experts[it.start:it.stop, layer].reshape(-1)
            for e in sorted(set(ids[ids >= 0].tolist())):
                n += 1
                if (layer, e) in cache:
                    hits += 1
                    cache.move_to_end((layer, e))
                else:
                    cache[(layer, e)] = True
                    if len(cache) > slots:
                        cache.popitem(last=False)
    return hits / n


@pytest.mark.parametrize("slots", [3, 6, 12])
def test_lru_on_an_imported_batched_log_matches_a_plain_count(tmp_path, slots):
    from finemoe.traces.importers.jsonl import FieldMap

    log = _write(tmp_path / "b.jsonl", _batched_log([3, 2], [5, 3], [0, 1, 3], warmup_rows=30))
    fields = FieldMap(request_key=("req_id",), experts_key="topk_ids", weights_key="topk_weights")
    trace, _ = import_jsonl([log], G, fields=fields, layout="batched", prompt_tokens=[3, 2],
                            generated_tokens=[5, 3])
    one = trace.select_requests([0])  # one request: no batching between requests in the simulator
    config = SimConfig(trace_path="", policy="lru", hardware=load_hardware("h100"),
                       memory=MemoryConfig(expert_cache_slots=slots),
                       workload=WorkloadConfig(online=True, history_fraction=0.0))
    got = simulate(one, config).summary["hit_rate"]
    assert got == pytest.approx(_plain_lru(one, slots), abs=1e-12)


def test_inspect_shows_fields_and_layout(tmp_path):
    log = _write(tmp_path / "b.jsonl", _batched_log([2, 2], [3, 3], [0, 1]), meta={"top_k": 2})
    res = CliRunner().invoke(cli, ["import", "--inspect", str(log), "--experts-key", "topk_ids"])
    assert res.exit_code == 0, res.output
    assert "header (1 meta record(s))" in res.output and "fields found:" in res.output
    assert "experts     topk_ids: found" in res.output and "weights     gating_probs: NOT found" in res.output
    assert "layout: batched" in res.output and "record types: route" in res.output


# ---------------------------------------------------------------------------------------------
# route_trace v1 (a mobile llama.cpp-derived engine)

ROUTE_HEADER = """# route_trace v1
# model=/x.gguf arch=qwen3moe n_layer=2 n_expert=4 n_expert_used=2
# layer=0 expert_bytes=100 dense_bytes=10
# layer=1 expert_bytes=300 dense_bytes=10
turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
"""


def test_route_trace_small_file(tmp_path):
    rows = []
    for step, phase in ((0, 0), (1, 0), (2, 1), (3, 1)):
        for layer in range(2):
            for slot, (e, w) in enumerate(((step % 4, 0.4), ((step + 1) % 4, 0.6))):
                rows.append(f"0,{phase},{step},{layer},{slot},{e},{w},{int(phase == 1 and slot == 0)},0")
    f = tmp_path / "r.csv"
    f.write_text(ROUTE_HEADER + "\n".join(rows) + "\n")
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(cli, ["import", str(f), "--hidden-size", "8", "--expert-intermediate-size", "4",
                                   "--engine-cache", "1K", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "decode 4 of 8 accesses" in res.output and "simulator's lru at 5 slots" in res.output
    t = read_trace(out)
    (r,) = t.requests
    assert (r.prompt_tokens, r.generated_tokens, r.has_prefill) == (2, 3, True)
    assert t.geometry.bytes_per_expert == 200 and t.geometry.top_k == 2
    # experts reordered by descending weight, residency with them
    from finemoe.traces.importers.route_trace import engine_residency

    assert t.experts[2, 0].tolist() == [3, 2]
    assert engine_residency(t)[2, 0].tolist() == [False, True]
    bad = tmp_path / "bad.csv"
    bad.write_text(ROUTE_HEADER + "0,0,0,5,0,1,0.5,0,0\n")
    res = CliRunner().invoke(cli, ["import", str(bad), "--hidden-size", "8", "--expert-intermediate-size", "4",
                                   "-o", str(tmp_path / "b.parquet")])
    assert res.exit_code == 1 and "line 6 names a layer outside 0..1" in res.output
    assert not (tmp_path / "b.parquet").exists()


def test_real_route_trace_engine_lru_beside_the_simulator(shared_dir, tmp_path):
    f = shared_dir / "traces" / "qwen3-30b-a3b-route" / "qwen3-30b-a3b.route.csv"
    if not f.is_file():
        pytest.skip(f"route_trace file not found at {f}")
    from finemoe.sim.engine_check import check_engine_cache
    from finemoe.traces.importers.route_trace import import_route_trace

    t = import_route_trace(f, hidden_size=2048, expert_intermediate_size=768, engine_cache_bytes=4000 * 2**20)
    (r,) = t.requests
    assert (r.prompt_tokens, t.num_tokens, t.num_missing, t.geometry.top_k) == (28, 156, 27, 6)
    check = check_engine_cache(t)
    assert (check.engine_decode_hits, check.engine_decode_accesses) == (29_597, 36_864)
    assert check.sim_decode_accesses == check.engine_decode_accesses
    # the simulator's LRU at the engine's size, in slots of the mean expert, within half a point
    assert abs(check.sim_hit_rate - check.engine_hit_rate) < 0.005


def test_logged_layers_taken_as_consecutive(tmp_path):
    from finemoe.traces.importers.jsonl import FieldMap

    log = _write(tmp_path / "b.jsonl", _batched_log([2], [2], [0, 3]), meta={"layers_logged": [0, 3]})
    fields = FieldMap(request_key=("req_id",), experts_key="topk_ids", weights_key="topk_weights")
    trace, _ = import_jsonl([log], G, fields=fields, layout="batched", prompt_tokens=[2], generated_tokens=[2])
    packed = trace.logged_layers_only()
    assert packed.geometry.num_layers == 2 and not packed.is_partial
    np.testing.assert_array_equal(packed.experts, trace.experts[:, [0, 3]])
    assert packed.metadata["layers_as_consecutive"] == [0, 3] and packed.num_missing == 0
