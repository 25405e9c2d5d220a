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
    """The dense part of one layer: x [T, H] @ W [H, C] (attention, router, shared experts, head)."""
    return x @ weight
