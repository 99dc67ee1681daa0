"""Charts drawn as SVG on the server: time series and bar charts, with no script and nothing fetched.

Why server-side SVG rather than a JavaScript charting library: the console must work on an air-gapped
network and under a strict Content-Security-Policy; an SVG is text the page already carries, prints, scales
to a phone's width (viewBox), and is accessible (role="img", a <title> and <desc>, a <title> per point for
the exact value on hover). The charts the console needs (a few lines over time buckets, horizontal bars)
are a few hundred lines to draw, tested here; a vendored library would be more code than that to audit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape

from markupsafe import Markup

NONE = "\u2013"  # an en dash: no value
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2")


@dataclass(frozen=True, slots=True)
class Series:
    """One line: a name for the legend and a value per bucket (None: no data in that bucket)."""

    name: str
    values: Sequence[float | None]
    color: str | None = None


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    note: str = ""  # shown after the value (e.g. a share)


@dataclass(frozen=True, slots=True)
class _Frame:
    width: int = 720
    height: int = 240
    left: int = 64
    right: int = 16
    top: int = 28
    bottom: int = 36
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom


def nice_ticks(high: float, count: int = 4) -> list[float]:
    """0 and evenly spaced round numbers (1, 2, 2.5 or 5 times a power of ten) up to at least `high`."""
    if not high > 0 or math.isinf(high) or math.isnan(high):
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    n = math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def fmt_number(value: float | None, unit: str = "") -> str:
    """A compact number for an axis or a bar: 950, 1.2k, 3.4M, 0.25; with the unit after it."""
    if value is None:
        return NONE
    sign = "-" if value < 0 else ""
    v = abs(value)
    if unit == "$":
        text = f"{v:,.2f}" if v >= 0.01 or v == 0 else f"{v:.4f}"
        return f"{sign}${text}"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= limit:
            text = f"{v / limit:.1f}".rstrip("0").rstrip(".") + suffix
            break
    else:
        text = f"{v:.0f}" if v >= 100 or v == int(v) else f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text}{' ' + unit if unit and unit != '$' else ''}"


def _label_every(n: int, room: int) -> int:
    return max(1, math.ceil(n / max(1, room)))


def _bucket_label(when: datetime, hourly: bool) -> str:
    return when.strftime("%H:%M") if hourly else when.strftime("%b %d")


def _open(frame: _Frame, title: str, desc: str, css: str) -> list[str]:
    ident = "c" + hashlib.sha256(f"{title}\n{desc}".encode()).hexdigest()[:10]
    return [
        f'<svg class="chart {css}" viewBox="0 0 {frame.width} {frame.height}" role="img" '
        f'aria-labelledby="{ident}t {ident}d" xmlns="http://www.w3.org/2000/svg" '
        f'preserveAspectRatio="xMidYMid meet">',
        f'<title id="{ident}t">{escape(title)}</title><desc id="{ident}d">{escape(desc)}</desc>',
    ]


def time_chart(
    title: str,
    buckets: Sequence[datetime],
    series: Sequence[Series],
    *,
    unit: str = "",
    hourly: bool = True,
    kind: str = "line",
) -> Markup:
    """Lines (or stacked-free bars when kind="bars", for counts) of each series over the buckets."""
    frame = _Frame()
    n = len(buckets)
    values = [v for s in series for v in s.values if v is not None]
    high = max(values, default=0.0)
    ticks = nice_ticks(high)
    top = ticks[-1] or 1.0
    total_points = sum(1 for v in values if v)
    desc = (
        f"{title}: {n} {'hourly' if hourly else 'daily'} buckets"
        + (f" from {buckets[0]:%Y-%m-%d %H:%M} to {buckets[-1]:%Y-%m-%d %H:%M} UTC" if n else "")
        + "; "
        + "; ".join(
            f"{s.name} peak {fmt_number(max((v for v in s.values if v is not None), default=None), unit)}"
            for s in series
        )
    )
    out = _open(frame, title, desc, f"chart-{kind}")
    x0, y0, w, h = frame.left, frame.top, frame.plot_w, frame.plot_h

    def y(v: float) -> float:
        return y0 + h - (v / top) * h

    for t in ticks:
        yy = y(t)
        out.append(f'<line class="grid" x1="{x0}" x2="{x0 + w}" y1="{yy:.1f}" y2="{yy:.1f}"/>')
        out.append(
            f'<text class="tick" x="{x0 - 6}" y="{yy + 4:.1f}" text-anchor="end">{escape(fmt_number(t, unit))}</text>'
        )
    step = w / max(1, n)
    every = _label_every(n, 8)
    for i, when in enumerate(buckets):
        if i % every == 0:
            cx = x0 + step * (i + 0.5)
            out.append(
                f'<text class="tick" x="{cx:.1f}" y="{y0 + h + 18}" text-anchor="middle">'
                f"{escape(_bucket_label(when, hourly))}</text>"
            )
    for k, s in enumerate(series):
        color = s.color or PALETTE[k % len(PALETTE)]
        if kind == "bars":
            bw = max(1.0, step / max(1, len(series)) * 0.8)
            for i, v in enumerate(s.values):
                if v is None or v <= 0:
                    continue
                bx = x0 + step * i + step * 0.1 + bw * k
                label = f"{_bucket_label(buckets[i], hourly)} {s.name}: {fmt_number(v, unit)}"
                out.append(
                    f'<rect class="bar" x="{bx:.1f}" y="{y(v):.1f}" width="{bw:.1f}" '
                    f'height="{max(0.5, y0 + h - y(v)):.1f}" fill="{color}"><title>{escape(label)}</title></rect>'
                )
            continue
        points = [(x0 + step * (i + 0.5), y(v), v, i) for i, v in enumerate(s.values) if v is not None]
        if len(points) > 1:
            path = " ".join(
                f"{'M' if j == 0 else 'L'}{px:.1f},{py:.1f}" for j, (px, py, _, _) in enumerate(points)
            )
            out.append(f'<path class="line" d="{path}" stroke="{color}" fill="none" stroke-width="2"/>')
        for px, py, v, i in points:
            label = f"{_bucket_label(buckets[i], hourly)} {s.name}: {fmt_number(v, unit)}"
            out.append(
                f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{color}">'
                f"<title>{escape(label)}</title></circle>"
            )
    # legend
    lx = x0
    for k, s in enumerate(series):
        color = s.color or PALETTE[k % len(PALETTE)]
        out.append(f'<rect x="{lx}" y="8" width="10" height="10" fill="{color}"/>')
        out.append(f'<text class="legend" x="{lx + 14}" y="17">{escape(s.name)}</text>')
        lx += 24 + 7 * len(s.name)
    if not total_points:
        out.append(
            f'<text class="empty" x="{x0 + w / 2:.1f}" y="{y0 + h / 2:.1f}" text-anchor="middle">'
            "no data in this range</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(title: str, bars: Sequence[Bar], *, unit: str = "", limit: int = 10) -> Markup:
    """Horizontal bars, largest first, at most `limit` of them (the rest summed as "other")."""
    ranked = sorted(bars, key=lambda b: b.value, reverse=True)
    if len(ranked) > limit:
        rest = sum(b.value for b in ranked[limit - 1 :])
        ranked = [*ranked[: limit - 1], Bar(f"other ({len(bars) - limit + 1})", rest)]
    row_h = 24
    frame = _Frame(height=max(60, 16 + row_h * len(ranked)), left=150, right=90, top=8, bottom=8)
    desc = f"{title}: " + (
        "; ".join(f"{b.label} {fmt_number(b.value, unit)}" for b in ranked) if ranked else "no data"
    )
    out = _open(frame, title, desc, "chart-bars")
    high = max((b.value for b in ranked), default=0.0) or 1.0
    for i, b in enumerate(ranked):
        yy = frame.top + i * row_h
        bw = max(1.0, b.value / high * frame.plot_w) if b.value > 0 else 0.0
        label = b.label if len(b.label) <= 22 else b.label[:21] + "…"
        out.append(
            f'<text class="tick" x="{frame.left - 6}" y="{yy + 15}" text-anchor="end">{escape(label)}</text>'
        )
        value_text = fmt_number(b.value, unit) + (f" {b.note}" if b.note else "")
        out.append(
            f'<rect class="bar" x="{frame.left}" y="{yy + 3}" width="{bw:.1f}" height="{row_h - 8}" '
            f'fill="{PALETTE[0]}"><title>{escape(b.label)}: {escape(value_text)}</title></rect>'
        )
        out.append(
            f'<text class="value" x="{frame.left + bw + 6:.1f}" y="{yy + 15}">{escape(value_text)}</text>'
        )
    if not ranked:
        out.append(
            f'<text class="empty" x="{frame.width / 2:.0f}" y="34" text-anchor="middle">no data</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))
