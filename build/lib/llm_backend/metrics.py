"""A small Prometheus registry: counters and histograms per worker, rendered in the text format."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OTHER = "other"
#: Routes served outside the spec (docs, the spec itself, the metrics).
EXTRA_ROUTES = ("/metrics", "/openapi.json", "/docs", "/docs/")


class RouteLabels:
    """The route template a path belongs to (a path of the spec, `/v1/models/{model}`), else "other": a
    label from a bounded set, whatever paths callers invent (raw paths would carry ids and grow forever)."""

    def __init__(self, templates: Iterable[str]) -> None:
        self.static: dict[str, str] = {}
        self.patterns: list[tuple[re.Pattern[str], str]] = []
        for template in templates:
            if "{" not in template:
                self.static[template] = template
                continue
            regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
            self.patterns.append((re.compile(regex + "$"), template))

    def __call__(self, path: str) -> str:
        template = self.static.get(path)
        if template is not None:
            return template
        for pattern, template in self.patterns:
            if pattern.match(path):
                return template
        return OTHER


class Metrics:
    """Counters, a latency histogram and gauges read at scrape time; labelled with the worker pid."""

    def __init__(self, models: Iterable[str] = (), routes: Iterable[str] = ()) -> None:
        self.models = frozenset(models)  # the configured names and aliases: the only model labels
        self.route_of = RouteLabels((*routes, *EXTRA_ROUTES))
        self.rejected: dict[str, int] = defaultdict(int)
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def model_label(self, model: object) -> str:
        if not model:
            return ""
        return model if isinstance(model, str) and model in self.models else OTHER

    def reject(self, reason: str) -> None:
        """A request refused before it was authenticated (`reason` from a fixed set)."""
        self.rejected[reason] += 1

    def observe_request(
        self, route: str, status: int, model: str | None, seconds: float, tokens: int
    ) -> None:
        """Count one request; `route` is a template (RouteLabels), `model` already a label (model_label)."""
        status = status if 100 <= status <= 599 else 0
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
            "# HELP llm_backend_rejected_total Requests refused before authentication (unknown route or key).",
            "# TYPE llm_backend_rejected_total counter",
        ]
        for reason, n in sorted(self.rejected.items()):
            out.append(f'llm_backend_rejected_total{{pid="{pid}",reason="{reason}"}} {n}')
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
