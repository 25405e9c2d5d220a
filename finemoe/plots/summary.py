"""What a study says, computed from its result files: per budget, which policy is fastest, by how
much, and how much of the gap to the oracle it closes; and one line on each result that looks
wrong at first sight, explained from the same result columns (never from what a policy is
supposed to do, which the data might contradict).

The grid is the memory figures' one: the study's simulated runs, one cell per policy series and
budget, seeds averaged; the oracle (bound) and no-offload (floor) are references, not contenders.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from finemoe.plots.common import drop_single_points, mean, series
from finemoe.plots.data import (
    Run,
    format_budget,
    memory_axis,
    series_label,
    sim_runs,
    sorted_budgets,
    varying_params,
)
from finemoe.plots.numbers import format_bytes, format_number, format_percent, format_time

# A winner's hit rate below this share of the best hit rate at its budget is worth a sentence.
LOW_HIT_SHARE = 0.5
# Slower than LRU by more than this ratio while hitting more than this many points more.
SLOWER_RATIO = 1.05
HIGHER_HIT = 0.05
# The oracle's TTFT below this share of the best contender's is "far below".
FAR_BELOW = 0.5


@dataclass(frozen=True)
class Cell:
    """One policy series at one budget: its runs (seeds) and their mean metrics."""

    label: str
    budget: str
    runs: tuple[Run, ...]

    @property
    def is_bound(self) -> bool:
        return self.runs[0].is_bound

    @property
    def is_floor(self) -> bool:
        return self.runs[0].is_floor

    @property
    def is_contender(self) -> bool:
        return not (self.is_bound or self.is_floor)

    @property
    def policy(self) -> str:
        return self.runs[0].policy

    def metric(self, name: str) -> float:
        return mean([r.metric(name) for r in self.runs])


def study_cells(runs: Sequence[Run]) -> list[Cell]:
    """The policy x budget grid of the study: contenders by label, then the bound, then the floor;
    within a row, budgets smallest first."""
    study = sim_runs(runs)
    _, x_of = memory_axis(study)
    members = [r for group in drop_single_points(series(study, x_of), x_of).values() for r in group]
    varying = varying_params(members)
    multi_hw = len({r.hardware for r in members}) > 1
    grouped: dict[tuple[str, str], list[Run]] = {}
    for r in members:
        grouped.setdefault((series_label(r, varying, multi_hw), format_budget(r)), []).append(r)
    cells = [Cell(label, budget, tuple(rs)) for (label, budget), rs in grouped.items()]
    return sorted(cells, key=lambda c: (c.is_floor, c.is_bound, c.label))


def budgets_of(cells: Sequence[Cell]) -> list[str]:
    """The budgets of the grid, smallest first."""
    return sorted_budgets([r for c in cells for r in c.runs])


def _at(cells: Sequence[Cell], budget: str) -> list[Cell]:
    return [c for c in cells if c.budget == budget]


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value)


@dataclass(frozen=True)
class BudgetFinding:
    """The fastest contender at one budget on median time per output token, and its references."""

    budget: str
    ranked: tuple[Cell, ...]  # contenders, fastest first
    oracle: Cell | None

    @property
    def winner(self) -> Cell:
        return self.ranked[0]

    @property
    def runner_up(self) -> Cell | None:
        return self.ranked[1] if len(self.ranked) > 1 else None

    @property
    def worst(self) -> Cell | None:
        return self.ranked[-1] if len(self.ranked) > 1 else None

    def below(self, other: Cell) -> float:
        """How much less time per token the winner takes than `other`, as a fraction of other's."""
        theirs = other.metric("tpot_p50_s")
        return (theirs - self.winner.metric("tpot_p50_s")) / theirs if theirs > 0 else math.nan

    @property
    def oracle_share(self) -> float:
        """The winner's share of the gap between the worst contender and the oracle: 1 = oracle."""
        if self.oracle is None or self.worst is None:
            return math.nan
        worst, oracle = self.worst.metric("tpot_p50_s"), self.oracle.metric("tpot_p50_s")
        if not (_finite(worst) and _finite(oracle)) or worst <= oracle:
            return math.nan
        return (worst - self.winner.metric("tpot_p50_s")) / (worst - oracle)


def findings(cells: Sequence[Cell]) -> list[BudgetFinding]:
    """One finding per budget that has a contender with a time per token, smallest budget first."""
    out = []
    for budget in budgets_of(cells):
        here = _at(cells, budget)
        ranked = sorted((c for c in here if c.is_contender and _finite(c.metric("tpot_p50_s"))),
                        key=lambda c: (c.metric("tpot_p50_s"), c.label))
        if ranked:
            oracle = next((c for c in here if c.is_bound and _finite(c.metric("tpot_p50_s"))), None)
            out.append(BudgetFinding(budget, tuple(ranked), oracle))
    return out


def _pct(fraction: float) -> str:
    return f"{format_number(100.0 * fraction, 2)}%"


def finding_sentence(f: BudgetFinding, unit: tuple[str, float]) -> str:
    """'mixtral-offloading is fastest at 194 µs per output token, 21% below the runner-up ...'."""
    def t(cell: Cell) -> str:
        return format_time(cell.metric("tpot_p50_s"), unit)

    w = f.winner
    if f.runner_up is None:
        text = f"only {w.label} ran: {t(w)} per output token"
    else:
        text = f"{w.label} is fastest at {t(w)} per output token"
        if w.metric("tpot_p50_s") == f.runner_up.metric("tpot_p50_s"):
            text += f", tied with {f.runner_up.label}"
        else:
            text += f", {_pct(f.below(f.runner_up))} below the runner-up {f.runner_up.label} ({t(f.runner_up)})"
        if f.worst is not f.runner_up:
            text += f" and {_pct(f.below(f.worst))} below the slowest, {f.worst.label} ({t(f.worst)})"
    share = f.oracle_share
    if _finite(share):
        text += f"; it closes {_pct(share)} of the gap from {f.worst.label} to the oracle ({t(f.oracle)})"
    elif f.oracle is not None:
        text += f"; the oracle takes {t(f.oracle)}"
    return text + "."


def gap_share(worst: float, mine: float, reference: float) -> float:
    """How much of the gap from `worst` down to `reference` a time `mine` closes (1 = all of it)."""
    if not (_finite(worst) and _finite(mine) and _finite(reference)) or worst <= reference:
        return math.nan
    return (worst - mine) / (worst - reference)


def bracket_sentence(f: BudgetFinding, unit: tuple[str, float]) -> str:
    """'[bound, oracle]: [1 ms, 2 ms]; of the gap from lru to the oracle / to the bound, finemoe
    closes 50% / 44%, ...': the lower bound the oracle's result records (sim/bounds.py) and every
    contender's share of both gaps; empty without an oracle that records a bound."""
    if f.oracle is None or not _finite(f.oracle.metric("bound_tpot_p50_s")):
        return ""
    bound, oracle = f.oracle.metric("bound_tpot_p50_s"), f.oracle.metric("tpot_p50_s")
    text = f"[bound, oracle] on median time per output token: [{format_time(bound, unit)}, {format_time(oracle, unit)}]"
    if f.worst is not None:
        worst = f.worst.metric("tpot_p50_s")
        shares = [f"{c.label} {_pct_or_dash(gap_share(worst, c.metric('tpot_p50_s'), oracle))} / "
                  f"{_pct_or_dash(gap_share(worst, c.metric('tpot_p50_s'), bound))}" for c in f.ranked[:-1]]
        text += f"; of the gap from {f.worst.label} to the oracle / to the bound: {', '.join(shares)}"
    return text + "."


def _pct_or_dash(fraction: float) -> str:
    return _pct(fraction) if _finite(fraction) else "-"


def headline(found: Sequence[BudgetFinding]) -> str:
    """Who wins how many budgets, most wins first."""
    if not found:
        return "No budget has a policy with a time per output token to compare."
    wins = Counter(f.winner.label for f in found)
    parts = [f"{label} at {n} of {len(found)}" for label, n in sorted(wins.items(), key=lambda kv: (-kv[1], kv[0]))]
    return ("Lowest median time per output token (the oracle and no-offload are references, not "
            f"contenders): {'; '.join(parts)} budget{'s' if len(found) > 1 else ''}.")


# --- odd results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Odd:
    rule: str
    subject: str
    severity: float
    budget: str
    text: str


def odd_results(cells: Sequence[Cell], units: dict[str, tuple[str, float]]) -> list[str]:
    """One sentence per result that looks wrong, from the result columns; a rule that fires at
    several budgets for the same policy is told once, at its most extreme budget."""
    found = findings(cells)
    odd: list[_Odd] = []
    for f in found:
        here = _at(cells, f.budget)
        odd += _low_hit_winner(f, here, units)
        odd += _slower_than_lru(f, here, units)
        odd += _oracle_ttft(f, here, units)
        odd += _beats_oracle(f, units)
    best: dict[tuple[str, str], list[_Odd]] = {}
    for o in odd:
        best.setdefault((o.rule, o.subject), []).append(o)
    lines = []
    for group in best.values():
        top = max(group, key=lambda o: o.severity)
        others = [o.budget for o in group if o is not top]
        lines.append(top.text + (f" The same holds at {', '.join(others)}." if others else ""))
    return lines


def _stall(cell: Cell, units) -> str:
    return format_time(cell.metric("stall_s"), units["stall"])


def _low_hit_winner(f: BudgetFinding, here: Sequence[Cell], units) -> list[_Odd]:
    """The fastest policy with a hit rate well below the best hit rate at its budget."""
    w = f.winner
    hitters = [c for c in here if c.is_contender and _finite(c.metric("hit_rate"))]
    if not hitters or not _finite(w.metric("hit_rate")):
        return []
    top = max(hitters, key=lambda c: (c.metric("hit_rate"), c.label))
    if top is w or w.metric("hit_rate") >= LOW_HIT_SHARE * top.metric("hit_rate"):
        return []
    text = (f"{w.label} has the lowest time per output token at {f.budget} "
            f"({format_time(w.metric('tpot_p50_s'), units['tpot'])}) with a hit rate of only "
            f"{format_percent(w.metric('hit_rate'))} ({top.label}: {format_percent(top.metric('hit_rate'))}): ")
    clauses = []
    late, misses = w.metric("prefetch_late"), w.metric("misses")
    if _finite(late) and _finite(misses) and late > 0 and misses > 0:
        clauses.append(f"{format_number(late)} of its {format_number(misses)} misses ({format_percent(late / misses)}) "
                       "were experts already queued or on the wire for a prefetch when their layer needed "
                       "them, which count as misses but wait only for the rest of their copy")
    if w.metric("stall_s") < top.metric("stall_s"):
        clauses.append(f"it waited {_stall(w, units)} on copies in all, against {_stall(top, units)} for {top.label}")
    else:
        clauses.append(f"its wait on copies ({_stall(w, units)}) is no shorter than {top.label}'s "
                       f"({_stall(top, units)}), so the difference is not in copy waits")
    return [_Odd("low-hit-winner", w.label, top.metric("hit_rate") - w.metric("hit_rate"), f.budget,
                 text + "; ".join(clauses) + ".")]


def _slower_than_lru(f: BudgetFinding, here: Sequence[Cell], units) -> list[_Odd]:
    """A policy that hits more often than on-demand LRU at the same budget and is still slower."""
    lru = next((c for c in here if c.is_contender and c.policy == "lru"), None)
    if lru is None:
        return []
    out = []
    for c in here:
        if c is lru or not c.is_contender:
            continue
        slower = c.metric("tpot_p50_s") / lru.metric("tpot_p50_s") if lru.metric("tpot_p50_s") > 0 else math.nan
        if not (c.metric("hit_rate") > lru.metric("hit_rate") + HIGHER_HIT and slower > SLOWER_RATIO):
            continue
        text = (f"{c.label} is slower than on-demand {lru.label} at {f.budget} "
                f"({format_time(c.metric('tpot_p50_s'), units['tpot'])} against "
                f"{format_time(lru.metric('tpot_p50_s'), units['tpot'])} per token) despite a higher hit rate "
                f"({format_percent(c.metric('hit_rate'))} against {format_percent(lru.metric('hit_rate'))}): ")
        clauses = []
        moved, lru_moved = c.metric("bytes_h2d"), lru.metric("bytes_h2d")
        if moved > lru_moved:
            clauses.append(f"it moved {format_bytes(moved)} host-to-device, {format_bytes(moved - lru_moved)} more")
        started, unused = c.metric("prefetch_started"), c.metric("prefetch_unused_evicted")
        if started > 0 and unused > 0:
            clauses.append(f"{format_percent(unused / started)} of the {format_number(started)} prefetches it "
                           "started were evicted before any use")
        clauses.append(f"it waited {_stall(c, units)} on copies against {_stall(lru, units)}")
        out.append(_Odd("slower-than-lru", c.label, slower, f.budget, text + "; ".join(clauses) + "."))
    return out


def _first_step_misses(cell: Cell) -> tuple[int, int] | None:
    """(misses, expert uses) in the first engine step of the cell's first run's timeline."""
    events = [e for e in cell.runs[0].result.timeline if e.get("kind") == "expert"]
    if not events:
        return None
    first = min(int(e.get("step", 0)) for e in events)
    step = [e for e in events if int(e.get("step", 0)) == first]
    return sum(1 for e in step if e.get("miss")), len(step)


def _oracle_ttft(f: BudgetFinding, here: Sequence[Cell], units) -> list[_Odd]:
    """The oracle's first token far sooner than every contender's."""
    oracle = next((c for c in here if c.is_bound), None)
    ranked = sorted((c for c in f.ranked if _finite(c.metric("ttft_p50_s"))), key=lambda c: c.metric("ttft_p50_s"))
    if oracle is None or not ranked or not _finite(oracle.metric("ttft_p50_s")):
        return []
    best, mine = ranked[0], oracle.metric("ttft_p50_s")
    if not mine < FAR_BELOW * best.metric("ttft_p50_s"):
        return []
    ratio = best.metric("ttft_p50_s") / mine if mine > 0 else math.inf
    text = (f"The oracle's time to first token at {f.budget} ({format_time(mine, units['ttft'])}) is "
            f"{format_number(ratio, 2)}x below the best policy's ({best.label}, "
            f"{format_time(best.metric('ttft_p50_s'), units['ttft'])}): ")
    own, theirs = _first_step_misses(oracle), _first_step_misses(best)
    if own is not None and theirs is not None:
        text += (f"in its first engine step it missed {own[0]} of {own[1]} expert uses against {theirs[0]} of "
                 f"{theirs[1]} for {best.label}")
        if own[1] and theirs[1] and own[0] / own[1] < theirs[0] / theirs[1]:
            text += ", so more of the experts its first token needs are resident when needed."
        else:
            text += ", so its lead is not in the first step."
    else:
        text += (f"its hit rate is {format_percent(oracle.metric('hit_rate'))} against "
                 f"{format_percent(best.metric('hit_rate'))}.")
    return [_Odd("oracle-ttft", oracle.label, ratio, f.budget, text)]


def _beats_oracle(f: BudgetFinding, units) -> list[_Odd]:
    """A contender faster per token than the oracle, which is meant to be at or below every policy."""
    w, oracle = f.winner, f.oracle
    if oracle is None or not w.metric("tpot_p50_s") < oracle.metric("tpot_p50_s"):
        return []
    text = (f"{w.label} takes less time per output token than the oracle at {f.budget} "
            f"({format_time(w.metric('tpot_p50_s'), units['tpot'])} against "
            f"{format_time(oracle.metric('tpot_p50_s'), units['tpot'])}): its hit rate is "
            f"{format_percent(w.metric('hit_rate'))} against {format_percent(oracle.metric('hit_rate'))}, its wait "
            f"on copies {_stall(w, units)} against {_stall(oracle, units)}")
    bound = oracle.runs[0].described.get("bound")
    text += f"; the oracle's result records its bound as: {bound}." if bound else "."
    return [_Odd("beats-oracle", w.label, oracle.metric("tpot_p50_s") / w.metric("tpot_p50_s"), f.budget, text)]


def replay_sentences(runs: Sequence[Run], units: dict[str, tuple[str, float]]) -> list[str]:
    """Per replayed configuration: measured against simulated time per token and hit rate."""
    from finemoe.plots.fidelity import pair_runs

    out = []
    for pair in pair_runs(runs):
        measured, simulated = pair.replay.get("tpot_p50_s", math.nan), pair.sim.get("tpot_p50_s", math.nan)
        text = (f"Replayed for real on {pair.runs[0].hardware}, {pair.label} took "
                f"{format_time(measured, units['tpot'])} per output token against "
                f"{format_time(simulated, units['tpot'])} simulated")
        err = pair.relative_error("tpot_p50_s")
        if _finite(err) and err != 0:
            text += f" (the simulator {_pct(abs(err))} {'optimistic' if err < 0 else 'pessimistic'})"
        text += (f"; hit rate {format_percent(pair.replay.get('hit_rate', math.nan))} measured, "
                 f"{format_percent(pair.sim.get('hit_rate', math.nan))} simulated.")
        out.append(text)
    return out
