"""Per-worker resources, created in the ASGI lifespan after gunicorn forks and closed on shutdown."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llm_backend.api.validation import BODY_STATE_KEY
from llm_backend.config import BackendConfig, Settings
from llm_backend.metrics import Metrics
from llm_backend.services.operations import operation_of_path
from llm_backend.services.proxy import Caller, ProxyService, RecordSink
from llm_backend.upstream.base import Backend
from llm_backend.upstream.mock import MockBackend
from llm_backend.upstream.router import Router
from llm_backend.upstream.sdk import SdkBackend

logger = logging.getLogger(__name__)


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
    conversations: Any = None
    responses: Any = None  # llm_backend.services.responses.ResponsesService
    limiter: Any = None
    metrics: Metrics = field(default_factory=Metrics)
    extra_checks: list[Callable[[], Awaitable[tuple[str, bool, str]]]] = field(default_factory=list)

    async def authenticate(self, token: str, caller: Caller) -> dict[str, Any] | None:
        if self.authenticator is None:
            return {"sub": "anonymous"}
        principal: dict[str, Any] | None = await self.authenticator(token, caller)
        return principal

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"models": {"ok": bool(self.router.models) or bool(self.backends)}}
        for check in self.extra_checks:
            name, ok, message = await check()
            checks[name] = {"ok": ok, "message": message}
        return all(c["ok"] for c in checks.values()), checks

    def on_request_done(self, caller: Caller, status: int, state: dict[str, Any]) -> None:
        """Count every request; record the OpenAI-style ones that ended before reaching the proxy service."""
        route = caller.route
        if "/responses/" in route:
            route = _response_route(route)
        self.metrics.observe_request(
            route if route.startswith(("/v1/", "/api/", "/admin/")) else _route_group(route),
            status,
            caller.log.get("model"),
            time.perf_counter() - caller.started,
            int(caller.log.get("tokens") or 0),
        )
        if caller.recorded or not caller.route.startswith(("/v1/", "/openai/")):
            return
        body = state.get(BODY_STATE_KEY, (None, None))[0]
        operation = operation_of_path(caller.route)
        error = caller.log.get("error") if status >= 400 else None
        self.proxy.record_rejection(
            caller, operation, status, error, body if isinstance(body, dict) else None
        )


_V1_ROUTES = frozenset(
    prefix + suffix
    for prefix in ("/openai/v1", "/openai")
    for suffix in (
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/models",
        "/responses",
        "/responses/input_tokens",
        "/responses/{response_id}",
        "/responses/{response_id}/cancel",
        "/responses/{response_id}/input_items",
    )
)


def _response_route(path: str) -> str:
    """A stored-response path with its id replaced (metric labels must not grow with the ids)."""
    head, _, tail = path.partition("/responses/")
    rid, slash, rest = tail.partition("/")
    if rid == "input_tokens":
        return path
    return f"{head}/responses/{{response_id}}{slash}{rest}"


def _route_group(path: str) -> str:
    """The route template of a path, for metric labels (never the raw path: deployments vary)."""
    if path.startswith("/openai/deployments/"):
        for suffix in ("/chat/completions", "/completions", "/embeddings"):
            if path.endswith(suffix):
                return "/openai/deployments/{deployment}" + suffix
        return "/openai/deployments"
    if path.startswith("/openai/v1/models/"):
        return "/openai/v1/models/{model}"
    if path in _V1_ROUTES:
        return path
    known = ("/healthz", "/readyz", "/metrics", "/openai/models", "/openapi.json")
    return path if path in known else "other"


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
    resources = Resources(settings=settings, router=router, proxy=ProxyService(router), backends=backends)
    from llm_backend.storage import setup_storage

    await setup_storage(settings, resources, stack)
    recorder: RecordSink | None = resources.recorder
    resources.proxy = ProxyService(router, recorder, record_content=settings.record_content)
    from llm_backend.services.access import setup_access
    from llm_backend.services.conversations import ConversationService

    await setup_access(settings, resources, stack)
    resources.conversations = ConversationService(resources.engine, resources.proxy)
    from llm_backend.services.affinity import ResponseOwners
    from llm_backend.services.responses import ResponsesService

    owners = ResponseOwners(resources.engine)
    await owners.start()
    stack.push_async_callback(owners.stop)
    resources.responses = ResponsesService(resources.proxy, owners)
    return resources


def tune_gc() -> None:
    """Keep the cyclic GC off the hot path: everything built at start-up is moved out of its sight, and
    young collections run less often (each request allocates many short-lived objects; with 64 requests in
    flight a collection would otherwise walk all of theirs, a cost that grows with concurrency)."""
    gc.collect()
    gc.freeze()

    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 20_000), max(gen1, 20), max(gen2, 20))


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
            yield {"resources": resources, "on_request_done": resources.on_request_done}
            logger.info("llm-backend worker shutting down")

    return lifespan
