"""Model routing: names and aliases to backends, the order to try them in, and each backend's health."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from llm_backend.config import ModelConfig
from llm_backend.upstream.base import Backend
from llm_backend.upstream.errors import UpstreamError


@dataclass(slots=True)
class BackendState:
    """A backend plus what routing knows of it in this worker."""

    backend: Backend
    in_flight: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    latency_ewma_ms: float | None = None
    last_error: str | None = None
    cooldown_until: float = 0.0

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A resolved model: its configuration and the states of its backends."""

    config: ModelConfig
    backends: tuple[BackendState, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.config.name


class Router:
    """Resolves model names and orders backends; one per worker, built in the lifespan."""

    def __init__(self, models: Iterable[ModelConfig], backends: dict[str, Backend]) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._wildcard: ModelRoute | None = None
        self.states: dict[str, BackendState] = {}
        self.models: list[ModelConfig] = []
        for model in models:
            states = []
            for bc in model.backends:
                key = f"{model.name}/{bc.name}"
                state = BackendState(backends[key])
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

    def plan(self, route: ModelRoute) -> list[BackendState]:
        """Backends to try, best first: by priority, skipping ones cooling down while others are ready."""
        now = time.monotonic()
        ordered = sorted(route.backends, key=lambda s: s.backend.config.priority)
        ready = [s for s in ordered if s.cooldown_until <= now]
        return ready or ordered

    def started(self, state: BackendState) -> None:
        state.in_flight += 1

    def succeeded(self, state: BackendState, latency_ms: float) -> None:
        state.in_flight -= 1
        state.successes += 1
        state.consecutive_failures = 0
        prev = state.latency_ewma_ms
        state.latency_ewma_ms = latency_ms if prev is None else prev * 0.8 + latency_ms * 0.2

    def failed(self, state: BackendState, exc: UpstreamError) -> None:
        state.in_flight -= 1
        self.broke(state, exc)

    def broke(self, state: BackendState, exc: UpstreamError) -> None:
        """Count a failure without touching in-flight (a stream that broke after it had started)."""
        if not exc.retryable:
            # the caller's fault (400/404/content filter): the backend is healthy
            state.successes += 1
            state.consecutive_failures = 0
            return
        state.failures += 1
        state.consecutive_failures += 1
        state.last_error = f"{type(exc).__name__}: {exc.message}"[:300]
        if exc.retry_after:
            state.cooldown_until = max(state.cooldown_until, time.monotonic() + exc.retry_after)

    def snapshot(self) -> list[dict[str, object]]:
        """Each backend's state, for /admin/backends."""
        now = time.monotonic()
        out: list[dict[str, object]] = []
        for key, s in self.states.items():
            model, _, _ = key.partition("/")
            cfg = s.backend.config
            out.append(
                {
                    "model": model,
                    "backend": s.name,
                    "provider": cfg.provider,
                    "deployment": cfg.deployment or cfg.model,
                    "priority": cfg.priority,
                    "weight": cfg.weight,
                    "state": "cooling_down" if s.cooldown_until > now else "closed",
                    "cooldown_remaining_s": round(max(0.0, s.cooldown_until - now), 3),
                    "in_flight": s.in_flight,
                    "latency_ewma_ms": round(s.latency_ewma_ms, 2) if s.latency_ewma_ms is not None else None,
                    "successes": s.successes,
                    "failures": s.failures,
                    "consecutive_failures": s.consecutive_failures,
                    "last_error": s.last_error,
                }
            )
        return out
