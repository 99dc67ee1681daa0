"""The spec's security schemes: bearer token and api-key header, both resolved to a principal."""

from __future__ import annotations

from typing import Any

from connexion.lifecycle import ConnexionRequest


async def _principal(token: str, request: ConnexionRequest) -> dict[str, Any] | None:
    state = request.scope["state"]
    principal: dict[str, Any] | None = await state["resources"].authenticate(
        token, state["caller"], request.headers
    )
    return principal


async def bearer_info(token: str, request: ConnexionRequest) -> dict[str, Any] | None:
    return await _principal(token, request)


async def api_key_info(
    api_key: str, request: ConnexionRequest, required_scopes: Any = None
) -> dict[str, Any] | None:
    return await _principal(api_key, request)
