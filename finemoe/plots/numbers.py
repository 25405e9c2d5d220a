"""Numbers for people: every table, caption and sentence of the report formats numbers here.

Three significant digits, thousands separators, binary byte units, and never scientific notation
(`1.01e+03 MiB` tells a reader nothing a glance at `0.986 GiB` would not tell better).
"""

from __future__ import annotations

import math

_BYTE_UNITS = (("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4), ("PiB", 1024**5))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value, digits: int = 3) -> str:
    """`digits` significant digits in fixed notation with thousands separators: 894.46 -> '894',
    12345.6 -> '12,346' (whole numbers keep every digit), 0.000123 -> '0.000123', NaN -> '-'."""
    if _missing(value):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    value = float(value)
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    text = f"{value:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def format_bytes(n) -> str:
    """Bytes in the binary unit that keeps at most three digits before the point: 512 B, 1.5 KiB,
    874 MiB, 0.986 GiB (not 1,010 MiB), 24 GiB."""
    if _missing(n):
        return "-"
    size = abs(float(n))
    index = 0
    while index + 1 < len(_BYTE_UNITS) and size >= _BYTE_UNITS[index + 1][1]:
        index += 1
    if size / _BYTE_UNITS[index][1] >= 1000 and index + 1 < len(_BYTE_UNITS):
        index += 1
    unit, scale = _BYTE_UNITS[index]
    if unit == "B":
        return f"{int(n):,} B"
    return f"{format_number(float(n) / scale)} {unit}"


def format_percent(fraction, decimals: int = 1) -> str:
    """A fraction as a percentage to `decimals` places: 0.0029 -> '0.3%'."""
    if _missing(fraction):
        return "-"
    return f"{100.0 * float(fraction):.{decimals}f}%"


def format_time(seconds, unit: tuple[str, float]) -> str:
    """Seconds in the given (name, scale) unit: (0.000194, ('µs', 1e6)) -> '194 µs'."""
    if _missing(seconds):
        return "-"
    name, scale = unit
    return f"{format_number(float(seconds) * scale)} {name}"
