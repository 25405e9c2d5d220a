"""finemoe collect on tiny random-weight models of every supported architecture (offline, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (the dev extra installs it; a missing package must fail, not skip)

sys.path.insert(0, str(Path(__file__).parent))
from collect_models import tiny_config, tiny_model  # noqa: E402

from finemoe.demo_model.tokenizer import ByteTokenizer  # noqa: E402
from finemoe.errors import ConfigError  # noqa: E402
from finemoe.traces.collect import ARCHITECTURES, CollectConfig, collect  # noqa: E402
from finemoe.traces.collect.adapters import ARCHITECTURES as ARCHS  # noqa: E402
from finemoe.traces.collect.adapters import route  # noqa: E402
from finemoe.traces.collect.forcing import forced_routing  # noqa: E402
from finemoe.traces.collect.runner import PromptEncoder  # noqa: E402
from finemoe.traces.io import read_trace  # noqa: E402
from finemoe.traces.prompts import Prompt  # noqa: E402
from finemoe.traces.schema import MISSING_EXPERT  # noqa: E402

PROMPTS = [
    Prompt("Explain how a hash map works.", "p/0"),
    Prompt("hi", "p/1"),
    Prompt("Write a haiku about the sea, then translate it to French.", "p/2"),
]
SHARED = {"qwen2_moe": 1, "deepseek_v2": 1, "deepseek_v3": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _collect(model, tmp_path, prompts=PROMPTS, name="t.parquet", **settings):
    cfg = CollectConfig(**{"max_new_tokens": 6, "greedy": True, **settings})
    path = collect(model, ByteTokenizer(), prompts, tmp_path / name, cfg, progress=False)
    return read_trace(path)


def _prompt_ids(text: str) -> list[int]:
    return PromptEncoder(ByteTokenizer(), chat_template=True, max_tokens=512).encode(text)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_collects_a_valid_trace(model_type, tmp_path):
    model = tiny_model(model_type)
    trace = _collect(model, tmp_path, batch_size=2)
    g = trace.geometry
    assert (g.num_layers, g.num_experts, g.top_k) == (2, 8, 2)
    assert g.num_shared_experts == SHARED.get(model_type, 0)
    expert_params = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters())
    assert g.bytes_per_expert == expert_params * 4 // 8
    assert g.dense_bytes == sum(p.numel() * 4 for p in model.parameters()) - 2 * 8 * g.bytes_per_expert
    # padding never appears: every request has exactly its prompt tokens plus one row per decode step
    for r in trace.requests:
        assert r.prompt_tokens == len(_prompt_ids(PROMPTS[r.request_id].text))
        rows = trace.request_id == r.request_id
        assert rows.sum() == r.prompt_tokens + r.generated_tokens - 1
        assert sorted(set(trace.iteration[rows].tolist())) == list(range(r.generated_tokens))
        assert r.label == PROMPTS[r.request_id].label
    assert trace.router_probs.shape == (trace.num_tokens, 2, 8)
    np.testing.assert_allclose(trace.router_probs.astype(np.float32).sum(-1), 1.0, atol=1e-2)
    assert trace.semantic_key.shape == (trace.num_tokens, 32)
    assert (trace.spec_experts[:, 1] == MISSING_EXPERT).all()  # no layer after the last
    assert (trace.spec_experts[:, 0] >= 0).all()
    assert trace.metadata["collector"]["architecture"] == model_type
    assert (np.diff(trace.weights.astype(np.float32), axis=2) <= 0).all()  # descending gate weight


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "phimoe"])
def test_recorded_experts_are_the_top_k_of_output_router_logits(model_type, tmp_path):
    model = tiny_model(model_type)
    trace = _collect(model, tmp_path, prompts=PROMPTS[:1], max_new_tokens=10)
    ids = _prompt_ids(PROMPTS[0].text)
    x = torch.tensor([ids])
    seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                         pad_token_id=256, eos_token_id=258)
    with torch.no_grad():
        out = model(seq[:, : trace.num_tokens], output_router_logits=True)
    top = np.stack([torch.topk(r.float(), 2, dim=-1).indices.numpy() for r in out.router_logits], 1)
    assert (np.sort(top, -1) == np.sort(trace.experts, -1)).all()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_forcing_the_recorded_routing_reproduces_the_logits(model_type, tmp_path):
    model = tiny_model(model_type)
    trace = _collect(model, tmp_path, prompts=PROMPTS[:1], max_new_tokens=12)
    ids = _prompt_ids(PROMPTS[0].text)
    x = torch.tensor([ids])
    gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=256, eos_token_id=258)
    reference = torch.stack(gen.logits, 1)[0]
    tokens = gen.sequences[:, : trace.num_tokens]
    weights = trace.weights.astype(np.float32)
    with torch.no_grad(), forced_routing(model, trace.experts, weights):
        forced = model(tokens).logits[0, len(ids) - 1 :]
    wrong = (trace.experts.astype(np.int64) + 1) % 8  # a different, equally valid routing
    with torch.no_grad(), forced_routing(model, wrong, weights):
        other = model(tokens).logits[0, len(ids) - 1 :]
    err = (forced - reference).abs().max().item()
    assert err < 2e-4
    assert (other - reference).abs().max().item() > 50 * max(err, 1e-6)


def test_deepseek_v3_records_the_biased_choice_not_a_recomputed_top_k(tmp_path):
    model = tiny_model("deepseek_v3")
    for layer in model.model.layers:
        layer.mlp.gate.e_score_correction_bias[:] = torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0])
    trace = _collect(model, tmp_path, prompts=PROMPTS[:1])
    assert (np.sort(trace.experts, -1) == [6, 7]).all()  # the bias decides
    plain = np.argsort(-trace.router_probs.astype(np.float32), axis=-1)[..., :2]
    assert not (np.sort(plain, -1) == [6, 7]).all()  # a plain top-k of the scores would differ


def test_batched_and_single_collection_agree(tmp_path):
    """Left padding shifts nothing: each request routes the same alone or in a padded batch."""
    model = tiny_model("mixtral")
    alone = _collect(model, tmp_path, name="a.parquet", batch_size=1)
    batched = _collect(model, tmp_path, name="b.parquet", batch_size=3)
    assert alone.requests == batched.requests
    np.testing.assert_array_equal(alone.experts, batched.experts)
    np.testing.assert_array_equal(alone.position, batched.position)
    np.testing.assert_allclose(alone.weights.astype(np.float32), batched.weights.astype(np.float32), atol=2e-3)


def test_options_turn_off_fields_and_projection_is_recorded(tmp_path):
    model = tiny_model("olmoe")
    trace = _collect(model, tmp_path, router_probs=False, speculative=False, semantic_dim=8)
    assert trace.router_probs is None and trace.spec_experts is None
    assert trace.semantic_key.shape[1] == 8
    sem = trace.metadata["semantic_key"]
    assert sem["dim"] == 8 and sem["seed"] == 0 and sem["input_dim"] == 32


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ConfigError, match="unsupported model architecture 'llama'.*mixtral"):
        collect(model, ByteTokenizer(), PROMPTS, "/nonexistent/t.parquet", progress=False)


def test_transformers_4_gate_returning_logits_uses_the_architecture_rule():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.5, 0.2, 0.0]])
    config = tiny_config("mixtral")
    probs, weights, experts = route(ARCHS["mixtral"], config, logits)
    assert experts.tolist() == [[1, 3], [0, 1]]
    np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(logits, -1).numpy())
    with pytest.raises(ConfigError, match="transformers 5"):
        route(ARCHS["deepseek_v3"], tiny_config("deepseek_v3"), logits)


class _Interrupt:
    """Raises KeyboardInterrupt at the n-th model forward, like Ctrl-C in the middle of a batch."""

    def __init__(self, model, at: int):
        self.calls, self.at = 0, at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("flush_every_s", [0.0, 30.0])  # every request on disk at once / kept in memory
@pytest.mark.parametrize("name", ["t.parquet", "tdir"])
def test_interrupted_collection_leaves_a_valid_partial_trace(tmp_path, name, flush_every_s):
    model = tiny_model("mixtral")
    _Interrupt(model, at=14)  # 6 forwards per request: dies inside the third one
    cfg = CollectConfig(max_new_tokens=6, greedy=True, flush_every_s=flush_every_s)
    with pytest.raises(KeyboardInterrupt):
        collect(model, ByteTokenizer(), PROMPTS, tmp_path / name, cfg, progress=False)
    trace = read_trace(tmp_path / name)
    assert [r.request_id for r in trace.requests] == [0, 1]
    assert trace.metadata["complete"] is False and trace.metadata["requests_collected"] == 2
    if name == "tdir":
        assert len(list((tmp_path / name).glob("part-*.parquet"))) == (2 if flush_every_s == 0 else 1)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary folder left behind


def test_interrupted_before_any_request_writes_nothing(tmp_path):
    model = tiny_model("mixtral")
    _Interrupt(model, at=1)
    with pytest.raises(KeyboardInterrupt):
        collect(model, ByteTokenizer(), PROMPTS, tmp_path / "t.parquet", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_collect_from_a_model_folder_and_text_prompts(tmp_path):
    from click.testing import CliRunner

    from finemoe.cli.main import cli

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "tiny")
    ByteTokenizer().save(tmp_path / "tiny")
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\nthird\n")
    out = tmp_path / "trace"
    result = CliRunner().invoke(cli, ["collect", "--model", str(tmp_path / "tiny"), "--prompts",
                                      str(tmp_path / "p.txt"), "--limit", "2", "--max-new-tokens", "3",
                                      "--batch-size", "2", "--greedy", "--quiet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    trace = read_trace(out)
    assert [r.label for r in trace.requests] == ["p.txt/0", "p.txt/2"]
    assert trace.metadata["collector"]["prompts"] == str(tmp_path / "p.txt")
    assert trace.metadata["collector"]["model"] == str(tmp_path / "tiny")


def test_cli_collect_reports_bad_input_in_one_line(tmp_path):
    from click.testing import CliRunner

    from finemoe.cli.main import cli

    result = CliRunner().invoke(cli, ["collect", "--prompts", str(tmp_path / "missing.json")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "no such prompts file" in result.output


def test_part_writer_publishes_atomically(tmp_path, small_trace):
    from finemoe.errors import TraceError
    from finemoe.traces.parts import PartWriter

    halves = [small_trace.select_requests([0, 1]), small_trace.select_requests([2, 3])]
    writer = PartWriter(tmp_path / "dir")
    for piece in halves:
        writer.write(piece)
    assert not (tmp_path / "dir").exists()  # nothing under the target name until finish
    writer.finish()
    assert read_trace(tmp_path / "dir").content_hash() == small_trace.content_hash()
    single = PartWriter(tmp_path / "one.parquet")
    for piece in halves:
        single.write(piece)
    single.finish(metadata_update={"complete": True})
    trace = read_trace(tmp_path / "one.parquet")
    assert trace.content_hash() == small_trace.content_hash() and trace.metadata["complete"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "one.parquet"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceError, match="exists as a file"):
        PartWriter(tmp_path / "file")


def test_cli_rejects_an_unsupported_model_folder_before_loading_weights(tmp_path):
    from click.testing import CliRunner
    from transformers import LlamaConfig

    from finemoe.cli.main import cli

    LlamaConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )  # config only: loading weights would fail differently
    (tmp_path / "p.txt").write_text("hello\n")
    result = CliRunner().invoke(cli, ["collect", "--model", str(tmp_path / "llama"), "--prompts",
                                      str(tmp_path / "p.txt"), "-o", str(tmp_path / "t.parquet")])
    assert result.exit_code == 1
    assert "error: unsupported model architecture 'llama'" in result.output
    assert "deepseek_v3" in result.output and "gpt_oss" in result.output
