"""The plan's figure: time per output token against GPU memory for every strategy, the [bound,
oracle] bracket, and the recommendation marked at the user's budget (from `finemoe plan`'s JSON)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from finemoe.plots.style import Rendered, finish, new_figure

FAMILY_STYLE = {"copy": "-", "cpu": "--", "stream": ":"}


def plan_figure(plan: dict, out_dir: Path) -> Rendered:
    """Solid markers: simulated points; hollow: closed-form estimates."""
    top = max(p["budget"] for p in plan["points"])
    GIB, unit = (2**30, "GiB") if top >= 4 * 2**30 else (2**20, "MiB")  # noqa: N806 (a unit, as a constant)
    fig, axes = new_figure(9.0, 5.0)
    ax = axes[0][0]
    by_strategy: dict[str, list[dict]] = {}
    for p in plan["points"]:
        by_strategy.setdefault(p["strategy"], []).append(p)
    colours = plt.get_cmap("tab20").colors
    for i, (name, pts) in enumerate(by_strategy.items()):
        pts = sorted(pts, key=lambda p: p["budget"])
        xs = [p["budget"] / GIB for p in pts]
        ys = [p["tpot_p50_s"] * 1e3 for p in pts]
        (line,) = ax.plot(xs, ys, FAMILY_STYLE.get(pts[0]["family"], "-"), label=name, linewidth=1.4,
                          color=colours[(2 * i) % 20 + (i // 10) % 2])
        for x, y, p in zip(xs, ys, pts, strict=True):
            filled = p["source"] == "simulated"
            ax.plot([x], [y], "o", color=line.get_color(), markersize=4.5,
                    markerfacecolor=line.get_color() if filled else "none")
    brackets = sorted(plan["brackets"], key=lambda b: b["budget"])
    bx = [b["budget"] / GIB for b in brackets if b["bound_tpot_p50_s"] is not None]
    by = [b["bound_tpot_p50_s"] * 1e3 for b in brackets if b["bound_tpot_p50_s"] is not None]
    mins = [(b["budget"] / GIB, b["belady_tpot_p50_s"] * 1e3) for b in brackets if b.get("belady_tpot_p50_s")]
    if mins:
        ax.plot(*zip(*mins, strict=True), color="grey", linewidth=1.0, linestyle=(0, (1, 1)),
                label="offline MIN (estimated)")
    if bx:
        ax.plot(bx, by, "k.-", linewidth=1.0, markersize=5, label="lower bound (copy-on-miss)")
    ox = [(b["budget"] / GIB, b["oracle_tpot_p50_s"] * 1e3) for b in brackets if b["oracle_tpot_p50_s"] is not None]
    if ox:
        ax.plot(*zip(*ox, strict=True), "k^", markersize=6, label="oracle (offline schedule)")
        bound_at = {b["budget"] / GIB: b["bound_tpot_p50_s"] * 1e3 for b in brackets if b["bound_tpot_p50_s"]}
        for x, y in ox:
            if x in bound_at:
                ax.vlines(x, bound_at[x], y, colors="black", linewidth=3, alpha=0.25)
    rec = plan["recommendation"]
    ax.plot([rec["budget"] / GIB], [rec["tpot_p50_s"] * 1e3], "*", color="crimson", markersize=16,
            markeredgecolor="black", label=f"recommended: {rec['strategy']}", zorder=5)
    ax.axvline(rec["budget"] / GIB, color="crimson", linewidth=0.8, alpha=0.4)
    ax.set_xlabel(f"GPU memory ({unit})")
    ax.set_ylabel("time per output token, median (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    lossy = " (lossy expert precision)" if plan.get("lossy") else ""
    title = f"Plan for {plan['model']} on {plan['request']['hardware']['name']} + {plan['request']['cpu']['name']}{lossy}"
    caption = ("Solid markers simulated, hollow ones estimated in closed form; solid lines copy to the GPU, "
               "dashed compute misses on the CPU, dotted stream weights every pass. The bound holds for copy-on-miss.")
    return finish(fig, "plan", title, caption, out_dir)
