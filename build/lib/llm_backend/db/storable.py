"""Texts made storable: U+0000 (which PostgreSQL refuses in text and JSON/JSONB) becomes U+FFFD.

Why U+FFFD and not dropping the character or escaping it: the replacement character is Unicode's own mark
for "a character was here that could not be kept", so a reader of the stored text sees that something was
replaced, the text keeps its length and position of every other character, and no real text (a literal
"\\0" in code, say) becomes ambiguous with an escape. SQLite would store NUL, but both databases get the
same text, so what one reads back does not depend on the database.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

NUL = "\x00"
REPLACEMENT = "\ufffd"


def storable_text(value: str | None) -> str | None:
    """The text with every NUL replaced (the same object when it has none)."""
    if value is not None and NUL in value:
        return value.replace(NUL, REPLACEMENT)
    return value


def storable(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings, numbers) with NUL replaced in every string, keys too.

    Returns the same object when nothing needed replacing, and copies a container only from its first
    change on, so the common case (no NUL anywhere) allocates nothing."""
    if isinstance(value, str):
        return value.replace(NUL, REPLACEMENT) if NUL in value else value
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for i, (k, v) in enumerate(value.items()):
            k2, v2 = storable(k), storable(v)
            if out is None and (k2 is not k or v2 is not v):
                out = dict(islice(value.items(), i))
            if out is not None:
                out[k2] = v2
        return value if out is None else out
    if isinstance(value, list | tuple):
        items: list[Any] | None = None
        for i, v in enumerate(value):
            v2 = storable(v)
            if items is None and v2 is not v:
                items = list(value[:i])
            if items is not None:
                items.append(v2)
        if items is None:
            return value
        return items if isinstance(value, list) else tuple(items)
    return value
