"""Prometheus metrics with bounded labels, summed over every gunicorn worker of a pod (multiprocess mode)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

# `_created` series double what a scrape carries and no dashboard reads them (multiprocess mode has none)
prometheus_client.disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
OTHER = "other"
#: Routes served outside the spec (docs, the spec itself, the metrics).
EXTRA_ROUTES = ("/metrics", "/openapi.json", "/docs", "/docs/")
TOKEN_KINDS = ("prompt", "completion", "cached", "reasoning")
OUTCOMES = frozenset({"ok", "error", "client_disconnected", "interrupted"})
#: Why the limiter refused a request: the limit hit (llm_backend.limits.LimitKind), or the store being away.
LIMITER_REASONS = (
    "requests",
    "tokens",
    "parallel",
    "daily_budget",
    "monthly_budget",
    "period_budget",
    "period_spend",
    "period_not_started",
    "period_ended",
    "limiter_unavailable",
)
REJECT_REASONS = ("unauthenticated", "unknown_route")
#: Upstream error kinds: the failover condition that covers the error, or `client` for the caller's own.
UPSTREAM_ERROR_KINDS = ("429", "5xx", "timeout", "connect", "client")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
#: How often each worker publishes what it holds (in-flight, recorder backlog, breakers) for the others'
#: scrapes; the worker that answers a scrape publishes its own first.
REFRESH_INTERVAL_S = 1.0


def multiprocess_dir() -> str | None:
    """The directory every worker writes its metrics to, if multiprocess mode is on (gunicorn.conf.py)."""
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


def wipe_multiprocess_dir(path: str) -> None:
    """Remove what an earlier run left (its counters would be summed into this run's)."""
    for name in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def worker_exited(pid: int) -> None:
    """A worker ended: its live gauges (in-flight, backlog) go; its counters stay in the sums."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


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


class _Family:
    """A labelled metric with its children cached by label values (prometheus_client's `labels()` takes a
    lock and rebuilds the key each call; this is one dict look-up on the hot path)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}
        if not metric._labelnames:  # an unlabelled metric is its own only child
            self.children[()] = metric

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class _Sampled:
    """A counter fed from a number another object keeps (`read()`, only ever growing): the growth since
    the last look is added at each refresh."""

    __slots__ = ("child", "last", "read")

    def __init__(self, child: Any, read: Callable[[], float]) -> None:
        self.child = child
        self.read = read
        self.last = 0.0

    def refresh(self) -> None:
        value = float(self.read())
        if value > self.last:
            self.child.inc(value - self.last)
        self.last = value


class MeteredSink:
    """Hands each final record to `observe` (the metrics), then to the recorder (if recording is on);
    provisional records (`started`, the journal's) go to the recorder only."""

    def __init__(self, inner: Any, observe: Callable[[Any], None]) -> None:
        self.inner = inner
        self.observe = observe
        self.started: Callable[[Any], None] | None = getattr(inner, "started", None)

    def submit(self, record: Any) -> None:
        try:
            self.observe(record)
        except Exception:  # metrics must never cost a record
            logger.exception("counting a record in the metrics failed")
        if self.inner is not None:
            self.inner.submit(record)


class Metrics:
    """The gateway's metrics: counters and histograms fed as requests end, gauges published by each worker
    every REFRESH_INTERVAL_S (and at its own scrape). Labels come only from bounded sets: route templates,
    configured model and backend names, fixed reasons and kinds."""

    def __init__(
        self,
        models: Iterable[str] = (),
        routes: Iterable[str] = (),
        backends: Iterable[tuple[str, str]] = (),
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.models = frozenset(models)  # the configured names: the only model labels (and "other")
        # a name a client may send -> its label: an alias counts as the model it names
        self.canonical = {**(aliases or {}), **{m: m for m in self.models}}
        self.backend_pairs = tuple(backends)  # (model, backend) as configured
        self.backends = frozenset(b for _, b in self.backend_pairs)
        self.route_of = RouteLabels((*routes, *EXTRA_ROUTES))
        self.multiprocess = multiprocess_dir()
        # multiprocess mode: every worker writes its own files and a scrape reads them all (collect());
        # single-process mode (tests, uvicorn alone): the metrics live in this registry
        self.registry = CollectorRegistry(auto_describe=False)
        reg = None if self.multiprocess else self.registry
        self.live: dict[int, Any] = {}  # id(caller) -> Caller of each request in progress
        self._refreshers: list[Callable[[], None]] = []
        self._sampled: list[_Sampled] = []

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Family:
            return _Family(Counter(name, doc, labels, registry=reg))

        def gauge(name: str, doc: str, labels: tuple[str, ...], mode: str) -> _Family:
            return _Family(Gauge(name, doc, labels, registry=reg, multiprocess_mode=mode))  # type: ignore[arg-type]

        self.requests = counter(
            "llm_backend_requests",
            "Requests served, by route template, status, model, backend and outcome.",
            ("route", "status", "model", "backend", "outcome"),
        )
        self.rejected = counter(
            "llm_backend_rejected",
            "Requests refused before authentication (unknown route or key).",
            ("reason",),
        )
        self.duration = _Family(
            Histogram(
                "llm_backend_request_duration_seconds",
                "Request latency (the whole stream for streams), by route template and model.",
                ("route", "model"),
                buckets=LATENCY_BUCKETS,
                registry=reg,
            )
        )
        self.ttft = _Family(
            Histogram(
                "llm_backend_time_to_first_token_seconds",
                "Time from a stream's request to its first token, by model.",
                ("model",),
                buckets=TTFT_BUCKETS,
                registry=reg,
            )
        )
        self.tokens = counter(
            "llm_backend_tokens",
            "Tokens used, by model and kind (prompt, completion, cached and reasoning; the last two are part "
            "of the first two).",
            ("model", "kind"),
        )
        self.spend = counter(
            "llm_backend_spend",
            "What the requests cost at the configured prices (per million tokens; in their currency), by model.",
            ("model",),
        )
        self.attempts = counter(
            "llm_backend_upstream_attempts",
            "Calls made to upstream backends (every try, failovers included).",
            ("model", "backend"),
        )
        self.upstream_errors = counter(
            "llm_backend_upstream_errors",
            "Upstream calls that failed, by backend and kind (429, 5xx, timeout, connect; client: the "
            "caller's own error, passed on).",
            ("model", "backend", "kind"),
        )
        self.failovers = counter(
            "llm_backend_upstream_failovers",
            "Requests that were tried on another backend after one failed (one per extra try), by model.",
            ("model",),
        )
        self.limiter_refusals = counter(
            "llm_backend_limiter_refusals",
            "Requests the rate limiter refused, by the limit hit (or limiter_unavailable).",
            ("reason",),
        )
        self.in_flight = gauge("llm_backend_in_flight_requests", "Requests being served now.", (), "livesum")
        self.in_flight_streams = gauge(
            "llm_backend_in_flight_streams", "Streamed answers being served now.", (), "livesum"
        )
        self.breaker = gauge(
            "llm_backend_backend_breaker_state",
            "Circuit breaker of each backend: 0 closed, 1 half-open (the next request probes), 2 open; the "
            "worst of the workers.",
            ("model", "backend"),
            "livemax",
        )
        self.cooldown = gauge(
            "llm_backend_backend_cooldown_seconds",
            "Seconds until a backend that answered 429 takes requests again (0: not cooling down).",
            ("model", "backend"),
            "livemax",
        )
        self.backend_in_flight = gauge(
            "llm_backend_backend_in_flight",
            "Upstream calls in progress on each backend (streams included).",
            ("model", "backend"),
            "livesum",
        )
        self._gauge = gauge
        self._counter = counter
        for reason in REJECT_REASONS:
            self.rejected(reason)
        for reason in LIMITER_REASONS:
            self.limiter_refusals(reason)
        for model in self.models:  # series that exist from the start: rate() and sums see their first step
            self.spend(model)
            self.failovers(model)
            for kind in TOKEN_KINDS:
                self.tokens(model, kind)
        for model, backend in self.backend_pairs:
            self.attempts(model, backend)
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors(model, backend, kind)
        self.in_flight()
        self.in_flight_streams()

    # -- labels -------------------------------------------------------------------------------------------

    def model_label(self, model: object) -> str:
        if not model:
            return ""
        return self.canonical.get(model, OTHER) if isinstance(model, str) else OTHER

    def backend_label(self, backend: object) -> str:
        if not backend:
            return ""
        return backend if isinstance(backend, str) and backend in self.backends else OTHER

    # -- fed on the serving path --------------------------------------------------------------------------

    def request_started(self, caller: Any) -> None:
        self.live[id(caller)] = caller

    def reject(self, reason: str) -> None:
        """A request refused before it was authenticated (`reason` from a fixed set)."""
        self.rejected(reason).inc()

    def observe_request(
        self,
        route: str,
        status: int,
        model: str | None,
        seconds: float,
        *,
        backend: str = "",
        outcome: str | None = None,
    ) -> None:
        """Count one request; `route` is a template (RouteLabels), `model` and `backend` already labels."""
        status = status if 100 <= status <= 599 else 0
        if outcome not in OUTCOMES:
            outcome = "ok" if status < 400 else "error"
        model = model or ""
        self.requests(route, str(status), model, backend, outcome).inc()
        self.duration(route, model).observe(seconds)

    def request_done(self, caller: Any) -> None:
        self.live.pop(id(caller), None)

    def observe_record(self, record: Any) -> None:
        """What a request's record says: tokens by kind, spend, time to first token, failovers."""
        model = self.model_label(record.model)
        usage = record.usage
        tokens = self.tokens
        if usage.prompt_tokens:
            tokens(model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            tokens(model, "completion").inc(usage.completion_tokens)
        if usage.cached_tokens:
            tokens(model, "cached").inc(usage.cached_tokens)
        if usage.reasoning_tokens:
            tokens(model, "reasoning").inc(usage.reasoning_tokens)
        cost = record.cost
        if cost:
            self.spend(model).inc(cost)
        if record.ttft_ms is not None:
            self.ttft(model).observe(record.ttft_ms / 1000)
        if record.attempts > 1:
            self.failovers(model).inc(record.attempts - 1)

    def upstream_attempt(self, model: str, backend: str) -> None:
        self.attempts(model, backend).inc()

    def upstream_error(self, model: str, backend: str, kind: str) -> None:
        self.upstream_errors(model, backend, kind if kind in UPSTREAM_ERROR_KINDS else "client").inc()

    def limiter_refused(self, reason: str) -> None:
        self.limiter_refusals(reason if reason in LIMITER_REASONS else OTHER).inc()

    # -- published by each worker -------------------------------------------------------------------------

    def gauge(self, name: str, help_text: str, read: Callable[[], float], *, mode: str = "livesum") -> None:
        """A gauge read from `read()` at each refresh; `mode` says how workers' values combine."""
        child = self._gauge(name, help_text, (), mode)()

        def refresh() -> None:
            child.set(float(read()))

        self._refreshers.append(refresh)

    def sampled_counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter another object keeps (`read()`, growing): its growth is added at each refresh. Name it
        without `_total`, which the exposition adds."""
        self._sampled.append(_Sampled(self._counter(name, help_text, ())(), read))

    def watch_router(self, router: Any) -> None:
        """Publish each backend's breaker, cool-down and load."""

        def refresh() -> None:
            now = router.clock()
            for state in router.states.values():
                key = (state.model, state.name)
                value = BREAKER_STATES.get(state.state, 2)
                if value == 2 and state.open_until <= now:
                    value = 1  # open, but its wait is over: the next request probes
                self.breaker(*key).set(value)
                self.cooldown(*key).set(max(0.0, state.cooldown_until - now))
                self.backend_in_flight(*key).set(state.in_flight)

        self._refreshers.append(refresh)

    def watch_recorder(self, recorder: Any) -> None:
        """Publish the recorder's backlog, journal and losses."""
        pending = self._gauge(
            "llm_backend_recorder_pending", "Records queued in memory, not yet written.", (), "livesum"
        )()
        spilled = self._gauge(
            "llm_backend_recorder_spilled",
            "Records in the journal (spill file) waiting for the database.",
            (),
            "livesum",
        )()
        memory_only = self._gauge(
            "llm_backend_recorder_memory_only",
            "Records held only in memory because the journal (spill file) cannot be written.",
            (),
            "livesum",
        )()
        journal_ok = self._gauge(
            "llm_backend_recorder_journal_ok",
            "1 when every worker's journal can be written, 0 when one keeps records in memory only.",
            (),
            "livemin",
        )()
        journal_bytes = self._gauge(
            "llm_backend_recorder_journal_bytes",
            "Size of the workers' journal files (records not yet confirmed written, and spilled ones).",
            (),
            "livesum",
        )()
        self.sampled_counter(
            "llm_backend_recorder_written",
            "Records written to the database.",
            lambda: recorder.stats()["written"],
        )
        self.sampled_counter(
            "llm_backend_recorder_dropped",
            "Records dropped: the memory bound was reached while neither the database nor the journal could "
            "take them (stays 0 otherwise).",
            lambda: recorder.health()["dropped"],
        )

        def refresh() -> None:
            stats = recorder.stats()
            health = recorder.health()
            pending.set(stats["pending"])
            spilled.set(stats["spilled"])
            memory_only.set(health["memory_only"])
            journal_ok.set(1.0 if health["journal_ok"] else 0.0)
            try:
                size = os.stat(health["journal"]).st_size
            except OSError:
                size = 0
            journal_bytes.set(size)

        self._refreshers.append(refresh)

    def refresh(self) -> None:
        """Publish this worker's gauges and sampled counters."""
        live = self.live
        self.in_flight().set(len(live))
        self.in_flight_streams().set(sum(1 for c in list(live.values()) if c.log.get("stream")))
        for refresh in self._refreshers:
            try:
                refresh()
            except Exception:  # one broken reading must not hide the others
                logger.debug("refreshing a metric failed", exc_info=True)
        for sampled in self._sampled:
            try:
                sampled.refresh()
            except Exception:
                logger.debug("refreshing a metric failed", exc_info=True)

    async def publish(self, interval: float = REFRESH_INTERVAL_S) -> None:
        """Refresh every `interval` seconds until cancelled (a task per worker)."""
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    def render(self) -> bytes:
        """Refresh, then the text exposition."""
        self.refresh()
        return self.collect()

    def collect(self) -> bytes:
        """The text exposition of every worker's metrics (of this process's in single-process mode)."""
        if self.multiprocess is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess)
        return generate_latest(registry)
