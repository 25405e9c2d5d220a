"""Built-in geometry of real MoE models, from their published Hugging Face configs.

Sizes are computed from the config fields, not copied from marketing numbers, so they can be
checked: an expert is a gated FFN with three matrices (gate, up, down) of hidden x intermediate.
`dense_params` is total parameters minus routed-expert parameters, so it covers embeddings,
attention, norms, routers, shared experts and leading dense layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import ConfigError
from finemoe.traces.geometry import DTYPE_BYTES, Geometry


@dataclass(frozen=True)
class ModelProfile:
    name: str
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    num_shared_experts: int
    hidden_size: int
    expert_intermediate_size: int
    dense_params: int
    kv_bytes_per_token_bf16: int  # K and V (or MLA latent) of all layers for one token, bf16
    default_dtype: str
    expert_dtype: str | None = None  # when experts are stored differently from the rest (GPT-OSS)
    source: str = ""
    leading_dense_layers: int = 0  # dense blocks before the first MoE layer (DeepSeek's first_k_dense_replace)
    moe_blocks_: tuple[int, ...] | None = None  # each MoE layer's block index, when not contiguous

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        """The model's block index of each MoE layer (what llama.cpp's blk.N and --n-cpu-moe count)."""
        if self.moe_blocks_ is not None:
            return self.moe_blocks_
        return tuple(range(self.leading_dense_layers, self.leading_dense_layers + self.num_layers))

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.expert_intermediate_size

    def geometry(self, dtype: str | None = None) -> Geometry:
        dtype = dtype or self.default_dtype
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        expert_dtype = self.expert_dtype if (self.expert_dtype and dtype == self.default_dtype) else dtype
        return Geometry(
            model_name=self.name,
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            num_shared_experts=self.num_shared_experts,
            hidden_size=self.hidden_size,
            expert_intermediate_size=self.expert_intermediate_size,
            dtype=dtype,
            bytes_per_expert=int(round(self.params_per_expert * DTYPE_BYTES[expert_dtype])),
            dense_bytes=int(round(self.dense_params * DTYPE_BYTES[dtype])),
            kv_bytes_per_token=int(self.kv_bytes_per_token_bf16 * DTYPE_BYTES[dtype] / 2),
        )


def _kv(layers: int, kv_heads: int, head_dim: int) -> int:
    return layers * 2 * kv_heads * head_dim * 2


PROFILES: dict[str, ModelProfile] = {
    p.name: p
    for p in [
        # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, hidden 4096, intermediate 14336,
        # 8 experts, top-2, 8 KV heads x 128; 46.7B parameters in all (Mixtral paper, arXiv 2401.04088).
        ModelProfile("mixtral-8x7b", 32, 8, 2, 0, 4096, 14336, 46_702_792_704 - 32 * 8 * 3 * 4096 * 14336,
                     _kv(32, 8, 128), "bfloat16", source="mistralai/Mixtral-8x7B-v0.1 config.json"),
        # mistralai/Mixtral-8x22B-v0.1: 56 layers, hidden 6144, intermediate 16384, 8 experts, top-2,
        # 8 KV heads x 128; 140.6B parameters (model card).
        ModelProfile("mixtral-8x22b", 56, 8, 2, 0, 6144, 16384, 140_620_634_112 - 56 * 8 * 3 * 6144 * 16384,
                     _kv(56, 8, 128), "bfloat16", source="mistralai/Mixtral-8x22B-v0.1 config.json"),
        # Qwen/Qwen1.5-MoE-A2.7B: 24 layers, hidden 2048, moe_intermediate 1408, 60 experts, top-4,
        # one shared expert of intermediate 5632 (= 4 fine-grained experts); 14.3B parameters.
        ModelProfile("qwen1.5-moe-a2.7b", 24, 60, 4, 1, 2048, 1408, 14_315_784_192 - 24 * 60 * 3 * 2048 * 1408,
                     _kv(24, 16, 128), "bfloat16", source="Qwen/Qwen1.5-MoE-A2.7B config.json"),
        # Qwen/Qwen3-30B-A3B: 48 layers, hidden 2048, moe_intermediate 768, 128 experts, top-8,
        # 4 KV heads x 128, no shared expert; 30.5B parameters.
        ModelProfile("qwen3-30b-a3b", 48, 128, 8, 0, 2048, 768, 30_532_122_624 - 48 * 128 * 3 * 2048 * 768,
                     _kv(48, 4, 128), "bfloat16", source="Qwen/Qwen3-30B-A3B config.json"),
        # microsoft/Phi-3.5-MoE-instruct: 32 layers, hidden 4096, intermediate 6400, 16 experts, top-2,
        # 8 KV heads x 128; 41.9B parameters.
        ModelProfile("phi-3.5-moe", 32, 16, 2, 0, 4096, 6400, 41_873_153_344 - 32 * 16 * 3 * 4096 * 6400,
                     _kv(32, 8, 128), "bfloat16", source="microsoft/Phi-3.5-MoE-instruct config.json"),
        # allenai/OLMoE-1B-7B-0924: 16 layers, hidden 2048, intermediate 1024, 64 experts, top-8,
        # 16 KV heads x 128; 6.92B parameters.
        ModelProfile("olmoe-1b-7b", 16, 64, 8, 0, 2048, 1024, 6_919_161_856 - 16 * 64 * 3 * 2048 * 1024,
                     _kv(16, 16, 128), "bfloat16", source="allenai/OLMoE-1B-7B-0924 config.json"),
        # deepseek-ai/DeepSeek-V2-Lite: 27 layers, the first dense (first_k_dense_replace=1), so 26 MoE
        # layers; hidden 2048, moe_intermediate 1408, 64 routed experts, top-6, 2 shared experts;
        # MLA cache of kv_lora_rank 512 + rope 64 per layer; 15.7B parameters.
        ModelProfile("deepseek-v2-lite", 26, 64, 6, 2, 2048, 1408, 15_706_484_224 - 26 * 64 * 3 * 2048 * 1408,
                     27 * (512 + 64) * 2, "bfloat16", source="deepseek-ai/DeepSeek-V2-Lite config.json",
                     leading_dense_layers=1),
        # deepseek-ai/DeepSeek-V3: 61 layers, the first 3 dense, so 58 MoE layers; hidden 7168,
        # moe_intermediate 2048, 256 routed experts, top-8, 1 shared expert; FP8 weights; MLA cache
        # 512 + 64 per layer; 671B parameters in the main model (technical report, arXiv 2412.19437).
        ModelProfile("deepseek-v3", 58, 256, 8, 1, 7168, 2048, 671_026_419_200 - 58 * 256 * 3 * 7168 * 2048,
                     61 * (512 + 64) * 2, "fp8", source="deepseek-ai/DeepSeek-V3 config.json",
                     leading_dense_layers=3),
        # openai/gpt-oss-20b: 24 layers, hidden 2880, intermediate 2880, 32 experts, top-4, 8 KV heads
        # x 64; experts in MXFP4, the rest bf16; 20.9B parameters (model card).
        ModelProfile("gpt-oss-20b", 24, 32, 4, 0, 2880, 2880, 20_914_757_184 - 24 * 32 * 3 * 2880 * 2880,
                     _kv(24, 8, 64), "bfloat16", expert_dtype="mxfp4", source="openai/gpt-oss-20b config.json"),
        # openai/gpt-oss-120b: 36 layers, 128 experts, top-4, otherwise as gpt-oss-20b; 116.8B parameters.
        ModelProfile("gpt-oss-120b", 36, 128, 4, 0, 2880, 2880, 116_829_156_672 - 36 * 128 * 3 * 2880 * 2880,
                     _kv(36, 8, 64), "bfloat16", expert_dtype="mxfp4", source="openai/gpt-oss-120b config.json"),
    ]
}


def get_profile(name: str) -> ModelProfile:
    key = name.lower()
    if key not in PROFILES:
        raise ConfigError(f"unknown model profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[key]
