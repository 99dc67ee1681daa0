"""GET /healthz (liveness) and GET /readyz (readiness: schema current, resources up)."""

from __future__ import annotations

from starlette.responses import Response

from llm_backend.api.common import json_response, resources


async def healthz() -> Response:
    return json_response({"status": "ok"})


async def readyz() -> Response:
    ok, checks = await resources().readiness()
    return json_response({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)
