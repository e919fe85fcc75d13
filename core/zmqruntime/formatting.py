"""How durations, sizes and times are written for people: one copy for the CLI and the GUI.

A value that is not known is written as :data:`DASH` (an en dash) in both.
"""

from __future__ import annotations

import time

#: what a table cell holds for a value not known (yet)
DASH = "–"


def fmt_duration(seconds: float | None) -> str:
    """``3.2 s``, ``45 s``, ``1m 05s``, ``2h 03m``, ``3d 04h``."""
    if seconds is None:
        return DASH
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h >= 24:
        return f"{h // 24}d {h % 24:02d}h"
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s} s")


def fmt_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 kB``, ``12.0 MB``, ``3.1 GB``: SI units (powers of 1000), the
    units of ``--min-free-mb`` and of disk vendors, one convention for CLI, GUI and the
    server's messages."""
    if n is None:
        return DASH
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_time(t: float | None) -> str:
    """A wall-clock time (seconds since the epoch) as local ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else DASH
