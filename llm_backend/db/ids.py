"""Generation of the public ids the database layer hands out (time-ordered UUIDs, api key ids)."""

from __future__ import annotations

import logging
import os
import secrets
import time
import uuid

logger = logging.getLogger(__name__)


def new_uuid7() -> str:
    """A UUIDv7-style id (48-bit millisecond timestamp + random bits) as its canonical string.

    Time-ordered, so ids of rows created together sort together (cheap tie-breaker for pagination).
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10))  # one read for both random fields
    rand_a = rand & 0xFFF
    rand_b = (rand >> 12) & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def new_api_key_id() -> str:
    """A public api key id such as `key_5f3c9a1b2d4e6f70`."""
    return f"key_{secrets.token_hex(8)}"


def new_team_id() -> str:
    """A public team id such as `team_5f3c9a1b2d4e6f70`."""
    return f"team_{secrets.token_hex(8)}"


def new_user_id() -> str:
    """A public user id such as `user_5f3c9a1b2d4e6f70`."""
    return f"user_{secrets.token_hex(8)}"
