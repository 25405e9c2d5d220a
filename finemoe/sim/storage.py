"""A third tier behind host memory: experts that do not fit in host RAM live on an SSD.

MoE-Infinity and FineMoE's own runtime keep experts on NVMe behind host memory, mlx-lm streams them
from the SSD. With `--host-mem`, host memory holds that many bytes of experts, itself a cache
(LRU) in front of the SSD; a copy to the GPU of an expert that is not in host memory first reads it
from the SSD into host memory, evicting host memory's least recently used expert. At the start host
memory holds the first experts in (layer, expert) order, as a loader filling RAM layer by layer
would; the rest are on the SSD.

The SSD is modelled like the link: a read waits the drive's latency and then occupies its
bandwidth, reads back to back in the order they start. With a queue depth above 1 the next read's
latency passes while the last one's bytes flow; at depth 1 (a runtime that reads one expert at a
time) each read waits for the last and then pays its latency. (One expert is tens to hundreds of
MB, so deeper queues change nothing more: the reads are bound by bandwidth.) The copy engine that asked holds the expert through the read and then copies it over
the link, so a copy behind an SSD read waits for it (head-of-line, as a runtime that reads and
copies on one thread). Presets cite their drives' sequential-read ratings.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.sim.costs import to_ticks


@dataclass(frozen=True)
class StorageSpec:
    name: str
    read_gbps: float  # rated sequential read, GB/s (1e9 bytes/s)
    latency_s: float  # a read's fixed cost before its bytes flow
    efficiency: float = 0.85  # achieved / rated for expert-sized reads through the file system (assumed)
    queue_depth: int = 32  # reads in flight at once; 1: each read waits for the last (no latency hidden)
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.read_gbps > 0 and 0 < self.efficiency <= 1 and self.latency_s >= 0 and self.queue_depth >= 1):
            raise ConfigError(f"storage {self.name!r}: read_gbps > 0, 0 < efficiency <= 1, latency_s >= 0 "
                              "and queue_depth >= 1")

    @property
    def read_bytes_per_s(self) -> float:
        return self.read_gbps * 1e9 * self.efficiency

    def to_dict(self) -> dict:
        return asdict(self)


STORAGE_PRESETS: dict[str, StorageSpec] = {s.name: s for s in (
    StorageSpec("pcie4-ssd", 7.45, 80e-6,
                source="Samsung 990 PRO (PCIe 4.0 x4): 7,450 MB/s rated sequential read; ~80 us QD1 read latency"),
    StorageSpec("pcie5-ssd", 14.5, 60e-6,
                source="Crucial T705 (PCIe 5.0 x4): 14,500 MB/s rated sequential read; ~60 us QD1 read latency"),
)}
DEFAULT_STORAGE = "pcie4-ssd"


def load_storage(name: str) -> StorageSpec:
    """A preset, or the "storage" object of a profile from `finemoe calibrate --storage-dir`."""
    name = name.strip()
    if name in STORAGE_PRESETS:
        return STORAGE_PRESETS[name]
    if name.endswith(".json") and Path(name).is_file():
        try:
            data = json.loads(Path(name).read_text())["storage"]
            return StorageSpec(**{f.name: data[f.name] for f in fields(StorageSpec) if f.name in data})
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"--storage {name}: not a profile with a \"storage\" object "
                              "(from `finemoe calibrate --storage-dir`)") from None
    raise ConfigError(f"unknown storage {name!r}; presets: {', '.join(STORAGE_PRESETS)}, or a profile .json")


class HostTier:
    """Host memory as an LRU of experts in front of the SSD, on the engine's tick clock."""

    def __init__(self, slots: int, spec: StorageSpec, bytes_per_expert: int, num_layers: int, num_experts: int,
                 recorder) -> None:
        if slots < 1:
            raise ConfigError(f"--host-mem holds no expert of {bytes_per_expert / 1e6:.0f} MB")
        self.slots = slots
        self.rec = recorder
        self.bytes_per_expert = bytes_per_expert
        self.latency_ticks = to_ticks(spec.latency_s)
        self.read_ticks = to_ticks(bytes_per_expert / spec.read_bytes_per_s)
        self.serial = spec.queue_depth == 1
        keys = [(la, e) for la in range(num_layers) for e in range(num_experts)][:slots]
        self.lru: OrderedDict = OrderedDict((k, None) for k in keys)
        self._free = 0  # the tick the SSD's bandwidth is free again

    def ready_at(self, key, start: int) -> int:
        """The tick at which `key`, asked for at `start`, is in host memory (at once on a host hit)."""
        lru = self.lru
        if key in lru:
            lru.move_to_end(key)
            self.rec.host_hits += 1
            return start
        if self.serial:  # queue depth 1: the drive takes the next read only once the last is done
            read_start = max(start, self._free) + self.latency_ticks
        else:  # the next read's latency passes while the last one's bytes flow
            read_start = max(start + self.latency_ticks, self._free)
        self._free = end = read_start + self.read_ticks
        if len(lru) >= self.slots:
            lru.popitem(last=False)
        lru[key] = None
        self.rec.ssd_reads += 1
        self.rec.bytes_ssd += self.bytes_per_expert
        return end
