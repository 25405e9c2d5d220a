"""Policy names -> classes. A new policy is one import and one entry here."""

from __future__ import annotations

from finemoe.errors import ConfigError
from finemoe.policies.base import Policy

POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **params) -> Policy:
    """An instance of the named policy; unknown names and parameters are ConfigErrors."""
    _load_builtin()
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"policy {name}: {exc}") from None


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(POLICIES)


_builtin_loaded = False


def _load_builtin() -> None:
    # Imported here so that each policy file registers itself with @register on first use; the
    # package is scanned once per process (a sweep of small runs asks thousands of times).
    global _builtin_loaded
    if not _builtin_loaded:
        import importlib
        import pkgutil

        import finemoe.policies as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in ("base", "registry", "caches"):
                importlib.import_module(f"finemoe.policies.{mod.name}")
        _builtin_loaded = True
    from finemoe.policies.user import load_external

    load_external()  # --policy-file files (also in pool workers) and installed entry points
