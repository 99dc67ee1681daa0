"""Admin routes (admin key only): API keys, usage from the request log, backend routing state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from llm_backend.api.common import body, caller, json_response, resources
from llm_backend.errors import AuthenticationFailed, InvalidRequest, PermissionDenied


def _require_admin(*, needs_keys: bool = True) -> Any:
    res = resources()
    if not res.settings.admin_key:
        raise PermissionDenied(
            "The admin API is disabled: set LLM_BACKEND_ADMIN_KEY on the server to use it.",
            code="admin_disabled",
        )
    if not caller().is_admin:
        raise AuthenticationFailed("This route needs the admin key.", code="invalid_api_key")
    if needs_keys and res.key_store is None:
        raise PermissionDenied("No database is configured for keys.", code="admin_disabled")
    return res


async def list_keys(owner: str | None = None) -> Response:
    res = _require_admin()
    return json_response({"object": "list", "data": await asyncio.to_thread(res.key_store.list, owner)})


async def create_key() -> Response:
    res = _require_admin()
    info, secret = await asyncio.to_thread(res.key_store.create, body())
    return json_response({**info, "key": secret}, 201)


async def get_key(key_id: str) -> Response:
    res = _require_admin()
    return json_response(await asyncio.to_thread(res.key_store.get, key_id))


async def update_key(key_id: str) -> Response:
    res = _require_admin()
    info = await asyncio.to_thread(res.key_store.update, key_id, body())
    res.authenticator.invalidate()
    return json_response(info)


async def disable_key(key_id: str) -> Response:
    res = _require_admin()
    info = await asyncio.to_thread(res.key_store.update, key_id, {"enabled": False})
    res.authenticator.invalidate()
    return json_response(info)


async def delete_key(key_id: str) -> Response:
    res = _require_admin()
    await asyncio.to_thread(res.key_store.delete, key_id)
    res.authenticator.invalidate()
    return json_response({"id": key_id, "object": "api_key.deleted", "deleted": True})


def _since(value: str | None) -> datetime:
    from llm_backend.durations import parse_duration

    now = datetime.now(UTC)
    if not value:
        return now - parse_duration("30d")
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest("'since' must be an ISO time or a duration such as 7d.", param="since") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def get_usage(
    since: str | None = None,
    until: str | None = None,
    group_by: str = "key,model",
    key_id: str | None = None,
    model: str | None = None,
) -> Response:
    res = _require_admin()
    from llm_backend.services.usage import usage_report

    try:
        end = datetime.fromisoformat(until.replace("Z", "+00:00")) if until else datetime.now(UTC)
    except ValueError:
        raise InvalidRequest("'until' must be an ISO time.", param="until") from None
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    try:
        rows = await asyncio.to_thread(usage_report, res.engine, _since(since), end, groups, key_id, model)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="group_by") from None
    return json_response({"object": "list", "data": rows})


async def list_backends() -> Response:
    res = _require_admin(needs_keys=False)
    return json_response({"object": "list", "data": res.router.snapshot()})
