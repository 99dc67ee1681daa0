"""The app factory: the spec, the middleware, OpenAI-shaped error handlers and the lifespan."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import yaml
from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.lifecycle import ConnexionRequest, ConnexionResponse
from connexion.middleware import ConnexionMiddleware, MiddlewarePosition
from connexion.middleware.swagger_ui import SwaggerUIMiddleware
from connexion.options import SwaggerUIOptions
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from llm_backend.api.docs import DocsMiddleware
from llm_backend.api.middleware import RequestContextMiddleware
from llm_backend.api.validation import OpenAIJSONBodyValidator, OpenAIParameterValidator
from llm_backend.config import Settings
from llm_backend.db.session import DatabaseUnavailable, unavailable_error
from llm_backend.errors import GatewayError, error_body, upstream_error_response
from llm_backend.lifespan import lifespan_for
from llm_backend.logs import configure_logging
from llm_backend.logthrottle import LogThrottle
from llm_backend.upstream.errors import UpstreamError

logger = logging.getLogger(__name__)
#: An outage makes every request fail the same way: one log line per minute and kind, with a count.
_errors_log = LogThrottle(logger, 60.0)
DATABASE_RETRY_AFTER_S = 2

SPEC_DIR = Path(__file__).resolve().parent.parent / "openapi"
if not SPEC_DIR.exists():  # installed without the repository checkout
    SPEC_DIR = Path(__file__).resolve().parent / "openapi"

_orjson_dumps: Any = None


def _dumps(data: Any) -> bytes:
    global _orjson_dumps
    if _orjson_dumps is None:
        import orjson

        _orjson_dumps = orjson.dumps
    return _orjson_dumps(data)  # type: ignore[no-any-return]


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> ConnexionResponse:
    return ConnexionResponse(
        status_code=status, body=_dumps(body), headers=headers or {}, content_type="application/json"
    )


def _note_error(request: ConnexionRequest, code: str | None) -> None:
    caller = request.scope.get("state", {}).get("caller")
    if caller is not None and code:
        caller.log.setdefault("error", code)


def handle_gateway_error(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, GatewayError)
    _note_error(request, exc.code or exc.error_type)
    return _response(exc.status_code, exc.body(), exc.headers)


def handle_upstream_error(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    assert isinstance(exc, UpstreamError)
    status, body, headers = upstream_error_response(exc)
    _note_error(request, exc.code or exc.error_type)
    return _response(status, body, headers)


_PROBLEM_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def handle_problem(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    """Connexion's and Starlette's own errors (routing, security, media type) in OpenAI's shape."""
    status = int(getattr(exc, "status_code", None) or getattr(exc, "status", None) or 500)
    detail = str(getattr(exc, "detail", None) or getattr(exc, "title", None) or "")
    error_type, code = _PROBLEM_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    method = request.scope.get("method", "")
    path = request.scope.get("path", "")
    if status == 401:
        message = (
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `api-key: <key>`."
            if "No authorization token" in detail or "Missing" in detail or not detail
            else "Incorrect API key provided."
        )
    elif status == 404:
        message = f"Invalid URL ({method} {path})"
    elif status == 405:
        message = f"Method not allowed ({method} {path})"
    elif status == 415:
        message = "Unsupported Content-Type: send the body as application/json."
    elif status >= 500:
        message = "The server had an error while processing your request."
        logger.error("internal problem: %s", detail)
    else:
        message = detail or "Bad request."
    _note_error(request, code or error_type)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return _response(status, error_body(message, error_type, None, code), headers)


def handle_database_unavailable(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    """The database is unreachable or timed out (any route that needs it): 503 with Retry-After."""
    down = exc if isinstance(exc, DatabaseUnavailable) else unavailable_error(exc)
    _errors_log.log("database", logging.ERROR, "database unavailable: %s", down)
    _note_error(request, "database_unavailable")
    body = error_body(
        "The database is unreachable; please retry shortly.",
        "service_unavailable",
        None,
        "database_unavailable",
    )
    return _response(503, body, {"Retry-After": str(DATABASE_RETRY_AFTER_S)})


def handle_unexpected(request: ConnexionRequest, exc: Exception) -> ConnexionResponse:
    if isinstance(exc, GatewayError):
        return handle_gateway_error(request, exc)
    if isinstance(exc, UpstreamError):
        return handle_upstream_error(request, exc)
    if isinstance(exc, ProblemException | HTTPException):
        return handle_problem(request, exc)
    if unavailable_error(exc) is not None:  # a driver error that escaped session_scope
        return handle_database_unavailable(request, exc)
    caller = request.scope.get("state", {}).get("caller")
    rid = caller.request_id if caller is not None else "unknown"
    # the first of a kind with its traceback, then one line per minute with the count
    _errors_log.log(
        f"unhandled:{type(exc).__name__}:{str(exc)[:120]}",
        logging.ERROR,
        "unhandled error in request %s",
        rid,
        exc_info=exc,
    )
    _note_error(request, "server_error")
    return _response(
        500,
        error_body(
            f"The server had an error while processing your request (request id {rid}).",
            "server_error",
            None,
            "internal_error",
        ),
    )


@functools.lru_cache(maxsize=4)
def _spec_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def load_spec(settings: Settings) -> dict[str, Any]:
    """The spec as a dict; with LLM_BACKEND_AUTH=none the security requirements become optional."""
    from llm_backend.api.security import apply_oidc

    spec: dict[str, Any] = apply_oidc(yaml.safe_load(_spec_text(str(SPEC_DIR / "openapi.yaml"))), settings)
    if settings.auth == "none":
        spec = copy.deepcopy(spec)
        # the admin routes keep requiring the admin key
        global_security = spec.get("security", [])
        for path, item in spec.get("paths", {}).items():
            if path.startswith("/admin/"):
                continue
            for method, op in item.items():
                if method == "parameters" or not isinstance(op, dict):
                    continue
                security = op.get("security", global_security)
                if security:
                    op["security"] = [*security, {}]
    return spec


def _cache_security_introspection() -> None:
    """Connexion asks `inspect` on every request whether our security functions take `request` and
    `required_scopes`; the answer never changes for a function, so remember it (3 % of a request's time)."""
    from connexion.security import AbstractSecurityHandler

    current = AbstractSecurityHandler.__dict__.get("_accepts_kwarg")
    if isinstance(current, staticmethod) and not hasattr(current.__func__, "cache_info"):
        AbstractSecurityHandler._accepts_kwarg = staticmethod(  # type: ignore[method-assign]
            functools.lru_cache(maxsize=256)(current.__func__)
        )


def create_app(settings: Settings | None = None) -> AsyncApp:
    """Build a fresh app: tests call this with their own Settings; asgi.py calls it once per process."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    _cache_security_introspection()
    middlewares = [
        DocsMiddleware if m is SwaggerUIMiddleware else m for m in ConnexionMiddleware.default_middlewares
    ]
    app = AsyncApp(
        __name__, lifespan=lifespan_for(settings), specification_dir=str(SPEC_DIR), middlewares=middlewares
    )
    from llm_backend.api.security import SECURITY_MAP

    app.add_api(
        load_spec(settings),
        security_map=SECURITY_MAP,
        strict_validation=False,
        validate_responses=False,
        pythonic_params=False,
        validator_map={
            "parameter": OpenAIParameterValidator,
            "body": {"application/json": OpenAIJSONBodyValidator},
        },
        swagger_ui_options=SwaggerUIOptions(swagger_ui_path="/docs", spec_path="/openapi.json"),
    )
    app.add_error_handler(GatewayError, handle_gateway_error)
    app.add_error_handler(UpstreamError, handle_upstream_error)
    app.add_error_handler(ProblemException, handle_problem)
    app.add_error_handler(HTTPException, handle_problem)
    app.add_error_handler(DatabaseUnavailable, handle_database_unavailable)
    app.add_error_handler(Exception, handle_unexpected)
    if settings.cors_allow_origins:
        # added first, so it wraps everything, the request-size refusals included
        # Browser chat UIs call the API from their own origin, with an Authorization header (a preflight).
        # Keys travel in headers, never cookies, so credentials are not allowed.
        app.add_middleware(
            CORSMiddleware,
            position=MiddlewarePosition.BEFORE_EXCEPTION,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[
                "x-request-id",
                "x-client-request-id",
                "retry-after",
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            max_age=600,
        )
    app.add_middleware(
        RequestContextMiddleware,
        position=MiddlewarePosition.BEFORE_EXCEPTION,
        max_body_bytes=settings.max_body_bytes,
        trusted_proxies=settings.trusted_proxies,
        conversation_headers=settings.conversation_id_headers,
    )
    from llm_backend.api.metrics import add_metrics_route

    add_metrics_route(app)
    return app
