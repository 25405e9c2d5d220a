"""numba where it imports: the compiled hot paths (sim/compiled.py, plan/curves.py) and their
plain-Python fallback. docs/timing-model.md, "The compiled path", says why numba."""

from __future__ import annotations

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; a broken install runs the plain paths
    numba = None


def jit(fn):
    """`fn` compiled with numba (its machine code cached on disk), or `fn` itself without numba."""
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


def jit_borrowing(fn):
    """`jit` for a helper that only compiled code calls and that allocates and returns no array:
    compiled without numba's reference counting (its `_nrt` flag off), so the arrays it is passed
    are borrowed from the caller, which holds them for the call. With it on, every call of a
    helper that itself calls another increments and decrements each array argument atomically at
    entry and exit (numba's pruning of those pairs fails where a callee's error status is checked):
    the prefetch kernel's helpers take up to 19 arrays, and those atomic operations were 80% of
    its time (docs/timing-model.md, "Borrowed arrays"). numba refuses to compile an allocation in
    such a function, and returning an array from one would free it early: neither is done."""
    if not _CAN_BORROW:  # no numba, or one without the flag: counted as before, the same results
        return jit(fn)
    return numba.njit(cache=True, nogil=True, _nrt=False)(fn)


def _has_nrt_flag() -> bool:
    """Whether this numba has the flag (a private one, there since its runtime came in, 2015)."""
    try:
        from numba.core.options import DefaultOptions
    except ImportError:  # pragma: no cover - numba's layout changed
        return False
    return hasattr(DefaultOptions, "_nrt")


_CAN_BORROW = numba is not None and _has_nrt_flag()
