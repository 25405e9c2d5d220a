"""The serving engines' and trainers' own routing formats, each written here from its documentation
(vLLM's returned routed experts, SGLang's per-token recorder dump, llama.cpp's moe-trace CSV,
Megatron-LM's router trace), imported through the CLI with flags only, checked token by token
against the routing the fixture was made from, and LRU on the result against a plain count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_import_engine_logs import _plain_lru

from finemoe.cli.main import cli
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import load_hardware
from finemoe.sim.run import simulate
from finemoe.traces.importers.assemble import NO_GATE
from finemoe.traces.importers.formats import detect
from finemoe.traces.io import read_trace

L, J, K = 4, 8, 2
SIZES = ["--num-layers", str(L), "--num-experts", str(J), "--top-k", str(K), "--hidden-size", "16",
         "--expert-intermediate-size", "32"]


def route(seq: int, pos: int, layer: int) -> list[int]:
    """The fixture's routing: two distinct experts per (sequence, position, layer), rank order."""
    a = (3 * seq + 5 * (pos % 3) + 2 * layer) % J  # repeats every 3 positions: LRU hits
    return [a, (a + 1 + seq % 3) % J]


def truth(seq: int, tokens: int, layers=range(L)) -> np.ndarray:
    out = np.full((tokens, L, K), -1, np.int64)
    for p in range(tokens):
        for layer in layers:
            out[p, layer] = route(seq, p, layer)
    return out


def _import(tmp_path, logs, *extra):
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(cli, ["import", *map(str, logs), *SIZES, *extra, "-o", str(out)])
    assert res.exit_code == 0, res.output
    return read_trace(out), res.output


def _requests(trace):
    return [(r.prompt_tokens, r.generated_tokens - 1) for r in trace.requests]


def _rows(trace, rid):
    return trace.experts[trace.request_id == rid].astype(np.int64)


def _lru_matches_plain_count(trace, slots=10):
    """slots above one layer's experts: within a prefill layer the plain count's order is not the engine's."""
    one = trace.select_requests([trace.requests[0].request_id])
    config = SimConfig(trace_path="", policy="lru", hardware=load_hardware("h100"),
                       memory=MemoryConfig(expert_cache_slots=slots),
                       workload=WorkloadConfig(online=True, history_fraction=0.0))
    assert simulate(one, config).summary["hit_rate"] == pytest.approx(_plain_lru(one, slots), abs=1e-12)


def _error(tmp_path, logs, *extra):
    res = CliRunner().invoke(cli, ["import", *map(str, logs), *SIZES, *extra, "-o", str(tmp_path / "bad.parquet")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "bad.parquet").exists()
    return res.output


# --- vLLM: prompt_routed_experts [prompt, layers, k] and per choice routed_experts [gen, layers, k] ---

def vllm_response(seq, prompt, gens, rid):
    return {"id": rid, "prompt_routed_experts": truth(seq, prompt)[:prompt].tolist(),
            "choices": [{"index": i, "routed_experts": truth(seq, prompt + g)[prompt:].tolist()}
                        for i, g in enumerate(gens)]}


def test_vllm_routed_experts_json_and_npz(tmp_path):
    log = tmp_path / "resp.json"
    log.write_text(json.dumps([vllm_response(0, 3, [4], "a"), vllm_response(1, 2, [5, 2], "b")]))
    npz = tmp_path / "one.npz"
    np.savez(npz, prompt_routed_experts=truth(2, 4)[:4], routed_experts=truth(2, 7)[4:])
    assert detect(log) == "vllm-routed" and detect(npz) == "vllm-routed"
    trace, out = _import(tmp_path, [log, npz])  # --format auto
    assert "vLLM returned routed experts" in out and "gate weights" in out
    assert _requests(trace) == [(3, 4), (2, 5), (2, 2), (4, 3)]
    np.testing.assert_array_equal(_rows(trace, 0), truth(0, 7))
    # the second choice of response b shares its prompt: its generated rows follow the same prompt
    np.testing.assert_array_equal(_rows(trace, 2)[:2], truth(1, 2)[:2])
    np.testing.assert_array_equal(_rows(trace, 3), truth(2, 7))
    assert trace.metadata["source"]["gate"] == NO_GATE and trace.router_probs is None
    assert np.all(trace.weights == np.float16(0.5))
    assert [r.label for r in trace.requests][:2] == ["resp/a", "resp/b/0"]
    _lru_matches_plain_count(trace)


def test_vllm_wrong_geometry_is_one_sentence(tmp_path):
    log = tmp_path / "resp.json"
    resp = vllm_response(0, 3, [2], "a")
    resp["prompt_routed_experts"] = [row[:3] for row in resp["prompt_routed_experts"]]  # 3 of 4 layers
    log.write_text(json.dumps(resp))
    assert "holds 3 layers x top-2, but the model has 4 layers x top-2" in _error(tmp_path, [log])


# --- SGLang per_token: records of forward passes, topk_ids_of_layer [layers, tokens, 8] physical ids ---

def sglang_dump(prompts, decodes, permute=None):
    """Forward passes as SGLang's scheduler runs them: one extend pass per admitted group, then
    decode passes over the running sequences (admission order), each leaving after its decodes."""
    records, fid = [], 0

    def topk(rows):  # [layers, tokens, 8], -1 past top-k, physical ids through `permute`
        ids = np.full((L, len(rows), 8), -1, np.int64)
        for t, (q, p) in enumerate(rows):
            for layer in range(L):
                logical = route(q, p, layer)
                ids[layer, t, :K] = [int(np.flatnonzero(permute[layer] == e)[0]) for e in logical] \
                    if permute is not None else logical
        return ids

    def rec(rows, lens):
        nonlocal fid
        r = {"forward_pass_id": fid, "rank": 0, "gatherer_key": "primary", "input_ids": [7] * len(rows),
             "positions": [p for _, p in rows], "extend_seq_lens": lens, "forward_mode": 1 if lens else 2,
             "topk_ids_of_layer": topk(rows).tolist(), "misc_objects": []}
        fid += 1
        return r

    records.append(rec([(q, p) for q in range(len(prompts)) for p in range(prompts[q])], list(prompts)))
    done = [0] * len(prompts)
    while any(done[q] < decodes[q] for q in range(len(prompts))):
        running = [q for q in range(len(prompts)) if done[q] < decodes[q]]
        records.append(rec([(q, prompts[q] + done[q]) for q in running], None))
        for q in running:
            done[q] += 1
    out = {"records": records}
    if permute is not None:
        out["last_physical_to_logical_map"] = permute.tolist()
    return out


def test_sglang_per_token_dump_pt_and_json(tmp_path):
    import torch

    perm = np.array([np.roll(np.arange(J), layer) for layer in range(L)])  # physical -> logical
    dump = sglang_dump([3, 2], [4, 2], permute=perm)
    pt = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save({"records": [{k: (torch.tensor(v, dtype=torch.int32) if k == "topk_ids_of_layer" else v)
                             for k, v in r.items()} for r in dump["records"]],
                "last_physical_to_logical_map": torch.tensor(perm)}, pt)
    assert detect(pt) == "sglang-per-token"
    trace, out = _import(tmp_path, [pt])
    assert "SGLang expert distribution recorder" in out
    assert _requests(trace) == [(3, 4), (2, 2)]
    np.testing.assert_array_equal(_rows(trace, 0), truth(0, 7))
    np.testing.assert_array_equal(_rows(trace, 1), truth(1, 4))
    _lru_matches_plain_count(trace)
    js = tmp_path / "dump.json"
    js.write_text(json.dumps(sglang_dump([2], [3])))
    trace, _ = _import(tmp_path, [js], "--format", "sglang-per-token")
    np.testing.assert_array_equal(_rows(trace, 0), truth(0, 5))


def test_sglang_decode_row_of_no_sequence_is_one_sentence(tmp_path):
    dump = sglang_dump([2], [2])
    dump["records"][1]["positions"] = [9]
    js = tmp_path / "dump.json"
    js.write_text(json.dumps(dump))
    assert "continues no running sequence" in _error(tmp_path, [js], "--format", "sglang-per-token")


# --- llama.cpp moe-trace: `layer,expert` per routed activation, execution order ---

def moe_trace_csv(prompt, decode, layers, ubatch=64, header=True):
    lines = ["layer,expert"] if header else []
    tokens = list(range(prompt))
    batches = [tokens[i:i + ubatch] for i in range(0, prompt, ubatch)] + [[prompt + d] for d in range(decode)]
    for batch in batches:
        for layer in layers:
            for p in batch:
                lines += [f"{layer},{e}" for e in route(0, p, layer)]
    return "\n".join(lines) + "\n"


def test_llama_moe_trace_csv_with_a_layer_not_logged(tmp_path):
    log = tmp_path / "moe_trace.csv"
    log.write_text(moe_trace_csv(4, 6, [0, 1, 3], ubatch=2))  # the prompt in two ubatches of 2 tokens
    assert detect(log) == "llama-moe-trace"
    trace, out = _import(tmp_path, [log])
    assert "llama.cpp moe-trace CSV" in out and "layers logged: 3 (0, 1, 3)" in out
    assert _requests(trace) == [(4, 6)]
    np.testing.assert_array_equal(_rows(trace, 0), truth(0, 10, layers=[0, 1, 3]))
    assert trace.logged_layers == (0, 1, 3) and trace.num_missing == 10
    _lru_matches_plain_count(trace)


def test_llama_moe_trace_prompt_tokens_and_faults(tmp_path):
    log = tmp_path / "one.csv"
    log.write_text(moe_trace_csv(1, 3, [0, 1, 2, 3], header=False))  # a 1-token prompt looks like decode
    trace, _ = _import(tmp_path, [log], "--format", "llama-moe-trace", "--prompt-tokens", "1")
    assert _requests(trace) == [(1, 3)]
    single = tmp_path / "single.csv"
    single.write_text(moe_trace_csv(3, 2, [2]))
    assert "cannot be told apart: give --prompt-tokens N" in _error(tmp_path, [single])
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,expert\n0,1\n0,x\n")
    assert "line 3 is not 'layer,expert'" in _error(tmp_path, [bad], "--format", "llama-moe-trace")


# --- Megatron-LM router trace: one JSONL record per (step, layer, rank), [s, b] token order ---

def router_trace(prompt, batch, decode, base=0, mtp=False):
    lines = []
    for step in range(decode + 1):
        for layer in range(L):
            if step == 0:  # sequence-first: token j is sequence j % b at position j // b
                ids = [route(j % batch, j // batch, layer) for j in range(prompt * batch)]
            else:
                ids = [route(b, prompt + step - 1, layer) for b in range(batch)]
            lines.append(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder",
                                     "layer": layer + base, "rank": 0, "num_tokens": len(ids), "topk": K,
                                     "top_indices": ids}))
        if mtp:
            lines.append(json.dumps({"step": step, "stage": "pre_dispatch", "block": "mtp", "layer": 0,
                                     "mtp_idx": 0, "rank": 0, "num_tokens": 1, "topk": K, "top_indices": [[0, 1]]}))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("base", [0, 1])
def test_megatron_router_trace(tmp_path, base):
    log = tmp_path / "router_trace_rank0.jsonl"
    log.write_text(router_trace(3, 2, 4, base=base, mtp=True))
    assert detect(log) == "megatron-router"
    trace, out = _import(tmp_path, [log])
    assert "Megatron-LM router trace" in out
    assert _requests(trace) == [(3, 4), (3, 4)]
    for b in range(2):
        np.testing.assert_array_equal(_rows(trace, b), truth(b, 7))
    _lru_matches_plain_count(trace)


def test_megatron_prompt_tokens_and_a_ragged_step(tmp_path):
    log = tmp_path / "router_trace_rank0.jsonl"
    log.write_text(router_trace(2, 3, 0))  # prefill only: the batch comes from --prompt-tokens
    trace, _ = _import(tmp_path, [log], "--prompt-tokens", "2")
    assert _requests(trace) == [(2, 0)] * 3
    np.testing.assert_array_equal(_rows(trace, 2), truth(2, 2))
    lines = router_trace(2, 2, 2).splitlines()
    rec = json.loads(lines[-1])
    rec["top_indices"] = rec["top_indices"][:1]
    lines[-1] = json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")
    assert "step 2's layers hold different token counts [1, 2]" in _error(tmp_path, [log])


def test_a_format_that_needs_no_prompt_length_refuses_one(tmp_path):
    log = tmp_path / "resp.json"
    log.write_text(json.dumps(vllm_response(0, 2, [1], "a")))
    assert "does not apply to --format vllm-routed" in _error(tmp_path, [log], "--prompt-tokens", "2")
