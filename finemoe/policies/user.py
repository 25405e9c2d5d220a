"""Policies from outside the package: a user's Python file (`--policy-file`) or an installed
package's entry point (group `finemoe.policies`), registered beside the built-in ones.

A file is imported as a module of its own; every `Policy` subclass it defines with a `name` of its
own is registered under that name (a name already taken is an error, so a file cannot silently
replace a built-in). Loaded paths are recorded in the environment variable `FINEMOE_POLICY_FILES`,
which the local process pool's workers inherit, so they register the same classes before running a
configuration that names one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.policies.base import Policy
from finemoe.policies.registry import POLICIES

ENV_VAR = "FINEMOE_POLICY_FILES"
ENTRY_POINT_GROUP = "finemoe.policies"
_loaded: dict[str, list[str]] = {}  # resolved path -> names it registered
_entry_points_loaded = False


def load_policy_file(path: str | os.PathLike) -> list[str]:
    """Import `path` and register its Policy subclasses; the names registered (once per path)."""
    resolved = Path(path).expanduser().resolve()
    key = str(resolved)
    if key in _loaded:
        return _loaded[key]
    if not resolved.is_file():
        raise ConfigError(f"--policy-file {path}: no such file")
    module_name = f"finemoe_user_policies_{len(_loaded)}_{resolved.stem}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--policy-file {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's code is one sentence
        sys.modules.pop(module_name, None)
        where = getattr(exc, "lineno", None)
        at = f" (line {where})" if where else ""
        raise ConfigError(f"--policy-file {path}: importing it failed{at}: {type(exc).__name__}: {exc}") from None
    names = register_classes(vars(module).values(), module_name, f"--policy-file {path}")
    if not names:
        raise ConfigError(f"--policy-file {path}: it defines no Policy subclass with a name of its own")
    _loaded[key] = names
    _remember(key)
    return names


def user_policies() -> dict[str, str]:
    """The policies loaded from files in this process: name -> the file's path."""
    return {name: path for path, names in _loaded.items() for name in names}


def register_classes(candidates, module_name: str, source: str) -> list[str]:
    """Register the Policy subclasses among `candidates` defined in `module_name`; their names."""
    names = []
    for obj in candidates:
        if not (isinstance(obj, type) and issubclass(obj, Policy)) or obj.__module__ != module_name:
            continue
        name = obj.name
        if name == Policy.name or not isinstance(name, str) or not name:
            continue
        if POLICIES.get(name, obj) is not obj:
            raise ConfigError(f"{source}: policy name {name!r} is taken; give the class another `name`")
        POLICIES[name] = obj
        names.append(name)
    return names


def _remember(path: str) -> None:
    paths = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if path not in paths:
        os.environ[ENV_VAR] = os.pathsep.join([*paths, path])


def load_external() -> None:
    """Register the policies of the files named in the environment (set by this process or the
    one that started it) and of installed entry points; called by the registry before lookups."""
    for path in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if path and path not in _loaded:
            load_policy_file(path)
    _load_entry_points()


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is one sentence
            raise ConfigError(f"policy entry point {ep.name} ({ep.value}): loading it failed: {exc}") from None
        candidates = vars(obj).values() if not isinstance(obj, type) else [obj]
        register_classes(candidates, getattr(obj, "__name__", "") if not isinstance(obj, type) else obj.__module__,
                         f"policy entry point {ep.name}")
