"""Measure a file read path for the SSD tier (`finemoe calibrate --storage-dir DIR`).

A test file of expert-sized chunks is written to DIR and synced, its pages are dropped from the
page cache (`posix_fadvise(DONTNEED)`, which needs no privileges for a file one wrote), and it is
read back chunk by chunk into one buffer, as a runtime reads experts: the bytes over the time are
the read bandwidth, and 4 KiB reads at spread offsets (dropped again first) the latency. A second,
cached pass is timed too: when the "cold" pass is nearly as fast, the page cache or a RAM-backed
file system served it, and the profile says so. The file is removed whatever happens.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from finemoe.errors import ConfigError

SMALL_READ = 4096
CACHED_SHARE = 0.8  # a cold pass at this share of the cached pass's speed or more was not cold


def _drop(fd: int) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def _read_pass(fd: int, chunk: int, chunks: int, buf: memoryview) -> list[float]:
    times = []
    for k in range(chunks):
        os.lseek(fd, k * chunk, os.SEEK_SET)
        t0 = time.perf_counter()
        got = os.readv(fd, [buf])
        times.append(time.perf_counter() - t0)
        if got != chunk:
            raise OSError(f"short read of the test file ({got} of {chunk} bytes)")
    return times


def measure_storage(folder: str | os.PathLike, chunk_bytes: int, chunks: int) -> dict:
    """Cold and cached sequential reads of `chunks` chunks of `chunk_bytes`, and small-read latency."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--storage-dir {folder}: no such folder")
    block = os.urandom(min(chunk_bytes, 1 << 20))
    fd, name = -1, None
    try:
        fd, name = tempfile.mkstemp(prefix=".finemoe-read-test-", dir=folder)
        for _ in range(chunks):
            left = chunk_bytes
            while left:
                left -= os.write(fd, block[: min(left, len(block))])
        dropped = _drop(fd)
        buf = memoryview(bytearray(chunk_bytes))
        cold = _read_pass(fd, chunk_bytes, chunks, buf)
        cached = _read_pass(fd, chunk_bytes, chunks, buf)
        _drop(fd)
        small = memoryview(bytearray(SMALL_READ))
        latencies = []
        for k in range(min(chunks, 16)):
            os.lseek(fd, (k * chunk_bytes + chunk_bytes // 2) // SMALL_READ * SMALL_READ, os.SEEK_SET)
            t0 = time.perf_counter()
            os.readv(fd, [small])
            latencies.append(time.perf_counter() - t0)
    except OSError as exc:
        raise ConfigError(f"--storage-dir {folder}: the read test failed ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if name is not None:
            Path(name).unlink(missing_ok=True)
    total = chunk_bytes * chunks
    cold_gbps, cached_gbps = total / sum(cold) / 1e9, total / sum(cached) / 1e9
    return {"folder": str(folder.resolve()), "chunk_bytes": chunk_bytes, "chunks": chunks, "dropped_cache": dropped,
            "cold_gbps": cold_gbps, "cached_gbps": cached_gbps, "cold_chunk_s": cold,
            "latency_s": statistics.median(latencies),
            "page_cache_suspected": (not dropped) or cold_gbps >= CACHED_SHARE * cached_gbps}


def fit_storage(measured: dict, name: str):
    """The StorageSpec of a measured read path: its cold bandwidth (efficiency 1: it is achieved,
    not rated) and its small-read latency."""
    from finemoe.sim.storage import StorageSpec

    note = "; the page cache may have served it (cold read near the cached speed)" \
        if measured["page_cache_suspected"] else ""
    return StorageSpec(name=name, read_gbps=measured["cold_gbps"], latency_s=measured["latency_s"], efficiency=1.0,
                       source=f"finemoe calibrate --storage-dir {measured['folder']} "
                              f"({time.strftime('%Y-%m-%d %H:%M:%S')}){note}")
