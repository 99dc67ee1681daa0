"""Console security over plain HTTP: sign-in, refusals, CSRF, cookie flags, sign-out, no secret on any page."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llm_backend.config import BackendConfig, ConfigError, ModelConfig, Settings
from llm_backend.db.migrate import upgrade
from tests.conftest import mock_model
from tests.console.conftest import ADMIN_KEY, csrf_of, sign_in

PAGES = ["/console", "/console/requests", "/console/conversations", "/console/keys", "/console/backends"]
UPSTREAM_SECRET = "upstream-secret-6d1e0b7a"


def _cookie_header(response: Any, name: str) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(f"{name}="):
            return value
    raise AssertionError(f"no {name} cookie set: {response.headers.get_list('set-cookie')}")


def test_no_session_redirects_to_sign_in(console_client: Callable[..., Any]) -> None:
    client = console_client()
    for path in [*PAGES, "/console/requests/req_x", "/console/keys/key_x", "/console/logout"]:
        r = client.get(path + "?range=7d", follow_redirects=False)
        assert r.status_code == 303, (path, r.status_code)
        assert r.headers["location"].startswith("/console/login?next=%2Fconsole"), r.headers["location"]
    # a form posted without a session changes nothing
    r = client.post("/console/keys", data={"name": "x", "csrf_token": "y"}, follow_redirects=False)
    assert r.status_code == 403
    # the login page and the static assets need no session
    assert client.get("/console/login").status_code == 200
    css = client.get("/console/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/console/static/../app.py").status_code == 404
    assert client.get("/console/static/nothing.css").status_code == 404


def test_a_client_key_never_opens_the_console(console_client: Callable[..., Any]) -> None:
    client = console_client()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = client.post("/admin/keys", json={"name": "client"}, headers=admin)
    assert created.status_code == 201, created.text
    client_key = created.json()["key"]
    # as the sign-in key: refused, no session cookie
    r = sign_in(client, client_key)
    assert r.status_code == 401
    assert "Client API keys cannot open the console" in r.text
    assert not any(c.startswith("llmb_console=") for c in r.headers.get_list("set-cookie"))
    assert client.get("/console/keys", follow_redirects=False).status_code == 303
    # as a header: the console reads only its session cookie (the admin key as a header opens nothing either)
    for key in (client_key, ADMIN_KEY):
        for headers in ({"Authorization": f"Bearer {key}"}, {"api-key": key}):
            r = client.get("/console/keys", headers=headers, follow_redirects=False)
            assert r.status_code == 303, r.text
    # a forged session cookie opens nothing
    client.cookies.set("llmb_console", client_key, path="/console")
    assert client.get("/console/keys", follow_redirects=False).status_code == 303


def test_wrong_admin_key_and_login_csrf(console_client: Callable[..., Any]) -> None:
    client = console_client()
    assert sign_in(client, ADMIN_KEY + "x").status_code == 401
    # the sign-in form's own CSRF token (double submit) must match its cookie
    client.get("/console/login")
    r = client.post(
        "/console/login", data={"csrf_token": "forged", "admin_key": ADMIN_KEY}, follow_redirects=False
    )
    assert r.status_code == 403 and "llmb_console=" not in ";".join(r.headers.get_list("set-cookie"))
    # no open redirect after signing in
    page = client.get("/console/login?next=//evil.example/x")
    r = client.post(
        "/console/login",
        data={"csrf_token": csrf_of(page.text), "admin_key": ADMIN_KEY, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/console"


def test_cookie_flags_over_http_and_tls(console_client: Callable[..., Any]) -> None:
    plain = console_client()
    r = sign_in(plain)
    assert r.status_code == 303 and r.headers["location"] == "/console/keys"
    cookie = _cookie_header(r, "llmb_console")
    flags = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/console" in flags
    assert "secure" not in flags
    assert any(f.startswith("max-age=") and 0 < int(f.split("=")[1]) <= 12 * 3600 for f in flags)

    tls = console_client(base_url="https://testserver", console_session_ttl_s=600)
    r = sign_in(tls)
    flags = [p.strip().lower() for p in _cookie_header(r, "llmb_console").split(";")]
    assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags
    assert any(f.startswith("max-age=") and 0 < int(f.split("=")[1]) <= 600 for f in flags)
    page = tls.get("/console/keys")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"


def test_csrf_is_required_on_every_form(console_client: Callable[..., Any]) -> None:
    client = console_client()
    sign_in(client)
    token = csrf_of(client.get("/console/keys").text)
    created = client.post("/console/keys", data={"name": "kept", "csrf_token": token})
    assert created.status_code == 201
    key_id = re.search(r"<dt>Id</dt><dd>([^<]+)</dd>", created.text).group(1)  # type: ignore[union-attr]
    forms = [
        ("/console/keys", {"name": "sneaky"}),
        (f"/console/keys/{key_id}", {"name": "renamed"}),
        (f"/console/keys/{key_id}/disable", {}),
        (f"/console/keys/{key_id}/delete", {}),
        ("/console/logout", {}),
    ]
    for path, data in forms:
        for csrf in (None, "", "0" * 64, token[:-1] + ("0" if token[-1] != "0" else "1")):
            body = dict(data) if csrf is None else {**data, "csrf_token": csrf}
            r = client.post(path, data=body, follow_redirects=False)
            assert r.status_code == 403, (path, csrf, r.status_code)
        # the right token from another origin: refused too
        r = client.post(
            path,
            data={**data, "csrf_token": token},
            headers={"Origin": "https://evil.example"},
            follow_redirects=False,
        )
        assert r.status_code == 403, (path, "cross-origin")
    keys = client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    assert [(k["name"], k["enabled"]) for k in keys] == [("kept", True)]
    # still signed in: the refused sign-out did not sign out
    assert client.get("/console/keys", follow_redirects=False).status_code == 200


def test_sign_out_ends_the_session_for_a_copied_cookie(console_client: Callable[..., Any]) -> None:
    client = console_client()
    r = sign_in(client)
    stolen = r.cookies["llmb_console"]
    page = client.get("/console/logout")
    assert page.status_code == 200
    out = client.post("/console/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"].startswith("/console/login")
    assert 'llmb_console=""' in _cookie_header(out, "llmb_console")
    client.cookies.clear()
    client.cookies.set("llmb_console", stolen, path="/console")
    assert client.get("/console", follow_redirects=False).status_code == 303


def test_no_page_renders_a_secret(console_client: Callable[..., Any]) -> None:
    backend = BackendConfig(
        provider="openai", name="oai", base_url="http://127.0.0.1:9/v1", api_key=UPSTREAM_SECRET
    )
    client = console_client([mock_model(), ModelConfig(name="remote", backends=(backend,))], recording=True)
    sign_in(client)
    token = csrf_of(client.get("/console/keys").text)
    created = client.post(
        "/console/keys", data={"name": "secretive", "csrf_token": token, "models": "mock", "rpm": "5"}
    )
    assert created.status_code == 201
    secret = re.search(r'<code id="secret">([^<]+)</code>', created.text).group(1)  # type: ignore[union-attr]
    assert secret.startswith("sk-llmb-") and created.headers["cache-control"] == "no-store"
    # use the key, so the request log, conversations and backends pages have something to show
    chat = client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={"model": "mock", "messages": [{"role": "user", "content": "hello"}], "user": "ada"},
    )
    assert chat.status_code == 200, chat.text
    key_id = client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"][0][
        "id"
    ]
    forbidden = {
        "upstream key": UPSTREAM_SECRET,
        "admin key": ADMIN_KEY,
        "client key": secret,
        "client key hash": hashlib.sha256(secret.encode()).hexdigest(),
        "session token": client.cookies.get("llmb_console") or "no-cookie",
    }
    pages = [*PAGES, f"/console/keys/{key_id}", "/console/logout", "/console/requests?range=30d"]
    rid = chat.headers["x-request-id"]
    pages.append(f"/console/requests/{rid}")
    for path in pages:
        r = client.get(path)
        assert r.status_code in (200, 404), (path, r.status_code)
        for what, value in forbidden.items():
            assert value not in r.text, f"{path} shows the {what}"


def test_open_console_on_loopback_only_without_an_admin_key(serve: Callable[..., str], tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/open.db"
    upgrade(url)
    base = serve(auth="none", database_url=url)
    with httpx.Client(base_url=base, timeout=30) as http:
        r = http.get("/console/keys", follow_redirects=False)
        assert r.status_code == 200, r.text
        assert "Open console" in r.text
        assert "samesite=strict" in _cookie_header(r, "llmb_console").lower()
        # the session it opened carries a CSRF token and works for forms
        token = csrf_of(r.text)
        created = http.post("/console/keys", data={"name": "local", "csrf_token": token})
        assert created.status_code == 201
        assert http.post("/console/keys", data={"name": "nope"}).status_code == 403
    # through a proxy, or under a name that is not loopback (DNS rebinding): not open
    for headers in (
        {"X-Forwarded-For": "203.0.113.9"},
        {"Host": "evil.example"},
        {"Forwarded": "for=1.2.3.4"},
    ):
        with httpx.Client(base_url=base, timeout=30) as http:
            r = http.get("/console/keys", headers=headers, follow_redirects=False)
            assert r.status_code == 303, (headers, r.status_code)
            login = http.get("/console/login", headers=headers)
            assert "The console is disabled" in login.text


def test_auth_off_with_an_admin_key_still_needs_sign_in(serve: Callable[..., str], tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/adm.db"
    upgrade(url)
    base = serve(auth="none", admin_key=ADMIN_KEY, database_url=url)
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/console", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("", 12 * 3600.0), ("30m", 1800.0), ("8h", 28800.0), ("7d", 604800.0), ("900", 900.0)],
)
def test_console_session_ttl_setting(raw: str, seconds: float) -> None:
    assert (
        Settings.from_env(
            {"CONSOLE_SESSION_TTL": raw, "LLM_BACKEND_CONFIG": "config/demo.yaml"}
        ).console_session_ttl_s
        == seconds
    )


@pytest.mark.parametrize("raw", ["0", "10", "31d", "forever", "-5"])
def test_console_session_ttl_refuses_nonsense(raw: str) -> None:
    with pytest.raises(ConfigError, match="CONSOLE_SESSION_TTL"):
        Settings.from_env({"CONSOLE_SESSION_TTL": raw, "LLM_BACKEND_CONFIG": "config/demo.yaml"})
