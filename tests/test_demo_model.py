"""The embedded demo MoE: byte tokenizer, per-layer balance loss, training smoke run, shipped weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (the dev extra installs it; a missing package fails, never skips)

from finemoe.demo_model.model import TRAINING_FILE, demo_model_dir, load_demo_model
from finemoe.demo_model.tokenizer import ByteTokenizer
from finemoe.demo_model.train import (
    TrainConfig,
    heldout_windows,
    per_layer_balance,
    routing_quality,
)

SHIPPED = demo_model_dir()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_byte_tokenizer_round_trip_and_chat_frame(tmp_path):
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and max(ids[1:]) < 256
    assert tok.decode(ids) == text
    chat = tok.encode_chat("hi")
    assert chat == [tok.bos_token_id, tok.user_token_id, ord("h"), ord("i"), tok.assistant_token_id]
    tok.save(tmp_path)
    assert ByteTokenizer.is_saved_in(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    assert not ByteTokenizer.is_saved_in(tmp_path)


def test_balance_loss_is_per_layer():
    """A collapsed layer is penalised even when the usage pooled over layers looks balanced."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    tokens = 64
    collapsed = []
    for hot in ([0, 1], [2, 3], [4, 5], [6, 7]):  # each layer sends every token to its own two experts
        logits = torch.full((tokens, 8), -10.0)
        logits[:, hot] = torch.randn(tokens, 2) * 0.1
        collapsed.append(logits)
    per_layer = per_layer_balance(collapsed, top_k=2)
    assert torch.allclose(per_layer, torch.full((4,), 4.0), atol=0.01)  # J/K: fully collapsed
    balanced_logits = [torch.randn(tokens, 8) * 0.01 for _ in range(4)]
    balanced = per_layer_balance(balanced_logits, top_k=2)
    # the stock Mixtral loss pools the layers: it scores the collapsed model like the balanced one
    stock_collapsed = load_balancing_loss_func(tuple(collapsed), num_experts=8, top_k=2)
    stock_balanced = load_balancing_loss_func(tuple(balanced_logits), num_experts=8, top_k=2)
    assert abs(stock_collapsed.item() - stock_balanced.item()) < 0.01
    assert (balanced < 1.2).all()


@pytest.mark.slow
def test_training_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    from finemoe.demo_model.train import train

    cfg = TrainConfig(hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      train_conversations=20, heldout_conversations=5, block_size=64, batch_size=4,
                      max_steps=4, warmup_steps=2, eval_every=2, eval_windows=2)
    lines = []
    record = train(cfg, tmp_path / "m", log=lines.append)
    assert record["history"][-1]["heldout_loss"] < record["history"][0]["heldout_loss"]
    saved = json.loads((tmp_path / "m" / TRAINING_FILE).read_text())
    assert saved["train_config"]["max_steps"] == 4
    model, tok = load_demo_model(tmp_path / "m")
    assert model.config.num_hidden_layers == 2 and model.generation_config.do_sample
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["m"]  # no temporary folder left


def _shipped() -> tuple:
    if not (SHIPPED / "config.json").is_file():
        pytest.fail(f"the shipped demo model is missing from {SHIPPED}")
    return load_demo_model()


def test_shipped_checkpoint_is_small_and_documented():
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total <= 10 * 1024 * 1024
    record = json.loads((SHIPPED / TRAINING_FILE).read_text())
    assert record["train_config"]["num_experts"] == 8 and record["final"]["heldout_loss"] < 2.0
    model, _ = _shipped()
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2


@pytest.mark.slow
def test_shipped_weights_route_non_degenerately_on_heldout_text():
    """Per-layer usage entropy >= 2.8 of 3 bits and mean top-1 probability >= 0.35, on text the
    model never trained on (the ShareGPT conversations after its training range)."""
    from finemoe.demo_model.train import conversation_ids
    from finemoe.traces.prompts import sharegpt_conversations

    record = json.loads((SHIPPED / TRAINING_FILE).read_text())
    cfg = TrainConfig(**record["train_config"])
    tok = ByteTokenizer()
    start = cfg.train_conversations + cfg.heldout_conversations  # beyond even the evaluation split
    held = []
    for n, (_, turns) in enumerate(sharegpt_conversations(start + 60)):
        if n >= start:
            held.extend(conversation_ids(turns, tok))
    model, _ = _shipped()
    windows = heldout_windows(np.array(held, np.uint16), cfg, 24)
    quality = routing_quality(model, windows, cfg.top_k)
    assert quality["tokens"] >= 24 * cfg.block_size
    assert min(quality["usage_entropy_bits"]) >= 2.8, quality
    assert min(quality["mean_top1_prob"]) >= 0.35, quality
