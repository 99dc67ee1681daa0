"""Derived ratios, PASS/MISS checks against the issue targets, and the printed table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Result = dict[str, Any]

MIN_RPS_C64 = 1000.0
MAX_ADDED_P50_MS = 1.0
MAX_TTFB_OVERHEAD_MS = 2.0
MAX_RSS_MB = 120.0
MIN_RECORDING_RATIO = 0.90


def _get(point: Result | None, *path: str) -> Any:
    value: Any = point
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def derive(points: Result, direct: Result, rss: Result, baseline: Result | None) -> Result:
    """Ratios of one variant against the direct-to-upstream points (and its baseline variant)."""
    c1, c64, s1 = points.get("c1"), points.get("c64"), points.get("stream_c1")
    d1, d64, ds1 = direct.get("c1"), direct.get("c64"), direct.get("stream_c1")
    derived: Result = {
        "throughput_ratio_c1": _ratio(_get(c1, "rps"), _get(d1, "rps")),
        "throughput_ratio_c64": _ratio(_get(c64, "rps"), _get(d64, "rps")),
        "added_p50_c1_ms": _diff(_get(c1, "latency_ms", "p50"), _get(d1, "latency_ms", "p50")),
        "added_p99_c1_ms": _diff(_get(c1, "latency_ms", "p99"), _get(d1, "latency_ms", "p99")),
        "added_p50_c64_ms": _diff(_get(c64, "latency_ms", "p50"), _get(d64, "latency_ms", "p50")),
        "c64_over_c1": _ratio(_get(c64, "rps"), _get(c1, "rps")),
        "ttfb_overhead_p50_ms": _diff(_get(s1, "ttfb_ms", "p50"), _get(ds1, "ttfb_ms", "p50")),
        "ttfb_overhead_p99_ms": _diff(_get(s1, "ttfb_ms", "p99"), _get(ds1, "ttfb_ms", "p99")),
        "stream_total_overhead_p50_ms": _diff(_get(s1, "latency_ms", "p50"), _get(ds1, "latency_ms", "p50")),
        "rss_peak_mb": rss.get("rss_peak_mb"),
    }
    if "stream_c16" in points:
        s16, ds16 = points["stream_c16"], direct.get("stream_c16")
        derived["ttfb_overhead_p50_c16_ms"] = _diff(_get(s16, "ttfb_ms", "p50"), _get(ds16, "ttfb_ms", "p50"))
    if baseline is not None:
        derived["vs_baseline_c1"] = _ratio(_get(c1, "rps"), _get(baseline, "c1", "rps"))
        derived["vs_baseline_c64"] = _ratio(_get(c64, "rps"), _get(baseline, "c64", "rps"))
    return derived


def _check(issue: str, target: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> Result:
    return {
        "issue": issue,
        "target": target,
        "value": value,
        "shown": "n/a" if value is None else format(value, fmt),
        "ok": None if value is None else bool(ok(value)),
    }


def checks(points: Result, derived: Result, baseline_name: str | None) -> list[Result]:
    """PASS/MISS of one variant against issue 2 (and issue 3 when it has a baseline)."""
    out = [
        _check(
            "#2",
            "c=64 throughput >= 1,000 req/s",
            _get(points.get("c64"), "rps"),
            lambda v: v >= 1000,
            ",.0f",
        ),
        _check("#2", "c=64 throughput not below c=1", derived["c64_over_c1"], lambda v: v >= 1.0, ".2f"),
        _check("#2", "added p50 at c=1 <= 1 ms", derived["added_p50_c1_ms"], lambda v: v <= 1.0, ".3f"),
        _check(
            "#2",
            "stream first-byte overhead <= 2 ms",
            derived["ttfb_overhead_p50_ms"],
            lambda v: v <= 2.0,
            ".3f",
        ),
        _check("#2", "worker RSS <= 120 MB", derived["rss_peak_mb"], lambda v: v <= 120.0, ".1f"),
    ]
    if baseline_name is not None:
        for c in ("c64", "c1"):
            out.append(
                _check(
                    "#3",
                    f"{c.replace('c', 'c=')} throughput >= 90 % of {baseline_name}",
                    derived.get(f"vs_baseline_{c}"),
                    lambda v: v >= MIN_RECORDING_RATIO,
                    ".2f",
                )
            )
    for name, point in points.items():
        errors, requests = _get(point, "errors") or 0, _get(point, "requests") or 0
        if errors and errors > 0.01 * max(requests, 1):
            out.append(_check("run", f"{name}: errors <= 1 % of requests", errors, lambda v: False, ".0f"))
    return out


def _fmt(value: Any, spec: str, width: int) -> str:
    text = "-" if value is None else format(value, spec)
    return text.rjust(width)


def table(direct: Result, variants: dict[str, Result]) -> str:
    """The text report: raw points, ratios, then PASS/MISS per target."""
    lines: list[str] = []
    head = (
        f"{'target':<20}{'c1 req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'c64 req/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'TTFB p50':>10}{'TTFB p99':>10}{'stream p50':>12}{'errors':>8}"
    )
    lines += ["Raw points (non-streaming c=1 / c=64; streaming c=1: time to first byte, whole stream)", head]
    rows = [("direct", direct)] + [(n, v.get("points") or {}) for n, v in variants.items() if v.get("points")]
    for name, pts in rows:
        c1, c64, s1 = pts.get("c1"), pts.get("c64"), pts.get("stream_c1")
        errors = sum(int(_get(p, "errors") or 0) for p in pts.values())
        lines.append(
            f"{name:<20}"
            + _fmt(_get(c1, "rps"), ",.0f", 10)
            + _fmt(_get(c1, "latency_ms", "p50"), ".3f", 9)
            + _fmt(_get(c1, "latency_ms", "p99"), ".3f", 9)
            + _fmt(_get(c64, "rps"), ",.0f", 11)
            + _fmt(_get(c64, "latency_ms", "p50"), ".2f", 9)
            + _fmt(_get(c64, "latency_ms", "p99"), ".2f", 9)
            + _fmt(_get(s1, "ttfb_ms", "p50"), ".3f", 10)
            + _fmt(_get(s1, "ttfb_ms", "p99"), ".3f", 10)
            + _fmt(_get(s1, "latency_ms", "p50"), ".1f", 12)
            + _fmt(errors, "d", 8)
        )
    if any("stream_c16" in pts for _, pts in rows):
        lines += [
            "",
            f"{'streaming c=16':<20}{'TTFB p50':>10}{'TTFB p99':>10}{'stream p50':>12}{'stream p99':>12}",
        ]
        for name, pts in rows:
            s16 = pts.get("stream_c16")
            lines.append(
                f"{name:<20}"
                + _fmt(_get(s16, "ttfb_ms", "p50"), ".3f", 10)
                + _fmt(_get(s16, "ttfb_ms", "p99"), ".3f", 10)
                + _fmt(_get(s16, "latency_ms", "p50"), ".1f", 12)
                + _fmt(_get(s16, "latency_ms", "p99"), ".1f", 12)
            )
    lines += [
        "",
        "Ratios vs direct (proxy/direct throughput, added latency, c64/c1, streaming overhead, worker RSS)",
        f"{'variant':<20}{'thr c1':>8}{'thr c64':>9}{'+p50 c1':>9}{'+p99 c1':>9}{'c64/c1':>8}"
        f"{'+TTFB p50':>11}{'+TTFB p99':>11}{'+stream':>9}{'RSS MB':>8}{'vs base':>9}",
    ]
    for name, var in variants.items():
        if var.get("status") != "ok":
            lines.append(f"{name:<20}{var.get('status', '?')}: {var.get('reason', '')}")
            continue
        d = var["derived"]
        lines.append(
            f"{name:<20}"
            + _fmt(d["throughput_ratio_c1"], ".3f", 8)
            + _fmt(d["throughput_ratio_c64"], ".3f", 9)
            + _fmt(d["added_p50_c1_ms"], ".3f", 9)
            + _fmt(d["added_p99_c1_ms"], ".3f", 9)
            + _fmt(d["c64_over_c1"], ".2f", 8)
            + _fmt(d["ttfb_overhead_p50_ms"], ".3f", 11)
            + _fmt(d["ttfb_overhead_p99_ms"], ".3f", 11)
            + _fmt(d["stream_total_overhead_p50_ms"], ".2f", 9)
            + _fmt(d["rss_peak_mb"], ".1f", 8)
            + _fmt(d.get("vs_baseline_c64"), ".3f", 9)
        )
    lines += ["", "Targets"]
    for name, var in variants.items():
        for c in var.get("checks") or []:
            verdict = {True: "PASS", False: "MISS", None: "n/a "}[c["ok"]]
            lines.append(f"  {verdict}  {name:<20} {c['issue']:<4} {c['target']:<44} {c['shown']:>10}")
    return "\n".join(lines)
