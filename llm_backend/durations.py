"""Durations as people write them on command lines and in queries: 90d, 12h, 30m, 2w, 45s."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`, `45s` (a bare number is days) → timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90d, 12h, 2w)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
