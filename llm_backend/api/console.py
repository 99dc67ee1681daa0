"""The operator console (/console): HTML pages over the admin services, signed in with a session cookie.

HTTP only: the session cookie and its flags, CSRF checks on every form that changes something, redirects
and security headers. The pages' data come from llm_backend.console.views and the services the admin API
uses; the templates and static assets live in llm_backend/console/.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mimetypes
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from connexion import request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from llm_backend.api.common import caller, resources
from llm_backend.console import views
from llm_backend.console.render import STATIC, render
from llm_backend.db.session import DatabaseUnavailable
from llm_backend.errors import GatewayError
from llm_backend.services.sessions import LOCAL_METHOD, SESSION_COOKIE, ConsoleSession

logger = logging.getLogger(__name__)

LOGIN_COOKIE = "llmb_console_login"  # the sign-in form's CSRF token (double submit; no session yet)
COOKIE_PATH = "/console"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class _SignIn(Exception):
    """The request has no valid session: the answer (a redirect to sign-in, or a refusal) is attached."""

    def __init__(self, response: Response) -> None:
        self.response = response


# -- cookies and sessions ----------------------------------------------------------------------------------


def _secure() -> bool:
    """Served over TLS: the scheme as uvicorn gives it (X-Forwarded-Proto counts only from the proxies
    FORWARDED_ALLOW_IPS trusts, as everywhere else in the app)."""
    return request.scope.get("scheme") == "https"


def set_session_cookie(response: Response, token: str, session: ConsoleSession) -> None:
    """Hand the browser a session (any sign-in method calls this after ConsoleSessions.issue)."""
    max_age = max(1, int((session.expires_at - datetime.now(UTC)).total_seconds()))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path=COOKIE_PATH,
        secure=_secure(),
        httponly=True,
        samesite="strict",
    )


def _clear_session_cookie(response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, secure=_secure(), httponly=True, samesite="strict"
    )


def _html(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=PAGE_HEADERS)


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path of this server, nothing else (no open redirect)."""
    if not target or not target.startswith("/console") or target.startswith("//") or "\\" in target:
        return "/console"
    if any(c in target for c in "\r\n\x00"):
        return "/console"
    return target


def _here() -> str:
    query = request.scope.get("query_string", b"").decode("latin-1")
    return request.scope["path"] + (f"?{query}" if query else "")


def _console_open() -> bool:
    """The open demo console: LLM_BACKEND_AUTH=none, no admin key, and a browser on this very machine
    (a loopback peer, no proxy in between, and a loopback Host, so a rebound DNS name cannot reach it)."""
    settings = resources().settings
    if settings.auth != "none" or settings.admin_key:
        return False
    peer = request.scope.get("client")
    try:
        if peer is None or not ipaddress.ip_address(peer[0]).is_loopback:
            return False
    except ValueError:
        return False
    headers = request.headers
    if "x-forwarded-for" in headers or "forwarded" in headers or "x-real-ip" in headers:
        return False
    host = headers.get("host", "")
    hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    return hostname.lower() in _LOOPBACK_HOSTS


async def _session(*, changing: bool = False) -> tuple[ConsoleSession, str | None]:
    """The request's valid session (and a new cookie token when one was opened just now), or _SignIn."""
    sessions = resources().console_sessions
    token = request.cookies.get(SESSION_COOKIE)
    session = await asyncio.to_thread(sessions.verify, token) if token else None
    if session is not None and session.method == LOCAL_METHOD and not _console_open():
        session = None  # a session of the open console counts only where the console is open
    new_token = None
    if session is None and _console_open():
        if changing:  # a form needs the token of the page it came from: no session, no change
            raise _SignIn(_refused("Your console session has ended; reload the page and try again.", 403))
        new_token, session = await asyncio.to_thread(
            sessions.issue, LOCAL_METHOD, method=LOCAL_METHOD, client_ip=caller().client_ip
        )
    if session is None:
        if changing:
            raise _SignIn(_refused("You are not signed in to the console (or your session has ended).", 403))
        raise _SignIn(_redirect("/console/login?" + urlencode({"next": _here()})))
    c = caller()
    c.is_admin = True  # the console acts with the admin's rights, as the admin key does on /admin
    c.key_id = None
    c.log["key"] = f"console:{session.subject}"
    return session, new_token


def _refused(message: str, status: int) -> HTMLResponse:
    return _html(render("error.html", title="Refused", message=message, session=None), status)


def _form(body: Mapping[str, Any] | None) -> dict[str, str]:
    """The posted form's text fields (Connexion hands the parsed form over as `body`)."""
    return {k: v for k, v in (body or {}).items() if isinstance(k, str) and isinstance(v, str)}


def _same_origin() -> bool:
    """A form posted from another origin is refused whatever it carries (SameSite=Strict aside)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


async def _changing(form: Mapping[str, str]) -> ConsoleSession:
    """The session of a state-changing form, which must carry its CSRF token and come from this origin."""
    session, _ = await _session(changing=True)
    sessions = resources().console_sessions
    if not _same_origin() or not sessions.csrf_valid(session, form.get("csrf_token")):
        raise _SignIn(
            _refused("The form's security token is missing or wrong; reload the page and retry.", 403)
        )
    return session


def _page(
    template: str, session: ConsoleSession, new_token: str | None, status: int = 200, **ctx: Any
) -> Response:
    response = _html(render(template, session=session, nav=template.split(".")[0], **ctx), status)
    if new_token is not None:
        set_session_cookie(response, new_token, session)
    return response


async def _guarded(coro: Any) -> Response:
    try:
        result: Response = await coro
        return result
    except _SignIn as refusal:
        return refusal.response
    except DatabaseUnavailable:
        logger.warning("console page %s: the database is unreachable", request.scope.get("path"))
        page = _refused("The database is unreachable; the console will work again once it is back.", 503)
        page.headers["Retry-After"] = "5"
        return page


# -- sign-in and sign-out ----------------------------------------------------------------------------------


async def login_page(next: str | None = None) -> Response:
    return await _guarded(_login_page(next))


async def _login_page(target: str | None, message: str | None = None, status: int = 200) -> Response:
    res = resources()
    token = request.cookies.get(SESSION_COOKIE)
    current = await asyncio.to_thread(res.console_sessions.verify, token) if token else None
    if message is None and current is not None and (current.method != LOCAL_METHOD or _console_open()):
        return _redirect(_safe_next(target))
    if message is None and _console_open():
        opened, new_token = await _session()
        redirect = _redirect(_safe_next(target))
        if new_token is not None:
            set_session_cookie(redirect, new_token, opened)
        return redirect
    login_token = secrets.token_urlsafe(24)
    response = _html(
        render(
            "login.html",
            session=None,
            nav="login",
            login_token=login_token,
            next=_safe_next(target),
            message=message,
            enabled=bool(res.settings.admin_key),
            oidc=res.settings.oidc.console_enabled,
        ),
        status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        login_token,
        max_age=3600,
        path=COOKIE_PATH,
        secure=_secure(),
        httponly=True,
        samesite="strict",
    )
    return response


async def signin_wait() -> int | None:
    """Seconds this client must wait before it may try to sign in again (None: it may now)."""
    throttle = resources().signin_throttle
    return None if throttle is None else await throttle.retry_after(caller().client_ip)


async def signin_failed() -> None:
    """Count a failed sign-in of this client (the caller logs the failure itself)."""
    throttle = resources().signin_throttle
    if throttle is not None:
        await throttle.failed(caller().client_ip)


async def signin_succeeded() -> None:
    throttle = resources().signin_throttle
    if throttle is not None:
        await throttle.succeeded(caller().client_ip)


def too_many_sign_ins(wait: int) -> str:
    minutes = max(1, -(-wait // 60))
    return (
        "Too many failed sign-ins from your address. Please wait "
        f"{minutes} minute{'s' if minutes != 1 else ''} before trying again."
    )


async def login(body: dict[str, Any] | None = None) -> Response:
    form = _form(body)
    target = _safe_next(form.get("next"))
    wait = await signin_wait()
    if wait is not None:  # answered without looking at the key
        throttled = await _login_page(target, too_many_sign_ins(wait), 429)
        throttled.headers["Retry-After"] = str(wait)
        return throttled
    expected = request.cookies.get(LOGIN_COOKIE, "")
    presented = form.get("csrf_token", "")
    if not _same_origin() or not expected or not secrets.compare_digest(expected, presented):
        return await _login_page(target, "The sign-in form expired; please try again.", 403)
    sessions = resources().console_sessions
    issued = await asyncio.to_thread(
        sessions.sign_in_with_admin_key, form.get("admin_key", "").strip(), client_ip=caller().client_ip
    )
    if issued is None:
        logger.warning("console sign-in refused from %s: not the admin key", caller().client_ip)
        await signin_failed()
        return await _login_page(
            target, "That is not the admin key. Client API keys cannot open the console.", 401
        )
    token, session = issued
    await signin_succeeded()
    response = _redirect(target)
    set_session_cookie(response, token, session)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, secure=_secure(), httponly=True, samesite="strict")
    return response


async def logout_page() -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        return _page("logout.html", session, new_token)

    return await _guarded(page())


async def logout(body: dict[str, Any] | None = None) -> Response:
    async def work() -> Response:
        form = _form(body)
        await _changing(form)
        await asyncio.to_thread(resources().console_sessions.revoke, request.cookies.get(SESSION_COOKIE))
        response = _redirect("/console/login?signed_out=1")
        _clear_session_cookie(response)
        return response

    return await _guarded(work())


# -- static assets -----------------------------------------------------------------------------------------


async def static_asset(name: str) -> Response:
    path = (STATIC / name).resolve()
    if path.parent != STATIC.resolve() or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.suffix == ".js":
        media_type = "text/javascript"
    return Response(
        path.read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


# -- keys ----------------------------------------------------------------------------------------------------


async def keys_page() -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        res = resources()
        rows = await asyncio.to_thread(views.key_rows, res.key_store, res.engine) if res.key_store else []
        return _page("keys.html", session, new_token, keys=rows, models=_model_names(), form={}, error=None)

    return await _guarded(page())


def _model_names() -> list[str]:
    return [m.name for m in resources().router.models]


def _backend_names() -> list[str]:
    return sorted({s.name for s in resources().router.states.values()})


async def create_key(body: dict[str, Any] | None = None) -> Response:
    async def work() -> Response:
        form = _form(body)
        session = await _changing(form)
        res = resources()
        try:
            info, secret = await asyncio.to_thread(res.key_store.create, views.key_body(form, creating=True))
        except GatewayError as exc:
            rows = await asyncio.to_thread(views.key_rows, res.key_store, res.engine)
            return _page(
                "keys.html",
                session,
                None,
                400,
                keys=rows,
                models=_model_names(),
                form=form,
                error=exc.message,
            )
        logger.info("console: key %s (%s) created by %s", info["id"], info["name"], session.subject)
        return _page("key_created.html", session, None, 201, key=info, secret=secret)

    return await _guarded(work())


async def key_page(key_id: str) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        res = resources()
        try:
            key = await asyncio.to_thread(res.key_store.get, key_id)
        except GatewayError as exc:
            return _page(
                "error.html", session, new_token, exc.status_code, title="No such key", message=exc.message
            )
        return _page("key_edit.html", session, new_token, key=key, error=None, models=_model_names())

    return await _guarded(page())


async def update_key(key_id: str, body: dict[str, Any] | None = None) -> Response:
    async def work() -> Response:
        form = _form(body)
        session = await _changing(form)
        res = resources()
        try:
            await asyncio.to_thread(res.key_store.update, key_id, views.key_body(form, creating=False))
        except GatewayError as exc:
            if exc.status_code == 404:
                return _page("error.html", session, None, 404, title="No such key", message=exc.message)
            key = await asyncio.to_thread(res.key_store.get, key_id)
            return _page(
                "key_edit.html", session, None, 400, key=key, error=exc.message, models=_model_names()
            )
        res.authenticator.invalidate()
        return _redirect(f"/console/keys?{urlencode({'changed': key_id})}")

    return await _guarded(work())


async def _key_action(key_id: str, action: str, body: dict[str, Any] | None) -> Response:
    async def work() -> Response:
        form = _form(body)
        session = await _changing(form)
        res = resources()
        try:
            if action == "delete":
                await asyncio.to_thread(res.key_store.delete, key_id)
            else:
                await asyncio.to_thread(res.key_store.update, key_id, {"enabled": action == "enable"})
        except GatewayError as exc:
            return _page(
                "error.html", session, None, exc.status_code, title="No such key", message=exc.message
            )
        res.authenticator.invalidate()
        logger.info("console: key %s %sd by %s", key_id, action, session.subject)
        return _redirect(f"/console/keys?{urlencode({action + 'd': key_id})}")

    return await _guarded(work())


async def disable_key(key_id: str, body: dict[str, Any] | None = None) -> Response:
    return await _key_action(key_id, "disable", body)


async def enable_key(key_id: str, body: dict[str, Any] | None = None) -> Response:
    return await _key_action(key_id, "enable", body)


async def delete_key(key_id: str, body: dict[str, Any] | None = None) -> Response:
    return await _key_action(key_id, "delete", body)


# -- backends ------------------------------------------------------------------------------------------------


async def backends_page() -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        res = resources()
        rows = await asyncio.to_thread(views.backend_rows, res.router, res.engine)
        models: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            models.setdefault(str(row["model"]), []).append(row)

        return _page(
            "backends.html",
            session,
            new_token,
            models=models,
            worker=os.getpid(),
            recent_since=(datetime.now(UTC) - views.RECENT).replace(minute=0, second=0, microsecond=0),
        )

    return await _guarded(page())


# -- conversations -------------------------------------------------------------------------------------------


def _time_param(value: str | None, *, end: bool = False) -> datetime | None:
    """A date (2026-01-31) or a datetime-local value as UTC; None when empty or unreadable."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if end and len(value) == 10:  # a whole day: up to its end
        when += timedelta(days=1)
    return when


async def conversations_page(
    q: str | None = None,
    model: str | None = None,
    key_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        res = resources()
        params = {
            "owner": key_id or None,
            "model": model or None,
            "q": q or None,
            "created_after": _time_param(since),
            "created_before": _time_param(until, end=True),
            "limit": 25,
            "cursor": cursor or None,
        }
        error = None
        try:
            listing = await res.conversations.list_conversations(caller(), params)
        except GatewayError as exc:
            listing, error = {"data": [], "has_more": False, "next_cursor": None}, exc.message
        filters = {
            "q": q or "",
            "model": model or "",
            "key_id": key_id or "",
            "since": since or "",
            "until": until or "",
        }
        next_url = None
        if listing["next_cursor"]:
            next_url = "/console/conversations?" + urlencode({**filters, "cursor": listing["next_cursor"]})
        keys = await asyncio.to_thread(res.key_store.list) if res.key_store else []
        return _page(
            "conversations.html",
            session,
            new_token,
            conversations=listing["data"],
            filters=filters,
            next_url=next_url,
            error=error,
            keys=keys,
            models=_model_names(),
        )

    return await _guarded(page())


async def conversation_page(conversation_id: str) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        try:
            conv = await resources().conversations.get(caller(), conversation_id)
        except GatewayError as exc:
            return _page(
                "error.html",
                session,
                new_token,
                exc.status_code,
                title="No such conversation",
                message=exc.message,
            )
        return _page("conversation.html", session, new_token, conv=conv)

    return await _guarded(page())


async def export_conversation(conversation_id: str, format: str = "markdown") -> Response:
    async def work() -> Response:
        session, _ = await _session()
        try:
            media_type, content = await resources().conversations.export(caller(), conversation_id, format)
        except GatewayError as exc:
            return _page(
                "error.html",
                session,
                None,
                exc.status_code,
                title="No such conversation",
                message=exc.message,
            )
        ext = "md" if format == "markdown" else "json"
        return Response(
            content,
            media_type=media_type,
            headers={
                "Content-Disposition": f'attachment; filename="conversation-{conversation_id}.{ext}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return await _guarded(work())


# -- overview and request log --------------------------------------------------------------------------------


async def overview(
    range: str | None = None,
    since: str | None = None,
    until: str | None = None,
    bucket: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    backend: str | None = None,
) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        window = views.Window.parse(range, since, until, bucket)
        res = resources()
        filters = {"key_id": key_id or None, "model": model or None, "backend": backend or None}
        data = await asyncio.to_thread(views.overview, res.engine, window, filters)
        keys = await asyncio.to_thread(res.key_store.list) if res.key_store else []
        return _page(
            "overview.html",
            session,
            new_token,
            window=window,
            data=data,
            filters={k: v or "" for k, v in filters.items()},
            keys=keys,
            models=_model_names(),
            backends=_backend_names(),
        )

    return await _guarded(page())


async def requests_page(
    range: str | None = None,
    since: str | None = None,
    until: str | None = None,
    key_id: str | None = None,
    model: str | None = None,
    backend: str | None = None,
    outcome: str | None = None,
    status: str | None = None,
    user: str | None = None,
    client_ip: str | None = None,
    request_id: str | None = None,
    cursor: str | None = None,
) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        window = views.Window.parse(range or "7d", since, until, None)
        # Connexion passes a signed-in principal as `user` to a handler that takes one: read the filter itself
        user_filter = request.query_params.get("user")
        given = {
            "key_id": key_id,
            "model": model,
            "backend": backend,
            "outcome": outcome,
            "status": status,
            "user": user_filter,
            "client_ip": client_ip,
            "request_id": request_id,
        }
        filters = {k: v.strip() for k, v in given.items() if v and v.strip()}
        res = resources()
        error = None
        try:
            listing = await asyncio.to_thread(views.request_log, res.engine, window, filters, cursor or None)
        except GatewayError as exc:
            listing, error = {"data": [], "next_cursor": None}, exc.message
        query = {"range": window.range, **filters}
        if window.range == "custom":
            query.update(since=window.since_text, until=window.until_text)
        next_url = None
        if listing["next_cursor"]:
            next_url = "/console/requests?" + urlencode({**query, "cursor": listing["next_cursor"]})
        keys = await asyncio.to_thread(res.key_store.list) if res.key_store else []
        return _page(
            "requests.html",
            session,
            new_token,
            window=window,
            filters=filters,
            rows=listing["data"],
            next_url=next_url,
            first_url="/console/requests?" + urlencode(query) if cursor else None,
            error=error,
            keys=keys,
            models=_model_names(),
            backends=_backend_names(),
        )

    return await _guarded(page())


async def request_page(request_id: str) -> Response:
    async def page() -> Response:
        session, new_token = await _session()
        res = resources()
        from llm_backend.services.analytics import request_detail

        record = await asyncio.to_thread(request_detail, res.engine, request_id)
        if record is None:
            return _page(
                "error.html",
                session,
                new_token,
                404,
                title="No such request",
                message=f"No recorded request with id '{request_id}' (records land within a second or so).",
            )
        return _page("request.html", session, new_token, r=record, record_content=res.settings.record_content)

    return await _guarded(page())
