"""Model geometry: what the cost model and the cache need to know about an MoE model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "mxfp4": 4.25 / 8,  # 4-bit values plus one 8-bit scale per 32 values (OCP MX spec)
    "int4": 0.5,
}


@dataclass(frozen=True)
class Geometry:
    """Shapes and sizes of an MoE model; travels inside every trace.

    `num_layers` counts MoE layers only (DeepSeek's leading dense layers are part of `dense_bytes`).
    `dense_bytes` is everything that always stays on the GPU: embeddings, attention, norms,
    routers, shared experts and dense layers.
    """

    model_name: str
    num_layers: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    hidden_size: int
    expert_intermediate_size: int
    dtype: str
    bytes_per_expert: int
    dense_bytes: int
    kv_bytes_per_token: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"geometry field {name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        for name in ("num_shared_experts", "bytes_per_expert", "dense_bytes", "kv_bytes_per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"geometry field {name} must not be negative")

    @property
    def expert_flops_per_token(self) -> float:
        """Multiply-adds of one gated (SwiGLU) expert FFN for one token, counted as 2 FLOPs each."""
        return 2.0 * 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 2.0)

    @property
    def dense_flops_per_token(self) -> float:
        """Two FLOPs per always-active parameter (attention projections, shared experts, head)."""
        return 2.0 * self.dense_bytes / self.dtype_bytes

    @property
    def total_expert_bytes(self) -> int:
        return self.bytes_per_expert * self.num_layers * self.num_experts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"geometry lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})
