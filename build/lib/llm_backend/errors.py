"""Gateway errors and their OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_backend.upstream.errors import UpstreamError


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body; raised by any layer below the API."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    """The request is malformed or violates the schema (400)."""


class ModelNotFound(GatewayError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str | None, **kw: Any) -> None:
        shown = model if model else "(none)"
        super().__init__(
            f"The model `{shown}` does not exist or you do not have access to it.", param="model", **kw
        )


class NotFound(GatewayError):
    status_code = 404
    code = "not_found"


class AuthenticationFailed(GatewayError):
    status_code = 401
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "request_too_large"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


def upstream_error_response(exc: UpstreamError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers for an upstream failure (the body never carries the server's keys)."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return exc.status_code, exc.error_body(), headers
