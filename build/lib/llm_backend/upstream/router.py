"""Model routing: names and aliases to backends, the order to try them in, and each backend's health."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llm_backend.config import BreakerConfig, ModelConfig
from llm_backend.upstream.base import Backend
from llm_backend.upstream.errors import NoBackendAvailable, UpstreamError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
DEFAULT_429_COOLDOWN = 10.0  # seconds, when a 429 says nothing about when to come back


@dataclass(slots=True)
class BackendState:
    """A backend plus what routing knows of it in this worker: breaker, cool-down, load, latency."""

    backend: Backend
    model: str
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    latency_ewma_ms: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    cooldown_until: float = 0.0  # Retry-After of a 429: this backend only
    state: str = CLOSED
    open_until: float = 0.0
    probing: bool = False
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)

    @property
    def name(self) -> str:
        return self.backend.name

    def recovers_at(self, now: float) -> float:
        """When this backend can next take a request (now if it can)."""
        at = now
        if self.cooldown_until > at:
            at = self.cooldown_until
        if self.state == OPEN and self.open_until > at:
            at = self.open_until
        return at

    def available(self, now: float) -> bool:
        if self.cooldown_until > now:
            return False
        if self.state == OPEN:
            return self.open_until <= now and not self.probing
        if self.state == HALF_OPEN:
            return not self.probing
        limit = self.backend.config.max_parallel
        return limit is None or self.in_flight < limit


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A resolved model: its configuration and the states of its backends."""

    config: ModelConfig
    backends: tuple[BackendState, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.config.name


class Router:
    """Resolves model names and orders backends by the model's strategy; one per worker."""

    def __init__(
        self,
        models: Iterable[ModelConfig],
        backends: dict[str, Backend],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._routes: dict[str, ModelRoute] = {}
        self._wildcard: ModelRoute | None = None
        self.states: dict[str, BackendState] = {}
        self.models: list[ModelConfig] = []
        self.rng = rng or random.Random()
        self.clock = clock  # cool-downs and breaker windows; injectable so tests need not sleep
        for model in models:
            states = []
            for bc in model.backends:
                key = f"{model.name}/{bc.name}"
                state = BackendState(backends[key], model.name, model.breaker)
                self.states[key] = state
                states.append(state)
            route = ModelRoute(model, tuple(states))
            if model.wildcard:
                self._wildcard = route
                continue
            self.models.append(model)
            for n in (model.name, *model.aliases):
                self._routes[n] = route

    def resolve(self, name: str | None) -> ModelRoute | None:
        if name is None:
            return None
        route = self._routes.get(name)
        if route is None and self._wildcard is not None and name:
            return self._wildcard
        return route

    # -- choosing -----------------------------------------------------------------------------------------

    def plan(self, route: ModelRoute) -> list[BackendState]:
        """Backends to try, best first. Raises NoBackendAvailable when all are open or cooling down."""
        now = self.clock()
        ready = [s for s in route.backends if s.available(now)]
        if not ready:
            earliest = min(s.recovers_at(now) for s in route.backends)
            busy = all(
                s.backend.config.max_parallel is not None and s.in_flight >= s.backend.config.max_parallel
                for s in route.backends
                if s.recovers_at(now) <= now
            ) and any(s.recovers_at(now) <= now for s in route.backends)
            exc = NoBackendAvailable(
                f"Every backend of model '{route.name}' is "
                + ("at its parallel-request limit" if busy else "unavailable (rate limited or failing)")
                + "; try again shortly."
            )
            exc.retry_after = max(1.0, earliest - now) if not busy else 1.0
            raise exc
        strategy = route.config.strategy
        if strategy == "weighted":
            return self._weighted_order(ready)
        if strategy == "least_busy":
            self.rng.shuffle(ready)
            return sorted(ready, key=lambda s: (s.in_flight, s.backend.config.priority))
        if strategy == "lowest_latency":
            self.rng.shuffle(ready)
            return sorted(ready, key=lambda s: (s.latency_ewma_ms or 0.0, s.backend.config.priority))
        # priority: lower first; equal priorities share load by weight
        groups: dict[int, list[BackendState]] = {}
        for s in ready:
            groups.setdefault(s.backend.config.priority, []).append(s)
        ordered: list[BackendState] = []
        for priority in sorted(groups):
            ordered += self._weighted_order(groups[priority])
        return ordered

    def _weighted_order(self, states: list[BackendState]) -> list[BackendState]:
        """A random order where each backend comes first with probability proportional to its weight."""
        if len(states) <= 1:
            return list(states)
        keyed = []
        for s in states:
            w = s.backend.config.weight
            # Efraimidis-Spirakis: key = u^(1/w); zero weights go last
            key = self.rng.random() ** (1.0 / w) if w > 0 else -1.0
            keyed.append((key, s))
        keyed.sort(key=lambda kv: kv[0], reverse=True)
        return [s for _, s in keyed]

    # -- outcomes -----------------------------------------------------------------------------------------

    def acquire(self, state: BackendState) -> bool:
        """Take a slot on the backend just before calling it; False if it filled up meanwhile."""
        now = self.clock()
        if not state.available(now):
            return False
        if state.state == OPEN:
            state.state = HALF_OPEN
        if state.state == HALF_OPEN:
            state.probing = True
        state.in_flight += 1
        return True

    def release(self, state: BackendState) -> None:
        state.in_flight = max(0, state.in_flight - 1)

    def abandoned(self, state: BackendState) -> None:
        """A call that ended neither in an answer nor in an upstream error (cancelled, or a bug): free its
        slot, and if it was the half-open probe, let the next request probe instead."""
        self.release(state)
        if state.probing:
            state.probing = False
            if state.state == HALF_OPEN:
                state.state = OPEN
                state.open_until = self.clock()

    def earliest_recovery(self, route: ModelRoute) -> float | None:
        """Seconds until the first of the route's backends can take a request again (at least 1); None
        when one can right now."""
        now = self.clock()
        soonest = min(s.recovers_at(now) for s in route.backends)
        return None if soonest <= now else max(1.0, soonest - now)

    def succeeded(self, state: BackendState, latency_ms: float, *, release: bool = True) -> None:
        if release:
            self.release(state)
        now = self.clock()
        state.successes += 1
        state.consecutive_failures = 0
        self._outcome(state, now, True)
        if state.state != CLOSED:
            state.state = CLOSED
            state.probing = False
        prev = state.latency_ewma_ms
        state.latency_ewma_ms = latency_ms if prev is None else prev * 0.8 + latency_ms * 0.2

    def failed(self, state: BackendState, exc: UpstreamError, *, release: bool = True) -> None:
        if release:
            self.release(state)
        now = self.clock()
        if not exc.retryable:
            # the caller's answer (400/404/content filter): the backend itself is healthy
            state.successes += 1
            state.consecutive_failures = 0
            state.probing = False
            if state.state == HALF_OPEN:
                state.state = CLOSED
            return
        state.failures += 1
        state.last_error = f"{type(exc).__name__}: {exc.message}"[:300]
        state.last_error_at = time.time()
        if exc.failover_kind == "429":
            wait = exc.retry_after if exc.retry_after is not None else DEFAULT_429_COOLDOWN
            state.cooldown_until = max(state.cooldown_until, now + wait)
            state.probing = False
            if state.state == HALF_OPEN:
                state.state = OPEN
                state.open_until = max(state.open_until, now + wait)
            return  # quota, not sickness: no breaker count
        state.consecutive_failures += 1
        self._outcome(state, now, False)
        cfg = state.breaker
        if (
            state.state == HALF_OPEN
            or state.consecutive_failures >= cfg.failure_threshold
            or self._rate_tripped(state, now)
        ):
            state.state = OPEN
            state.open_until = now + cfg.cooldown
            state.probing = False

    def broke(self, state: BackendState, exc: UpstreamError) -> None:
        """A stream that had started broke off: count the failure; its slot is released at stream end."""
        self.failed(state, exc, release=False)

    def _outcome(self, state: BackendState, now: float, ok: bool) -> None:
        window = state.breaker.window
        q = state.outcomes
        q.append((now, ok))
        while q and q[0][0] < now - window:
            q.popleft()
        if len(q) > 1000:
            q.popleft()

    def _rate_tripped(self, state: BackendState, now: float) -> bool:
        cfg = state.breaker
        if cfg.failure_rate is None:
            return False
        q = state.outcomes
        if len(q) < cfg.min_requests:
            return False
        failures = sum(1 for _, ok in q if not ok)
        return failures / len(q) >= cfg.failure_rate

    # -- observing ----------------------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """Each backend's state, for /admin/backends."""
        now = self.clock()
        out: list[dict[str, object]] = []
        for s in self.states.values():
            cfg = s.backend.config
            state = s.state
            if state == OPEN and s.open_until <= now:
                state = "half_open (next request probes)"
            out.append(
                {
                    "model": s.model,
                    "backend": s.name,
                    "provider": cfg.provider,
                    "endpoint": cfg.endpoint or cfg.base_url,
                    "deployment": cfg.deployment or cfg.model,
                    "auth": cfg.auth,
                    "priority": cfg.priority,
                    "weight": cfg.weight,
                    "max_parallel": cfg.max_parallel,
                    "state": state,
                    "open_remaining_s": round(max(0.0, s.open_until - now), 3) if s.state == OPEN else 0.0,
                    "cooldown_remaining_s": round(max(0.0, s.cooldown_until - now), 3),
                    "in_flight": s.in_flight,
                    "latency_ewma_ms": round(s.latency_ewma_ms, 2) if s.latency_ewma_ms is not None else None,
                    "successes": s.successes,
                    "failures": s.failures,
                    "consecutive_failures": s.consecutive_failures,
                    "last_error": s.last_error,
                    "last_error_at": s.last_error_at,
                }
            )
        return out
