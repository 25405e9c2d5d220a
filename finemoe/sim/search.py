"""The oracle's local search: change one decision of a candidate schedule at a time, keep what helps.

A candidate (policies/oracle.py) is a rule: Belady's victim, a prefetch for every first use within
its lookahead. On small instances a policy's imperfect rule sometimes beats every candidate, and
the way it does is nearly always one of two moves (docs/bounds.md, "Local search"):
- it leaves a copy to its demand load that the candidate prefetches: on a slow link a late prefetch
  only delays the copies behind it, or takes a slot whose expert would still have hit;
- it keeps an expert that Belady's order evicts: while a layer's experts are served one by one
  through too few slots, the farthest next use is not always the cheapest victim.
So from each candidate's run this search tries, one at a time, to drop an ask it sent or to keep a
victim it chose at that position (and, a third move, to ask early for an expert the run loaded on
demand: a copy started at its step's start shortens the stall a demand load would have), and
hill-climbs (first improvement; on hit rate sideways moves too) on one metric at a time:
time per output token, hit rate, fewest loads. Every run it makes is a real schedule on the same
engine, start state and clairvoyant view as its candidate; the best per metric joins the
candidates. A fixed budget of runs, no clock: the same instance gives the same schedules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from finemoe.policies.oracle import Decisions
from finemoe.policies.registry import make_policy
from finemoe.results import RunResult
from finemoe.sim.config import SimConfig

RUNS_PER_METRIC = 60  # engine runs the search may spend on each metric's climbs
RUNS_PER_START = 20  # of which, on one candidate's schedule
SIDEWAYS_RUNS = 30  # and on hit rate's sideways climbs, after its plain ones (`PASSES`)
SIDEWAYS_PER_START = 20
RATIONED_RUNS = 30  # and on hit rate's climbs from the rationed candidates, after all the others
MAX_LAYER_STEPS = 2_000  # above, no search: a run costs too much to try dozens


@dataclass(frozen=True)
class SearchCost:
    runs: int  # engine runs made
    wall_s: float  # their wall time, summed


@dataclass(frozen=True)
class Start:
    """A candidate's last (most clairvoyant) run: what the search starts from."""

    label: str
    params: dict
    planned: list | None  # the steps it was given as its future (None: the engine's view)
    result: RunResult
    decisions: Decisions
    climbs: frozenset | None = None  # the metrics whose climbs may start from it (None: every one)
    group: str = ""  # the passes that climb from it are those of its group (`Pass.group`)


def loads(result: RunResult) -> int:
    """Copies a run made: on-demand loads and prefetches started."""
    s = result.summary
    return int(s["ondemand_loads"]) + int(s["prefetch_started"])


def time_rank(result: RunResult) -> tuple:
    """The oracle's choice: lowest mean TPOT, then makespan, then fewest loads, then hit rate."""
    s = result.summary
    tpot = s["tpot_mean_s"]
    return (math.inf if math.isnan(tpot) else tpot, s["makespan_s"], loads(result), -s["hit_rate"])


METRICS: dict[str, Callable[[RunResult], tuple]] = {
    "tpot": time_rank,
    "hit_rate": lambda r: (-r.summary["hit_rate"], *time_rank(r)),
    "loads": lambda r: (loads(r), *time_rank(r)),
}


# The kinds of move each metric's climb tries (`moves`), in this order, or, for the metrics in
# `IN_TURN`, one of each kind in turn. For time, added asks come last: tried earlier they took the
# budget of the other moves. For hit rate an added ask is the one move that aims at a hit (an
# access whose expert is resident), but the others reach hits too (an ask dropped keeps a victim
# that would have hit): taking the kinds in turn closed more cases than either order
# (docs/bounds.md). An added copy rarely saves a load.
MOVE_ORDER: dict[str, tuple[str, ...]] = {
    "tpot": ("late", "asks", "keep", "add"),
    "hit_rate": ("add", "late", "asks", "keep"),
    "loads": ("keep", "asks", "late"),
}
IN_TURN = frozenset({"hit_rate"})


@dataclass(frozen=True)
class Pass:
    """One round of climbs: on `metric`, from each candidate in turn (best first), `runs` in all and
    `per_start` from one; `sideways`: an edit that leaves the rank as it was is kept too, and the
    climb goes on from it (on hit rate one edit often makes room for the next one's hit without a
    hit of its own: dropping the ask that takes the slot an added ask needs, say)."""

    metric: str
    sideways: bool
    runs: int
    per_start: int
    group: str = ""  # it climbs from the starts of this group only (`Start.group`)


# Hit rate's sideways climbs come after its plain ones, with their own runs: taking sideways moves
# from the first, the climbs spent their budget elsewhere and lost a case the plain ones close
# (docs/bounds.md). Coming after them, a sideways pass only adds runs to what the plain ones find.
# The rationed candidates (sim/offline.py) are climbed from in a pass of their own, last, for the
# same reason: among the others' starts they took the runs that close two regression cases.
PASSES = (
    Pass("tpot", False, RUNS_PER_METRIC, RUNS_PER_START),
    Pass("hit_rate", False, RUNS_PER_METRIC, RUNS_PER_START),
    Pass("hit_rate", True, SIDEWAYS_RUNS, SIDEWAYS_PER_START),
    Pass("loads", False, RUNS_PER_METRIC, RUNS_PER_START),
    Pass("hit_rate", False, RATIONED_RUNS, RUNS_PER_START, group="rationed"),
)


def moves(decisions: Decisions, metric: str) -> list[tuple]:
    """The edits to try for `metric`, each once, by kind as `MOVE_ORDER` and `IN_TURN` say: "add",
    an ask for an expert that came by its demand load, sent from its step's start; "late", drop an
    ask whose copy landed late (it only held up the copies behind it); "asks", drop one that landed
    in time; "keep", keep a chosen victim. Within a kind, in the run's order."""
    kinds = {"add": [("add", p, k) for p, k in decisions.demands],
             "late": [("skip", p, k) for p, k in decisions.late],
             "asks": [("skip", p, k) for p, k in decisions.asks],
             "keep": [("keep", p, k) for p, k in decisions.victims]}
    lists = [kinds[kind] for kind in MOVE_ORDER[metric]]
    if metric in IN_TURN:
        ordered = [m for turn in itertools.zip_longest(*lists) for m in turn if m is not None]
    else:
        ordered = [m for kind in lists for m in kind]
    return list(dict.fromkeys(ordered))


def run_edited(trace, config: SimConfig, run_policy: Callable, start: Start,
               edits: frozenset) -> tuple[RunResult, Decisions]:
    """One run of the start's candidate with `edits` applied, recording its decisions."""
    policy = make_policy("oracle", **start.params)
    policy.planned_steps = start.planned
    policy.skip_asks = frozenset((p, k) for kind, p, k in edits if kind == "skip")
    policy.keep = frozenset((p, k) for kind, p, k in edits if kind == "keep")
    policy.add_asks = frozenset((p, k) for kind, p, k in edits if kind == "add")
    policy.decisions = Decisions()
    return run_policy(trace, config, policy, bounds=False), policy.decisions


def distinct(starts: list[Start]) -> list[Start]:
    """The starts less those that made the same decisions as one before them (the candidates often
    agree, aggressive prefetch with one layer's lookahead and two's, say): their neighbourhoods are
    the same moves, and a budget spent twice on them is spent on nothing new."""
    seen, out = set(), []
    for s in starts:
        key = (tuple(s.decisions.asks), tuple(s.decisions.victims))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def at_bound(metric: str, result: RunResult, bounds: dict) -> bool:
    """Whether `result` meets a lower bound no schedule crosses (sim/bounds.py; every access a hit
    for the hit rate), so that searching on is pointless."""
    s = result.summary
    if metric == "tpot":
        return s["tpot_mean_s"] <= bounds.get("bound_tpot_mean_s", -math.inf)
    if metric == "loads":
        return loads(result) <= bounds.get("bound_loads", -1)
    return s["hit_rate"] >= 1.0


def improve(trace, config: SimConfig, run_policy: Callable, starts: list[Start], bounds: dict,
            passes: tuple[Pass, ...] = PASSES) -> tuple[dict[str, tuple[str, RunResult]], SearchCost]:
    """Per metric, the best (label, run) the search reached, and what it cost. Each run
    counts for every metric, whichever one it was climbing for; a pass's climbs start from the
    candidates in its metric's order, best first; none where a candidate meets its lower bound
    (`bounds`, the bound_* summary fields of the start state)."""
    best = {m: min(((s.label, s.result) for s in starts), key=lambda lr, m=m: METRICS[m](lr[1]))
            for m in METRICS}
    cost = SearchCost(0, 0.0)

    def run(start: Start, edits: frozenset) -> tuple[RunResult, Decisions]:
        nonlocal cost
        result, decisions = run_edited(trace, config, run_policy, start, edits)
        cost = SearchCost(cost.runs + 1, cost.wall_s + result.summary["wall_s"])
        for m, rank in METRICS.items():
            if rank(result) < rank(best[m][1]):
                best[m] = (f"{start.label}+{len(edits)} edits", result)
        return result, decisions

    for p in passes:
        if at_bound(p.metric, best[p.metric][1], bounds):
            continue  # no schedule does better
        rank, left = METRICS[p.metric], p.runs
        mine = [s for s in starts if s.group == p.group and (s.climbs is None or p.metric in s.climbs)]
        for start in distinct(sorted(mine, key=lambda s: rank(s.result))):
            if left <= 0:
                break
            left -= climb(start, p.metric, min(p.per_start, left), run, p.sideways)
    return best, cost


def climb(start: Start, metric: str, budget: int, run: Callable, sideways: bool = False) -> int:
    """First-improvement hill climb on `metric` from `start` (taking sideways moves too, with
    `sideways`), in at most `budget` runs of `run(start, edits)`; returns the runs it made."""
    rank = METRICS[metric]
    edits, current, decisions, made = frozenset(), rank(start.result), start.decisions, 0
    moved = True
    while moved and made < budget:
        moved = False
        for move in moves(decisions, metric):
            if move in edits:
                continue
            tried = edits | {move}
            result, tried_decisions = run(start, tried)
            made += 1
            ranked = rank(result)
            if ranked < current or (sideways and ranked == current):
                edits, current, decisions, moved = tried, ranked, tried_decisions, True
                break
            if made >= budget:
                break
    return made
