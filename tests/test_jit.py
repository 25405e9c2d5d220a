"""finemoe/jit.py: the compiled helpers borrow their arrays where numba has the flag for it."""

from __future__ import annotations

import numpy as np
import pytest

from finemoe import jit as jitmod

numba = pytest.importorskip("numba")


def test_the_kernels_helpers_are_compiled_without_reference_counts():
    from finemoe.sim import compiled, compiled_prefetch

    assert jitmod._CAN_BORROW  # the installed numba has the flag (pyproject's range)
    for helper in (compiled_prefetch._sync, compiled_prefetch._next_event, compiled_prefetch._farthest,
                   compiled_prefetch._queue_unpin, compiled_prefetch._compact_unpins, compiled.victim, compiled._land):
        assert helper.targetoptions.get("_nrt") is False, helper.py_func.__name__
    for counted in (compiled_prefetch.run_prefetch_steps, compiled.layer_step):
        assert "_nrt" not in counted.targetoptions, counted.py_func.__name__  # they allocate


@jitmod.jit_borrowing
def _bump(a, b, k):
    for i in range(a.shape[0]):
        a[i] += b[i] * k
    return a[0]


@jitmod.jit
def _caller(a, b, n):
    total = 0
    for k in range(n):
        total += _bump(a, b, k)
    return total


def test_a_borrowing_helper_called_from_compiled_code_sees_and_changes_the_callers_arrays():
    a, b = np.zeros(3, np.int64), np.array([1, 2, 3], np.int64)
    assert _caller(a, b, 4) == 0 + 1 + 3 + 6
    assert a.tolist() == [6, 12, 18]
