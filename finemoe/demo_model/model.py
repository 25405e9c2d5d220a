"""The embedded demo MoE: a small transformers Mixtral, so collect uses the same path as real models."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from finemoe.demo_model.tokenizer import ByteTokenizer
from finemoe.errors import ConfigError

DEMO_MODEL_NAME = "finemoe-demo-moe"
TRAINING_FILE = "training.json"


def demo_model_dir() -> Path:
    """Where the shipped checkpoint lives inside the installed package."""
    return Path(str(resources.files("finemoe").joinpath("data", "demo-moe")))


def demo_config(
    *,
    hidden_size: int = 96,
    intermediate_size: int = 192,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    max_positions: int = 1024,
):
    """A MixtralConfig for the byte vocabulary; the stock aux loss is off (training adds its own)."""
    from transformers import MixtralConfig

    tok = ByteTokenizer
    return MixtralConfig(
        vocab_size=(tok.vocab_size + 7) // 8 * 8,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.02,
    )


def load_demo_model(path: str | os.PathLike | None = None):
    """(model in float32, eval mode; ByteTokenizer) from a checkpoint folder (default: the shipped one)."""
    from transformers import MixtralForCausalLM

    path = Path(path) if path is not None else demo_model_dir()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path}: no demo model checkpoint there (config.json missing); run `finemoe train-demo-model`"
        )
    import torch

    from finemoe.traces.collect.loader import dtype_kwarg

    model = MixtralForCausalLM.from_pretrained(str(path), **dtype_kwarg(torch.float32))
    model.eval()
    return model, ByteTokenizer()
