"""The policy interface: the only thing the engines (simulator and replayer) know about prediction.

An engine drives a policy through one run. It feeds it only what a real server would know at that
moment: the semantic key of a step once its embedding has run, and the routing of layer l once
layer l's gate has run. Only policies with `is_oracle = True` get an `OracleView` of the future,
and their results are labelled as bounds.

Call order for one run:
    bind(ctx) -> fit(history) -> prepare(trace, measured requests) (offline simulation only) -> initial_residents()
    per engine step:  on_step_start(step)           -> prefetches
      per layer:      on_layer_routed(routing)      -> prefetches
                      on_access(layer, expert, hit)    for each routed expert of the layer
    when a load needs a slot and the cache is full: choose_victim(evictable, for_prefetch)
    (only if `executes_on_cpu`) place_misses(...) per layer with misses: where each missed expert runs
    on_loaded / on_evicted keep the policy's view of residency in step with the engine's
    on_request_finished(request) when a request completes (online learning)

The engine owns residency (slots, copies in flight) and the transfer queue; a policy owns
*which* experts to prefetch and *which* to evict. Engines serve on-demand loads before queued
prefetches, prefetches by descending priority, and drop a queued prefetch once the (step, layer)
it was meant for has passed; a prefetch with a `ready_s` in the future joins the queue at that time. Both engines call these methods in the same order, so the same
policy makes the same decisions given the same timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from finemoe.sim.costs import CostModel
    from finemoe.traces.geometry import Geometry
    from finemoe.traces.schema import Trace

ExpertKey = tuple[int, int]  # (layer, expert)

# Where a missed expert runs (`Policy.place_misses`): copied to the GPU and computed there once it
# has landed, staying cached (what every copy-on-miss policy does); copied and computed there, its
# slot freed once the layer is done (a runtime's temporary buffer: llama.cpp's prompt offload,
# Fiddler); computed on the CPU from host memory; or computed on the CPU now while a copy brings it
# to the GPU for later steps.
COPY = "copy"
COPY_ONCE = "copy-once"
CPU = "cpu"
CPU_AND_COPY = "cpu+copy"
PLACEMENTS = (COPY, COPY_ONCE, CPU, CPU_AND_COPY)


@dataclass(frozen=True, order=True)
class Prefetch:
    """Ask for expert `expert` of layer `layer` to be resident by layer `layer` of engine step `step`.

    `priority`: larger is served first (FineMoE: p / (l - l_now)). `ready_s`: the copy may not start
    before this time, because the prediction behind it is still being computed then (FineMoE's map
    search on its own thread); 0 means at once. The simulator honours it exactly; the replayer runs
    the policy's code for real, so its predictions appear when that code has finished.
    """

    priority: float
    step: int
    layer: int
    expert: int
    ready_s: float = field(default=0.0, compare=False)

    @property
    def key(self) -> ExpertKey:
        return (self.layer, self.expert)


def ranked_prefetches(step: int, priorities: dict[ExpertKey, float], ready_s: float = 0.0) -> list[Prefetch]:
    """Prefetches for `step` from (layer, expert) -> priority, highest priority first, as sorting the
    `Prefetch` objects would order them (then layer, then expert, descending), at a fraction of the
    cost: the policies build one such list per layer-step."""
    ranked = sorted(((priority, layer, expert) for (layer, expert), priority in priorities.items()), reverse=True)
    return [Prefetch(priority, step, layer, expert, ready_s) for priority, layer, expert in ranked]


@dataclass(frozen=True)
class Sequence:
    """One request's share of an engine step: rows [start, stop) of the trace, one iteration."""

    request_id: int
    iteration: int
    start: int
    stop: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    @property
    def is_prefill(self) -> bool:
        return self.iteration == 0


@dataclass
class StepInfo:
    """What is known when an engine step begins: who is in the batch and their embedding output."""

    step: int
    now_s: float
    sequences: tuple[Sequence, ...]
    _trace: Trace = field(repr=False)

    def semantic_key(self, index: int) -> np.ndarray | None:
        """Mean embedding-layer output (float32) of sequence `index`'s tokens in this iteration."""
        keys = self._trace.semantic_key
        if keys is None:
            return None
        s = self.sequences[index]
        return keys[s.start : s.stop].astype(np.float32).mean(axis=0)


@dataclass
class LayerRouting:
    """The gate output of one layer for every token of the step; arrays are sliced lazily.

    Per sequence i (index into `step.sequences`): `experts(i)` [tokens, K], `weights(i)`,
    `router_probs(i)` [tokens, J] (None if the trace lacks them) and `spec_experts(i)` (layer+1's
    router applied to this layer's input; None if absent). Missing records are all -1.
    """

    step: StepInfo
    layer: int
    now_s: float
    _trace: Trace = field(repr=False)

    def _rows(self, name: str, index: int) -> np.ndarray | None:
        arr = getattr(self._trace, name)
        if arr is None:
            return None
        s = self.step.sequences[index]
        return arr[s.start : s.stop, self.layer]

    def experts(self, index: int) -> np.ndarray:
        return self._rows("experts", index)

    def weights(self, index: int) -> np.ndarray:
        return self._rows("weights", index)

    def router_probs(self, index: int) -> np.ndarray | None:
        return self._rows("router_probs", index)

    def router_rows(self, index: int) -> np.ndarray | None:
        """`router_probs(i)` as float32 with missing records (NaN) as zeros, as `np.nan_to_num` would
        give them, without its cost when every value is finite (the common case)."""
        rows = self._rows("router_probs", index)
        if rows is None:
            return None
        rows = rows.astype(np.float32)
        return rows if np.isfinite(rows).all() else np.nan_to_num(rows, copy=False)

    def spec_experts(self, index: int) -> np.ndarray | None:
        return self._rows("spec_experts", index)

    def spec_weights(self, index: int) -> np.ndarray | None:
        return self._rows("spec_weights", index)

    def needed(self) -> dict[int, int]:
        """Expert id -> number of tokens routed to it at this layer in this step."""
        counts: dict[int, int] = {}
        for i in range(len(self.step.sequences)):
            ids, n = np.unique(self.experts(i), return_counts=True)
            for e, c in zip(ids.tolist(), n.tolist(), strict=True):
                if e >= 0:
                    counts[e] = counts.get(e, 0) + c
        return counts


class OracleView:
    """The future, for oracle policies only. Engines implement it; see sim/engine.py."""

    num_layers: int = 0  # set by the engine: a position is step x num_layers + layer

    def next_use(self, key: ExpertKey, after: tuple[int, int]) -> float:
        """Engine (step, layer) index of the next use of `key` strictly after `after`, as a
        monotone float position; `inf` if never used again."""
        raise NotImplementedError

    def upcoming(self, after: tuple[int, int], limit: int) -> list[tuple[int, int, int]]:
        """Up to `limit` future accesses (step, layer, expert), in order, strictly after `after`."""
        raise NotImplementedError

    def first_uses(self, after: tuple[int, int], limit: int) -> tuple[list[tuple[int, int, int]], int, int]:
        """Of `upcoming(after, limit)`: each expert's first access, in order; how many accesses the
        window held; the position (step x layers + layer) of its last one (-1: none). An engine
        may answer it faster than this, which reads the window."""
        window = self.upcoming(after, limit)
        seen, first = set(), []
        for s, layer, e in window:
            if (layer, e) not in seen:
                seen.add((layer, e))
                first.append((s, layer, e))
        return first, len(window), (window[-1][0] * self.num_layers + window[-1][1]) if window else -1

    def first_use_arrays(self, after: tuple[int, int], limit: int, num_experts: int):
        """`first_uses` as int64 arrays, for a policy that filters them with numpy: each first
        access's position and key (layer x `num_experts` + expert), in order; then how many
        accesses the window held and the position of its last one (-1: none)."""
        first, count, last = self.first_uses(after, limit)
        pos = np.array([s * self.num_layers + layer for s, layer, _ in first], dtype=np.int64)
        keys = np.array([layer * num_experts + e for _, layer, e in first], dtype=np.int64)
        return pos, keys, count, last


@dataclass(frozen=True)
class PolicyContext:
    """What a policy is told when bound to a run."""

    geometry: Geometry
    capacity_slots: int  # expert slots in GPU memory
    seed: int
    is_resident: Callable[[ExpertKey], bool]
    is_in_flight: Callable[[ExpertKey], bool]
    expert_load_s: float  # modelled time to copy one expert over the host-to-device link
    oracle: OracleView | None = None  # set only for policies with is_oracle = True
    costs: CostModel | None = None  # the timing model's cost functions (GPU, link and, with --cpu, CPU)
    # The prefetch queued (not yet started) for an expert, or None; None where the engine keeps no queue.
    queued: Callable[[ExpertKey], Prefetch | None] | None = None


class Policy:
    """Base class: prefetches nothing; subclasses implement `choose_victim`, override the rest at will.

    `name` is what `--policy` accepts; `needs` names trace fields the policy requires (the engine
    raises MissingFieldError naming them if absent).
    """

    name: ClassVar[str] = "base"
    is_oracle: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    uses_history: ClassVar[bool] = False  # whether fit()/on_request_finished() learn anything
    # Whether the policy may compute missed experts on the CPU: the engine then asks `place_misses`
    # and needs a CPU profile (docs/cpu-execution.md).
    executes_on_cpu: ClassVar[bool] = False
    # The format (traces/precision.py) a policy may fetch unimportant misses in (HOBBIT): the cache
    # then asks `fetch_low` per copy, and the policy is lossy. None: every copy at full precision.
    low_precision: str | None = None

    def __init__(self, **params) -> None:
        if params:
            raise TypeError(f"policy {self.name} takes no parameters, got {', '.join(params)}")
        self.params: dict = {}
        self.ctx: PolicyContext | None = None

    # --- life cycle -------------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def fit(self, history: Trace) -> None:
        """Learn from the history split before measurement starts (no-op by default)."""

    def prepare(self, trace: Trace, measure: list[int]) -> None:
        """An offline run (the history fixed before it starts) is about to measure these requests of
        `trace`: predictions that depend only on the trace and the history, not on the cache or
        the clock, may be computed for all of them now, once for every budget of a sweep (FineMoE's
        map matches). Online runs and the replayer never call it (no-op by default)."""

    def initial_residents(self) -> list[ExpertKey]:
        """Experts resident before the first step (at most capacity_slots of them)."""
        return []

    def on_request_finished(self, request_id: int, trace: Trace) -> None:
        """A request completed; online policies may add its routing to their history."""

    # --- prediction ---------------------------------------------------------------------------
    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        return ()

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        return ()

    # --- caching ------------------------------------------------------------------------------
    def on_access(self, layer: int, expert: int, hit: bool, now_s: float) -> None:
        """A routed expert was needed at its layer (hit: it was resident at that moment)."""

    def on_loaded(self, key: ExpertKey, now_s: float) -> None:
        """`key` became resident (a demand load or a prefetch finished)."""

    def on_evicted(self, key: ExpertKey, now_s: float) -> None:
        """`key` left the cache."""

    def choose_victim(
        self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None, now_s: float
    ) -> ExpertKey | None:
        """The resident expert to evict so a load can proceed.

        `for_prefetch` is None for an on-demand load (then a victim must be returned if any
        resident expert is evictable) or the prefetch asking (returning None drops it).
        """
        raise NotImplementedError

    def place_misses(self, layer: int, misses: list[int], tokens: list[int], step_tokens: int,
                     now_s: float) -> dict[int, str]:
        """Where each missed expert of `layer` runs: COPY, CPU or CPU_AND_COPY (base.py), by expert id.
        `tokens[i]`: the tokens routed to `misses[i]`; `step_tokens`: the step's batch. Asked only of
        policies with `executes_on_cpu`; every other policy copies every miss."""
        return dict.fromkeys(misses, COPY)

    def layers_ahead(self) -> int:
        """How many layers past the current one this policy predicts (0: none); on a log of only some
        layers those must be logged (finemoe/policies/support.py). Its `distance` parameter if it has one."""
        return int(self.params.get("distance", 0))

    def fetch_low(self, key: ExpertKey) -> bool:
        """Whether `key`, needed now, may be (or stay) at `low_precision`: asked for each routed
        expert of a policy with `low_precision`. A resident low-precision copy that may not stay
        is a miss, reloaded at full precision."""
        return False

    @property
    def lossy(self) -> bool:
        """Whether the policy changes the model's outputs (a lower precision for some experts)."""
        return self.low_precision is not None

    def describe(self) -> dict:
        """Name and parameters, as recorded in result files."""
        out = {"name": self.name, "params": dict(self.params), "is_oracle": self.is_oracle}
        if self.lossy:
            out["lossy"] = f"fetches unimportant misses as {self.low_precision}"
        return out
