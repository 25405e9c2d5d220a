"""Per-architecture knowledge: where the routers are, what they return, and the model's geometry.

In transformers 5.x every supported router module returns `(router_logits, weights, indices)`:
the weights and expert ids the MoE block then uses. We record those as returned (sorted by
weight), never a recomputed top-k, so biased and group-limited selection (DeepSeek) is captured as
the model decided it. A transformers 4.x gate is a plain linear layer returning logits only; its
block applied the architecture's fixed rule (`_legacy_route`), which is what we replay there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finemoe.errors import ConfigError
from finemoe.traces.geometry import Geometry


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.model_type
    router_attr: str  # attribute of the MoE block holding the router
    probs: str  # how the full router distribution is derived from the logits
    shared_experts: str = ""  # config field giving the number of shared experts, or "one" if present
    legacy_norm_topk: bool | None = None  # 4.x rule: renormalise the top-k? None: config.norm_topk_prob


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in [
        Architecture("mixtral", "gate", "softmax", legacy_norm_topk=True),
        Architecture("qwen2_moe", "gate", "softmax", shared_experts="one"),
        Architecture("qwen3_moe", "gate", "softmax"),
        Architecture("olmoe", "gate", "softmax"),
        Architecture("deepseek_v2", "gate", "softmax", shared_experts="n_shared_experts"),
        Architecture("deepseek_v3", "gate", "sigmoid", shared_experts="n_shared_experts"),
        Architecture("phimoe", "router", "softmax"),
        Architecture("gpt_oss", "router", "softmax"),
    ]
}

PROBS_NOTE = {
    "softmax": "softmax of the router logits",
    "sigmoid": "sigmoid router scores (without the selection bias), normalised to sum to 1",
}


def architecture_of(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported model architecture {model_type!r}; finemoe collect supports "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer: its decoder layer, router, and the norm that feeds the router."""

    moe_index: int
    decoder_index: int
    decoder: torch.nn.Module
    block: torch.nn.Module
    router: torch.nn.Module
    norm: torch.nn.Module


def decoder_layers(model) -> torch.nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no decoder layer list (model.model.layers)")
    return layers


def embedding(model) -> torch.nn.Module:
    return model.get_input_embeddings()


def moe_layers(model) -> list[MoELayer]:
    """Every decoder layer whose MLP is a routed MoE block, in order (dense layers skipped)."""
    arch = architecture_of(model.config)
    out = []
    for index, decoder in enumerate(decoder_layers(model)):
        block = getattr(decoder, "mlp", None)
        if block is None or not hasattr(block, arch.router_attr):
            block = getattr(decoder, "block_sparse_moe", None)  # transformers 4.x Mixtral / PhiMoE
        router = getattr(block, arch.router_attr, None) if block is not None else None
        if router is None or not hasattr(block, "experts"):
            continue
        norm = getattr(decoder, "post_attention_layernorm", None)
        if norm is None:
            raise ConfigError(f"decoder layer {index} has no post_attention_layernorm to feed its router")
        out.append(MoELayer(len(out), index, decoder, block, router, norm))
    if not out:
        raise ConfigError(f"no MoE layers found in {type(model).__name__}")
    return out


def num_experts(config) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError("model config names no expert count (num_local_experts / num_experts / n_routed_experts)")


def experts_of(layer: MoELayer) -> int:
    """Routed experts of a layer, read off its router's weight (config names for it vary)."""
    weight = getattr(layer.router, "weight", None)
    return int(weight.shape[0]) if weight is not None else num_experts(layer.router.config)


def top_k(config) -> int:
    value = getattr(config, "num_experts_per_tok", None)
    if not isinstance(value, int) or value <= 0:
        raise ConfigError("model config has no num_experts_per_tok")
    return value


def route(arch: Architecture, config, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs [T, J] float32, weights [T, K] float32, experts [T, K] int64) from a router's output.

    Experts are sorted by descending weight; ties keep the model's order.
    """
    if isinstance(output, (tuple, list)):
        if len(output) < 3:
            raise ConfigError(f"{arch.model_type} router returned {len(output)} values, expected 3")
        logits, weights, indices = output[0], output[1], output[2]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        weights = weights.reshape(logits.shape[0], -1).float()
        indices = indices.reshape(logits.shape[0], -1).long()
        if weights.shape[1] != indices.shape[1]:
            weights = weights.gather(1, indices)  # a dense (T, J) score matrix: keep the chosen
    else:
        logits = output.reshape(-1, output.shape[-1]).float()
        weights, indices = _legacy_route(arch, config, logits)
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    weights = weights.gather(1, order)
    indices = indices.gather(1, order)
    return router_probs(arch, logits), weights, indices


def router_probs(arch: Architecture, logits: torch.Tensor) -> torch.Tensor:
    if arch.probs == "sigmoid":
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    return torch.softmax(logits, dim=-1)


def _legacy_route(arch: Architecture, config, logits: torch.Tensor):
    """The transformers 4.x rule for gates that return logits: softmax, top-k, maybe renormalise."""
    if arch.model_type in ("deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"):
        raise ConfigError(
            f"{arch.model_type}: this transformers version's router returns only logits; finemoe records "
            "what the model chose and needs transformers 5.x for this architecture"
        )
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, top_k(config), dim=-1)
    norm = arch.legacy_norm_topk if arch.legacy_norm_topk is not None else bool(getattr(config, "norm_topk_prob", False))
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def geometry_of(model, *, name: str) -> Geometry:
    """Geometry measured from the model: parameter bytes per routed expert and of everything else."""
    config = model.config
    arch = architecture_of(config)
    layers = moe_layers(model)
    J = experts_of(layers[0])
    expert_bytes = 0
    for layer in layers:
        expert_bytes += sum(p.numel() * p.element_size() for p in layer.block.experts.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_expert = expert_bytes // (len(layers) * J)
    param = next(model.parameters())
    inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None)
    shared = 0
    if arch.shared_experts == "one":
        shared = 1 if getattr(layers[0].block, "shared_expert", None) is not None else 0
    elif arch.shared_experts:
        shared = int(getattr(config, arch.shared_experts, 0) or 0)
    return Geometry(
        model_name=name,
        num_layers=len(layers),
        num_experts=J,
        top_k=top_k(config),
        num_shared_experts=shared,
        hidden_size=int(config.hidden_size),
        expert_intermediate_size=int(inter),
        dtype=_DTYPE_NAMES.get(param.dtype, str(param.dtype).removeprefix("torch.")),
        bytes_per_expert=int(per_expert),
        dense_bytes=int(total_bytes - expert_bytes),
        kv_bytes_per_token=_kv_bytes_per_token(config, param.element_size()),
    )


def _kv_bytes_per_token(config, dtype_bytes: int) -> int:
    layers = int(config.num_hidden_layers)
    if getattr(config, "kv_lora_rank", None):  # DeepSeek MLA: the compressed latent plus the rope key
        return layers * (int(config.kv_lora_rank) + int(config.qk_rope_head_dim)) * dtype_bytes
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers * 2 * int(heads) * int(head_dim) * dtype_bytes
