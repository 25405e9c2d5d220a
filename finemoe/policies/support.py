"""Whether a trace can serve a policy: the trace fields it needs, and, on a log of only some layers,
whether the layers its predictions reach are there.

One check for every command (simulate, replay, predict), so that a policy a trace cannot serve
refuses in one sentence instead of running and silently predicting nothing (ProMoE predicting 3
layers ahead into layers the log lacks would otherwise equal LRU exactly). The check reads only
what a trace file's metadata says (`TraceShape.of_metadata`), so a sweep can sort its policies
before any worker starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finemoe.errors import MissingFieldError
from finemoe.policies.base import Policy

OPTIONAL_FIELDS = ("router_probs", "semantic_key", "spec_experts", "spec_weights")
CONSECUTIVE_HINT = "give --layers-as-consecutive to take the logged layers as the model's consecutive layers"


@dataclass(frozen=True)
class TraceShape:
    """What a support check needs to know of a trace: its layer count, the optional fields it
    carries and the layers it logs."""

    num_layers: int
    fields: frozenset[str]
    logged_layers: tuple[int, ...]

    @classmethod
    def of_trace(cls, trace) -> TraceShape:
        fields = frozenset(f for f in OPTIONAL_FIELDS if getattr(trace, f, None) is not None)
        return cls(trace.geometry.num_layers, fields, tuple(trace.logged_layers))

    @classmethod
    def of_metadata(cls, meta: dict) -> TraceShape:
        """From `finemoe.traces.io.read_metadata`'s dict (geometry, columns, free-form metadata)."""
        from finemoe.traces.schema import LAYERS_LOGGED_KEY

        num_layers = meta["geometry"].num_layers
        logged = (meta.get("metadata") or {}).get(LAYERS_LOGGED_KEY)
        layers = tuple(range(num_layers)) if logged is None else tuple(int(v) for v in logged)
        return cls(num_layers, frozenset(f for f in OPTIONAL_FIELDS if f in meta.get("columns", ())), layers)

    @property
    def is_partial(self) -> bool:
        return len(self.logged_layers) < self.num_layers

    def consecutive(self) -> TraceShape:
        """The shape of `Trace.logged_layers_only()`: the logged layers as layers 0..n-1."""
        n = len(self.logged_layers)
        return TraceShape(n, self.fields, tuple(range(n)))


def missing_fields(policy: Policy, shape: TraceShape) -> list[str]:
    return [name for name in policy.needs if name not in shape.fields]


def unreached_layers(policy: Policy, shape: TraceShape) -> list[int]:
    """Model layers a prediction from a logged layer reaches (1..layers_ahead() past it) that the
    trace does not log, in order."""
    reach = int(policy.layers_ahead())
    logged = set(shape.logged_layers)
    if reach <= 0 or not shape.is_partial:
        return []
    return sorted({t for layer in logged for t in range(layer + 1, min(layer + reach, shape.num_layers - 1) + 1)
                   if t not in logged})


def unsupported_reason(policy: Policy, shape: TraceShape) -> str | None:
    """Why the trace cannot serve the policy (completing 'policy NAME ...'), or None if it can."""
    missing = missing_fields(policy, shape)
    if missing:
        return f"needs trace field(s) {', '.join(missing)}, which this trace does not carry"
    lacking = unreached_layers(policy, shape)
    if lacking:
        reach = policy.layers_ahead()
        return (f"predicts {reach} layer{'s' if reach != 1 else ''} ahead, into layers this trace lacks "
                f"(it logs {len(shape.logged_layers)} of {shape.num_layers} layers: {_layers(shape.logged_layers)}; "
                f"its predictions reach layer {lacking[0]}); {CONSECUTIVE_HINT}")
    return None


def check_support(policy: Policy, trace) -> None:
    """MissingFieldError in one sentence when `trace` cannot serve `policy`."""
    reason = unsupported_reason(policy, TraceShape.of_trace(trace))
    if reason:
        raise MissingFieldError(f"policy {policy.name} {reason}")


def _layers(layers: Sequence[int], shown: int = 8) -> str:
    head = ", ".join(str(v) for v in layers[:shown])
    return head + (f", ... ({len(layers) - shown} more)" if len(layers) > shown else "")
