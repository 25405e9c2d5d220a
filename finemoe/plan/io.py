"""plan.json on disk: written atomically by `finemoe plan`, read back (checked) by the report."""

from __future__ import annotations

import json
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.files import atomic_path

REQUIRED = ("plan_version", "model", "request", "points", "brackets", "recommendation", "split")


def write_plan(plan: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plan, indent=2, default=str))
    return path


def read_plan(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--plan: no such file {str(p)!r}")
    try:
        plan = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--plan {p}: not a plan.json ({exc})") from None
    missing = [k for k in REQUIRED if not isinstance(plan, dict) or k not in plan]
    if missing:
        raise ConfigError(f"--plan {p}: not a plan from `finemoe plan` (no {missing[0]!r})")
    return plan
