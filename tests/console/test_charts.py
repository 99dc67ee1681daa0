"""The console's server-drawn SVG charts: ticks, number formats, what each chart draws, escaping."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from llm_backend.console.charts import Bar, Series, bar_chart, fmt_number, nice_ticks, time_chart
from llm_backend.console.views import Window

SVG = "{http://www.w3.org/2000/svg}"
START = datetime(2026, 3, 1, tzinfo=UTC)


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


@pytest.mark.parametrize(
    ("high", "ticks"),
    [
        (0, [0.0, 1.0]),
        (7, [0.0, 2.0, 4.0, 6.0, 8.0]),
        (10, [0.0, 2.5, 5.0, 7.5, 10.0]),
        (1234, [0.0, 500.0, 1000.0, 1500.0]),
        (0.3, [0.0, 0.1, 0.2, 0.3]),
    ],
)
def test_nice_ticks_cover_the_highest_value(high: float, ticks: list[float]) -> None:
    assert nice_ticks(high) == ticks
    assert nice_ticks(high)[-1] >= high


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (950, "", "950"),
        (1200, "", "1.2k"),
        (3_400_000, "", "3.4M"),
        (0.25, "", "0.25"),
        (12.5, "ms", "12.5 ms"),
        (1.5, "$", "$1.50"),
        (0.0012, "$", "$0.0012"),
        (None, "", "\u2013"),
    ],
)
def test_fmt_number(value: float | None, unit: str, text: str) -> None:
    assert fmt_number(value, unit) == text


def test_time_chart_draws_a_point_per_value_and_a_title_per_point() -> None:
    buckets = [START + timedelta(hours=i) for i in range(24)]
    values: list[float | None] = [float(i % 5) for i in range(24)]
    values[3] = None  # a bucket without data draws no point
    svg = time_chart(
        "Latency", buckets, [Series("p50", values), Series("p95", [v * 2 for v in range(24)])], unit="ms"
    )
    root = parse(svg)
    assert root.get("role") == "img" and root.get("viewBox") == "0 0 720 240"
    assert root.find(f"{SVG}title").text == "Latency"  # type: ignore[union-attr]
    desc = root.find(f"{SVG}desc").text or ""  # type: ignore[union-attr]
    assert "24 hourly buckets" in desc and "p95 peak 46 ms" in desc
    points = root.findall(f".//{SVG}circle")
    assert len(points) == 23 + 24
    labels = [p.find(f"{SVG}title").text for p in points]  # type: ignore[union-attr]
    assert "01:00 p50: 1 ms" in labels and not any(label.startswith("03:00 p50") for label in labels)
    assert len(root.findall(f"{SVG}path")) == 2


def test_time_chart_bars_and_empty_ranges() -> None:
    buckets = [START + timedelta(days=i) for i in range(7)]
    svg = time_chart(
        "Requests", buckets, [Series("requests", [0, 3, 0, 1, 0, 0, 2])], hourly=False, kind="bars"
    )
    bars = parse(svg).findall(f".//{SVG}rect[@class='bar']")
    assert [b.find(f"{SVG}title").text for b in bars] == [  # type: ignore[union-attr]
        "Mar 02 requests: 3",
        "Mar 04 requests: 1",
        "Mar 07 requests: 2",
    ]
    heights = [float(b.get("height") or 0) for b in bars]
    assert heights[0] > heights[2] > heights[1] > 0
    empty = time_chart("Requests", buckets, [Series("requests", [0] * 7)], hourly=False)
    assert "no data in this range" in empty


def test_labels_are_escaped() -> None:
    hostile = '<script>alert(1)</script>"&'
    for svg in (
        time_chart(hostile, [START], [Series(hostile, [1.0])]),
        bar_chart(hostile, [Bar(hostile, 2.0, note=hostile)]),
    ):
        assert "<script>" not in svg and "&lt;script&gt;" in svg
        assert hostile in (parse(svg).find(f"{SVG}title").text or "")  # type: ignore[union-attr]


def test_bar_chart_ranks_and_folds_the_rest() -> None:
    bars = [Bar(f"k{i}", float(i)) for i in range(15)]
    root = parse(bar_chart("By key", bars, limit=5))
    labels = [t.text for t in root.findall(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert labels == ["k14", "k13", "k12", "k11", "other (11)"]
    rects = root.findall(f"{SVG}rect")
    widths = [float(r.get("width") or 0) for r in rects]
    assert widths[0] == max(widths[:4]) and widths[-1] > widths[0]  # "other" sums 0..10 = 55 > 14
    assert "no data" in bar_chart("By key", [])


def test_window_presets_custom_and_buckets() -> None:
    now = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
    day = Window.parse("24h", None, None, None, now)
    assert (day.start, day.end, day.bucket) == (now - timedelta(hours=24), now, "hour")
    assert len(day.buckets()) == 25 and day.buckets()[0] == datetime(2026, 3, 9, 12, tzinfo=UTC)
    assert Window.parse("7d", None, None, None, now).bucket == "hour"
    month = Window.parse("30d", None, None, None, now)
    assert month.bucket == "day" and len(month.buckets()) == 31
    custom = Window.parse("custom", "2026-03-01", "2026-03-03", None, now)
    assert (custom.start, custom.end) == (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC))
    assert custom.error is None and custom.range == "custom"
    for bad in (("custom", "2026-03-05", "2026-03-01"), ("custom", "yesterday", None), ("bogus", None, None)):
        w = Window.parse(bad[0], bad[1], bad[2], None, now)
        assert w.error and w.range == "24h"
    long = Window.parse("custom", "2020-01-01", "2026-01-01", "hour", now)
    assert long.bucket == "day" and long.end - long.start == timedelta(days=366) and long.error
