"""Imported once by the local pool's fork server, so every forked worker starts with the simulator
and all policies already imported, and every compiled kernel's machine code already loaded (or, on
a fresh install, compiled once here rather than by every worker at the same time: sim/warm.py),
instead of doing either on its first task."""

from __future__ import annotations

try:
    import finemoe.sim.run  # noqa: F401
    from finemoe.policies.registry import policy_names
    from finemoe.sim.warm import warm_kernels

    policy_names()  # imports and registers every policy module
    warm_kernels()
except Exception:  # noqa: BLE001 - a broken import must surface in the task that needs it, with its message
    pass
