"""A model profile from a Hugging Face `config.json`, so that a plan or a simulation needs no
built-in profile: layers, routed experts, top-k, shared experts, and the bytes of an expert and of
everything else, counted from the architecture's own fields.

Parameters are counted per tensor as the transformers implementation of each architecture lays
them out (attention, norms, router, shared experts, leading dense layers, embeddings and the output
head); small biases are counted where the architecture has them. The built-in profiles
(traces/profiles.py) come from published totals, and tests check these counts against them.
"""

from __future__ import annotations

import json
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.traces.profiles import ModelProfile

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss")
_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def read_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--model-config: no such file {str(p)!r}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--model-config {p}: not a JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model-config {p}: not a JSON object")
    return data


def profile_from_config(path_or_dict, name: str | None = None) -> ModelProfile:
    """The profile of the model `path_or_dict` (a config.json path or its parsed dict) describes."""
    cfg = read_config(path_or_dict) if not isinstance(path_or_dict, dict) else path_or_dict
    where = f"--model-config {path_or_dict}" if not isinstance(path_or_dict, dict) else "model config"
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {arch!r} is not a MoE architecture finemoe reads; "
                          f"known: {', '.join(ARCHITECTURES)}")
    try:
        return _profile(cfg, arch, name or cfg.get("_name_or_path") or arch)
    except KeyError as exc:
        raise ConfigError(f"{where}: a {arch} config needs the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: a field has the wrong type ({exc})") from None


def _int(cfg: dict, *names: str, default=None) -> int:
    for n in names:
        if cfg.get(n) is not None:
            v = cfg[n]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{n} = {v!r} is not a whole number")
            return v
    if default is not None:
        return default
    raise KeyError(names[0])


def _attention(cfg: dict, arch: str, hidden: int) -> tuple[int, int]:
    """(parameters of one layer's attention, KV bytes per token per layer in bf16)."""
    heads = _int(cfg, "num_attention_heads")
    if arch in ("deepseek_v2", "deepseek_v3"):
        rope, nope, v = _int(cfg, "qk_rope_head_dim"), _int(cfg, "qk_nope_head_dim"), _int(cfg, "v_head_dim")
        kv_rank = _int(cfg, "kv_lora_rank")
        q_rank = cfg.get("q_lora_rank")
        q = hidden * heads * (nope + rope) if not q_rank else hidden * q_rank + q_rank + q_rank * heads * (nope + rope)
        kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v)
        return q + kv + heads * v * hidden, (kv_rank + rope) * 2  # MLA caches the latent and the rope key
    kv_heads = _int(cfg, "num_key_value_heads", default=heads)
    head_dim = _int(cfg, "head_dim", default=hidden // heads)
    params = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if arch in ("qwen2_moe", "phimoe", "gpt_oss") or cfg.get("attention_bias"):
        params += heads * head_dim + 2 * kv_heads * head_dim + (hidden if arch in ("phimoe", "gpt_oss") else 0)
    if arch in ("qwen3_moe",):
        params += 2 * head_dim  # per-head q and k norms
    if arch == "olmoe":
        params += heads * head_dim + kv_heads * head_dim  # q and k norms over the projections
    if arch == "gpt_oss":
        params += heads  # attention sinks
    return params, 2 * kv_heads * head_dim * 2


def _profile(cfg: dict, arch: str, name: str) -> ModelProfile:
    hidden = _int(cfg, "hidden_size")
    layers = _int(cfg, "num_hidden_layers")
    vocab = _int(cfg, "vocab_size")
    top_k = _int(cfg, "num_experts_per_tok", "experts_per_token")
    experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts")
    if arch in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        expert_inter = _int(cfg, "moe_intermediate_size")
    else:
        expert_inter = _int(cfg, "intermediate_size")
    dense_inter = _int(cfg, "intermediate_size")
    # which layers are MoE
    if arch in ("deepseek_v2", "deepseek_v3"):
        first_dense, freq = _int(cfg, "first_k_dense_replace", default=0), _int(cfg, "moe_layer_freq", default=1)
        moe_layers = [i for i in range(layers) if i >= first_dense and i % max(freq, 1) == 0]
    elif arch in ("qwen2_moe", "qwen3_moe"):
        step, only_mlp = _int(cfg, "decoder_sparse_step", default=1), set(cfg.get("mlp_only_layers") or [])
        moe_layers = [i for i in range(layers) if i not in only_mlp and experts > 0 and (i + 1) % max(step, 1) == 0]
    else:
        moe_layers = list(range(layers))
    if not moe_layers or experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"{len(moe_layers)} MoE layers of {experts} experts, top-{top_k}")
    shared_inter, shared = 0, 0
    if arch == "qwen2_moe":
        shared_inter = _int(cfg, "shared_expert_intermediate_size", default=0)
        shared = 1 if shared_inter else 0
    elif arch in ("deepseek_v2", "deepseek_v3"):
        shared = _int(cfg, "n_shared_experts", default=0)
        shared_inter = shared * expert_inter
    attn, kv_per_layer = _attention(cfg, arch, hidden)
    norm = 2 * hidden if arch == "phimoe" else hidden  # LayerNorm with bias, else RMSNorm
    per_moe = hidden * experts + (experts if arch == "gpt_oss" else 0)  # router (GPT-OSS: with bias)
    per_moe += 3 * hidden * shared_inter + (hidden if arch == "qwen2_moe" and shared else 0)
    dense = len(moe_layers) * per_moe
    dense += layers * (attn + 2 * norm)
    dense += (layers - len(moe_layers)) * 3 * hidden * dense_inter
    tied = bool(cfg.get("tie_word_embeddings", False))
    dense += vocab * hidden * (1 if tied else 2) + norm
    expert_bias = (2 * expert_inter + hidden) if arch == "gpt_oss" else 0  # gate_up and down biases
    routed_bias = len(moe_layers) * experts * expert_bias
    dense += routed_bias  # small enough to count with the rest
    dtype = _TORCH_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), "bfloat16")
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    expert_dtype = {"mxfp4": "mxfp4"}.get(quant)
    if quant == "fp8":
        dtype = "fp8"
    return ModelProfile(
        name=str(name), num_layers=len(moe_layers), num_experts=experts, top_k=top_k, num_shared_experts=shared,
        hidden_size=hidden, expert_intermediate_size=expert_inter, dense_params=int(dense),
        kv_bytes_per_token_bf16=layers * kv_per_layer, default_dtype=dtype, expert_dtype=expert_dtype,
        source=f"config.json ({arch})", moe_blocks_=tuple(moe_layers))
