"""One look for every figure: colours per policy, the caption line, atomic PNG/SVG output.

matplotlib is imported with the Agg backend here and only here, so figures render on machines
without a display and `finemoe --help` never pays for importing matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from finemoe.files import atomic_path, ensure_dir  # noqa: E402

# Same results, same bytes: SVG element ids from a fixed salt, no creation date in the files.
matplotlib.rcParams["svg.hashsalt"] = "finemoe"
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}

FORMATS = ("png", "svg")
DPI = 130

# Fixed colours so a policy looks the same in every figure of a study.
_POLICY_COLOURS = {
    "no-offload": "#000000",
    "oracle": "#7f7f7f",
    "lru": "#1f77b4",
    "lfu": "#17becf",
    "layerwise": "#8c564b",
    "mixtral-offloading": "#ff7f0e",
    "moe-infinity": "#9467bd",
    "promoe": "#2ca02c",
    "finemoe": "#d62728",
}
_FALLBACK = ["#e377c2", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2"]


def policy_colour(policy: str) -> str:
    if policy in _POLICY_COLOURS:
        return _POLICY_COLOURS[policy]
    for name, colour in _POLICY_COLOURS.items():  # ablation variants share their family's colour
        if policy.startswith(name + "-"):
            return colour
    return _FALLBACK[sum(map(ord, policy)) % len(_FALLBACK)]


@dataclass
class Rendered:
    """A figure written to disk, with what was drawn (tests check figures are not empty)."""

    name: str
    title: str
    files: list[Path]
    lines: int
    patches: int
    collections: int
    caption: str
    axis_labels: tuple[str, ...] = ()  # every axis's x and y label, units included

    @property
    def png(self) -> Path | None:
        return next((f for f in self.files if f.suffix == ".png"), None)

    @property
    def artists(self) -> int:
        return self.lines + self.patches + self.collections


def new_figure(width: float = 7.5, height: float = 4.6, nrows: int = 1, ncols: int = 1, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    return fig, axes


def finish(fig: Figure, name: str, title: str, caption: str, out_dir: Path, formats=FORMATS) -> Rendered:
    """Title, caption line, layout, then an atomic write of each format; the figure is closed."""
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, color="#444444", wrap=True)
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    counts = _count_artists(fig)
    labels = tuple(text for ax in fig.axes for text in (ax.get_xlabel(), ax.get_ylabel()) if text)
    out_dir = ensure_dir(out_dir)
    files = []
    try:
        for fmt in formats:
            files.append(_save_atomic(fig, out_dir / f"{name}.{fmt}", fmt))
    finally:
        plt.close(fig)
    return Rendered(name, title, files, *counts, caption=caption, axis_labels=labels)


def _count_artists(fig: Figure) -> tuple[int, int, int]:
    lines = patches = collections = 0
    for ax in fig.axes:
        lines += len([ln for ln in ax.lines if len(ln.get_xdata()) > 0])
        patches += len(ax.patches)
        collections += len(ax.collections)
    return lines, patches, collections


def _save_atomic(fig: Figure, path: Path, fmt: str) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=_METADATA.get(fmt))
    return path
