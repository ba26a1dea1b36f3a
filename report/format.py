"""How the report writes numbers, sizes, durations and times: the templates' filters (plain text;
the templates escape it)."""
from __future__ import annotations

import time

DASH = "–"  # a value that is not known (yet)


def fmt_num(v, digits: int = 3) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return DASH
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def fmt_pct(v, digits: int = 1) -> str:
    return DASH if v is None else f"{100 * v:.{digits}f}%"


def fmt_wer(v) -> str:
    """A WER in percent as results.json holds it."""
    return DASH if v is None else f"{float(v):.1f}%"


def fmt_bytes(n) -> str:
    if n is None:
        return DASH
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def fmt_duration(s) -> str:
    if s is None:
        return DASH
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    hr, m = divmod(m, 60)
    if hr < 48:
        return f"{hr} h {m:02d} min"
    d, hr = divmod(hr, 24)
    return f"{d} d {hr:02d} h"


def fmt_time(t) -> str:
    return DASH if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def fmt_modalities(m) -> str:
    """A run's input streams as a reader says them ("audio + video")."""
    if isinstance(m, str):
        return {"av": "audio + video"}.get(m, m)
    return " + ".join(map(str, m or []))


FILTERS = {"num": fmt_num, "pct": fmt_pct, "wer": fmt_wer, "bytes": fmt_bytes, "duration": fmt_duration,
           "time": fmt_time, "modalities": fmt_modalities}
