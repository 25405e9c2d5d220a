"""The bracket [bound, oracle] of a sweep's results, per budget, and whether it holds.

Reads result folders written by `finemoe simulate --policy all ... -o DIR` (all policies, several
seeds) and prints, per expert-cache size, means over seeds: the loads lower bound, the oracle's
fewest loads, the fewest loads of any other policy; the same for mean time per output token; the
bracket's width; and "holds": at every seed, bound <= oracle <= every policy, on loads and on mean
time per output token. Compared with the oracle: the policies that start from its (cold) state
and carry the bounds (not those that compute misses on the CPU or copy them at a lower precision,
which the bounds do not cover, nor a free warm start such as static-hot).

    S=../shared/traces/mixtral-8x7b-instruct
    finemoe import $S/gsm8k_2_routing.jsonl $S/humaneval_2_routing.jsonl --model-profile mixtral-8x7b -o mixtral.parquet
    finemoe simulate mixtral.parquet --hardware rtx3090 --policy all \\
        --gpu-mem 12G,16G,24G,32G,48G,64G --seed 0,2,3,4 --jobs 2 -q -o runs/mixtral
    python3 benchmarks/bench_bracket.py runs/mixtral
"""

from __future__ import annotations

import argparse
import math
import sys

import pandas as pd

from finemoe.results import summary_frame

SLOTS = "memory_plan.expert_cache_slots"
# The property tests' tolerances: the oracle's time per token within one part in a million (equal
# schedules a few ps apart); the bound within a picosecond (equal tick counts, averaged differently).
RTOL = 1e-6
EPS = 1e-12


def loads(df: pd.DataFrame) -> pd.Series:
    return df["ondemand_loads"] + df["prefetch_started"]


def bracket(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cache size: the bracket and whether it holds at every seed."""
    df = df.assign(loads=loads(df))
    oracle = df[df.policy == "oracle"].copy()
    if oracle.empty:
        raise SystemExit("error: no oracle run in these results; run simulate with --policy all (or include oracle)")
    if "policy_info.best_loads" in oracle:
        oracle["loads"] = oracle["policy_info.best_loads"].astype(int)
    others = df[(df.policy != "oracle") & df.bound_loads.notna() & (df.start_residents == 0)]
    rows = []
    for slots, at in oracle.groupby(SLOTS):
        here = others[others[SLOTS] == slots]
        holds = True
        for _, o in at.iterrows():
            mine = here[here.seed == o.seed]
            holds &= bool(o.bound_loads <= o.loads and o.bound_tpot_mean_s <= o.tpot_mean_s + EPS)
            holds &= bool((mine.loads >= o.loads).all()
                          and (mine.tpot_mean_s >= o.tpot_mean_s * (1 - RTOL)).all())
        per_policy = here.groupby("policy")[["loads", "tpot_mean_s"]].mean()
        fewest, fastest = per_policy.loads.idxmin(), per_policy.tpot_mean_s.idxmin()
        bound_t, oracle_t = at.bound_tpot_mean_s.mean(), at.tpot_mean_s.mean()
        rows.append({
            "slots": int(slots), "seeds": len(at), "bound_loads": at.bound_loads.mean(), "oracle_loads": at.loads.mean(),
            "fewest_loads": per_policy.loads[fewest], "fewest_policy": fewest,
            "bound_tpot_s": bound_t, "oracle_tpot_s": oracle_t,
            "fastest_tpot_s": per_policy.tpot_mean_s[fastest], "fastest_policy": fastest,
            "width_s": oracle_t - bound_t, "width_x": oracle_t / bound_t if bound_t > 0 else math.nan,
            "holds": holds,
        })
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="result folders of one sweep")
    args = ap.parse_args()
    table = bracket(summary_frame(args.results))
    unit, scale = ("ms", 1e3) if table.oracle_tpot_s.max() >= 1e-3 else ("us", 1e6)
    print(f"| slots | bound loads | oracle loads | fewest loads (policy) | bound TPOT {unit} | oracle TPOT {unit} "
          f"| fastest policy TPOT {unit} | bracket width (TPOT) | holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.slots} | {r.bound_loads:.0f} | {r.oracle_loads:.0f} | {r.fewest_loads:.0f} ({r.fewest_policy}) "
              f"| {scale * r.bound_tpot_s:.1f} | {scale * r.oracle_tpot_s:.1f} "
              f"| {scale * r.fastest_tpot_s:.1f} ({r.fastest_policy}) "
              f"| {max(scale * r.width_s, 0.0):.1f} {unit} ({r.width_x:.2f}x) | {'yes' if r.holds else 'NO'} |")
    sys.exit(0 if table.holds.all() else 1)


if __name__ == "__main__":
    main()
