"""The `finemoe` click group. Commands live one module each in this folder and are found by name."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import click

from finemoe import __version__
from finemoe.errors import FinemoeError
from finemoe.interrupts import describe, exit_code, interrupts_raised


class FinemoeGroup(click.Group):
    """A group that turns library errors into one sentence and exit code 1, never a traceback;
    Ctrl-C and SIGTERM stop a command the same way (finished work kept), exit 130 and 143. An
    unforeseen OSError is one sentence too, and so is a bug (FINEMOE_DEBUG=1 re-raises it, as the
    tests do, so that a bug in a fault path fails a test instead of passing as an error line)."""

    def invoke(self, ctx: click.Context):
        try:
            with interrupts_raised():
                return super().invoke(ctx)
        except FinemoeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except click.BadParameter as exc:
            # a value click's own types refuse (not an integer, a folder where a file goes, a missing
            # required option): the same one sentence as ours; unknown options keep click's usage (exit 2)
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            click.echo(f"{describe(exc)}; finished work is kept", err=True)
            sys.exit(exit_code(exc))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # --help, usage errors: click's own handling
        except MemoryError:
            click.echo("error: out of memory (a smaller trace, fewer --jobs or a smaller sweep may fit)", err=True)
            sys.exit(1)
        except OSError as exc:  # a file fault our writers and readers did not foresee: still one sentence
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)
        except Exception as exc:
            if os.environ.get("FINEMOE_DEBUG") == "1":
                raise
            click.echo(f"error: internal error, a bug in finemoe ({type(exc).__name__}: {exc}); "
                       "FINEMOE_DEBUG=1 shows the traceback", err=True)
            sys.exit(1)


@click.group(cls=FinemoeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finemoe")
def cli() -> None:
    """Which MoE experts should live in GPU memory, and what latency does a memory budget buy?

    \b
    Record router decisions:   finemoe collect / finemoe import
    Inspect a trace:           finemoe trace info TRACE
    Explore policies/budgets:  finemoe simulate TRACE --gpu-mem 24G --policy lru,finemoe
    Check against reality:     finemoe calibrate / finemoe replay TRACE --compare
    Trust it on this machine?  finemoe validate --quick
    What should I run?         finemoe plan TRACE --hardware rtx3090 --gpu-mem 24G
    Look at the results:       finemoe plot RESULTS -o figs / finemoe report RESULTS
    Everything at once:        finemoe demo
    """


def _register_commands() -> None:
    """Each module in finemoe/cli/ exposing `COMMANDS` (a list of click commands) is added."""
    import finemoe.cli as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name in ("main", "options"):
            continue
        module = importlib.import_module(f"finemoe.cli.{mod.name}")
        for command in getattr(module, "COMMANDS", []):
            cli.add_command(command)


_register_commands()
