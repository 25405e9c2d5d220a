"""Result files as the figures see them: one `Run` per file, with the fields figures group by.

Everything here is pure: it reads result files (through `finemoe.results`) and derives labels,
memory budgets and captions from the configuration each file records. Figures never look
anywhere else, so a figure can always be redrawn from the files it came from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import FinemoeError
from finemoe.plots.numbers import format_bytes, format_number
from finemoe.results import ResultError, RunResult, collect_result_paths, read_result

GiB = 1024**3

# Policies that are references rather than contenders: drawn dashed and labelled as such.
FLOOR_POLICIES = ("no-offload",)
BOUND_POLICIES = ("oracle",)


class PlotError(FinemoeError):
    """The results given cannot be plotted at all (none found, or a bad option such as a budget)."""


@dataclass(frozen=True)
class Run:
    """One result file and the fields figures group and place it by."""

    path: Path
    result: RunResult

    @property
    def config(self) -> dict:
        return self.result.config

    @property
    def summary(self) -> dict:
        return self.result.summary

    @property
    def engine(self) -> str:
        return str(self.config.get("engine", "sim"))

    @property
    def policy(self) -> str:
        policy = self.config.get("policy", "?")
        if isinstance(policy, dict):  # tolerate a describe() dict in place of the name
            policy = policy.get("name", "?")
        return str(policy)

    @property
    def described(self) -> dict:
        """The policy's own describe() as the engine recorded it (name, params with defaults, ...)."""
        info = self.config.get("policy_info") or {}
        return info if isinstance(info, dict) else {}

    @property
    def params(self) -> dict:
        """Policy parameters including defaults, so a default d=3 and an explicit d=3 are the same."""
        given = self.config.get("policy_params") or {}
        defaults = self.described.get("params") or {}
        out = dict(defaults) if isinstance(defaults, dict) else {}
        out.update(given if isinstance(given, dict) else {})
        return out

    @property
    def expert_label(self) -> str | None:
        """The experts' storage format when the run set one (`int4 experts (lossy)`), else None."""
        name = self.config.get("expert_dtype")
        if not name:
            return None
        from finemoe.traces.precision import EXPERT_FORMATS

        fmt = EXPERT_FORMATS.get(str(name))
        return fmt.label if fmt is not None else f"{name} experts (lossy)"

    @property
    def layer_split(self) -> str | None:
        """How the run split its slots between layers (uniform, demand, dp, a file), else None (shared)."""
        mem = self.config.get("memory") or {}
        mode = mem.get("layer_capacity") if isinstance(mem, dict) else None
        return Path(str(mode)).name if mode else None

    @property
    def is_bound(self) -> bool:
        return self.policy in BOUND_POLICIES or bool(self.described.get("is_oracle"))

    @property
    def is_floor(self) -> bool:
        return self.policy in FLOOR_POLICIES

    @property
    def hardware(self) -> str:
        hw = self.config.get("hardware") or {}
        return str(hw.get("name", "?")) if isinstance(hw, dict) else str(hw)

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def trace_name(self) -> str:
        path = self.config.get("trace_path") or ""
        name = Path(str(path)).name if path else "?"
        return name or str(path)

    @property
    def trace_id(self) -> str:
        """Trace path plus content hash where recorded: what 'the same trace' means."""
        return f"{self.config.get('trace_path', '')}#{find_key(self.config, 'trace_hash') or ''}"

    @property
    def model(self) -> str:
        profile = self.config.get("model_profile")
        if profile:
            return str(profile)
        name = find_key(self.config, "model_name")
        return str(name) if name else "as recorded in the trace"

    @property
    def gpu_mem_bytes(self) -> int | None:
        """The GPU memory budget of the run: the configured one, else the hardware's."""
        mem = self.config.get("memory") or {}
        value = mem.get("gpu_mem_bytes") if isinstance(mem, dict) else None
        if value is None:
            hw = self.config.get("hardware") or {}
            value = hw.get("gpu_mem_bytes") if isinstance(hw, dict) else None
        return int(value) if value is not None else None

    @property
    def cache_slots(self) -> int | None:
        """Expert cache slots: configured directly, or as derived by the engine and recorded."""
        mem = self.config.get("memory") or {}
        value = mem.get("expert_cache_slots") if isinstance(mem, dict) else None
        if value is None:
            value = find_key(self.config, "expert_cache_slots")
        return int(value) if value is not None else None

    @property
    def slots_set_directly(self) -> bool:
        mem = self.config.get("memory") or {}
        return isinstance(mem, dict) and mem.get("expert_cache_slots") is not None

    @property
    def on_cpu(self) -> bool:
        """Whether the expert cache lived in CPU memory: a replay on a CPU device, or a simulation
        on a profile `finemoe calibrate` measured on a CPU (its name or source says so). Its
        "GPU memory" is then host memory, and a report must not call it GPU memory."""
        replay = self.config.get("replay") or {}
        if isinstance(replay, dict) and replay.get("device"):
            return str(replay["device"]).startswith("cpu")
        hw = self.config.get("hardware") or {}
        name = str(hw.get("name", "")) if isinstance(hw, dict) else str(hw)
        source = str(hw.get("source", "")) if isinstance(hw, dict) else ""
        return name.startswith("cpu") or "calibrate on cpu" in source

    @property
    def budget_order(self) -> tuple:
        """Sort key of the run's budget: by size (slots, then bytes), never by its text."""
        if self.slots_set_directly:
            return (0, float(self.cache_slots))
        return (1, float(self.gpu_mem_bytes)) if self.gpu_mem_bytes is not None else (2, 0.0)

    def metric(self, name: str) -> float:
        value = self.summary.get(name)
        try:
            return float(value) if value is not None else math.nan
        except (TypeError, ValueError):
            return math.nan


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Every result file named or found under the given directories; none at all is an error."""
    paths = list(paths)
    if not paths:
        raise PlotError("no result files given; pass result files or directories holding them")
    for p in map(Path, paths):
        if not p.exists():
            raise PlotError(f"{p}: no such result file or directory")
    named = {Path(p) for p in paths if not Path(p).is_dir()}
    runs = []
    for f in collect_result_paths(paths):
        try:
            runs.append(Run(f, read_result(f)))
        except ResultError:
            if f in named or not _is_trace(f):  # a trace beside the results is not an error
                raise
    if not runs:
        raise PlotError(f"no result files (*.parquet) found in {', '.join(map(str, paths))}")
    return runs


def _is_trace(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        return b"finemoe" in (pq.read_schema(path).metadata or {})
    except Exception:  # unreadable: not a trace either, let the result error stand
        return False


def sim_runs(runs: Sequence[Run]) -> list[Run]:
    """The simulated runs of the study, or, when there are none, whatever engine the runs share.

    Simulations made only to check a replay (on the replay machine's calibrated profile) belong to
    the fidelity figure, not to the study's sweep: they are left out when other simulations exist.
    """
    sims = [r for r in runs if r.engine == "sim"]
    replay_hw = {r.hardware for r in runs if r.engine == "replay"}
    companions = {Path(str((r.config.get("compare") or {}).get("sim_result"))).name
                  for r in runs if r.engine == "replay"}
    study = [r for r in sims if r.hardware not in replay_hw and r.path.name not in companions]
    return study or sims or list(runs)


def varying_params(runs: Sequence[Run], exclude: Iterable[str] = ()) -> dict[str, set[str]]:
    """Per policy, the parameter names whose values differ between its runs (unset counts as a value)."""
    exclude = set(exclude)
    by_policy: dict[str, list[dict]] = {}
    for r in runs:
        by_policy.setdefault(r.policy, []).append(r.params)
    out: dict[str, set[str]] = {}
    for policy, param_sets in by_policy.items():
        names = set().union(*param_sets) - exclude
        out[policy] = {
            k for k in names
            if len({json.dumps(p.get(k, "<unset>"), sort_keys=True, default=str) for p in param_sets}) > 1
        }
    return out


def series_label(run: Run, varying: dict[str, set[str]], multi_hardware: bool = False) -> str:
    """A legend label: the policy, the parameters that tell its runs apart, and references marked."""
    label = run.policy
    names = sorted(varying.get(run.policy, ()))
    if names:
        label += " " + ",".join(f"{k}={_short(run.params.get(k, '-'))}" for k in names)
    if run.layer_split:
        label += f", {run.layer_split} layers"
    if run.expert_label:  # lossy formats say so in every legend, table and report
        label += f", {run.expert_label}"
    elif run.described.get("lossy"):  # a lossy policy (hobbit)
        label += " (lossy)"
    if multi_hardware:
        label += f" @ {run.hardware}"
    if run.is_floor:
        label += " (floor)"
    elif run.is_bound:
        label += " (bound)"
    return label


def memory_axis(runs: Sequence[Run]) -> tuple[str, callable]:
    """The x axis of memory figures: GPU memory (GiB, or MiB for small models), or expert cache
    slots when the runs set them directly instead of a budget."""
    if runs and all(r.gpu_mem_bytes is not None for r in runs) and not all(r.slots_set_directly for r in runs):
        top = max(r.gpu_mem_bytes for r in runs)
        unit, scale = ("GiB", GiB) if top >= GiB else ("MiB", 1024**2)
        return f"{memory_kind(runs)} budget ({unit})", lambda r: r.gpu_mem_bytes / scale
    totals = {find_key(r.config, "total_experts") for r in runs} - {None}
    of = f" of {totals.pop()} experts" if len(totals) == 1 else ""
    return f"expert cache (slots{of})", lambda r: float(r.cache_slots) if r.cache_slots is not None else math.nan


def caption(runs: Sequence[Run]) -> str:
    """Provenance line under every figure: trace, model profile, hardware and seed."""

    def join(values) -> str:
        vals = sorted({str(v) for v in values})
        return ", ".join(vals) if len(vals) <= 3 else f"{', '.join(vals[:3])} +{len(vals) - 3} more"

    seeds = {str(r.seed) for r in runs}
    text = (
        f"trace: {join(r.trace_name for r in runs)}  |  model: {join(r.model for r in runs)}  |  "
        f"hardware: {join(r.hardware for r in runs)}  |  seed: {join(r.seed for r in runs)}"
    )
    return text + ("  (points: mean over seeds)" if len(seeds) > 1 else "")


def memory_kind(runs: Sequence[Run]) -> str:
    """What the runs' memory budget is, from their recorded hardware: "GPU memory" only when every
    run's expert cache was on a GPU; a CPU profile's (a replay on the CPU, a calibrated cpu
    profile) is the expert cache's device memory, which is host memory."""
    cpu = [r.on_cpu for r in runs]
    if not any(cpu):
        return "GPU memory"
    if all(cpu):
        return "expert cache (device memory, CPU)"
    return "memory (GPU; device memory for CPU profiles)"


def budget_column(runs: Sequence[Run]) -> str:
    """The heading of a table's budget column: slots when every run set them, else memory_kind."""
    if runs and all(r.slots_set_directly for r in runs):
        return "expert cache"
    return memory_kind(runs)


def sorted_budgets(runs: Sequence[Run]) -> list[str]:
    """The runs' budgets as text, smallest first (6 slots < 12 slots < 48 slots)."""
    order: dict[str, tuple] = {}
    for r in runs:
        text = format_budget(r)
        order[text] = min(order.get(text, r.budget_order), r.budget_order)
    return sorted(order, key=lambda b: (order[b], b))


def format_budget(run: Run) -> str:
    if run.slots_set_directly:
        return f"{run.cache_slots} slots"
    return format_bytes(run.gpu_mem_bytes) if run.gpu_mem_bytes is not None else "-"


def _short(value) -> str:
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def find_key(tree, key: str):
    """The first value stored under `key` anywhere in a nested dict (breadth first)."""
    queue = [tree]
    while queue:
        node = queue.pop(0)
        if isinstance(node, dict):
            if key in node and node[key] is not None and not isinstance(node[key], dict):
                return node[key]
            queue.extend(v for v in node.values() if isinstance(v, dict))
    return None
