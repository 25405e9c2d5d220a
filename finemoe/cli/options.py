"""The options every command shares, declared and checked in one place so that each command spells
them, and refuses bad values, the same way.

Conventions:
  * `-o/--output` names what a command writes (a file or a folder);
  * `-q/--quiet` turns off progress, which is otherwise shown on stderr whether or not it is a
    terminal (so a log of a batch job shows how far it got);
  * `--json` prints machine-readable output on stdout (progress and notes stay on stderr).
Bad values raise ConfigError, which the `finemoe` group turns into one `error:` line and exit
code 1 before any work starts (never click's usage dump).
"""

from __future__ import annotations

import math

import click

from finemoe.errors import ConfigError


class _Option(click.Option):
    """A click option whose deprecated spellings still parse but are left out of --help."""

    def __init__(self, *args, hidden_aliases: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def _without_aliases(self, method, ctx: click.Context | None):
        """`method(ctx)` of the parent class, run while the hidden spellings are out of `opts`."""
        saved, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            return method(ctx)
        finally:
            self.opts = saved

    def get_help_record(self, ctx: click.Context):
        return self._without_aliases(super().get_help_record, ctx)

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return self._without_aliases(super().get_error_hint, ctx)


def _check_output(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ConfigError("-o/--output: an empty path names nothing to write")
    return value


def output_option(dest: str = "output", *, help: str, default: str | None = None, kind: str = "file",
                  required: bool = False):
    """`-o/--output PATH` (`--out`, the old spelling, still parses). `kind` is "file", "dir" or "any"."""
    path = click.Path(file_okay=kind != "dir", dir_okay=kind != "file")
    # an explicit default=None would satisfy `required` in click >= 8.3, so it is only passed when given
    defaults = {} if default is None else {"default": default, "show_default": True}
    return click.option("-o", "--output", "--out", dest, cls=_Option, hidden_aliases=("--out",), type=path,
                        required=required, callback=_check_output, help=help, **defaults)


def quiet_option(help: str = "No progress bars (shown on stderr otherwise, terminal or not)."):
    """`-q/--quiet`; `--no-progress`, the old spelling, still parses."""
    return click.option("-q", "--quiet", "--no-progress", "quiet", cls=_Option, hidden_aliases=("--no-progress",),
                        is_flag=True, default=False, help=help)


def json_option(help: str = "Print machine-readable JSON on stdout instead of tables."):
    """`--json`, into the parameter `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def _check_seed(_ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ConfigError(f"--{param.name.replace('_', '-')} must be 0 or more (numpy seeds are unsigned), got {value}")
    return value


def seed_option(help: str, default: int = 0):
    """`--seed N`, a single non-negative integer (simulate's --seed is a list, parsed by the sweep)."""
    return click.option("--seed", type=int, default=default, show_default=True, callback=_check_seed, help=help)


def at_least(value: int | None, minimum: int, option: str) -> int | None:
    """`value` unchanged (None passes), or ConfigError when it is below `minimum`."""
    if value is not None and value < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, got {value}")
    return value


def positive_number(value: float | None, option: str) -> float | None:
    """`value` unchanged (None passes), or ConfigError when it is not a finite positive number."""
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{option} must be a finite positive number, got {value}")
    return value


def size_option_value(text: str | None, option: str, *, positive: bool = True) -> int | None:
    """Bytes from a size typed after `option` ('24G', '512M'); None when the option was not given.
    An empty string is an error, not the default."""
    from finemoe.sim.memory import parse_size

    if text is None:
        return None
    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if positive and value <= 0:
        raise ConfigError(f"{option}: a size must be positive, got {text!r}")
    return value
