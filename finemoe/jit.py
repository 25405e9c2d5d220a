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
