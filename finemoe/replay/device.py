"""Which device, which dtype, how much memory: the few facts about the machine the replayer needs."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finemoe.errors import ConfigError

TORCH_DTYPES = ("float32", "bfloat16", "float16")


def check_device(device: str) -> str:
    """`device` normalised ("cpu", "cuda", "cuda:1"); a ConfigError when CUDA is asked for but absent."""
    import torch

    d = device.strip().lower()
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} asked for a CUDA GPU, but torch sees none; use --device cpu")
        index = int(d.split(":", 1)[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return f"cuda:{index}"
    raise ConfigError(f"unknown device {device!r}; use cpu or cuda")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in TORCH_DTYPES:
        raise ConfigError(
            f"the replayer computes in {', '.join(TORCH_DTYPES)}, not {name}; pass --dtype bfloat16 "
            "to replay this geometry with 2-byte weights"
        )
    return getattr(torch, name)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def now_s(device: str) -> float:
    """Monotonic wall time once all queued device work has finished."""
    synchronize(device)
    return time.perf_counter()


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); falls back to total physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: str) -> int:
    """Total memory of the device (CPU: physical RAM, the "device" buffers live there)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return host_total_bytes()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cpus)"


def cpu_threads(device: str) -> int:
    """torch's intra-op threads for a run: on CPU one fewer than the cores (the copy worker needs
    one), at least 1; with CUDA torch's default. Oversubscribed cores make CPU GEMMs ~10x slower."""
    import torch

    if device.startswith("cuda"):
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 2) - 1)


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run a block with `n` torch intra-op threads, restoring the previous setting after."""
    import torch

    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


# The cores a CPU replay's copy threads run on, while `split_cores` holds (None: anywhere).
_copy_cores: frozenset[int] | None = None


@contextmanager
def split_cores(device: str, threads: int) -> Iterator[int]:
    """On a CPU with more cores than torch's `threads`, keep the calling (compute) thread on the
    first `threads` cores and every copy thread started meanwhile (`copy_thread_started`) on the
    rest, as a GPU's copy engines are hardware of their own: unpinned, a copy thread woken at a
    step's start took the compute thread's core for 0.5-3 ms on this 2-core machine. Yields how
    many cores the copy threads have (0: not split: CUDA, or a single core)."""
    global _copy_cores
    if device.startswith("cuda") or not hasattr(os, "sched_setaffinity"):
        yield 0
        return
    cores = sorted(os.sched_getaffinity(0))
    n = min(max(threads, 1), len(cores) - 1)
    if n < 1:
        yield 0
        return
    before, outer = os.sched_getaffinity(0), _copy_cores
    os.sched_setaffinity(0, cores[:n])
    _copy_cores = frozenset(cores[n:])
    try:
        yield len(_copy_cores)
    finally:
        _copy_cores = outer
        os.sched_setaffinity(0, before)


def copy_thread_started() -> None:
    """Called first thing by a copy thread: onto the copy cores, when `split_cores` holds."""
    if _copy_cores is not None:
        os.sched_setaffinity(0, _copy_cores)
