"""What a plan compares: every way finemoe can run a model that does not fit, as a policy of the
simulator, and where it has one, the placement its closed-form estimate assumes (plan/estimate.py).

A strategy's `place` returns, per measured access, where its expert runs (GPU, COPY or CPU); None
means it has no closed form (its prefetches depend on timing and predictions: FineMoE, cost-aware)
and the plan can only simulate it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from finemoe.plan.accesses import Accesses
from finemoe.plan.curves import misses_at
from finemoe.plan.estimate import COPY, CPU, GPU
from finemoe.policies.static import hot_placement
from finemoe.policies.static_hot import hottest


@dataclass(frozen=True)
class PlanInputs:
    """What one pass over the trace gives every strategy: the accesses, their LRU and MIN stack
    distances, and the history split's expert counts [L, J] (None without a history)."""

    acc: Accesses
    lru: np.ndarray
    min: np.ndarray
    lfu: np.ndarray
    layer_lru: np.ndarray  # LRU distances within each layer (a cache per layer)
    history_counts: np.ndarray | None
    costs: object  # CostModel
    layer_caps: Callable[[int], tuple[int, ...]] | None = None  # the DP split of the slots (None: no history)


Placer = Callable[[PlanInputs, int], "np.ndarray | None"]


@dataclass(frozen=True)
class Strategy:
    name: str  # the plan's label for it
    policy: str  # the simulator's policy
    params: dict = field(default_factory=dict)
    family: str = "copy"  # "copy" (copy-on-miss), "cpu" (misses computed on the CPU), "stream"
    what: str = ""
    place: Placer | None = None
    layer_capacity: str | None = None
    needs_history: bool = False
    costly: bool = False  # its simulation costs several LRU runs: in a plan only when asked for
    loose: bool = False  # its closed form can be far off: always simulated at the user's budget
    policy_file: str | None = None  # the user's file that defines its policy (`--policy-file`)
    exact: bool = False  # where it copies nothing, its closed form is the simulator's arithmetic (tests/test_plan_curves.py)


def _cached(distances: str, miss: int) -> Placer:
    def place(inp: PlanInputs, slots: int) -> np.ndarray:
        return np.where(misses_at(getattr(inp, distances), slots), miss, GPU)
    return place


def _per_layer(inp: PlanInputs, slots: int) -> np.ndarray:
    caps = np.asarray(inp.layer_caps(slots))
    return np.where(inp.layer_lru >= caps[inp.acc.layer], COPY, GPU)


def _layers_on(where_cpu: str, miss: int) -> Placer:
    """Whole layers off the GPU, the fewest that let the others fit (llama.cpp's --fit), first or last."""
    def place(inp: PlanInputs, slots: int) -> np.ndarray:
        acc = inp.acc
        L, J = acc.num_layers, acc.num_experts
        if miss == COPY:
            slots -= J  # one layer's experts of scratch for the streamed copies (policies/placement.py)
        n = L - min(L, max(slots, 0) // J)
        off = np.arange(n) if where_cpu == "first" else np.arange(L - n, L)
        return np.where(np.isin(acc.layer, off), miss, GPU)
    return place


def _resident_set(keys: list, acc: Accesses) -> np.ndarray:
    mask = np.zeros(acc.num_layers * acc.num_experts, dtype=bool)
    for layer, e in keys:
        mask[layer * acc.num_experts + e] = True
    return mask[acc.key]


def _hot(inp: PlanInputs, slots: int) -> np.ndarray:
    return np.where(_resident_set(hot_placement(inp.history_counts, slots), inp.acc), GPU, CPU)


def _fiddler(inp: PlanInputs, slots: int) -> np.ndarray:
    acc, costs = inp.acc, inp.costs
    scratch = min(slots, costs.geometry.top_k)  # the copies' buffer (policies/fiddler.py)
    resident = _resident_set(hottest(inp.history_counts, slots - scratch), acc)
    tokens, inverse = np.unique(acc.tokens, return_inverse=True)
    copy_wins = np.array([costs.expert_load_s + costs.expert_compute_s(int(t))
                          < costs.cpu_expert_s(int(t)) + 2.0 * costs.activation_copy_s(int(t)) for t in tokens])
    return np.where(resident, GPU, np.where(copy_wins[inverse], COPY, CPU))


def _all_cpu(inp: PlanInputs, slots: int) -> np.ndarray:
    return np.full(len(inp.acc.key), CPU)


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("lru", "lru", what="copy each miss to the GPU, evict the least recently used", place=_cached("lru", COPY)),
    Strategy("lfu", "lfu", what="copy each miss, evict the least frequently used", place=_cached("lfu", COPY)),
    Strategy("lru per-layer dp", "lru", layer_capacity="dp", needs_history=True, place=_per_layer,
             what="copy each miss, slots split between layers by a DP over the history's hit curves"),
    Strategy("cost-aware", "cost-aware", needs_history=True, costly=True,
             what="finemoe's own: prefetch only when the saving beats the link time, evict by next use"),
    Strategy("finemoe", "finemoe", needs_history=True, costly=True,
             what="FineMoE's expert maps: prefetch the predicted experts"),
    Strategy("static first", "static", {"placement": "first", "cpu_layers": "fit"}, "cpu",
             "the first layers' experts on the CPU, the rest resident (llama.cpp --n-cpu-moe)",
             _layers_on("first", CPU), exact=True),
    Strategy("static last", "static", {"placement": "last", "cpu_layers": "fit"}, "cpu",
             "the last layers' experts on the CPU, the rest resident (llama.cpp -ot)", _layers_on("last", CPU), exact=True),
    Strategy("static hot", "static", {"placement": "hot"}, "cpu",
             "each layer's most used experts resident, the rest on the CPU (per-expert -ot rules, forks)",
             _hot, needs_history=True, exact=True),
    Strategy("fiddler", "fiddler", family="cpu", needs_history=True,
             what="popular experts resident; each miss copied or computed on the CPU, whichever is sooner",
             place=_fiddler, exact=True),
    Strategy("cache-cpu-miss", "cache-cpu-miss", {"cache": "lru"}, "cpu",
             "an LRU cache whose misses run on the CPU while they are copied for later (HybriMoE)",
             # loose: a copy the link cannot start in time is dropped, so the cache thrashes less than
             # LRU's (36% slower than the simulator at 24G on Mixtral, where LRU's 62 slots face a
             # 64-expert cycle; 5-10% elsewhere)
             _cached("lru", CPU), loose=True),
    Strategy("cpu-all", "cpu-all", family="cpu", what="every routed expert on the CPU (ktransformers)",
             place=_all_cpu, exact=True),
    Strategy("stream first", "static", {"placement": "first", "cpu_layers": "fit", "offload_batch": 1}, "stream",
             "the first layers' weights in host memory, copied to the GPU in every forward pass "
             "(vLLM --cpu-offload-gb)", _layers_on("first", COPY)),
)

# The ideal of copy-on-miss without prefetching, for the curve's lower edge: Belady's MIN.
BELADY = Strategy("belady (ideal demand)", "oracle", {"prefetch": "none"}, place=_cached("min", COPY))


def policy_strategies() -> tuple[Strategy, ...]:
    """Every other registered online policy at its defaults, as a strategy with no closed form: the
    built-in ones are costly (in a plan with `thorough`, or when named), a `--policy-file`'s are not
    (the user loaded them to see them). Left out: the oracle, no-offload (a reference, not a way to
    run a model that does not fit), ablations (a subclass of a registered policy named after it,
    such as finemoe-topk) and lossy ones (hobbit: they change the model's outputs, which a plan of
    one model at one precision does not weigh; --expert-dtype plans at a lower precision)."""
    from finemoe.policies.registry import POLICIES, make_policy, policy_names
    from finemoe.policies.user import user_policies

    names = policy_names()
    covered = {s.policy for s in STRATEGIES} | {"no-offload"}
    files = user_policies()
    out = []
    for name in names:
        cls = POLICIES[name]
        variant = any(name.startswith(base + "-") and issubclass(cls, POLICIES[base]) for base in names if base != name)
        if name in covered or cls.is_oracle or variant or make_policy(name).lossy:
            continue
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        out.append(Strategy(name, name, family="cpu" if cls.executes_on_cpu else "copy",
                            what=doc[0].rstrip(".") if doc else name, needs_history=cls.uses_history,
                            costly=name not in files, policy_file=files.get(name)))
    return tuple(out)


def all_strategies() -> tuple[Strategy, ...]:
    return STRATEGIES + policy_strategies()


def by_name(name: str) -> Strategy:
    for s in all_strategies():
        if s.name == name:
            return s
    raise KeyError(name)
