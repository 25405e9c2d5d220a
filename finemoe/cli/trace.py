"""`finemoe trace ...`: inspect traces."""

from __future__ import annotations

import click


@click.group("trace")
def trace_group() -> None:
    """Inspect and check traces (Parquet files or directories of part files)."""


COMMANDS = [trace_group]
