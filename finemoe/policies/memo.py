"""Results a policy computed from content alone (the trace, the history, its parameters), remembered
per process under a hash of that content: what every budget and hardware of a sweep can share
(FineMoE's map matches, ProMoE's trained predictors and their predictions)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def digest(*parts) -> str:
    """A content hash of arrays (their dtype, shape and bytes), strings and numbers."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


class ContentMemo(Generic[T]):
    """The last `kept` values by content hash, least recently used dropped first."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._values: OrderedDict[str, T] = OrderedDict()

    def get(self, key: str, compute: Callable[[], T]) -> T:
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = compute()
            while len(self._values) > self.kept:
                self._values.popitem(last=False)
        else:
            self._values.move_to_end(key)
        return value

    def clear(self) -> None:
        self._values.clear()
