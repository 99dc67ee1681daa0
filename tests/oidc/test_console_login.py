"""The console's sign-in with the test issuer: authorization code + PKCE over real HTTP, followed as a browser
would (httpx here; headless Chromium in test_console_browser.py)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest

from llm_backend.app import create_app
from tests.conftest import running_server
from tests.oidc.conftest import ADMIN_KEY
from tests.oidc.support import CLIENT_ID, CLIENT_SECRET, Issuer, b64url

ADMINS = "g-llm-admins"


def console_settings(issuer: Issuer, **kw: Any) -> Any:
    kw.setdefault("client_id", CLIENT_ID)
    kw.setdefault("client_secret", CLIENT_SECRET)
    kw.setdefault("admin_groups", (ADMINS,))
    kw.setdefault("admin_roles", ("LLM.Admin",))
    return issuer.settings(**kw)


@contextlib.contextmanager
def console(make_settings: Any, oidc: Any, **kw: Any) -> Iterator[str]:
    with running_server(create_app(make_settings(oidc, **kw))) as url:
        yield url


def sign_in(url: str, *, next_page: str = "/console/keys") -> tuple[httpx.Client, httpx.Response]:
    """Start at the sign-in route and follow redirects (the provider's and ours) to the last answer."""
    client = httpx.Client(base_url=url, follow_redirects=True, timeout=30)
    return client, client.get("/console/login/oidc", params={"next": next_page})


def test_admin_by_group_signs_in_with_pkce(issuer: Issuer, make_settings: Any) -> None:
    issuer.next_login = {"groups": ["g-engineering", ADMINS], "roles": []}
    with console(make_settings, console_settings(issuer)) as url:
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 200, answer.text
            assert answer.url.path == "/console/oidc/callback"
            assert answer.headers["refresh"] == "0; url=/console/keys"
            assert "signed in" in answer.text.lower()
            # the browser's session works on the console pages
            keys = client.get("/console/keys")
            assert keys.status_code == 200 and keys.url.path == "/console/keys", keys.text
            assert "Ada Lovelace" in keys.text
            assert "llmb_oidc_flow" not in client.cookies  # the sign-in's own cookie is gone
    (exchange,) = issuer.token_requests
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["redirect_uri"] == f"{url}/console/oidc/callback"
    assert exchange["client_secret"] == CLIENT_SECRET  # client_secret_post, as the document offers
    # (the issuer's token endpoint checked it against the code challenge, or the sign-in had failed)
    assert 43 <= len(exchange["code_verifier"]) <= 128


def test_authorization_request_carries_state_nonce_and_s256(issuer: Issuer, make_settings: Any) -> None:
    with console(make_settings, console_settings(issuer)) as url, httpx.Client(base_url=url) as client:
        start = client.get("/console/login/oidc")
        assert start.status_code == 303
        target = urlsplit(start.headers["location"])
        assert target.path == f"/{issuer.tenant}/oauth2/v2.0/authorize"
        query = {k: v[0] for k, v in parse_qs(target.query).items()}
        assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert len(query["state"]) >= 32 and len(query["nonce"]) >= 32 and query["state"] != query["nonce"]
        assert set(query["scope"].split()) >= {"openid", "profile", "email"}
        cookie = start.headers["set-cookie"]
        assert "llmb_oidc_flow=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert "Path=/console/oidc" in cookie
        # the verifier itself never leaves for the provider
        flow = start.cookies["llmb_oidc_flow"]
        data = orjson.loads(base64.urlsafe_b64decode(flow + "=" * (-len(flow) % 4)))
        assert data["verifier"] not in start.headers["location"]
        assert b64url(hashlib.sha256(data["verifier"].encode()).digest()) == query["code_challenge"]


def test_admin_by_role_and_public_client(issuer: Issuer, make_settings: Any) -> None:
    issuer.next_login = {"groups": [], "roles": ["LLM.Admin"]}
    issuer.public_client = True  # PKCE alone: the token endpoint refuses a request that sends a secret
    with console(make_settings, console_settings(issuer, client_secret=None)) as url:
        client, answer = sign_in(url, next_page="/console")
        with contextlib.closing(client):
            assert answer.status_code == 200, answer.text
            assert client.get("/console").url.path == "/console"
    (exchange,) = issuer.token_requests
    assert "client_secret" not in exchange and exchange["client_id"] == CLIENT_ID


def test_non_admin_gets_a_refusal_page(issuer: Issuer, make_settings: Any) -> None:
    issuer.next_login = {"groups": ["g-engineering"], "roles": ["LLM.User"]}
    with console(make_settings, console_settings(issuer)) as url:
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 403
            assert "text/html" in answer.headers["content-type"]
            assert "not an administrator" in answer.text
            assert "ada@example.org" in answer.text
            assert "llmb_console" not in client.cookies
            assert client.get("/console/keys").url.path == "/console/login"


def test_group_overage_on_sign_in_says_so(issuer: Issuer, make_settings: Any) -> None:
    issuer.next_login = {"groups": None, "roles": [], "hasgroups": True}
    with console(make_settings, console_settings(issuer)) as url:
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 403
            assert "too many" in answer.text


def test_no_admin_groups_configured_refuses_everyone(issuer: Issuer, make_settings: Any) -> None:
    issuer.next_login = {"groups": [ADMINS], "roles": ["LLM.Admin"]}
    with console(make_settings, console_settings(issuer, admin_groups=(), admin_roles=())) as url:
        client, answer = sign_in(url)
        with contextlib.closing(client):
            assert answer.status_code == 403
            assert "OIDC_ADMIN_GROUPS" in answer.text


@pytest.mark.parametrize(
    "tamper", ["state", "nonce", "verifier", "no_cookie", "provider_error", "reused_code"]
)
def test_forged_or_replayed_callbacks_are_refused(issuer: Issuer, make_settings: Any, tamper: str) -> None:
    issuer.next_login = {"groups": [ADMINS]}
    with (
        console(make_settings, console_settings(issuer)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        start = client.get("/console/login/oidc")
        back = httpx.get(start.headers["location"], timeout=30)  # the provider signs in and sends us back
        callback = urlsplit(back.headers["location"])
        query = {k: v[0] for k, v in parse_qs(callback.query).items()}
        flow = client.cookies["llmb_oidc_flow"]
        data = orjson.loads(base64.urlsafe_b64decode(flow + "=" * (-len(flow) % 4)))
        if tamper == "state":
            query["state"] = "forged-state"
        elif tamper in ("nonce", "verifier"):
            data[tamper] = "x" * 64
            client.cookies.set(
                "llmb_oidc_flow",
                base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("="),
                path="/console/oidc",
            )
        elif tamper == "no_cookie":
            client.cookies.clear()
        elif tamper == "provider_error":
            query = {"state": query["state"], "error": "access_denied", "error_description": "User cancelled"}
        elif tamper == "reused_code":
            first = client.get("/console/oidc/callback", params=query)
            assert first.status_code == 200
            client.cookies.clear()
            client.cookies.set("llmb_oidc_flow", flow, path="/console/oidc")
        answer = client.get("/console/oidc/callback", params=query)
        expected = {
            "state": 400,
            "nonce": 401,
            "verifier": 502,
            "no_cookie": 400,
            "provider_error": 401,
            "reused_code": 502,
        }[tamper]
        assert answer.status_code == expected, answer.text
        assert "text/html" in answer.headers["content-type"]
        if tamper == "nonce":
            assert "nonce" in answer.text
        if tamper == "provider_error":
            assert "access_denied" in answer.text
        if tamper != "reused_code":
            assert "llmb_console=" not in answer.headers.get("set-cookie", "")


def test_admin_key_still_opens_the_console(issuer: Issuer, make_settings: Any) -> None:
    with (
        console(make_settings, console_settings(issuer)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        page = client.get("/console/login")
        assert page.status_code == 200
        assert 'href="/console/login/oidc?next=/console"' in page.text or "/console/login/oidc" in page.text
        token = client.cookies["llmb_console_login"]
        signed = client.post(
            "/console/login",
            data={"csrf_token": token, "next": "/console/keys", "admin_key": ADMIN_KEY},
            headers={"Origin": url},
        )
        assert signed.status_code == 303, signed.text
        assert client.get("/console/keys").status_code == 200


def test_console_sign_in_without_client_id_is_unavailable(issuer: Issuer, make_settings: Any) -> None:
    with console(make_settings, issuer.settings()) as url, httpx.Client(base_url=url) as client:
        answer = client.get("/console/login/oidc")
        assert answer.status_code == 404
        assert "OIDC_CLIENT_ID" in answer.text
        assert "/console/login/oidc" not in client.get("/console/login").text
