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


class AttentionMasks:
    """Causal masks for the replay's batched attention, made once before the clock starts.

    `rows(contexts)` gives (keys, bias) for one attention over a step's new tokens: row r scores the
    first `contexts[r]` keys (its own position + 1: causal, the pairs the simulator counts). `keys`
    is the longest row's context rounded up to a whole `KEY_BUCKET` (at most `cap`), and `bias`
    [rows, keys] is 0 where a row may look and -inf beyond (None when every row reads all `keys`).
    The rounding keeps the kernels' shapes fixed over many decode steps: on a CPU each new matmul
    shape costs oneDNN about half a millisecond to set up (measured: 0.5-0.6 ms for the first scores
    and values matmuls of each decode step, 0.04-0.06 ms after), a cost a GPU's attention kernel,
    whose shape does not follow the context length, does not have; the replay's warm-up sets up every
    bucket before the clock starts. The bias is a view of (or one gather from) one row of zeros and
    -inf made here, not a mask built per step: built per step, its few small tensor operations took 2-4 ms at the
    start of each decode step of a replay on this shared 2-core machine (42 us alone), while the
    copy threads the step had just woken held the cores.
    """

    def __init__(self, cap: int, dtype: Any, device: str) -> None:
        import torch

        self.cap = max(1, int(cap))
        self.width = -(-self.cap // KEY_BUCKET) * KEY_BUCKET
        # `width` zeros then `width` -inf: a row of context c over k keys is the slice from width - c
        self.ramp = torch.cat([torch.zeros(self.width, dtype=dtype),
                               torch.full((self.width,), float("-inf"), dtype=dtype)]).to(device)
        self.device = device

    def keys(self, longest: int) -> int:
        return max(longest, min(-(-longest // KEY_BUCKET) * KEY_BUCKET, self.cap))

    def rows(self, contexts: list[int]) -> tuple[int, Any | None]:
        keys = self.keys(max(contexts))
        if min(contexts) == keys:
            return keys, None
        if len(contexts) == 1:
            at = self.width - contexts[0]
            return keys, self.ramp[at : at + keys].unsqueeze(0)
        import torch

        at = torch.as_tensor([self.width - c for c in contexts], dtype=torch.int64, device=self.device)
        return keys, self.ramp.unfold(0, keys, 1).index_select(0, at)


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
