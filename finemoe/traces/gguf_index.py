"""A model's geometry from a GGUF file's index: its metadata and tensor table, not its weights.

llama.cpp's own reader (the `gguf` package, `pip install 'finemoe[gguf]'`) maps the file and parses
the header; no tensor data is read. The routed experts are the tensors named
`blk.N.ffn_{gate,up,down}_exps.*` (one tensor per matrix holding all of a layer's experts), so an
expert's bytes are exact for the file's quantisation: the layer's expert tensors' bytes over its
experts, averaged over the layers (a quantisation mix such as Q4_K_M stores some layers' down
projections at more bits; the spread is kept in `expert_bytes_by_layer`). Everything else is the dense part.
The expert tensors' names are what llama.cpp's `-ot` rules match, so a plan writes its rules from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.traces.geometry import DTYPE_BYTES, Geometry

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_[a-z_]+_exps)\.(weight|bias)$")


@dataclass(frozen=True)
class GgufIndex:
    path: str
    architecture: str
    geometry_: Geometry
    expert_bytes_by_layer: tuple[int, ...]  # one expert's bytes in each MoE layer
    moe_blocks: tuple[int, ...]  # each MoE layer's block index (blk.N)
    expert_tensor_regex: str  # matches a layer's expert tensors, e.g. ffn_(down|gate|up)_exps
    tensor_types: dict  # quantisation type -> tensors of it

    def geometry(self) -> Geometry:
        return self.geometry_

    @property
    def name(self) -> str:
        return self.geometry_.model_name


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value.decode() if isinstance(value, bytes) else value


def read_gguf_index(path: str | Path) -> GgufIndex:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--model-gguf: no such file {str(p)!r}")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("--model-gguf needs llama.cpp's gguf reader: pip install 'finemoe[gguf]'") from None
    try:
        reader = GGUFReader(str(p), "r")
    except Exception as exc:  # the reader raises ValueError, struct errors, OSError on a bad file
        raise ConfigError(f"--model-gguf {p}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ConfigError(f"--model-gguf {p}: no general.architecture in its metadata")

    def need(key: str) -> int:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConfigError(f"--model-gguf {p}: its metadata lacks {arch}.{key}")
        return int(v)

    experts, top_k, hidden = need("expert_count"), need("expert_used_count"), need("embedding_length")
    blocks = need("block_count")
    by_layer: dict[int, int] = {}
    names: set[str] = set()
    total, inter = 0, None
    types: dict[str, int] = {}
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        total += nbytes
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        m = _EXPERT_TENSOR.match(t.name)
        if m:
            layer = int(m.group(1))
            by_layer[layer] = by_layer.get(layer, 0) + nbytes
            names.add(m.group(2))
            if m.group(2) == "ffn_gate_exps" and m.group(3) == "weight":
                inter = int(t.shape[1])
    if not by_layer:
        raise ConfigError(f"--model-gguf {p}: no routed-expert tensors (blk.N.ffn_*_exps) in its index: not a MoE model")
    layers = sorted(by_layer)
    per_layer = tuple(int(round(by_layer[n] / experts)) for n in layers)
    expert_bytes = int(round(sum(by_layer.values()) / (experts * len(layers))))
    dense_bytes = total - sum(by_layer.values())
    inter = int(_field(reader, f"{arch}.expert_feed_forward_length", inter or need("feed_forward_length")))
    heads = need("attention.head_count")
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    key_len = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    value_len = int(_field(reader, f"{arch}.attention.value_length", key_len))
    kv_rank = _field(reader, f"{arch}.attention.kv_lora_rank")
    if kv_rank:  # MLA: llama.cpp caches the latent and the rope key per layer (f16)
        kv = blocks * (int(kv_rank) + int(_field(reader, f"{arch}.rope.dimension_count", 64))) * 2
    else:
        kv = blocks * kv_heads * (key_len + value_len) * 2  # llama.cpp's default f16 KV cache
    # the dtype whose bytes per weight are nearest the dense part's: it sets the dense FLOPs
    dense_params = max(1, sum(int(t.n_elements) for t in reader.tensors if not _EXPERT_TENSOR.match(t.name)))
    bpw = dense_bytes / dense_params
    dtype = min(("bfloat16", "fp8", "int4"), key=lambda d: abs(DTYPE_BYTES[d] - bpw))
    name = _field(reader, "general.name") or p.stem
    geometry = Geometry(model_name=str(name), num_layers=len(layers), num_experts=experts, top_k=top_k,
                        num_shared_experts=int(_field(reader, f"{arch}.expert_shared_count", 0) or 0),
                        hidden_size=hidden, expert_intermediate_size=inter, dtype=dtype,
                        bytes_per_expert=expert_bytes, dense_bytes=int(dense_bytes), kv_bytes_per_token=int(kv))
    parts = sorted(n.removeprefix("ffn_").removesuffix("_exps") for n in names)
    return GgufIndex(str(p), arch, geometry, per_layer, tuple(layers), f"ffn_({'|'.join(parts)})_exps", types)
