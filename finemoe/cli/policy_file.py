"""`--policy-file FILE`: register a user's policy classes before a command looks policies up."""

from __future__ import annotations

import click


def _load(_ctx: click.Context, _param: click.Parameter, paths: tuple[str, ...]) -> None:
    from finemoe.policies.user import load_policy_file

    for path in paths:
        load_policy_file(path)


def policy_file_option(fn):
    """The option, eager so the file's policies exist when `--policy` is checked."""
    return click.option(
        "--policy-file", "policy_files", multiple=True, metavar="FILE", expose_value=False, is_eager=True,
        callback=_load,
        help="A Python file defining Policy subclasses; each is registered under its `name` (repeatable; "
             "see docs/policies.md).",
    )(fn)
