"""Admin routes (admin key only): API keys, usage from the request log, backend routing state."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from llm_backend.api.common import body, caller, json_response, parse_time, resources
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


def _checked_expiry(data: dict[str, Any]) -> dict[str, Any]:
    """The key body, its `expires_at` checked to be a time we can store (a time past 9999 in UTC is not)."""
    if isinstance(data.get("expires_at"), str) and data.get("expires_in") is None:
        parse_time(data["expires_at"], "expires_at")
    return data


async def create_key() -> Response:
    res = _require_admin()
    info, secret = await asyncio.to_thread(res.key_store.create, _checked_expiry(body()))
    return json_response({**info, "key": secret}, 201)


async def get_key(key_id: str) -> Response:
    res = _require_admin()
    return json_response(await asyncio.to_thread(res.key_store.get, key_id))


async def update_key(key_id: str) -> Response:
    res = _require_admin()
    info = await asyncio.to_thread(res.key_store.update, key_id, _checked_expiry(body()))
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


def _since(value: str | None, now: datetime) -> datetime:
    """`since`: an ISO time, or a duration back from now (7d, 24h; at most a hundred years)."""
    from llm_backend.durations import DurationTooLong, parse_duration

    try:
        return now - parse_duration(value or "30d")
    except DurationTooLong as exc:
        raise InvalidRequest(
            f"Invalid value for 'since': {exc}.", param="since", code="invalid_value"
        ) from None
    except ValueError:
        pass
    try:
        return parse_time(value or "", "since")
    except InvalidRequest:
        raise InvalidRequest(
            "Invalid value for 'since': expected an ISO 8601 time or a duration such as 7d or 24h.",
            param="since",
            code="invalid_value",
        ) from None


def _window(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return _since(since, now), parse_time(until, "until") if until else now


async def get_usage(
    since: str | None = None,
    until: str | None = None,
    group_by: str = "key,model",
    key_id: str | None = None,
    model: str | None = None,
    client_request_id: str | None = None,
    team_id: str | None = None,
    user_id: str | None = None,
) -> Response:
    res = _require_admin()
    from llm_backend.services.usage import usage_report

    start, end = _window(since, until)
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    try:
        rows = await asyncio.to_thread(
            functools.partial(
                usage_report,
                res.engine,
                start,
                end,
                groups,
                key_id,
                model,
                client_request_id,
                user_id=user_id,
                team_id=team_id,
            )
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="group_by") from None
    return json_response({"object": "list", "data": rows})


async def list_requests(
    since: str | None = None,
    until: str | None = None,
    client_request_id: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    limit: int = 100,
) -> Response:
    res = _require_admin()
    from llm_backend.services.usage import request_list

    start, end = _window(since, until)
    rows = await asyncio.to_thread(
        request_list,
        res.engine,
        start,
        end,
        client_request_id=client_request_id,
        key_id=key_id,
        model=model,
        limit=limit,
    )
    return json_response({"object": "list", "data": rows})


async def list_backends() -> Response:
    res = _require_admin(needs_keys=False)
    return json_response({"object": "list", "data": res.router.snapshot()})


# -- teams and users -------------------------------------------------------------------------------------


def _require_org() -> Any:
    res = _require_admin()
    if res.org is None:
        raise PermissionDenied("No database is configured for teams and users.", code="admin_disabled")
    return res


def _org_changed(res: Any) -> None:
    """A team or user changed: this worker's cached keys and members are looked up again at next use."""
    res.authenticator.invalidate()
    if res.members is not None:
        res.members.invalidate()


async def list_teams() -> Response:
    res = _require_org()
    return json_response({"object": "list", "data": await asyncio.to_thread(res.org.list_teams)})


async def create_team() -> Response:
    res = _require_org()
    return json_response(await asyncio.to_thread(res.org.create_team, body()), 201)


async def get_team(team_id: str) -> Response:
    res = _require_org()
    return json_response(await asyncio.to_thread(res.org.get_team, team_id))


async def update_team(team_id: str) -> Response:
    res = _require_org()
    info = await asyncio.to_thread(res.org.update_team, team_id, body())
    _org_changed(res)
    return json_response(info)


async def delete_team(team_id: str) -> Response:
    res = _require_org()
    deleted = await asyncio.to_thread(res.org.delete_team, team_id)
    _org_changed(res)
    return json_response({"id": deleted, "object": "team.deleted", "deleted": True})


async def list_users(team: str | None = None, q: str | None = None) -> Response:
    res = _require_org()
    return json_response({"object": "list", "data": await asyncio.to_thread(res.org.list_users, team, q)})


async def get_user(user_id: str) -> Response:
    res = _require_org()
    return json_response(await asyncio.to_thread(res.org.get_user, user_id))


async def update_user(user_id: str) -> Response:
    res = _require_org()
    info = await asyncio.to_thread(res.org.update_user, user_id, body())
    _org_changed(res)
    return json_response(info)
