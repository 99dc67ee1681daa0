"""Keys end to end: issued by the admin API and the CLI, stored as hashes, accepted in both header styles,
refused when wrong/expired/disabled/deleted, model lists, IP ranges, admin-only routes, logs and the request log."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest

from llm_backend.config import Settings
from llm_backend.logs import JsonFormatter, TextFormatter
from llm_backend.services import access
from tests.e2e_access.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLI,
    KEY_FORMAT,
    MESSAGES,
    REPO,
    assert_openai_error,
    bearer,
    chat,
    create_key,
    remember_key,
    table_rows,
)

AZURE_VERSION = "2024-10-21"


def api_key(key: str) -> dict[str, str]:
    return {"api-key": key}


def run_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BACKEND_", "REDIS_"))}
    env["DATABASE_URL"] = db_url
    proc = subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc


# -- issuing and storing ----------------------------------------------------------------------------------


def test_admin_api_issues_a_key_shown_once_and_stored_only_as_hash(db_url, serve, http):
    c = http(serve(database_url=db_url))
    info = create_key(c, "team-a", owner="team-a", models=["m"], rpm=60, tpm=100000, daily_tokens=1000000)
    secret = info["key"]
    assert KEY_FORMAT.match(secret), secret
    prefix = info["prefix"]
    assert secret.startswith(prefix) and 8 < len(prefix) <= 16
    assert info["models"] == ["m"] and info["rpm"] == 60 and info["enabled"] is True

    # shown once: no later answer carries the secret (or any long part of it)
    random_part = secret[len(prefix) :]
    for r in (c.get(f"/admin/keys/{info['id']}", headers=ADMIN), c.get("/admin/keys", headers=ADMIN)):
        assert r.status_code == 200, r.text
        assert random_part[:8] not in r.text and "key_hash" not in r.text
    listed = c.get("/admin/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in listed] == [info["id"]]
    assert "key" not in listed[0] and listed[0]["prefix"] == prefix
    r = c.patch(f"/admin/keys/{info['id']}", json={"name": "team-a2", "rpm": 30}, headers=ADMIN)
    assert r.status_code == 200 and "key" not in r.json() and random_part[:8] not in r.text
    assert r.json()["name"] == "team-a2" and r.json()["rpm"] == 30

    # stored only as a hash: no column holds the secret or its random part
    [row] = table_rows(db_url, "api_keys")
    for column, value in row.items():
        assert random_part[:8] not in str(value), column
    assert row["key_prefix"] == prefix
    assert row["key_hash"] != secret and len(row["key_hash"]) >= 32

    # and it works; a second key is a different secret
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(secret)).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # last use is written in the background
        if c.get(f"/admin/keys/{info['id']}", headers=ADMIN).json()["last_used_at"]:
            break
        time.sleep(0.02)
    assert c.get(f"/admin/keys/{info['id']}", headers=ADMIN).json()["last_used_at"]
    other = create_key(c, "team-b")
    assert other["key"][len(prefix) :] != random_part


def test_cli_creates_lists_disables_enables_and_deletes_keys(db_url, serve, http, monkeypatch):
    # changes made by another process reach this worker through its key cache: make that cache immediate
    monkeypatch.setattr(access, "CACHE_TTL", 0.0)
    monkeypatch.setattr(access, "NEGATIVE_TTL", 0.0)
    c = http(serve(database_url=db_url))
    proc = run_cli(
        db_url,
        *("keys", "create", "--name", "team-a", "--models", "m", "--rpm", "60", "--tpm", "100000"),
        *("--daily-tokens", "1000000", "--expires", "30d"),
    )
    lines = proc.stdout.strip().splitlines()
    secret = lines[-1].strip()
    assert KEY_FORMAT.match(secret), proc.stdout
    assert all(secret not in line for line in lines[:-1]) and secret not in proc.stderr

    [info] = c.get("/admin/keys", headers=ADMIN).json()["data"]
    remember_key(info["id"])
    assert secret.startswith(info["prefix"])
    assert info["name"] == "team-a" and info["models"] == ["m"]
    assert (info["rpm"], info["tpm"], info["daily_tokens"]) == (60, 100000, 1000000)
    expires = datetime.fromisoformat(info["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(hours=1)
    [row] = table_rows(db_url, "api_keys")
    assert all(secret[12:20] not in str(v) for v in row.values())

    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(secret)).status_code == 200
    assert_openai_error(
        c.post("/v1/chat/completions", json=chat("other"), headers=bearer(secret)),
        404,
        code="model_not_found",
    )

    listing = run_cli(db_url, "keys", "list").stdout
    assert info["id"] in listing and info["prefix"] in listing and secret[12:20] not in listing

    run_cli(db_url, "keys", "disable", info["id"])
    assert_openai_error(
        c.post("/v1/chat/completions", json=chat(), headers=bearer(secret)), 401, code="invalid_api_key"
    )
    run_cli(db_url, "keys", "enable", info["id"])
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(secret)).status_code == 200
    run_cli(db_url, "keys", "delete", info["id"])
    assert_openai_error(
        c.post("/v1/chat/completions", json=chat(), headers=bearer(secret)), 401, code="invalid_api_key"
    )
    assert table_rows(db_url, "api_keys") == []


# -- presenting keys --------------------------------------------------------------------------------------


def test_openai_and_azure_sdks_authenticate_with_bearer_and_api_key(serve, http):
    url = serve()
    secret = create_key(http(url), models=["m"])["key"]

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)  # Authorization: Bearer
    answer = oai.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content
    assert [m.id for m in oai.models.list()] == ["m"]
    chunks = list(oai.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    azure = openai.AzureOpenAI(azure_endpoint=url, api_key=secret, api_version=AZURE_VERSION, max_retries=0)
    answer = azure.chat.completions.create(model="m", messages=MESSAGES)  # api-key: ...
    assert answer.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as err:
        azure.chat.completions.create(model="other", messages=MESSAGES)
    assert err.value.code == "model_not_found"

    wrong = "sk-llmb-" + "A" * 43
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=f"{url}/v1", api_key=wrong, max_retries=0).chat.completions.create(
            model="m", messages=MESSAGES
        )
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.AzureOpenAI(
            azure_endpoint=url, api_key=wrong, api_version=AZURE_VERSION, max_retries=0
        ).chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.code == "invalid_api_key"


ROUTES = [
    ("POST", "/v1/chat/completions", chat()),
    ("GET", "/v1/models", None),
    ("POST", f"/openai/deployments/m/chat/completions?api-version={AZURE_VERSION}", {"messages": MESSAGES}),
]


def _call(c: Any, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return c.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("style", ["bearer", "api-key"])
def test_wrong_absent_expired_disabled_and_deleted_keys_get_401(serve, http, style):
    c = http(serve())
    present = bearer if style == "bearer" else api_key
    keys = {name: create_key(c, name) for name in ("expired", "disabled", "patched-off", "deleted")}
    for info in keys.values():  # each works before the change (and sits in the worker's key cache)
        for method, path, body in ROUTES:
            assert _call(c, method, path, body, present(info["key"])).status_code == 200, (info["name"], path)

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert (
        c.patch(f"/admin/keys/{keys['expired']['id']}", json={"expires_at": past}, headers=ADMIN).status_code
        == 200
    )
    assert c.post(f"/admin/keys/{keys['disabled']['id']}/disable", headers=ADMIN).status_code == 200
    assert (
        c.patch(
            f"/admin/keys/{keys['patched-off']['id']}", json={"enabled": False}, headers=ADMIN
        ).status_code
        == 200
    )
    assert c.delete(f"/admin/keys/{keys['deleted']['id']}", headers=ADMIN).status_code == 200

    presented: dict[str, dict[str, str]] = {name: present(info["key"]) for name, info in keys.items()}
    presented["wrong"] = present("sk-llmb-" + "x" * 43)
    presented["not ours"] = present("sk-proj-abcdef")
    presented["absent"] = {}
    presented["no token"] = {"Authorization": "Bearer"} if style == "bearer" else {"api-key": ""}
    presented["other scheme"] = {"Authorization": "Basic dXNlcjpwYXNz"}
    for name, headers in presented.items():
        for method, path, body in ROUTES:
            r = _call(c, method, path, body, headers)
            error = assert_openai_error(r, 401, code="invalid_api_key")
            secret = keys[name]["key"] if name in keys else None
            assert secret is None or secret not in r.text, (name, error)

    # a disabled key comes back when enabled again; an expired one when its expiry is lifted
    assert (
        c.patch(f"/admin/keys/{keys['patched-off']['id']}", json={"enabled": True}, headers=ADMIN).status_code
        == 200
    )
    assert (
        c.patch(f"/admin/keys/{keys['expired']['id']}", json={"expires_at": None}, headers=ADMIN).status_code
        == 200
    )
    for name in ("patched-off", "expired"):
        assert (
            c.post("/v1/chat/completions", json=chat(), headers=present(keys[name]["key"])).status_code == 200
        )


def test_key_expiring_by_its_lifetime(serve, http):
    c = http(serve())
    info = create_key(c, expires_in="30d")
    assert datetime.fromisoformat(info["expires_at"]) > datetime.now(UTC) + timedelta(days=29)
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(info["key"])).status_code == 200


# -- models -----------------------------------------------------------------------------------------------


def test_models_outside_the_key_are_hidden_404(serve, http):
    c = http(serve())
    only_m = create_key(c, "only-m", models=["m"])["key"]
    every = create_key(c, "all")["key"]

    assert [m["id"] for m in c.get("/v1/models", headers=bearer(only_m)).json()["data"]] == ["m"]
    assert sorted(m["id"] for m in c.get("/v1/models", headers=bearer(every)).json()["data"]) == [
        "m",
        "other",
    ]
    assert [m["id"] for m in c.get("/openai/models", headers=api_key(only_m)).json()["data"]] == ["m"]
    assert c.get("/v1/models/m", headers=bearer(only_m)).status_code == 200
    assert_openai_error(c.get("/v1/models/other", headers=bearer(only_m)), 404, code="model_not_found")
    assert c.get("/v1/models/other", headers=bearer(every)).status_code == 200

    forbidden = c.post("/v1/chat/completions", json=chat("other"), headers=bearer(only_m))
    missing = c.post("/v1/chat/completions", json=chat("does-not-exist"), headers=bearer(only_m))
    e1 = assert_openai_error(forbidden, 404, code="model_not_found")
    e2 = assert_openai_error(missing, 404, code="model_not_found")
    # hidden: a model the key may not use looks exactly like one that does not exist
    assert e1["message"].replace("other", "X") == e2["message"].replace("does-not-exist", "X")
    assert_openai_error(
        c.post(
            f"/openai/deployments/other/chat/completions?api-version={AZURE_VERSION}",
            json={"messages": MESSAGES},
            headers=api_key(only_m),
        ),
        404,
        code="model_not_found",
    )
    assert_openai_error(
        c.post("/v1/completions", json={"model": "other", "prompt": "hi"}, headers=bearer(only_m)),
        404,
        code="model_not_found",
    )
    assert_openai_error(
        c.post("/v1/embeddings", json={"model": "other", "input": "hi"}, headers=bearer(only_m)),
        404,
        code="model_not_found",
    )
    assert c.post("/v1/chat/completions", json=chat("other"), headers=bearer(every)).status_code == 200


# -- client addresses -------------------------------------------------------------------------------------


def test_ip_ranges(serve, http):
    direct = serve()
    c = http(direct)
    ten = create_key(c, "ten", allowed_ips=["10.0.0.0/8"])
    loop = create_key(c, "loop", allowed_ips=["127.0.0.0/8", "::1/128"])
    assert ten["allowed_ips"] == ["10.0.0.0/8"]

    error = assert_openai_error(
        c.post("/v1/chat/completions", json=chat(), headers=bearer(ten["key"])), 403, type_="permission_error"
    )
    assert error["code"] == "ip_not_allowed" and ten["key"] not in error["message"]
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(loop["key"])).status_code == 200
    # X-Forwarded-For counts only from a trusted proxy: a client cannot claim an allowed address
    spoofed = {**bearer(ten["key"]), "X-Forwarded-For": "10.1.2.3"}
    assert_openai_error(
        c.post("/v1/chat/completions", json=chat(), headers=spoofed), 403, code="ip_not_allowed"
    )

    proxied = http(serve(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),)))
    assert proxied.post("/v1/chat/completions", json=chat(), headers=spoofed).status_code == 200
    for forwarded in ("192.168.0.1", "10.1.2.3, 192.168.0.1"):  # the nearest untrusted hop decides
        headers = {**bearer(ten["key"]), "X-Forwarded-For": forwarded}
        assert_openai_error(
            proxied.post("/v1/chat/completions", json=chat(), headers=headers), 403, code="ip_not_allowed"
        )
    # a key with a range list keeps working after its ranges are lifted
    assert c.patch(f"/admin/keys/{ten['id']}", json={"allowed_ips": None}, headers=ADMIN).status_code == 200
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(ten["key"])).status_code == 200


# -- admin routes -----------------------------------------------------------------------------------------


def admin_calls(key_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"name": "made-by-someone"}),
        ("GET", f"/admin/keys/{key_id}", None),
        ("PATCH", f"/admin/keys/{key_id}", {"rpm": 1}),
        ("POST", f"/admin/keys/{key_id}/disable", None),
        ("GET", "/admin/usage", None),
        ("GET", "/admin/backends", None),
        ("DELETE", f"/admin/keys/{key_id}", None),
    ]


def test_admin_routes_need_the_admin_key(serve, http):
    c = http(serve())
    user = create_key(c, "user")
    for method, path, body in admin_calls(user["id"]):
        assert_openai_error(c.request(method, path, json=body), 401, code="invalid_api_key")
        assert_openai_error(
            c.request(method, path, json=body, headers={"Authorization": "Bearer adm-secreT"}), 401
        )
        r = c.request(method, path, json=body, headers=bearer(user["key"]))
        assert r.status_code in (401, 403), (path, r.text)
        assert_openai_error(r, r.status_code)
    # nothing changed by the refused calls
    [still] = c.get("/admin/keys", headers=ADMIN).json()["data"]
    assert still["id"] == user["id"] and still["enabled"] and still["rpm"] is None
    # the admin key, in either header style
    for headers in (ADMIN, {"api-key": ADMIN_KEY}):
        victim = create_key(c, "victim")
        for method, path, body in admin_calls(victim["id"]):
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code in (200, 201), (path, r.text)
            if path == "/admin/keys" and method == "POST":
                remember_key(r.json()["id"])


def test_admin_disabled_without_admin_key(serve, http, monkeypatch):
    with_admin = http(serve())
    user = create_key(with_admin, "user")
    c = http(serve(admin_key=None))  # same database, no LLM_BACKEND_ADMIN_KEY
    for method, path, body in admin_calls(user["id"]):
        assert_openai_error(
            c.request(method, path, json=body, headers=bearer(user["key"])), 403, code="admin_disabled"
        )
        assert_openai_error(c.request(method, path, json=body), 401, code="invalid_api_key")
        # the admin key of another deployment is just a wrong key here
        assert_openai_error(c.request(method, path, json=body, headers=ADMIN), 401, code="invalid_api_key")
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(user["key"])).status_code == 200

    env = {"LLM_BACKEND_CONFIG": str(REPO / "config" / "demo.yaml")}
    assert Settings.from_env(env).admin_key is None  # no default admin key
    assert Settings.from_env({**env, "LLM_BACKEND_ADMIN_KEY": ""}).admin_key is None
    assert ADMIN_KEY not in repr(Settings.from_env({**env, "LLM_BACKEND_ADMIN_KEY": ADMIN_KEY}))


# -- logs and the request log -----------------------------------------------------------------------------


def _rendered(records: list[logging.LogRecord]) -> str:
    text, js = TextFormatter(), JsonFormatter()
    out = []
    for record in records:
        out.append(text.format(record))
        out.append(js.format(record))
        out.append(repr(record.__dict__))
    return "\n".join(out)


def test_logs_name_keys_only_by_prefix_and_name(serve, http, caplog):
    caplog.set_level(logging.DEBUG)
    url = serve(log_level="DEBUG")
    c = http(url)
    info = create_key(c, "team-logs", models=["m"], rpm=2)
    secret = info["key"]
    near_miss = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    c.post("/v1/chat/completions", json=chat(), headers=bearer(secret))
    c.post("/v1/chat/completions", json=chat(stream=True), headers={"api-key": secret})
    c.post("/v1/chat/completions", json=chat(), headers=bearer(secret))  # 429
    c.post("/v1/chat/completions", json=chat("other"), headers=bearer(secret))  # 404
    c.post("/v1/chat/completions", json=chat(), headers=bearer(near_miss))  # 401
    c.get("/v1/models", headers=bearer(secret))
    c.patch(f"/admin/keys/{info['id']}", json={"allowed_ips": ["10.0.0.0/8"]}, headers=ADMIN)
    c.post("/v1/chat/completions", json=chat(), headers=bearer(secret))  # 403
    c.post(f"/admin/keys/{info['id']}/disable", headers=ADMIN)
    c.post("/v1/chat/completions", json=chat(), headers=bearer(secret))  # 401 disabled
    serve.stop(url)

    logs = _rendered(caplog.records)
    assert secret not in logs
    assert secret[12:] not in logs and near_miss[12:] not in logs
    assert ADMIN_KEY not in logs
    access_lines = [r for r in caplog.records if r.name == "llm_backend.access" and r.__dict__.get("key_id")]
    assert access_lines, "no access log line carries the key id"
    assert all(r.__dict__["key_id"] == info["id"] for r in access_lines)
    assert any(
        info["prefix"] in str(r.__dict__.get("key")) and "team-logs" in str(r.__dict__.get("key"))
        for r in access_lines
    )


def test_request_log_records_key_id(serve, http, sqlite_url):
    url = serve(recording=True)
    c = http(url)
    info = create_key(c, "recorded", models=["m"], rpm=2)
    other = create_key(c, "other-team")
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(info["key"])).status_code == 200
    assert (
        c.post("/v1/chat/completions", json=chat(stream=True), headers=bearer(info["key"])).status_code == 200
    )
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(info["key"])).status_code == 429
    assert c.post("/v1/chat/completions", json=chat("other"), headers=bearer(info["key"])).status_code == 404
    assert c.post("/v1/chat/completions", json=chat(), headers=bearer(other["key"])).status_code == 200
    assert (
        c.post("/v1/chat/completions", json=chat(), headers=bearer("sk-llmb-" + "z" * 43)).status_code == 401
    )
    serve.stop(url)  # drains the recorder

    rows = table_rows(sqlite_url, "request_log")
    mine = sorted(r["status_code"] for r in rows if r["key_id"] == info["id"])
    assert mine == [200, 200, 404, 429]
    assert [r["status_code"] for r in rows if r["key_id"] == other["id"]] == [200]
    # refused before authentication: counted in /metrics (llm_backend_rejected_total), not a row each
    assert [r for r in rows if r["status_code"] == 401] == []
    assert all("sk-llmb-" not in json.dumps(r, default=str) for r in rows)

    # the admin usage report groups by key id
    c = http(serve())
    report = c.get("/admin/usage", params={"group_by": "key"}, headers=ADMIN).json()["data"]
    by_key = {row["key_id"]: row for row in report}
    assert by_key[info["id"]]["requests"] == 4 and by_key[other["id"]]["requests"] == 1
