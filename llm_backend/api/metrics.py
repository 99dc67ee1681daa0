"""GET /metrics: the worker's Prometheus metrics (outside the OpenAI spec, like the docs routes)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse


async def metrics(request: Request) -> PlainTextResponse:
    resources = request.scope["state"]["resources"]
    return PlainTextResponse(resources.metrics.render(), media_type="text/plain; version=0.0.4")


def add_metrics_route(app: Any) -> None:
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
