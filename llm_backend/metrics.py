"""A small Prometheus registry: counters and histograms per worker, rendered in the text format."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters, a latency histogram and gauges read at scrape time; labelled with the worker pid."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe_request(
        self, route: str, status: int, model: str | None, seconds: float, tokens: int
    ) -> None:
        self.requests[(route, str(status), model or "")] += 1
        if tokens:
            self.tokens[(route, model or "")] += tokens
        buckets = self.latency.get(route)
        if buckets is None:
            buckets = self.latency[route] = [0] * (len(LATENCY_BUCKETS) + 1)
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.latency_sum[route] += seconds
        self.latency_count[route] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        pid = os.getpid()
        out = [
            "# HELP llm_backend_requests_total Requests served, by route, status and model.",
            "# TYPE llm_backend_requests_total counter",
        ]
        for (route, status, model), n in sorted(self.requests.items()):
            out.append(
                f'llm_backend_requests_total{{pid="{pid}",route="{route}",status="{status}",model="{model}"}} {n}'
            )
        out += [
            "# HELP llm_backend_tokens_total Tokens used (prompt + completion), by route and model.",
            "# TYPE llm_backend_tokens_total counter",
        ]
        for (route, model), n in sorted(self.tokens.items()):
            out.append(f'llm_backend_tokens_total{{pid="{pid}",route="{route}",model="{model}"}} {n}')
        out += [
            "# HELP llm_backend_request_duration_seconds Request latency (whole stream for streams).",
            "# TYPE llm_backend_request_duration_seconds histogram",
        ]
        for route, buckets in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip((*LATENCY_BUCKETS, "+Inf"), buckets, strict=True):
                cumulative += n
                out.append(
                    f'llm_backend_request_duration_seconds_bucket{{pid="{pid}",route="{route}",le="{bound}"}} '
                    f"{cumulative}"
                )
            out.append(
                f'llm_backend_request_duration_seconds_sum{{pid="{pid}",route="{route}"}} {self.latency_sum[route]:.6f}'
            )
            out.append(
                f'llm_backend_request_duration_seconds_count{{pid="{pid}",route="{route}"}} {self.latency_count[route]}'
            )
        for name, (help_text, read) in sorted(self.gauges.items()):
            try:
                value = float(read())
            except Exception:
                continue
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f'{name}{{pid="{pid}"}} {value:g}']
        return "\n".join(out) + "\n"
