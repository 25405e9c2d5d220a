"""The plan in words: the curve as a table, the recommendation, the settings (the CLI's and the
report's text)."""

from __future__ import annotations

import math

from finemoe.plan.planner import size_label


def _ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 1e3:,.0f}" if v >= 0.0995 else f"{v * 1e3:.3g}"


MARKS = {"simulated": "*", "exact": "=", "estimated": " "}


def _how(d: dict) -> str:
    return {"simulated": "simulated", "exact": "exact closed form"}.get(d.get("source", ""), "estimated")


def curve_rows(plan: dict, metric: str) -> tuple[list[int], list[tuple[str, list[str]]]]:
    """The budgets and, per strategy then the bound and the oracle, the metric's cells in ms
    (MARKS: '*' simulated, '=' a closed form that is the simulator's arithmetic); `metric` is "tpot" or "ttft"."""
    budgets = sorted({p["budget"] for p in plan["points"]})
    cells: dict = {}
    for p in plan["points"]:
        mark = MARKS[p["source"]]
        cells.setdefault(p["strategy"], {})[p["budget"]] = _ms(p[f"{metric}_p50_s"]) + mark
    rows = [(name, [row.get(b, "- ") for b in budgets]) for name, row in cells.items()]
    br = {b["budget"]: b for b in plan["brackets"]}
    rows.append(("offline MIN (copy-on-miss)", [_ms(br[b].get(f"belady_{metric}_p50_s")) + " " if b in br else "- "
                                               for b in budgets]))
    rows.append(("lower bound (copy-on-miss)", [_ms(br[b][f"bound_{metric}_p50_s"]) + " " if b in br else "- "
                                                for b in budgets]))
    if metric == "tpot" and any(b["oracle_tpot_p50_s"] for b in plan["brackets"]):
        rows.append(("oracle (offline schedule)", [_ms(br[b]["oracle_tpot_p50_s"]) + "*" if b in br and
                                                   br[b]["oracle_tpot_p50_s"] else "- " for b in budgets]))
    return budgets, rows


def plan_text(plan: dict) -> str:
    """The curves as tables (ms; * simulated), then the recommendation and its settings."""
    lines = [f"finemoe plan: {plan['model']} on {plan['request']['hardware']['name']} + "
             f"{plan['request']['cpu']['name']}" + ("; experts at a lossy precision" if plan.get("lossy") else ""),
             f"{len(plan['split']['measure'])} measured request(s), {len(plan['split']['history'])} for history; "
             "* simulated; = closed form equal to the simulator's (a placement that copies nothing); the rest "
             "estimated in closed form; offline MIN: Belady's eviction, no prefetch"]
    for metric, title in (("tpot", "time per output token (ms)"), ("ttft", "time to first token (ms)")):
        budgets, rows = curve_rows(plan, metric)
        lines += ["", f"{title:28s}" + "".join(f"{size_label(b):>9s}" for b in budgets)]
        lines += [f"{name:28s}" + "".join(f"{c:>9s}" for c in cells) for name, cells in rows]
    rec = plan["recommendation"]
    lines += ["", f"At {size_label(rec['budget'])} ({rec['slots']} expert slots): run {rec['strategy']}: {rec['what']}.",
              f"  time per output token {_ms(rec['tpot_p50_s'])} ms, time to first token {_ms(rec['ttft_p50_s'])} ms "
              f"(simulated: results/{rec['result']})"]
    if rec["runner_up"]:
        r = rec["runner_up"]
        lines.append(f"  {r['speedup']:.2f}x the runner-up, {r['strategy']} ({_ms(r['tpot_p50_s'])} ms, {_how(r)})")
    for runtime, d in rec["runtime_defaults"].items():
        if d.get("tpot_p50_s"):
            args = d["settings"]["args"] or "-"
            lines.append(f"  {d['speedup']:.2f}x {runtime}'s way ({d['strategy']}, {args}: {_ms(d['tpot_p50_s'])} ms, "
                         f"{_how(d)})")
    if rec["bound_tpot_p50_s"]:
        if rec["bound_applies"]:
            share = rec["share_of_gap_to_bound"]
            lines.append(f"  {rec['over_bound']:.2f}x the lower bound ({_ms(rec['bound_tpot_p50_s'])} ms)"
                         + (f"; it closes {share:.0%} of the gap from the slowest strategy to the bound" if share is not None else ""))
        else:
            lines.append(f"  the lower bound ({_ms(rec['bound_tpot_p50_s'])} ms) is of copy-on-miss schedules; "
                         f"computing misses on the CPU is outside it ({rec['over_bound']:.2f}x it)")
    lines += ["", f"Settings for {rec['strategy']}:"]
    for s in rec["settings"]:
        lines.append(f"  {s['runtime']:15s} {s['args'] or '-'}")
        lines.append(f"  {'':15s} {s['note']} [{s['applies_to']}]")
    others = {r: b for r, b in rec.get("best_per_runtime", {}).items() if b["strategy"] != rec["strategy"]}
    if others:
        lines += ["", "The best each runtime can express here:"]
        for runtime, b in others.items():
            lines.append(f"  {runtime:15s} {b['strategy']}: {b['settings']['args']}  ({_ms(b['tpot_p50_s'])} ms, "
                         f"{b['speedup']:.2f}x slower than {rec['strategy']})")
    return "\n".join(lines)
