"""GET /metrics: the worker's Prometheus metrics (outside the OpenAI spec, like the docs routes)."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from llm_backend.errors import error_body


async def metrics(request: Request) -> Response:
    resources = request.scope["state"]["resources"]
    token = resources.settings.metrics_token
    if token is not None:
        presented = request.headers.get("authorization", "")
        scheme, _, value = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            body = error_body(
                "GET /metrics needs the metrics token: send `Authorization: Bearer <METRICS_TOKEN>`.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
            return Response(
                orjson.dumps(body),
                status_code=401,
                media_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return PlainTextResponse(resources.metrics.render(), media_type="text/plain; version=0.0.4")


def add_metrics_route(app: Any) -> None:
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
