"""Imported once by the local pool's fork server, so every forked worker starts with the simulator
and all policies already imported instead of importing them on its first task."""

from __future__ import annotations

try:
    import finemoe.sim.run  # noqa: F401
    from finemoe.policies.registry import policy_names

    policy_names()  # imports and registers every policy module
except Exception:  # noqa: BLE001 - a broken import must surface in the task that needs it, with its message
    pass
