"""Durations as people write them on command lines and in queries: 90d, 12h, 30m, 2w, 45s."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d{1,15})\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}
MAX_DAYS = 36600  # a hundred years and a little: further than any key expiry or report needs
_MAX_SECONDS = MAX_DAYS * 86400


class DurationTooLong(ValueError):
    """A well-formed duration past MAX_DAYS."""


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `2w`, `45s` (a bare number is days) → timedelta, at most MAX_DAYS long.

    Raises ValueError for anything else, longer durations included (a date that far off does not exist)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text[:40]!r} (use e.g. 90d, 12h, 2w)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > _MAX_SECONDS:
        raise DurationTooLong(f"duration too long: {text.strip()[:40]!r} (at most {MAX_DAYS}d)")
    return timedelta(seconds=seconds)
