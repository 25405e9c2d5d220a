"""A plan: the latency-memory curve of every strategy, the [bound, oracle] bracket, and the
recommendation at the user's budget, with the settings that realise it.

How the numbers are made, cheapest first:
  1. one pass over the measured accesses gives LRU's, LFU's, MIN's and per-layer LRU's stack
     distances and the history's expert counts; every strategy with a closed form gets an estimate at
     every budget from them (plan/estimate.py);
  2. the discrete-event simulator confirms, at the user's budget, the strategies whose estimate is
     within `margin` of the best, the runtimes' own ways (llama.cpp's, vLLM's) and, when asked for
     (`thorough`), the costly ones with no closed form; `confirm_everywhere` does so at every budget;
  3. the lower bound (sim/bounds.py) at the user's budget and at a few others spread over the curve;
     the offline schedule (`oracle`) only when asked for, at the budget or everywhere; the curve's
     upper edge otherwise is Belady MIN's closed form (a real schedule's estimate).
Every point says whether it was simulated or estimated; the recommendation uses simulated points only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError
from finemoe.plan.accesses import measured_accesses
from finemoe.plan.curves import lfu_distances, lru_distances, min_distances, per_group_lru_distances
from finemoe.plan.estimate import Estimate, Estimator
from finemoe.plan.runtimes import settings
from finemoe.plan.strategies import BELADY, PlanInputs, Strategy, all_strategies
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.costs import CostModel
from finemoe.sim.cpu import CpuSpec
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.memory import plan_for_config
from finemoe.traces.schema import Trace

PLAN_VERSION = 1
LLAMA_CPP_DEFAULT = "static first"  # llama.cpp --n-cpu-moe with --fit's choice of N
VLLM_DEFAULT = "stream first"  # vLLM --cpu-offload-gb


@dataclass(frozen=True)
class PlanRequest:
    trace_path: str  # the trace the simulations read (already projected onto the plan's model)
    hardware: HardwareSpec
    cpu: CpuSpec
    budget: int  # the user's GPU memory, bytes
    curve: tuple[int, ...]  # the curve's budgets, bytes (the user's among them)
    memory: MemoryConfig = MemoryConfig()
    workload: WorkloadConfig = WorkloadConfig()
    seed: int = 0
    expert_dtype: str | None = None
    margin: float = 0.15
    oracle: str = "none"  # run the offline schedule at: "none", "budget" or "all" budgets
    strategies: tuple[str, ...] | None = None  # names to keep (default: every one not costly)
    thorough: bool = False  # also the costly strategies (no closed form, several LRU runs each)
    confirm_everywhere: bool = False  # confirm the front with the simulator at every budget
    bound_budgets: int = 5  # budgets with a computed lower bound (the user's among them)

    def config(self, strategy: Strategy | None, budget: int) -> SimConfig:
        memory = replace(self.memory, gpu_mem_bytes=budget,
                         layer_capacity=strategy.layer_capacity if strategy else None)
        policy, params = ("oracle", {}) if strategy is None else (strategy.policy, dict(strategy.params))
        return SimConfig(self.trace_path, policy, self.hardware, params, memory, self.workload, seed=self.seed,
                         cpu=self.cpu, expert_dtype=self.expert_dtype)

    def to_dict(self) -> dict:
        return {"trace_path": self.trace_path, "hardware": self.hardware.to_dict(), "cpu": self.cpu.to_dict(),
                "budget": self.budget, "curve": list(self.curve), "memory": self.memory.__dict__,
                "workload": self.workload.__dict__, "seed": self.seed, "expert_dtype": self.expert_dtype,
                "margin": self.margin, "oracle": self.oracle, "thorough": self.thorough,
                "confirm_everywhere": self.confirm_everywhere, "bound_budgets": self.bound_budgets,
                "strategies": list(self.strategies) if self.strategies else None}


def chosen_strategies(req: PlanRequest, has_history: bool) -> list[Strategy]:
    """The named strategies, or every one that is not costly (with `thorough`: every one)."""
    names, candidates = req.strategies, all_strategies()
    if names:
        by_name = {s.name: s for s in candidates}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown strategy {unknown[0]!r}; known: {', '.join(sorted(by_name))}")
        blind = [n for n in names if by_name[n].needs_history] if not has_history else []
        if blind:
            raise ConfigError(f"{blind[0]} learns from the history split, and this plan has none: give "
                              "--history-fraction above 0 (and enough requests for both splits)")
    return [s for s in candidates if (s.name in names if names else req.thorough or not s.costly)
            and (has_history or not s.needs_history)]


def one_pass(trace: Trace, req: PlanRequest, history: list[int], measure: list[int]) -> PlanInputs:
    from finemoe.policies.moe_infinity import activation_matrix
    from finemoe.sim.layer_capacity import dp_sizer

    acc = measured_accesses(trace, measure)
    counts, caps = None, None
    if history:
        past = trace.select_requests(history)
        counts = activation_matrix(past, np.arange(past.num_tokens))
        caps = dp_sizer(trace, history, req.workload.max_batch)
    costs = CostModel(req.hardware, trace.geometry, req.cpu)
    return PlanInputs(acc, lru_distances(acc.key), min_distances(acc.key), lfu_distances(acc.key),
                      per_group_lru_distances(acc.key, acc.layer), counts, costs, caps)


def estimates(inputs: PlanInputs, strategies: list[Strategy], slots_at: dict[int, int]) -> dict:
    """{(strategy name, budget): Estimate} for every strategy with a closed form, and MIN's."""
    out, of = {}, Estimator(inputs.acc, inputs.costs)
    for budget, slots in slots_at.items():
        for s in [*strategies, BELADY]:
            if s.place is not None and fits(s, slots, inputs.costs.geometry, 1):
                out[s.name, budget] = of(s.place(inputs, slots))
    return out


def fits(strategy: Strategy, slots: int, geometry, max_batch: int) -> bool:
    """Whether the strategy can run on `slots` (a per-layer split needs top-k x batch slots per layer)."""
    if not strategy.layer_capacity:
        return True
    from finemoe.sim.layer_capacity import check_split_fits

    try:
        check_split_fits(strategy.layer_capacity, slots, geometry, max_batch)
    except ConfigError:
        return False
    return True


def to_simulate(req: PlanRequest, strategies: list[Strategy], est: dict, budgets: list[int], slots_at: dict,
                geometry) -> list[tuple]:
    """(strategy or None for the oracle, budget) pairs the simulator runs."""
    runs = []
    for b in budgets:
        here = b == req.budget
        if here or req.confirm_everywhere:
            scored = [est[s.name, b].tpot_p50_s for s in strategies if (s.name, b) in est]
            best = min(scored) if scored else math.inf
            for s in strategies:
                if not fits(s, slots_at[b], geometry, req.workload.max_batch):
                    continue
                e = est.get((s.name, b))
                default = here and s.name in (LLAMA_CPP_DEFAULT, VLLM_DEFAULT)
                if is_exact(req, s, e) and not req.confirm_everywhere:
                    continue  # its closed form is the simulator's arithmetic (simulated if it leads)
                if e is None or default or s.loose or e.tpot_p50_s <= best * (1 + req.margin):
                    runs.append((s, b))
        if req.oracle == "all" or (req.oracle == "budget" and here):
            runs.append((None, b))
    return runs


def is_exact(req: PlanRequest, s: Strategy, e: Estimate | None) -> bool:
    """Whether the estimate `e` of `s` is the simulator's own number: `s`'s placement does not
    depend on the clock, it copies nothing, and the workload runs requests one at a time, all
    arrived (batch 1, arrival "all"), as the closed form does."""
    return (s.exact and e is not None and e.ran_gpu_copied == 0 and req.workload.max_batch == 1
            and req.workload.arrival == "all")


def unconfirmed_best(req: PlanRequest, strategies: list[Strategy], est: dict, sims: dict) -> Strategy | None:
    """The exact strategy, not yet simulated, whose closed form ranks at or above every simulated
    point at the user's budget by `recommend`'s order (the recommendation must be simulated), or None."""
    done = [(v["tpot_p50_s"], v["ttft_p50_s"] or 0.0) for (name, b), v in sims.items()
            if b == req.budget and name != "oracle"]
    best = min(done, default=(math.inf, math.inf))
    waiting = [((e.tpot_p50_s, e.ttft_p50_s), s) for s in strategies
               if is_exact(req, s, e := est.get((s.name, req.budget))) and (s.name, req.budget) not in sims]
    top = min(waiting, key=lambda t: t[0], default=None)
    return top[1] if top is not None and top[0] <= best else None


def simulate_runs(req: PlanRequest, runs: list[tuple], out_dir: Path, jobs: int, progress: bool,
                  say) -> tuple[dict, list]:
    """Run (strategy or None for the oracle, budget) pairs (results already in `out_dir` are kept):
    their summaries by (name, budget), and the (policy, why) pairs the simulator cannot run."""
    from finemoe.results import read_result
    from finemoe.sim.sweep import run_sweep, supported_configs

    configs = [req.config(s, b) for s, b in runs]
    kept, unsupported = supported_configs(configs)
    for policy, why in unsupported:
        say(f"{policy} left out: it {why}")
    kept_ids = {id(c) for c in kept}
    pairs = [(r, c) for r, c in zip(runs, configs, strict=True) if id(c) in kept_ids]
    outcome = run_sweep([c for _, c in pairs], out_dir / "results", jobs=jobs, progress=progress)
    if outcome.failures:
        raise ConfigError("simulation failed: " + outcome.failures[0].line())
    sims = {}
    for ((s, b), _config), path in zip(pairs, outcome.paths, strict=True):
        summary = read_result(path).summary
        sims[(s.name if s else "oracle"), b] = {k: summary.get(k) for k in SIM_FIELDS} | {"result": path.name}
    return sims, unsupported


def bound_budgets(req: PlanRequest, budgets: list[int]) -> list[int]:
    """The user's budget and `req.bound_budgets - 1` others spread evenly over the curve."""
    others = [b for b in budgets if b != req.budget]
    k = max(0, min(len(others), req.bound_budgets - 1))
    picked = {others[round(i * (len(others) - 1) / max(k - 1, 1))] for i in range(k)} if k else set()
    return sorted(picked | {req.budget})


SIM_FIELDS = ("tpot_p50_s", "ttft_p50_s", "tpot_mean_s", "hit_rate", "bytes_h2d", "bytes_d2h", "ran_gpu_resident",
              "ran_gpu_copied", "ran_cpu", "bound_tpot_p50_s", "bound_ttft_p50_s", "bound_loads")


def make_plan(trace: Trace, req: PlanRequest, out_dir: Path, *, jobs: int = 1, progress: bool = True,
              say=print, model: str = "", settings_context: dict | None = None) -> dict:
    """The plan as a JSON-ready dict; simulation results are kept in `out_dir`/results."""
    from finemoe.sim.run import bounds_over
    from finemoe.sim.workload import split_requests

    base = req.config(None, req.budget)
    trace = trace.with_geometry(base.run_geometry(trace.geometry)) if req.expert_dtype else trace
    g = trace.geometry
    split = split_requests(trace, req.workload, req.seed)
    budgets, slots_at, skipped = [], {}, []
    for b in sorted(set(req.curve) | {req.budget}):
        try:
            slots_at[b] = plan_for_config(g, trace.requests, req.config(None, b)).expert_cache_slots
            budgets.append(b)
        except ConfigError as exc:
            if b == req.budget:
                raise
            skipped.append({"budget": b, "why": str(exc)})
    for row in skipped:
        say(f"budget {size_label(row['budget'])} left out: {row['why']}")
    strategies = chosen_strategies(req, bool(split.history) and not req.workload.online)
    inputs = one_pass(trace, req, list(split.history), list(split.measure))
    if inputs.acc.step_first.all():
        raise ConfigError("the measured requests have no decode steps, so time per output token, which a plan "
                          "ranks by, is undefined; plan a trace with generated tokens (or a lower --history-fraction)")
    est = estimates(inputs, strategies, slots_at)
    runs = to_simulate(req, strategies, est, budgets, slots_at, g)
    sims, unsupported = simulate_runs(req, runs, out_dir, jobs, progress, say)
    while (extra := unconfirmed_best(req, strategies, est, sims)) is not None:  # an exact one leads: confirm it
        if (extra, req.budget) in runs:
            raise ConfigError(f"{extra.name} leads at this budget and the simulator cannot run it here")
        runs.append((extra, req.budget))
        sims, unsupported = simulate_runs(req, runs, out_dir, jobs, progress, say=lambda _m: None)
    exact = {(s.name, b) for s in strategies for b in budgets if is_exact(req, s, est.get((s.name, b)))}
    points = _points(strategies, budgets, est, sims, slots_at, exact)
    with_bound = bound_budgets(req, budgets)
    bound_at = dict(zip(with_bound, bounds_over(trace, [req.config(None, b) for b in with_bound], frozenset()),
                        strict=True))
    brackets = []
    for b in budgets:
        bound = bound_at.get(b, {})
        oracle = sims.get(("oracle", b))
        brackets.append({"budget": b, "slots": slots_at[b], "bound_tpot_p50_s": bound.get("bound_tpot_p50_s"),
                         "bound_ttft_p50_s": bound.get("bound_ttft_p50_s"), "bound_loads": bound.get("bound_loads"),
                         "oracle_tpot_p50_s": oracle["tpot_p50_s"] if oracle else None,
                         "belady_tpot_p50_s": est[BELADY.name, b].tpot_p50_s,
                         "belady_ttft_p50_s": est[BELADY.name, b].ttft_p50_s})
    rec = recommend(req, strategies, points, brackets, slots_at, g, settings_context or {})
    return {
        "plan_version": PLAN_VERSION,
        "model": model or g.model_name,
        "geometry": g.to_dict(),
        "request": req.to_dict(),
        "split": split.to_dict(),
        "strategies": [{"name": s.name, "policy": s.policy, "params": s.params, "family": s.family, "what": s.what,
                        "layer_capacity": s.layer_capacity, "estimated": s.place is not None} for s in strategies],
        "points": points,
        "brackets": brackets,
        "skipped_budgets": skipped,
        "unsupported": [{"policy": p, "why": w} for p, w in unsupported],
        "recommendation": rec,
        "lossy": bool(req.expert_dtype and _lossy(req.expert_dtype)),
    }


def size_label(nbytes: int, exact: bool = False) -> str:
    """'24G', '96M', '300K' where whole; otherwise GiB or MiB with two decimals, or with `exact` the
    byte count (for a command line, which must read back the same size)."""
    for unit, letter in ((2**30, "G"), (2**20, "M"), (2**10, "K")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{letter}"
    if exact:
        return str(nbytes)
    return f"{nbytes / 2**30:.2f}G" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f}M"


def _lossy(dtype: str) -> bool:
    from finemoe.traces.precision import expert_format

    return expert_format(dtype).lossy


def _points(strategies, budgets, est, sims, slots_at, exact: set[tuple]) -> list[dict]:
    out = []
    for s in strategies:
        for b in budgets:
            e, sim = est.get((s.name, b)), sims.get((s.name, b))
            if e is None and sim is None:
                continue
            row = {"strategy": s.name, "family": s.family, "budget": b, "slots": slots_at[b],
                   "estimate": e.to_dict() if e else None, "simulated": sim}
            chosen = sim or {}
            row["tpot_p50_s"] = chosen.get("tpot_p50_s", e.tpot_p50_s if e else None)
            row["ttft_p50_s"] = chosen.get("ttft_p50_s", e.ttft_p50_s if e else None)
            row["source"] = "simulated" if sim else ("exact" if (s.name, b) in exact else "estimated")
            out.append(row)
    return out


def _cpu_layers(strategy: Strategy, slots: int, L: int, J: int) -> list[int]:
    """The layers a static layer placement keeps off the GPU at `slots` (as policies/static.py fits it)."""
    if strategy.policy == "cpu-all":
        return list(range(L))
    if strategy.policy != "static" or strategy.params.get("placement") not in ("first", "last"):
        return []
    scratch = J if strategy.params.get("offload_batch") not in (None, "off") else 0
    n = L - min(L, max(slots - scratch, 0) // J)
    return list(range(n)) if strategy.params["placement"] == "first" else list(range(L - n, L))


def recommend(req, strategies, points, brackets, slots_at, g, ctx) -> dict:
    at = {p["strategy"]: p for p in points if p["budget"] == req.budget and p["source"] in ("simulated", "exact")}
    ranked = sorted(at.values(), key=lambda p: (p["tpot_p50_s"], p["ttft_p50_s"] or 0.0))
    if not ranked:
        raise ConfigError("no strategy could be simulated at this budget")
    best, slots = ranked[0], slots_at[req.budget]
    assert best["source"] == "simulated", "make_plan confirms the leader by simulation"
    by_name = {s.name: s for s in strategies}
    bracket = next(b for b in brackets if b["budget"] == req.budget)

    def versus(name: str | None) -> dict | None:
        p = at.get(name) if name else None
        if p is None:
            return None
        return {"strategy": name, "tpot_p50_s": p["tpot_p50_s"], "ttft_p50_s": p["ttft_p50_s"], "source": p["source"],
                "speedup": p["tpot_p50_s"] / best["tpot_p50_s"] if best["tpot_p50_s"] else None}

    strategy = by_name[best["strategy"]]
    bound, worst = bracket["bound_tpot_p50_s"], ranked[-1]["tpot_p50_s"]
    covered = strategy.family == "copy"
    share = None
    if covered and bound is not None and worst > bound:
        share = (worst - best["tpot_p50_s"]) / (worst - bound)

    def realise(s: Strategy) -> list[dict]:
        layers = _cpu_layers(s, slots, g.num_layers, g.num_experts)
        return settings(s, cpu_layers=layers, offloaded_bytes=len(layers) * g.num_experts * g.bytes_per_expert,
                        trace=ctx.get("trace", req.trace_path), gpu_mem=size_label(req.budget, exact=True),
                        hardware=ctx.get("hardware", req.hardware.name), expert_tensors=ctx.get("expert_tensors"),
                        moe_blocks=ctx.get("moe_blocks"))

    defaults, best_in = {}, {}
    for runtime, name in (("llama.cpp", LLAMA_CPP_DEFAULT), ("vLLM", VLLM_DEFAULT)):
        if name in by_name:
            defaults[runtime] = versus(name) or {"strategy": name, "tpot_p50_s": None}
            defaults[runtime]["settings"] = next(r for r in realise(by_name[name]) if r["runtime"] == runtime)
    for p in ranked:  # fastest first: the first each runtime can express is its best
        for row in realise(by_name[p["strategy"]]):
            if row["args"] is not None and row["runtime"] not in best_in:
                best_in[row["runtime"]] = versus(p["strategy"]) | {"settings": row}
    return {
        "budget": req.budget,
        "slots": slots,
        "strategy": best["strategy"],
        "family": strategy.family,
        "what": strategy.what,
        "tpot_p50_s": best["tpot_p50_s"],
        "ttft_p50_s": best["ttft_p50_s"],
        "result": best["simulated"]["result"],
        "runner_up": versus(ranked[1]["strategy"]) if len(ranked) > 1 else None,
        "runtime_defaults": defaults,
        "best_per_runtime": best_in,
        "bound_tpot_p50_s": bound,
        "oracle_tpot_p50_s": bracket["oracle_tpot_p50_s"],
        "over_bound": best["tpot_p50_s"] / bound if bound else None,
        "share_of_gap_to_bound": share,
        "bound_applies": covered,
        "settings": realise(strategy),
    }
