"""The spec's security schemes: bearer token and api-key header, both resolved to a principal."""

from __future__ import annotations

from typing import Any

from connexion import request

from llm_backend.api.common import resources


async def _principal(token: str) -> dict[str, Any] | None:
    state = request.scope["state"]
    principal = await resources().authenticate(token, state["caller"])
    return principal


async def bearer_info(token: str) -> dict[str, Any] | None:
    return await _principal(token)


async def api_key_info(api_key: str, required_scopes: Any = None) -> dict[str, Any] | None:
    return await _principal(api_key)
