"""GET /metrics: the pod's Prometheus metrics, all workers summed (outside the OpenAI spec, like the docs)."""

from __future__ import annotations

import hmac
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from llm_backend.errors import error_body
from llm_backend.metrics import CONTENT_TYPE


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
    metrics = resources.metrics
    metrics.refresh()  # this worker's gauges as of now (on the event loop, which owns what they read)
    # every worker's files are read off the event loop; the single-process registry is quick to render
    body = await anyio.to_thread.run_sync(metrics.collect) if metrics.multiprocess else metrics.collect()
    return Response(body, media_type=CONTENT_TYPE)


def add_metrics_route(app: Any) -> None:
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
