"""Upstream failures in domain terms: the API layer turns each into an OpenAI-shaped error."""

from __future__ import annotations

from typing import Any


class UpstreamError(Exception):
    """An upstream call failed. `retryable` tells routing whether another backend may help."""

    status_code = 502
    error_type = "upstream_error"
    code: str | None = "upstream_error"
    retryable = True
    failover_kind = "5xx"  # which fail_over_on condition covers it: connect | timeout | 429 | 5xx | never

    def __init__(
        self, message: str, *, backend: str | None = None, upstream_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.upstream_status = upstream_status
        self.retry_after: float | None = None

    def error_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": None, "code": self.code}}


class UpstreamRateLimited(UpstreamError):
    """The upstream answered 429; `retry_after` (seconds) is what it asked us to wait, if it said."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    failover_kind = "429"

    def __init__(
        self, message: str, *, retry_after: float | None, body: dict[str, Any] | None = None, **kw: Any
    ):
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.body = body

    def error_body(self) -> dict[str, Any]:
        body = super().error_body()
        upstream = self.body.get("error") if self.body else None
        if isinstance(upstream, dict):
            # Azure's 429 body is {"code": "429", "message": ...}: keep its words, in OpenAI's shape
            code = upstream.get("code")
            body["error"].update(
                message=upstream.get("message") or self.message,
                type=upstream.get("type") or self.error_type,
                param=upstream.get("param"),
                code=code if isinstance(code, str) and code and not code.isdigit() else self.code,
            )
        return body


class UpstreamServerError(UpstreamError):
    """The upstream answered 5xx."""

    failover_kind = "5xx"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""

    status_code = 504
    error_type = "timeout_error"
    code = "upstream_timeout"
    failover_kind = "timeout"


class UpstreamUnreachable(UpstreamError):
    """The upstream could not be connected to."""

    status_code = 502
    code = "upstream_unreachable"
    failover_kind = "connect"


class UpstreamAuthFailed(UpstreamError):
    """The upstream refused the server's own credentials: never the client's fault."""

    status_code = 502
    code = "upstream_auth_failed"
    failover_kind = "5xx"


class UpstreamBadResponse(UpstreamError):
    """The upstream answered with something that is not valid JSON/SSE."""

    code = "upstream_bad_response"
    failover_kind = "5xx"


class UpstreamClientError(UpstreamError):
    """The upstream rejected the request itself (4xx): the caller's answer, passed through, never retried."""

    retryable = False
    failover_kind = "never"
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, status_code: int, body: dict[str, Any] | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status_code = status_code
        self.body = body

    def error_body(self) -> dict[str, Any]:
        if self.body and isinstance(self.body.get("error"), dict):
            err = dict(self.body["error"])
            for k in ("message", "type", "param", "code"):
                err.setdefault(k, None)
            if not err.get("type"):
                err["type"] = self.error_type
            return {**self.body, "error": err}
        return super().error_body()


class UpstreamContentFilter(UpstreamClientError):
    """Azure's content filter blocked the prompt: 400 with code content_filter and the filter details."""

    code = "content_filter"

    def error_body(self) -> dict[str, Any]:
        body = super().error_body()
        body["error"]["code"] = "content_filter"
        return body


class NoBackendAvailable(UpstreamError):
    """Every backend of the model is cooling down or its circuit is open."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_backend_available"
    retryable = False
    failover_kind = "never"
