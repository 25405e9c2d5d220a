"""Sweeps: many simulation configurations from one set of options, run and resumed by file.

A sweep is the cartesian product of its axes (policies, memory budgets or cache sizes, hardware
and hardware overrides, workload settings, seeds). `expand_sweep` turns options into `SimConfig`s
without side effects; `run_sweep` runs those whose result file is not already there, on a local
process pool or a Ray cluster, and writes one result file per configuration, named by
`SimConfig.key()`, so an interrupted sweep resumes without redoing or losing finished work.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.files import atomic_write_text, ensure_dir, locked, stale_temporaries
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.memory import parse_size

MANIFEST_NAME = "sweep.json"
PREDICTIONS_DIR = "predictions"  # what policies computed from content alone, shared by the sweep (policies/memo.py)
MANIFEST_VERSION = 1
MAX_SWEEP_VALUES = 10_000  # per axis: a range this long is almost surely a typo
ARRIVALS = ("all", "poisson", "file")

# --- values, lists and ranges -------------------------------------------------------------------

def format_size(num_bytes: int | None) -> str:
    """The shortest exact binary-unit spelling: 25769803776 -> '24G', 1610612736 -> '1536M'."""
    if num_bytes is None:
        return "-"
    for unit, scale in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale}{unit}"
    if num_bytes >= 1024**3:
        return f"{num_bytes / 1024**3:.2f}G"
    return str(num_bytes)


def parse_values(text: str, parse_one: Callable[[str], float], option: str) -> list:
    """A comma list of values or ranges `start:stop:step` (the end is included when a step lands on
    it), in the order written, without repeats. Errors name the option and the bad piece."""
    if text is None or not str(text).strip():
        raise ConfigError(f"{option}: no value given")
    out: list = []
    for piece in str(text).split(","):
        piece = piece.strip()
        if not piece:
            raise ConfigError(f"{option}: empty item in {text!r}")
        if ":" in piece:
            out.extend(_expand_range(piece, parse_one, option))
        else:
            out.append(_parse_piece(piece, parse_one, option))
    unique = list(dict.fromkeys(out))
    if len(unique) > MAX_SWEEP_VALUES:
        raise ConfigError(f"{option}: {len(unique)} values is more than {MAX_SWEEP_VALUES}; check the range")
    return unique


def _parse_piece(piece: str, parse_one: Callable[[str], float], option: str):
    try:
        return parse_one(piece)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    except ValueError:
        raise ConfigError(f"{option}: {piece!r} is not a valid value") from None


def _expand_range(piece: str, parse_one: Callable[[str], float], option: str) -> list:
    parts = piece.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{option}: range {piece!r} must be start:stop:step, e.g. 8G:48G:4G")
    start, stop, step = (_parse_piece(p.strip(), parse_one, option) for p in parts)
    if step <= 0:
        raise ConfigError(f"{option}: range {piece!r} needs a positive step")
    if stop < start:
        raise ConfigError(f"{option}: range {piece!r} ends before it starts")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_SWEEP_VALUES:
        raise ConfigError(f"{option}: range {piece!r} has {count} values, more than {MAX_SWEEP_VALUES}")
    if isinstance(start, int) and isinstance(step, int):
        return [start + i * step for i in range(count)]
    return [float(f"{start + i * step:.12g}") for i in range(count)]


def _int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ConfigError(f"{text!r} is not a whole number")
    return int(value)


def parse_sizes(text: str, option: str = "--gpu-mem") -> list[int]:
    values = parse_values(text, parse_size, option)
    if any(v <= 0 for v in values):
        raise ConfigError(f"{option}: sizes must be positive")
    return values


def parse_ints(text: str, option: str, minimum: int | None = None) -> list[int]:
    values = parse_values(text, _int, option)
    if minimum is not None and any(v < minimum for v in values):
        raise ConfigError(f"{option}: values must be at least {minimum}")
    return values


def parse_floats(text: str, option: str, positive: bool = True) -> list[float]:
    values = [float(v) for v in parse_values(text, float, option)]
    if any(not math.isfinite(v) for v in values):
        raise ConfigError(f"{option}: values must be finite numbers")
    if positive and any(v <= 0 for v in values):
        raise ConfigError(f"{option}: values must be positive")
    return values


def parse_policy_params(items: Iterable[str]) -> dict[str, dict[str, list]]:
    """`finemoe.d=3` or `finemoe.d=2,3,6` (a sweep axis) -> {"finemoe": {"d": [3]}}.

    Values read as JSON where they can (numbers, true/false, null), else as strings.
    """
    out: dict[str, dict[str, list]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        policy, dot, name = head.strip().rpartition(".")
        if not sep or not dot or not policy or not name or not value.strip():
            raise ConfigError(f"--policy-param {item!r}: write POLICY.NAME=VALUE, e.g. finemoe.d=3")
        values = list(dict.fromkeys(_param_value(v.strip()) for v in value.split(",")))
        out.setdefault(policy, {})[name] = values
    return out


def _param_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --- expansion ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSpec:
    """The axes of a sweep; every sequence is one axis of the cartesian product.

    `hardware_overrides` maps a HardwareSpec field to the values it takes (e.g. pcie_gbps: [16, 32]).
    `policy_params` maps a policy to {param: values}; it applies only to that policy's configs.
    Exactly one of `gpu_mem_bytes` / `expert_cache_slots` may vary; `(None,)` means not set.
    """

    trace_path: str
    policies: Sequence[str]
    hardware: Sequence[HardwareSpec]
    gpu_mem_bytes: Sequence[int | None] = (None,)
    expert_cache_slots: Sequence[int | None] = (None,)
    reserve_bytes: int | None = None  # None: MemoryConfig's default
    kv_tokens: int | None = None
    hardware_overrides: Mapping[str, Sequence] = field(default_factory=dict)
    policy_params: Mapping[str, Mapping[str, Sequence]] = field(default_factory=dict)
    arrival: str = "all"
    rates_rps: Sequence[float | None] = (None,)
    timestamps_path: str | None = None
    max_batch: Sequence[int] = (1,)
    history_fraction: float = 0.7
    online: bool = False
    max_requests: int | None = None
    model_profile: str | None = None
    seeds: Sequence[int] = (0,)
    layers_as_consecutive: bool = False  # a partial-layer trace's logged layers as layers 0..n-1
    cpus: Sequence = (None,)  # CpuSpecs, an axis of the policies that compute experts on the CPU only
    expert_dtypes: Sequence[str | None] = (None,)  # routed experts' storage formats (traces/precision.py)
    layer_capacities: Sequence[str | None] = (None,)  # per-layer splits of the slots (sim/layer_capacity.py)
    host_mem_bytes: Sequence[int | None] = (None,)  # host memory for experts; the rest on `storage`
    storage: object = None  # StorageSpec (sim/storage.py), with host_mem_bytes only


def expand_sweep(spec: SweepSpec, known_policies: Sequence[str] | None = None) -> list[SimConfig]:
    """Every configuration of the sweep, in a stable order (policy, params, hardware, memory,
    workload, seed), without duplicates. Checks the options but touches no file but the trace's
    existence."""
    if known_policies is None:
        from finemoe.policies.registry import policy_names

        known_policies = policy_names()
    policies = _resolve_policies(spec.policies, known_policies)
    for name in spec.policy_params:
        if name not in policies:
            raise ConfigError(
                f"--policy-param names policy {name!r}, which is not in this sweep ({', '.join(policies)})"
            )
    if not spec.hardware:
        raise ConfigError("no hardware given")
    memories = [replace(m, layer_capacity=lc) for m in _memories(spec.gpu_mem_bytes, spec.expert_cache_slots,
                                                                  spec.reserve_bytes, spec.kv_tokens)
                for lc in spec.layer_capacities]
    workloads = _workloads(spec)
    hardware = _hardware_variants(spec.hardware, spec.hardware_overrides)
    trace_path = str(Path(spec.trace_path).expanduser().resolve())
    configs: dict[str, SimConfig] = {}
    from finemoe.policies.registry import POLICIES

    for policy in policies:
        cls = POLICIES.get(policy)
        # A CPU matters only to a policy that computes experts there: the others keep their keys.
        # (None: the default preset, which `sim/run.py: cpu_for` supplies and records.)
        cpus = list(spec.cpus) if cls is not None and cls.executes_on_cpu else [None]
        for params in _param_grid(spec.policy_params.get(policy, {})):
            for dtype, host, hw, memory, workload, seed, cpu in itertools.product(
                    spec.expert_dtypes, spec.host_mem_bytes, hardware, memories, workloads, spec.seeds, cpus):
                config = SimConfig(
                    trace_path=trace_path,
                    policy=policy,
                    hardware=hw,
                    policy_params=params,
                    memory=memory,
                    workload=workload,
                    model_profile=spec.model_profile,
                    seed=int(seed),
                    layers_as_consecutive=spec.layers_as_consecutive,
                    cpu=cpu,
                    expert_dtype=dtype,
                    host_mem_bytes=None if host is None else int(host),
                    storage=None if host is None else spec.storage,
                )
                configs.setdefault(config.key(), config)
    return list(configs.values())


def _resolve_policies(names: Sequence[str], known: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        name = name.strip()
        if name == "all":
            out.extend(known)
        elif name in known:
            out.append(name)
        else:
            raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(known) or 'none'}, or all")
    if not out:
        raise ConfigError("no policy given")
    return list(dict.fromkeys(out))


def supported_configs(configs: Sequence[SimConfig], explicit: Iterable[str] = ()
                      ) -> tuple[list[SimConfig], list[tuple[str, str]]]:
    """The configurations whose trace can serve their policy, and (policy, why not) for each policy
    left out because its trace cannot (what `--policy all` does). A policy in `explicit` (named by
    the user) that a trace cannot serve is a MissingFieldError instead, as is a sweep left with
    nothing to run. Reads the traces' metadata only."""
    from finemoe.errors import MissingFieldError
    from finemoe.policies.registry import make_policy
    from finemoe.policies.support import TraceShape, unsupported_reason
    from finemoe.traces.io import read_metadata, trace_files

    shapes: dict[tuple, TraceShape] = {}
    reasons: dict[tuple, str | None] = {}
    kept, skipped = [], {}
    for c in configs:
        key = (c.trace_path, c.layers_as_consecutive)
        if key not in shapes:
            shape = TraceShape.of_metadata(read_metadata(trace_files(c.trace_path)[0]))
            shapes[key] = shape.consecutive() if c.layers_as_consecutive else shape
        pkey = (*key, c.policy, json.dumps(c.policy_params, sort_keys=True, default=str))
        if pkey not in reasons:
            reasons[pkey] = unsupported_reason(make_policy(c.policy, **c.policy_params), shapes[key])
        reason = reasons[pkey]
        if reason is None and c.host_mem_bytes is not None and make_policy(c.policy, **c.policy_params).executes_on_cpu:
            reason = "computes experts on the CPU, which an SSD tier (--host-mem) does not model yet"
        if reason is None:
            kept.append(c)
        elif c.policy in explicit:
            raise MissingFieldError(f"policy {c.policy} {reason}")
        else:
            skipped.setdefault((c.policy, reason), None)
    if configs and not kept:
        raise MissingFieldError("no policy can run on this trace: "
                                + "; ".join(f"{name} {why}" for name, why in skipped))
    return kept, list(skipped)


def _memories(gpu_mem: Sequence[int | None], slots: Sequence[int | None], reserve_bytes: int | None,
              kv_tokens: int | None) -> list[MemoryConfig]:
    has_mem = any(v is not None for v in gpu_mem)
    has_slots = any(v is not None for v in slots)
    if has_mem and has_slots:
        raise ConfigError("give --gpu-mem or --expert-cache, not both (a slot count overrides the budget)")
    if kv_tokens is not None and kv_tokens < 0:
        raise ConfigError("--kv-tokens must not be negative")
    extra = {}
    if reserve_bytes is not None:
        extra["reserve_bytes"] = int(reserve_bytes)
    if kv_tokens is not None:
        extra["kv_tokens"] = int(kv_tokens)
    if has_slots:
        return [MemoryConfig(expert_cache_slots=int(s), **extra) for s in slots]
    return [MemoryConfig(gpu_mem_bytes=None if m is None else int(m), **extra) for m in gpu_mem]


def check_split(history_fraction: float, max_requests: int | None) -> None:
    """The history/measure split options (simulate and predict share them), refused before any work."""
    if not 0.0 <= history_fraction < 1.0:
        raise ConfigError(f"--history-fraction {history_fraction} must be in [0, 1)")
    if max_requests is not None and max_requests < 1:
        raise ConfigError("--max-requests must be at least 1")


def _workloads(spec: SweepSpec) -> list[WorkloadConfig]:
    if spec.arrival not in ARRIVALS:
        raise ConfigError(f"--arrival {spec.arrival!r}: choose one of {', '.join(ARRIVALS)}")
    rates = list(spec.rates_rps)
    if spec.arrival == "poisson" and any(r is None for r in rates):
        raise ConfigError("--arrival poisson needs --rate (requests per second)")
    if spec.arrival != "poisson" and any(r is not None for r in rates):
        raise ConfigError("--rate applies only to --arrival poisson")
    timestamps = spec.timestamps_path
    if spec.arrival == "file":
        if not timestamps:
            raise ConfigError("--arrival file needs --timestamps FILE (one arrival time in seconds per line)")
        if not Path(timestamps).is_file():
            raise ConfigError(f"timestamps file {timestamps} not found")
        timestamps = str(Path(timestamps).expanduser().resolve())
    elif timestamps:
        raise ConfigError("--timestamps applies only to --arrival file")
    check_split(spec.history_fraction, spec.max_requests)
    if any(b < 1 for b in spec.max_batch):
        raise ConfigError("--batch-size must be at least 1")
    return [
        WorkloadConfig(
            arrival=spec.arrival,
            rate_rps=rate,
            timestamps_path=timestamps,
            max_batch=int(batch),
            history_fraction=spec.history_fraction,
            online=spec.online,
            max_requests=spec.max_requests,
        )
        for rate, batch in itertools.product(rates, spec.max_batch)
    ]


def _hardware_variants(hardware: Sequence[HardwareSpec], overrides: Mapping[str, Sequence]) -> list[HardwareSpec]:
    names = [k for k, v in overrides.items() if v]
    grids = [list(overrides[k]) for k in names]
    out = []
    for hw in hardware:
        for combo in itertools.product(*grids):
            out.append(hw.with_overrides(**dict(zip(names, combo, strict=True))))
    return out


def _param_grid(params: Mapping[str, Sequence]) -> list[dict]:
    names = sorted(params)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(params[n] for n in names))]


# --- files --------------------------------------------------------------------------------------


def result_filename(config: SimConfig) -> str:
    """`<policy>-<memory>-<hardware>-<key>.parquet`: readable in a listing, unique by the key."""
    if config.memory.expert_cache_slots is not None:
        memory = f"{config.memory.expert_cache_slots}slots"
    elif config.memory.gpu_mem_bytes is not None:
        memory = format_size(config.memory.gpu_mem_bytes)
    else:
        memory = "fullmem"
    parts = [config.policy, memory, config.hardware.name, config.key()]
    return "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", p).strip("_") or "x" for p in parts) + ".parquet"


def write_manifest(configs: Sequence[SimConfig], out_dir: Path) -> Path:
    """`sweep.json`: every configuration of the sweep with its key and file, merged with the
    configurations of earlier sweeps into the same folder (so the folder's manifest stays whole).

    Read, merge and write happen under a lock on `.sweep.json.lock`, so sweeps started together
    into one folder each add their entries instead of overwriting the other's."""
    path = ensure_dir(out_dir) / MANIFEST_NAME
    with locked(path.with_name("." + MANIFEST_NAME + ".lock")):  # hidden: not a result
        entries = _manifest_entries(path)
        for c in configs:
            entries[c.key()] = {"key": c.key(), "file": result_filename(c), "config": c.to_dict()}
        text = json.dumps({"finemoe_sweep": MANIFEST_VERSION, "configs": list(entries.values())}, indent=1,
                          default=str)
        atomic_write_text(path, text)
    return path


def _manifest_entries(path: Path) -> dict[str, dict]:
    """key -> entry of an existing manifest; empty when there is none or it is damaged (rebuilt)."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        return {e["key"]: e for e in old.get("configs", [])}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}


def read_manifest(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no sweep manifest")
    try:
        return json.loads(path.read_text())["configs"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable sweep manifest ({exc})") from None


def _clean_stale_temporaries(out_dir: Path, names: Iterable[str]) -> None:
    """Temporary files a killed writer left behind for the results about to be (re)written."""
    for name in names:
        for tmp in stale_temporaries(out_dir, name):
            tmp.unlink(missing_ok=True)


# --- running ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """A configuration that raised, or whose worker kept dying; the sweep went on without it."""

    config: SimConfig
    path: Path
    error: str

    def line(self) -> str:
        c = self.config
        memory = (
            f"{c.memory.expert_cache_slots} slots"
            if c.memory.expert_cache_slots is not None
            else format_size(c.memory.gpu_mem_bytes)
        )
        return f"{c.policy} {memory} {c.hardware.name} (key {c.key()}): {self.error}"


@dataclass
class SweepOutcome:
    """`paths`: result files of every configuration that has one now, in configuration order."""

    paths: list[Path]
    ran: int
    skipped: int
    failures: list[Failure]
    executor: str = "local"

    @property
    def ok(self) -> bool:
        return not self.failures


def predictions_first(configs: Sequence[SimConfig]) -> list[int]:
    """An order to hand configurations to parallel workers: first one of each group that shares what
    its policy computes from content alone (the same configuration but for memory and hardware:
    FineMoE's matches, ProMoE's predictors, in the sweep's predictions folder), then the rest in
    their order. Two workers then never start a group together, one computing while the other
    waits for it on the folder's lock; the rest of a group finds the predictions made."""
    first: dict[str, int] = {}
    for i, config in enumerate(configs):
        d = config.to_dict()
        del d["memory"], d["hardware"]
        first.setdefault(json.dumps(d, sort_keys=True, default=str), i)
    lead = set(first.values())
    return sorted(first.values()) + [i for i in range(len(configs)) if i not in lead]


def run_sweep(
    configs: Sequence[SimConfig],
    out_dir: str | os.PathLike,
    executor: str = "local",
    jobs: int = 1,
    resume: bool = True,
    *,
    work=None,
    ray_address: str | None = None,
    ray_trace_transport: str = "object-store",
    max_retries: int = 2,
    progress: bool = True,
) -> SweepOutcome:
    """Run each configuration whose result file is missing or unreadable and write its result.

    Results are written here, in this process, as they arrive (atomically, named by
    `result_filename`), whatever executor computed them: a sweep started on one executor can be
    finished on another. A configuration that raises is recorded as a Failure and the others go on.
    `work` (a `finemoe.sim.executors.Work`) replaces the simulator, for tests and benchmarks.
    """
    from finemoe.results import result_exists, write_result
    from finemoe.sim.executors import TaskFailure, Work, make_executor

    out = ensure_dir(out_dir)
    configs = list(configs)
    write_manifest(configs, out)
    paths = [out / result_filename(c) for c in configs]
    todo = [i for i, p in enumerate(paths) if not (resume and result_exists(p))]
    if executor != "local" or (jobs or 1) > 1:
        todo = [todo[j] for j in predictions_first([configs[i] for i in todo])]
    skipped = len(configs) - len(todo)
    _clean_stale_temporaries(out, (paths[i].name for i in todo))
    failures: list[Failure] = []
    if todo:
        runner = make_executor(
            executor,
            jobs=jobs,
            ray_address=ray_address,
            trace_transport=ray_trace_transport,
            max_retries=max_retries,
        )
        bar = _progress_bar(len(todo), skipped, enabled=progress)
        # closing: an interrupt while a result is written stops the executor (and its workers) now
        try:
            work = replace(work or Work.default(), predictions_dir=str(out / PREDICTIONS_DIR))
            with closing(runner.map([configs[i] for i in todo], work)) as outcomes:
                for j, outcome in outcomes:
                    i = todo[j]
                    if isinstance(outcome, TaskFailure):
                        failures.append(Failure(configs[i], paths[i], outcome.error))
                    else:
                        write_result(outcome, paths[i])
                    bar.update(1)
                    if failures:
                        bar.set_postfix(failed=len(failures))
        finally:
            bar.close()
    failed = {id(f.config) for f in failures}
    done = [p for c, p in zip(configs, paths, strict=True) if id(c) not in failed and p.exists()]
    order = {id(c): i for i, c in enumerate(configs)}
    failures.sort(key=lambda f: order[id(f.config)])
    return SweepOutcome(done, ran=len(todo), skipped=skipped, failures=failures, executor=executor)


def _progress_bar(total: int, skipped: int, enabled: bool):
    from tqdm import tqdm

    desc = "simulate" if not skipped else f"simulate ({skipped} done before)"
    return tqdm(total=total, desc=desc, unit="config", disable=not enabled, dynamic_ncols=True)

