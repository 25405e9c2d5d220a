"""The real arithmetic a replay runs: a routed expert's SwiGLU FFN and a layer's dense part.

Expert weights live in one flat buffer per expert (gate | up | down), so one copy moves an expert
and a slot is one row of the device pool. The dense part is every always-on parameter of a layer
(`dense_bytes / num_layers`, the same quantity the simulator's cost model charges) as matmuls of
width `hidden_size`, so replay and simulation do the same FLOPs and read the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExpertShape:
    hidden_size: int
    intermediate_size: int

    @property
    def numel(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size


def expert_views(flat: Any, shape: ExpertShape) -> tuple[Any, Any, Any]:
    """gate [I, H], up [I, H], down [H, I] as views of one flat expert buffer."""
    h, i = shape.hidden_size, shape.intermediate_size
    n = h * i
    return flat[:n].view(i, h), flat[n : 2 * n].view(i, h), flat[2 * n : 3 * n].view(h, i)


def expert_ffn(x: Any, flat: Any, shape: ExpertShape) -> Any:
    """SwiGLU: down(silu(gate x) * up x), on the tokens `x` [T, H] routed to this expert."""
    return swiglu(x, *expert_views(flat, shape))


def swiglu(x: Any, gate: Any, up: Any, down: Any) -> Any:
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def dense_columns(dense_bytes: int, num_layers: int, hidden_size: int, dtype_bytes: float) -> int:
    """Output width of one layer's dense matmul so that it holds `dense_bytes / num_layers`."""
    params = dense_bytes / max(num_layers, 1) / dtype_bytes
    return max(1, int(round(params / hidden_size)))


def dense_forward(x: Any, weight: Any) -> Any:
    """The dense matmul of one layer: x [T, H] @ W [H, C] (attention projections, router, shared
    experts, head)."""
    return x @ weight


KEY_BUCKET = 64  # attention reads keys in whole buckets: see `attention_rows`


def attention_rows(contexts: list[int], dtype: Any, device: str, cap: int | None = None) -> tuple[int, Any | None]:
    """(keys, bias) for one batched attention over a step's new tokens: row r scores the first
    `contexts[r]` keys (its own position + 1: causal, the pairs the simulator counts).

    `keys` is the longest row's context rounded up to a whole `KEY_BUCKET` (at most `cap`), and
    `bias` [rows, keys] is 0 where a row may look and -inf beyond (None when every row reads all
    `keys`). The rounding keeps the kernels' shapes fixed over many decode steps: on a CPU each new
    matmul shape costs oneDNN about half a millisecond to set up (measured: 0.5-0.6 ms for the first
    scores and values matmuls of each decode step, 0.04-0.06 ms after), a cost a GPU's attention
    kernel, whose shape does not follow the context length, does not have; `_warmup` sets up every
    bucket before the clock starts.
    """
    import torch

    ctx = torch.as_tensor(contexts, dtype=torch.int64)
    longest = int(ctx.max())
    keys = -(-longest // KEY_BUCKET) * KEY_BUCKET
    keys = max(longest, min(keys, cap)) if cap is not None else keys
    if bool((ctx == keys).all()):
        return keys, None
    beyond = torch.arange(keys)[None, :] >= ctx[:, None]
    bias = torch.zeros(beyond.shape, dtype=dtype).masked_fill_(beyond, float("-inf"))
    return keys, bias.to(device)


def attend(q: Any, kv: Any, keys: int, bias: Any | None) -> Any:
    """Attention of the rows `q` [T, W] over the first `keys` entries of `kv` [2, tokens, W]."""
    import torch

    scores = q @ kv[0, :keys].T
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ kv[1, :keys]


def dense_layer(x: Any, weight: Any, q: Any, kv: Any, keys: int, bias: Any | None) -> Any:
    """The dense part of one layer as the replay runs it: the dense matmul, then one attention over
    all the step's tokens `q` [T, W] against the KV cache `kv` (one batched set of kernels per
    layer, as a serving engine's batched attention, not one per sequence)."""
    dense_forward(x, weight)
    return attend(q, kv, keys, bias)
