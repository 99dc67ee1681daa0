"""The console's sign-in with the OIDC provider (authorization code + PKCE): the two routes and the cookie
that carries the sign-in's state, nonce and code verifier from the one to the other."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from typing import Any

import orjson
from connexion import request
from starlette.responses import Response

from llm_backend.api.common import caller, resources
from llm_backend.api.console import (
    _html,
    _redirect,
    _safe_next,
    _secure,
    set_session_cookie,
    signin_failed,
    signin_succeeded,
    signin_wait,
    too_many_sign_ins,
)
from llm_backend.console.render import render
from llm_backend.errors import GatewayError
from llm_backend.services.oidc import SignInFailed, admin_refusal, finish_sign_in, start_sign_in

logger = logging.getLogger(__name__)

FLOW_COOKIE = "llmb_oidc_flow"
FLOW_PATH = "/console/oidc"  # the cookie goes only to the callback
FLOW_TTL_S = 600  # a sign-in must come back within this
CALLBACK_PATH = "/console/oidc/callback"
OIDC_METHOD = "oidc"


def _page(title: str, message: str, status: int) -> Response:
    body = render("oidc_signin.html", title=title, message=message, session=None, nav="login")
    response = _html(body, status)
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH, secure=_secure(), httponly=True, samesite="lax")
    return response


def _redirect_uri() -> str:
    """OIDC_REDIRECT_URL, else this server's callback as the browser reached it (the scheme as uvicorn
    gives it: X-Forwarded-Proto counts only from FORWARDED_ALLOW_IPS)."""
    configured = resources().settings.oidc.redirect_url
    if configured:
        return configured
    scheme = request.scope.get("scheme", "http")
    host = request.headers.get("host") or "localhost"
    return f"{scheme}://{host}{CALLBACK_PATH}"


def _flow_value(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


def _flow_of(raw: str | None) -> dict[str, Any] | None:
    if not raw or len(raw) > 4096:
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        return None
    fields = ("state", "nonce", "verifier", "next", "redirect_uri", "at")
    if not isinstance(data, dict) or not all(k in data for k in fields):
        return None
    if not isinstance(data["at"], int) or not 0 <= time.time() - data["at"] <= FLOW_TTL_S:
        return None
    return data


async def login_oidc(next: str | None = None) -> Response:
    res = resources()
    provider = res.oidc_provider
    if provider is None or not res.settings.oidc.console_enabled:
        return _page(
            "Sign-in unavailable",
            "Sign-in with the identity provider is not configured on this server (OIDC_ISSUER, OIDC_CLIENT_ID).",
            404,
        )
    redirect_uri = _redirect_uri()
    try:
        start = await start_sign_in(provider, redirect_uri)
    except SignInFailed as exc:
        return _page("Sign-in unavailable", exc.message, exc.status)
    except GatewayError as exc:  # the provider cannot be reached
        return _page("Sign-in unavailable", exc.message, exc.status_code)
    flow = {
        "state": start.state,
        "nonce": start.nonce,
        "verifier": start.verifier,
        "next": _safe_next(next),
        "redirect_uri": redirect_uri,
        "at": int(time.time()),
    }
    response = _redirect(start.url)
    # SameSite=Lax: the provider sends the browser back with a top-level GET from its own site
    response.set_cookie(
        FLOW_COOKIE,
        _flow_value(flow),
        max_age=FLOW_TTL_S,
        path=FLOW_PATH,
        secure=_secure(),
        httponly=True,
        samesite="lax",
    )
    return response


async def oidc_callback(
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    res = resources()
    provider = res.oidc_provider
    if provider is None or not res.settings.oidc.console_enabled:
        return _page("Sign-in unavailable", "Sign-in with the identity provider is not configured.", 404)
    wait = await signin_wait()
    if wait is not None:  # the sign-in is not looked at
        throttled = _page("Sign-in refused", too_many_sign_ins(wait), 429)
        throttled.headers["Retry-After"] = str(wait)
        return throttled
    flow = _flow_of(request.cookies.get(FLOW_COOKIE))
    if flow is None:
        return _page(
            "Sign-in expired",
            "This sign-in was not started here, or took too long (or cookies are blocked). Please start again.",
            400,
        )
    if not state or not secrets.compare_digest(state.encode(), str(flow["state"]).encode()):
        logger.warning("console OIDC sign-in refused from %s: the state does not match", caller().client_ip)
        await signin_failed()
        return _page("Sign-in refused", "The sign-in's state does not match the one started here.", 400)
    if error:
        detail = (error_description or "").strip()[:300]
        return _page(
            "Sign-in refused", f"The identity provider refused the sign-in ({error[:80]}). {detail}", 401
        )
    if not code:
        return _page("Sign-in refused", "The identity provider sent no authorization code.", 400)
    try:
        identity = await finish_sign_in(
            provider,
            code,
            redirect_uri=str(flow["redirect_uri"]),
            verifier=str(flow["verifier"]),
            nonce=str(flow["nonce"]),
        )
    except SignInFailed as exc:
        logger.warning("console OIDC sign-in from %s failed: %s", caller().client_ip, exc.message)
        if exc.status != 503:  # 503: the provider cannot be reached, no fault of the client's
            await signin_failed()
        return _page("Sign-in failed", exc.message, exc.status)
    except GatewayError as exc:  # the provider's trouble, not the client's: not counted
        return _page("Sign-in failed", exc.message, exc.status_code)
    refusal = admin_refusal(identity, res.settings.oidc)
    if refusal is not None:
        logger.warning(
            "console OIDC sign-in of %s from %s refused: not an admin",
            identity.email or identity.subject,
            caller().client_ip,
        )
        await signin_failed()
        return _page("Not an administrator", refusal, 403)
    await signin_succeeded()
    token, session = await asyncio.to_thread(
        res.console_sessions.issue,
        identity.subject,
        method=OIDC_METHOD,
        name=identity.name or identity.email,
        client_ip=caller().client_ip,
    )
    target = _safe_next(str(flow["next"]))
    # The session cookie is SameSite=Strict, and this request came from the provider's site: a redirect
    # from here would still be that cross-site navigation, without the cookie. A page of ours that moves on
    # makes the next request a same-site one.
    body = render(
        "oidc_signin.html", title="Signed in", message=None, target=target, session=None, nav="login"
    )
    response = _html(body, 200, {"Refresh": f"0; url={target}"})
    set_session_cookie(response, token, session)
    response.delete_cookie(FLOW_COOKIE, path=FLOW_PATH, secure=_secure(), httponly=True, samesite="lax")
    return response
