"""Access tokens of a real (test) issuer on the API: each kind of bad token refused as it should be, good
ones served and recorded as their user."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import pytest

from llm_backend.app import create_app, load_spec
from llm_backend.config import Settings
from llm_backend.db.session import make_engine
from llm_backend.services.org import OrgStore
from tests.oidc.conftest import ADMIN_KEY, CHAT, FakeClock, bearer
from tests.oidc.support import (
    APP_ID,
    AUDIENCE,
    OTHER_TENANT,
    TENANT,
    Issuer,
    assert_openai_error,
    request_log,
)

ADA = "0a0a0a0a-0000-4000-8000-00000000ada0"


def serve_and_log(settings: Settings, calls: list[tuple[str, dict[str, str]]]) -> tuple[list[Any], list[Any]]:
    """Send each (token kind, headers) to a fresh app; the answers, and the request log once it drained."""
    answers = []
    with create_app(settings).test_client() as client:
        for path, headers in calls:
            answers.append(client.post(path, json=CHAT, headers=headers))
    return answers, request_log(settings.database_url)


def test_valid_tokens_are_served_and_recorded_as_their_user(issuer: Issuer, make_settings: Any) -> None:
    settings = make_settings(issuer.settings())
    tokens = {
        "rsa": issuer.token(),
        "ec": issuer.token(kid="ec1"),
        "v1": issuer.v1_token(oid="0b0b0b0b-0000-4000-8000-0000000000b1", aud=APP_ID),
        "v1-app-uri": issuer.v1_token(oid="0b0b0b0b-0000-4000-8000-0000000000b2", aud=AUDIENCE),
        "sub-only": issuer.token(oid=None, sub="pairwise-sub-of-carol"),
    }
    answers, rows = serve_and_log(settings, [("/v1/chat/completions", bearer(t)) for t in tokens.values()])
    for kind, answer in zip(tokens, answers, strict=True):
        assert answer.status_code == 200, (kind, answer.text)
        assert answer.json()["choices"][0]["message"]["content"]
    users = sorted(r["user"] for r in rows)
    # the subject is `oid` when the token has one, else `sub`; the body's "user" does not override it
    assert users == sorted(
        [
            ADA,
            ADA,
            "0b0b0b0b-0000-4000-8000-0000000000b1",
            "0b0b0b0b-0000-4000-8000-0000000000b2",
            "pairwise-sub-of-carol",
        ]
    )
    assert all(r["key_id"] is None and r["status_code"] == 200 for r in rows)


@pytest.mark.parametrize(
    ("kind", "status", "code", "words"),
    [
        ("expired", 401, "invalid_api_key", ["expired"]),
        ("expired_beyond_leeway", 401, "invalid_api_key", ["expired"]),
        ("not_yet_valid", 401, "invalid_api_key", ["not valid yet", "nbf"]),
        ("issued_in_future", 401, "invalid_api_key", ["not valid yet", "iat"]),
        ("wrong_audience", 401, "invalid_api_key", ["audience", "api://other-app"]),
        ("graph_token", 401, "invalid_api_key", ["audience"]),
        ("wrong_issuer", 401, "invalid_api_key", ["issuer", "does not trust"]),
        ("no_issuer", 401, "invalid_api_key", ["no issuer"]),
        ("unknown_kid", 401, "invalid_api_key", ["does not publish"]),
        ("alg_none", 401, "invalid_api_key", ["algorithm", "none"]),
        ("hs256_public_key", 401, "invalid_api_key", ["algorithm", "HS256"]),
        ("alg_kty_mismatch", 401, "invalid_api_key", ["does not fit"]),
        ("bad_signature", 401, "invalid_api_key", ["signature"]),
        ("foreign_key", 401, "invalid_api_key", ["signature"]),
        ("graph_signature", 401, "invalid_api_key", ["Microsoft Graph"]),
        ("long_issuer", 401, "invalid_api_key", ["issuer", "..."]),
        ("no_exp", 401, "invalid_api_key", ["exp"]),
        ("no_subject", 401, "invalid_api_key", ["subject"]),
        ("other_tenant", 403, "tenant_not_allowed", ["tenant", OTHER_TENANT]),
        ("tid_mismatch", 401, "invalid_api_key", ["tenant"]),
        ("garbage", 401, "invalid_api_key", ["well-formed"]),
    ],
)
def test_bad_tokens_are_refused_and_not_recorded(
    issuer: Issuer,
    make_settings: Any,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    status: int,
    code: str,
    words: list[str],
) -> None:
    now = int(time.time())
    rsa_parts = issuer.token().split(".")
    tokens = {
        "expired": lambda: issuer.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200),
        "expired_beyond_leeway": lambda: issuer.token(exp=now - 90),
        "not_yet_valid": lambda: issuer.token(nbf=now + 3600),
        "issued_in_future": lambda: issuer.token(iat=now + 3600, nbf=None),
        "wrong_audience": lambda: issuer.token(aud="api://other-app"),
        "graph_token": lambda: issuer.token(aud="00000003-0000-0000-c000-000000000000"),
        "wrong_issuer": lambda: issuer.token(iss="https://evil.example/tenant/v2.0"),
        "no_issuer": lambda: issuer.token(iss=None),
        "unknown_kid": lambda: issuer.token(kid="rsa-never-published"),
        "alg_none": issuer.unsigned_token,
        "hs256_public_key": issuer.hs256_with_public_key,
        # an RSA key's id under an EC algorithm
        "alg_kty_mismatch": lambda: ".".join([_header({"alg": "ES256", "kid": "rsa1"}), *rsa_parts[1:]]),
        "bad_signature": lambda: ".".join([*rsa_parts[:2], rsa_parts[2][::-1]]),
        "foreign_key": lambda: _resign(issuer, "rsa-foreign", as_kid="rsa1"),
        # Graph's tokens carry a nonce in their header and verify with nobody's key but Graph's
        "graph_signature": lambda: _resign(
            issuer, "rsa-foreign", as_kid="rsa1", aud="00000003-0000-0000-c000-000000000000"
        ),
        "long_issuer": lambda: issuer.token(iss="https://evil.example/" + "x\u2026\n" * 200),
        "no_exp": lambda: issuer.token(exp=None),
        "no_subject": lambda: issuer.token(oid=None, sub=None),
        "other_tenant": lambda: issuer.token(
            iss=issuer.issuer.replace(TENANT, OTHER_TENANT),
            tid=OTHER_TENANT,
            oid="0c0c0c0c-0000-4000-8000-0000000000c1",
        ),
        "tid_mismatch": lambda: issuer.token(tid=OTHER_TENANT),
        "garbage": lambda: "eyJhbGciOiJSUzI1NiJ9.eyJub3QganNvbg.c2ln",
    }
    token = tokens[kind]()
    settings = make_settings(issuer.settings())
    caplog.set_level(logging.DEBUG)
    (answer,), rows = serve_and_log(settings, [("/v1/chat/completions", bearer(token))])
    message = assert_openai_error(answer, status, code=code, words=words)
    assert token not in message and token not in answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.headers["www-authenticate"].isascii()
    assert len(message) < 600
    # signature and payload never appear in the logs either
    assert token.split(".")[1] not in caplog.text
    assert rows == [], "a refused token is recorded as nobody's request"
    assert OrgStore(make_engine(settings.database_url)).list_users() == [], "nor becomes a user"


def _header(header: dict[str, Any]) -> str:
    import json

    from tests.oidc.support import b64url

    return b64url(json.dumps(header).encode())


def _resign(issuer: Issuer, signer: str, *, as_kid: str, **claims: Any) -> str:
    import jwt

    from tests.oidc.support import _private_key

    return jwt.encode(
        issuer.claims(**claims), _private_key(signer), algorithm="RS256", headers={"kid": as_kid}
    )


def test_leeway_accepts_a_token_just_expired(issuer: Issuer, make_settings: Any) -> None:
    now = int(time.time())
    settings = make_settings(issuer.settings(leeway_s=300))
    (answer,), rows = serve_and_log(
        settings, [("/v1/chat/completions", bearer(issuer.token(exp=now - 60, nbf=now + 60)))]
    )
    assert answer.status_code == 200, answer.text
    assert [r["user"] for r in rows] == [ADA]


def test_rotated_key_works_and_unknown_kids_refetch_at_a_bounded_rate(
    issuer: Issuer, make_settings: Any, clock: FakeClock
) -> None:
    settings = make_settings(issuer.settings(jwks_min_refresh_s=30.0))
    with create_app(settings).test_client() as client:

        def chat(token: str) -> Any:
            return client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))

        first = chat(issuer.token())
        assert first.status_code == 200, first.text
        assert issuer.jwks_fetches == 1  # loaded once (at start-up), not per request
        for _ in range(5):
            assert chat(issuer.token()).status_code == 200
        assert issuer.jwks_fetches == 1

        # the provider rotates: a new key appears, the old one goes
        issuer.published = ["rsa2", "ec1"]
        assert chat(issuer.token(kid="rsa2")).status_code == 200
        assert issuer.jwks_fetches == 2
        assert_openai_error(chat(issuer.token(kid="rsa1")), 401, words=["does not publish"])
        assert issuer.jwks_fetches == 2  # within the interval: no refetch for a now-unknown kid

        # a flood of made-up key ids costs the provider nothing more within the interval
        for i in range(25):
            assert_openai_error(chat(issuer.token(kid=f"rsa-made-up-{i}")), 401, words=["does not publish"])
        assert issuer.jwks_fetches == 2

        # after the interval one refetch, then quiet again
        clock.advance(31)
        for i in range(10):
            assert chat(issuer.token(kid=f"rsa-made-up-{i}")).status_code == 401
        assert issuer.jwks_fetches == 3
        assert chat(issuer.token(kid="rsa2")).status_code == 200
        assert issuer.jwks_fetches == 3
        metrics = client.get("/metrics").text
        assert re.search(r"^llm_backend_oidc_jwks_fetches_total 3(\.0)?$", metrics, re.M), metrics


def test_keys_are_refetched_in_the_background_after_their_ttl(
    issuer: Issuer, make_settings: Any, clock: FakeClock
) -> None:
    settings = make_settings(issuer.settings(jwks_ttl_s=600.0))
    with create_app(settings).test_client() as client:
        assert (
            client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token())).status_code == 200
        )
        assert issuer.jwks_fetches == 1
        clock.advance(601)
        # served from the cached keys while the refetch runs
        assert (
            client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token())).status_code == 200
        )
        deadline = time.monotonic() + 30
        while issuer.jwks_fetches < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert issuer.jwks_fetches == 2


def test_jwks_outage_is_a_503_and_keys_keep_working(issuer: Issuer, make_settings: Any) -> None:
    issuer.jwks_down = True
    settings = make_settings(issuer.settings())
    with create_app(settings).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token()))
        assert_openai_error(answer, 503, code="identity_provider_unavailable", words=["retry"])
        assert int(answer.headers["retry-after"]) >= 1
        # our own keys do not depend on the provider
        created = client.post("/admin/keys", json={"name": "k"}, headers=bearer(ADMIN_KEY))
        assert created.status_code == 201, created.text
        ok = client.post("/v1/chat/completions", json=CHAT, headers=bearer(created.json()["key"]))
        assert ok.status_code == 200


def test_provider_unreachable_is_a_503(make_settings: Any) -> None:
    from llm_backend.config import OidcSettings
    from tests.conftest import closed_port_url

    settings = make_settings(
        OidcSettings(issuer=closed_port_url() + f"/{TENANT}/v2.0", audience=(AUDIENCE,), http_timeout_s=5.0)
    )
    token = "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYTEifQ.eyJpc3MiOiJ4In0.c2ln"
    with create_app(settings).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
        assert_openai_error(answer, 503, code="identity_provider_unavailable")


def test_keys_still_work_and_jwts_without_oidc_are_wrong_keys(issuer: Issuer, make_settings: Any) -> None:
    with create_app(make_settings()).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token()))
        assert_openai_error(answer, 401, code="invalid_api_key", words=["incorrect api key"])
    spec = load_spec(make_settings())
    assert "oidcAuth" not in spec["components"]["securitySchemes"]
    assert all("oidcAuth" not in r for r in spec["security"])
    spec = load_spec(make_settings(issuer.settings()))
    scheme = spec["components"]["securitySchemes"]["oidcAuth"]
    assert scheme["type"] == "openIdConnect"
    assert scheme["openIdConnectUrl"] == issuer.issuer + "/.well-known/openid-configuration"
    assert {"oidcAuth": []} in spec["security"]


def test_served_spec_declares_the_scheme(issuer: Issuer, make_settings: Any) -> None:
    with create_app(make_settings(issuer.settings())).test_client() as client:
        spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["oidcAuth"]["type"] == "openIdConnect"


def test_group_overage_is_accepted_when_no_group_is_mapped(issuer: Issuer, make_settings: Any) -> None:
    token = issuer.token(
        groups=None, _claim_names={"groups": "src1"}, _claim_sources={"src1": {"endpoint": "https://graph"}}
    )
    (answer,), rows = serve_and_log(
        make_settings(issuer.settings()), [("/v1/chat/completions", bearer(token))]
    )
    assert answer.status_code == 200, answer.text
    assert [r["user"] for r in rows] == [ADA]


def test_signed_in_users_see_only_their_own_conversations(issuer: Issuer, make_settings: Any) -> None:
    ada = bearer(issuer.token())
    bob = bearer(issuer.token(oid="0d0d0d0d-0000-4000-8000-0000000000b0", sub="sub-bob"))
    with create_app(make_settings(issuer.settings())).test_client() as client:
        created = client.post("/api/conversations", json={"title": "ada's"}, headers=ada)
        assert created.status_code in (200, 201), created.text
        conv_id = created.json()["id"]
        assert [c["id"] for c in client.get("/api/conversations", headers=ada).json()["data"]] == [conv_id]
        assert client.get("/api/conversations", headers=bob).json()["data"] == []
        assert client.get(f"/api/conversations/{conv_id}", headers=bob).status_code == 404
