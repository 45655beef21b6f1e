"""Numbers as people read them: FLOPs, bytes, seconds, fractions. No torch, no rich.

The one place figures are formatted and ratios are taken, so the CLI, the library's
messages and the benchmarks all print the same thing for the same number.
"""

from __future__ import annotations

import math


def format_flops(value: float) -> str:
    """FLOPs with a decimal unit: '1.23 TFLOP'."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def format_bytes(value: float) -> str:
    """Bytes with a binary unit: '1.5 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_count(value: float) -> str:
    """A count such as parameters, three significant digits: '2.43 B', '934 M', '417 K'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def format_seconds(value: float | None) -> str:
    """Seconds as '0.42 s', '12.3 s', '4m05s' or '1h02m'; '-' when unknown."""
    if value is None or not math.isfinite(value):
        return "-"
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fraction(part: float, whole: float) -> float | None:
    """part / whole, or None when there is no whole to compare with (nothing ran)."""
    return None if not whole else part / whole


def remaining(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the pace so far (elapsed per unit done); None before anything is done."""
    return None if not done else elapsed * max(0.0, total - done) / done


def format_fraction(value: float | None, digits: int = 0) -> str:
    """A fraction as a percentage ('42%', or '42.3%' with digits=1), '-' when undefined."""
    return "-" if value is None else f"{value:.{digits}%}"


SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
              "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
              "TIB": 2**40}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'50G', '512M', '1.5TiB', '1000' (bytes; binary units) -> bytes; ValueError if not."""
    value = text.strip().upper().replace(" ", "")
    number = value.rstrip("BKMGTI")
    unit = value[len(number):]
    try:
        size = float(number) * SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (e.g. 50G, 512M)") from None
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"not a size: {text!r} (e.g. 50G, 512M)")
    return int(size)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds; ValueError if not."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in DURATION_UNITS else "s"
    number = value[:-1] if value[-1:] in DURATION_UNITS else value
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r} (e.g. 7d, 12h, 30m)")
    return seconds
