"""The console's Jinja environment (autoescaped) and the filters its templates use."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from llm_backend.console.charts import NONE, fmt_number

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def _when(value: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A time as UTC text; accepts datetimes, ISO strings and epoch seconds; a dash for none."""
    if value is None or value == "":
        return NONE
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime(fmt)


def _num(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _ms(value: Any) -> str:
    if value is None:
        return NONE
    v = float(value)
    return f"{v / 1000:.2f} s" if v >= 10_000 else f"{v:.0f} ms"


def _money(value: Any) -> str:
    return NONE if value is None else fmt_number(float(value), "$")


def _pct(value: Any) -> str:
    return NONE if value is None else f"{float(value) * 100:.1f} %"


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, num=_num, ms=_ms, money=_money, pct=_pct, compact=fmt_number)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
