"""Per-worker resources, created in the ASGI lifespan after gunicorn forks and closed on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_backend.api.validation import BODY_STATE_KEY
from llm_backend.config import BackendConfig, Settings
from llm_backend.logthrottle import LogThrottle
from llm_backend.metrics import OTHER, MeteredSink, Metrics
from llm_backend.services.operations import operation_of_path
from llm_backend.services.proxy import Caller, ProxyService, RecordSink
from llm_backend.upstream.base import Backend
from llm_backend.upstream.mock import MockBackend
from llm_backend.upstream.router import Router
from llm_backend.upstream.sdk import SdkBackend

logger = logging.getLogger(__name__)
_rejections = LogThrottle(logging.getLogger("llm_backend.access"), interval=60.0)


def make_backend(config: BackendConfig, settings: Settings, token_provider: Any = None) -> Backend:
    if config.provider == "mock":
        return MockBackend(config)
    if config.auth != "entra_id":
        token_provider = None
    elif token_provider is not None and (config.azure_v1 or config.token_scope):
        from llm_backend.upstream.identity import V1_SCOPE

        token_provider = token_provider.scoped(config.token_scope or V1_SCOPE)
    return SdkBackend(
        config, http_client_kind=settings.upstream_http_client, azure_ad_token_provider=token_provider
    )


@dataclass
class Resources:
    """Everything a worker holds: upstream clients, router, recorder, limiter, key store."""

    settings: Settings
    router: Router
    proxy: ProxyService
    backends: dict[str, Backend]
    recorder: Any = None
    engine: Any = None
    admit: Callable[..., Awaitable[Any]] | None = None
    authenticator: Any = None
    key_store: Any = None
    org: Any = None  # llm_backend.services.org.OrgStore (teams and users), with a database
    members: Any = None  # llm_backend.services.org.Members: resolve_user() for the serving path
    conversations: Any = None
    responses: Any = None  # llm_backend.services.responses.ResponsesService
    console_sessions: Any = None  # llm_backend.services.sessions.ConsoleSessions
    signin_throttle: Any = None  # llm_backend.services.signin_throttle.SignInThrottle of console sign-ins
    limiter: Any = None
    tracer: Any = None  # llm_backend.tracing.otel.Tracer when tracing is on
    oidc: Any = None  # llm_backend.services.oidc.OidcAuthenticator when OIDC_ISSUER is set
    oidc_provider: Any = None
    metrics: Metrics = field(default_factory=Metrics)
    recorded_routes: frozenset[str] = frozenset()  # route templates of the model calls (POST /v1/…)
    extra_checks: list[Callable[[], Awaitable[tuple[str, bool, str]]]] = field(default_factory=list)

    async def authenticate(
        self, token: str, caller: Caller, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any] | None:
        """`headers` are the request's (a trusted front-end may name its end user in them)."""
        if self.authenticator is None:
            return {"sub": "anonymous"}
        principal: dict[str, Any] | None = await self.authenticator(token, caller, headers)
        return principal

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"models": {"ok": bool(self.router.models) or bool(self.backends)}}
        for check in self.extra_checks:
            name, ok, message = await check()
            checks[name] = {"ok": ok, "message": message}
        return all(c["ok"] for c in checks.values()), checks

    def on_request_done(self, caller: Caller, status: int, state: dict[str, Any]) -> bool:
        """Count every request; record the model calls that ended before reaching the proxy service.

        Returns True for a request refused before authentication (an unknown route, no or a wrong key):
        those are counted and summed up in one log line per interval instead of a line (and a row) each,
        so a flood of junk grows neither the log nor the database."""
        metrics = self.metrics
        metrics.request_done(caller)
        route = metrics.route_of(caller.route)
        log = caller.log
        metrics.observe_request(
            route,
            status,
            metrics.model_label(log.get("model")),
            time.perf_counter() - caller.started,
            backend=metrics.backend_label(log.get("backend")),
            outcome=log.get("outcome"),
        )
        if route == OTHER or status in (401, 405):
            reason = "unauthenticated" if status == 401 else "unknown_route"
            metrics.reject(reason)
            _rejections.log(
                reason,
                logging.INFO,
                "refused a request before authentication (%s): last from %s",
                "no valid API key" if reason == "unauthenticated" else "no such route",
                caller.client_ip,
            )
            return True
        # Only model calls go to the request log: listing models or deployments, the conversations API and
        # the admin routes use no tokens and bill nothing, and the access log and /metrics count them.
        if caller.recorded or route not in self.recorded_routes:
            return False
        body = state.get(BODY_STATE_KEY, (None, None))[0]
        error = caller.log.get("error") if status >= 400 else None
        self.proxy.record_rejection(
            caller, operation_of_path(route), status, error, body if isinstance(body, dict) else None
        )
        return False


async def build_resources(settings: Settings, stack: contextlib.AsyncExitStack) -> Resources:
    backends: dict[str, Backend] = {}
    token_provider = None
    if any(bc.auth == "entra_id" for m in settings.models for bc in m.backends):
        from llm_backend.upstream.identity import TokenProvider, make_credential

        token_provider = TokenProvider(make_credential())
        stack.push_async_callback(token_provider.close)
    for model in settings.models:
        for bc in model.backends:
            backend = make_backend(bc, settings, token_provider)
            backends[f"{model.name}/{bc.name}"] = backend
            stack.push_async_callback(backend.close)
    router = Router(settings.models, backends)
    routes = spec_routes(settings)
    resources = Resources(
        settings=settings,
        router=router,
        proxy=ProxyService(router),
        backends=backends,
        metrics=Metrics(
            models=(m.name for m in settings.models if not m.wildcard),
            aliases={a: m.name for m in settings.models if not m.wildcard for a in m.aliases},
            routes=routes.keys(),
            backends=((s.model, s.name) for s in router.states.values()),
        ),
        recorded_routes=frozenset(
            path
            for path, methods in routes.items()
            if "post" in methods and path.startswith(("/v1/", "/openai/"))
        ),
    )
    # last of all at shutdown (after the recorder's drain): what the sampled counters grew by since the
    # previous refresh goes into the sums before the worker exits
    stack.callback(resources.metrics.refresh)
    from llm_backend.storage import setup_storage

    await setup_storage(settings, resources, stack)
    recorder: RecordSink | None = resources.recorder
    from llm_backend.tracing import start_tracing

    resources.tracer = await start_tracing(stack)  # None unless OTEL_* asks for traces
    metrics = resources.metrics
    metrics.watch_router(router)
    router.on_attempt, router.on_error = metrics.upstream_attempt, metrics.upstream_error
    resources.proxy = ProxyService(
        router,
        MeteredSink(recorder, metrics.observe_record),
        record_content=settings.record_content,
        tracer=resources.tracer,
    )
    from llm_backend.services.access import setup_access
    from llm_backend.services.conversations import ConversationService

    await setup_access(settings, resources, stack)
    from llm_backend.services.oidc import setup_oidc

    await setup_oidc(settings, resources, stack)
    resources.conversations = ConversationService(resources.engine, resources.proxy)
    from llm_backend.services.affinity import ResponseOwners
    from llm_backend.services.dbguard import DatabaseGuard
    from llm_backend.services.responses import ResponsesService

    owners_guard = DatabaseGuard(settings.db_statement_timeout_s)
    stack.callback(owners_guard.close)
    owners = ResponseOwners(resources.engine, guard=owners_guard)
    await owners.start()
    stack.push_async_callback(owners.stop)
    resources.responses = ResponsesService(resources.proxy, owners)
    from llm_backend.services.sessions import ConsoleSessions

    resources.console_sessions = ConsoleSessions(
        resources.engine,
        ttl_s=settings.console_session_ttl_s,
        admin_key=settings.admin_key,
        allow_local=settings.auth == "none" and not settings.admin_key,
    )
    from llm_backend.services.signin_throttle import make_signin_throttle

    resources.signin_throttle = make_signin_throttle(settings.redis_url, timeout_s=settings.redis_timeout_s)
    stack.push_async_callback(resources.signin_throttle.aclose)
    return resources


def spec_routes(settings: Settings) -> dict[str, frozenset[str]]:
    """The spec's path templates and their methods."""
    from llm_backend.app import load_spec  # the app module imports this one

    paths = load_spec(settings).get("paths", {})
    return {path: frozenset(m for m in item if m != "parameters") for path, item in paths.items()}


#: Net allocations between young collections. Each collection walks what is young and alive: the requests
#: in flight and, above all, the objects each held stream rebuilds to wait for its next chunk (about a dozen:
#: coroutines, futures, a timer). With 10,000 streams held, 20,000 allocations let 45,000 such objects pile up
#: and collections paused the worker for 30 to 140 ms; at 5,000 they stay near 10 ms, and throughput at 64
#: concurrent requests is the same (the default 700 would walk the in-flight requests' objects far more often).
GC_YOUNG_THRESHOLD = 5_000
#: Young collections before a middle one. A waiting stream's objects survive young collections (the stream
#: waits seconds for its next chunk), so they must die in the middle generation rather than reach the old one,
#: whose collections walk every live object (two million with 10,000 streams held: a pause of seconds).
GC_MIDDLE_THRESHOLD = 50


def tune_gc() -> None:
    """Keep the cyclic GC off the hot path: everything built at start-up is moved out of its sight, and the
    collections' thresholds keep their pauses short with thousands of streams held."""
    gc.collect()
    gc.freeze()

    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_YOUNG_THRESHOLD), max(gen1, GC_MIDDLE_THRESHOLD), max(gen2, 20))
    if _gc_pauses.observe not in gc.callbacks:
        gc.callbacks.append(_gc_pauses.observe)


class GcPauses:
    """Times the collector's full (generation 2) collections: they stop the event loop for as long as they
    walk every live object, so thousands of held streams make them long; slow ones are logged (throttled)."""

    def __init__(self, slow: float = 0.1) -> None:
        self.slow = slow
        self.full = 0
        self.longest = 0.0
        self.total = 0.0
        self._started = 0.0
        self._throttle = LogThrottle(logger, interval=60.0)

    def observe(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.full += 1
        self.total += took
        self.longest = max(self.longest, took)
        if took >= self.slow:
            self._throttle.log(
                "gc", logging.WARNING, "a full garbage collection paused the worker for %.0f ms", took * 1000
            )


_gc_pauses = GcPauses()


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def lifespan_for(
    settings: Settings,
) -> Callable[[Any], contextlib.AbstractAsyncContextManager[dict[str, Any]]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as stack:
            resources = await build_resources(settings, stack)
            names = ", ".join(m.name for m in settings.models) or "*"
            logger.info(
                "llm-backend ready: models %s from %s; recording %s; auth %s",
                names,
                settings.config_source,
                "on" if settings.recording else "off",
                settings.auth,
            )
            tune_gc()
            publisher = asyncio.create_task(resources.metrics.publish())
            stack.push_async_callback(_cancelled, publisher)
            state: dict[str, Any] = {
                "resources": resources,
                "on_request_start": resources.metrics.request_started,
                "on_request_done": resources.on_request_done,
            }
            if resources.tracer is not None:  # the request headers that carry the client's trace context
                state["trace_headers"] = resources.tracer.inbound_fields
            yield state
            logger.info("llm-backend worker shutting down")

    return lifespan
