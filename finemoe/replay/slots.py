"""The device slot pool: a fixed number of expert-sized buffers, allocated once (no allocator churn).

The expert cache (finemoe.sim.cache) decides *which* expert is resident; this maps resident and
in-flight experts to physical slots: a load takes the slot of the victim it evicted, or a free one.
On CUDA each slot also remembers the event of the last kernel that read it, so a copy into a
reused slot waits for that kernel instead of racing it.
"""

from __future__ import annotations

from typing import Any

from finemoe.policies.base import ExpertKey
from finemoe.replay.compute import ExpertShape, expert_views


class SlotPool:
    def __init__(self, slots: int, numel: int, dtype: Any, device: str, shape: ExpertShape | None = None) -> None:
        import torch

        if slots < 1:
            raise ValueError("the slot pool needs at least one slot")
        # Zeroed now, so that every page is mapped before the clock starts (a first copy into an
        # untouched CPU page would pay a page fault that no GPU slot pays).
        self.buffers = torch.zeros((slots, numel), dtype=dtype, device=device)
        self.capacity = slots
        self._free = list(range(slots - 1, -1, -1))
        self.slot_of: dict[ExpertKey, int] = {}
        self.last_read: list[Any] = [None] * slots  # CUDA event of the last kernel reading the slot
        # gate/up/down views of every slot, made once (a view costs microseconds per call)
        self.views = [expert_views(self.buffers[i], shape) for i in range(slots)] if shape else None

    @property
    def nbytes(self) -> int:
        return self.buffers.numel() * self.buffers.element_size()

    def assign(self, key: ExpertKey, victim: ExpertKey | None) -> int:
        """The slot `key` is copied into: its victim's, else a free one."""
        if key in self.slot_of:
            raise RuntimeError(f"expert {key} already holds slot {self.slot_of[key]}")
        if victim is not None:
            slot = self.slot_of.pop(victim)
        elif self._free:
            slot = self._free.pop()
        else:
            raise RuntimeError(f"no free slot for {key} and no victim: cache and slot pool disagree")
        self.slot_of[key] = slot
        return slot

    def release(self, key: ExpertKey) -> None:
        """`key` leaves the pool without a successor (a temporary copy): its slot is free again."""
        self._free.append(self.slot_of.pop(key))

    def buffer(self, key: ExpertKey) -> Any:
        return self.buffers[self.slot_of[key]]

    def matrices(self, key: ExpertKey) -> tuple[Any, Any, Any]:
        return self.views[self.slot_of[key]]

    def mark_read(self, key: ExpertKey, event: Any) -> None:
        self.last_read[self.slot_of[key]] = event

    def guard(self, slot: int) -> Any:
        return self.last_read[slot]
