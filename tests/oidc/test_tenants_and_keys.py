"""Entra ID's multi-tenant issuer template, the key cache's single flight and back-off, the settings."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm_backend.app import create_app
from llm_backend.config import ConfigError, OidcSettings, Settings
from llm_backend.services import oidc as oidc_module
from llm_backend.services.oidc import IssuerPolicy, KeySet, ProviderUnavailable, looks_like_jwt
from tests.oidc.conftest import CHAT, FakeClock, bearer
from tests.oidc.support import OTHER_TENANT, TENANT, Issuer, assert_openai_error, public_jwk, request_log

THIRD_TENANT = "33333333-3333-4333-8333-333333333333"


def test_multi_tenant_template_accepts_only_allowed_tenants(httpserver: Any, make_settings: Any) -> None:
    issuer = Issuer(httpserver, multi_tenant=True)
    settings = make_settings(issuer.settings(allowed_tenants=(TENANT, THIRD_TENANT)))
    other = issuer.issuer.replace(TENANT, OTHER_TENANT)
    third = issuer.issuer.replace(TENANT, THIRD_TENANT)
    with create_app(settings).test_client() as client:

        def chat(token: str) -> Any:
            return client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))

        assert chat(issuer.token()).status_code == 200
        assert chat(issuer.v1_token()).status_code == 200  # the tenant's v1.0 issuer
        assert (
            chat(
                issuer.token(iss=third, tid=THIRD_TENANT, oid="0e0e0e0e-0000-4000-8000-000000000003")
            ).status_code
            == 200
        )
        assert_openai_error(
            chat(issuer.token(iss=other, tid=OTHER_TENANT)),
            403,
            code="tenant_not_allowed",
            words=[OTHER_TENANT],
        )
        # a token whose issuer says one tenant and whose tid another
        assert_openai_error(chat(issuer.token(iss=third, tid=TENANT)), 401, words=["tenant"])
    users = {r["user"] for r in request_log(settings.database_url)}
    assert users == {"0a0a0a0a-0000-4000-8000-00000000ada0", "0e0e0e0e-0000-4000-8000-000000000003"}


def test_multi_tenant_template_without_allowed_tenants_refuses_all(
    httpserver: Any, make_settings: Any
) -> None:
    issuer = Issuer(httpserver, multi_tenant=True)
    with create_app(make_settings(issuer.settings())).test_client() as client:
        answer = client.post("/v1/chat/completions", json=CHAT, headers=bearer(issuer.token()))
    assert_openai_error(answer, 403, code="tenant_not_allowed")


def test_any_tenant_when_allowed_explicitly(httpserver: Any, make_settings: Any) -> None:
    issuer = Issuer(httpserver, multi_tenant=True)
    other = issuer.issuer.replace(TENANT, OTHER_TENANT)
    with create_app(make_settings(issuer.settings(allowed_tenants=("*",)))).test_client() as client:
        answer = client.post(
            "/v1/chat/completions", json=CHAT, headers=bearer(issuer.token(iss=other, tid=OTHER_TENANT))
        )
    assert answer.status_code == 200, answer.text


def test_issuer_policy_shapes() -> None:
    v2 = IssuerPolicy.of(f"https://login.microsoftonline.com/{TENANT}/v2.0", ())
    assert v2.classify(f"https://login.microsoftonline.com/{TENANT}/v2.0") == (True, TENANT)
    assert v2.classify(f"https://sts.windows.net/{TENANT}/") == (True, TENANT)
    assert v2.classify(f"https://sts.windows.net/{OTHER_TENANT}/") == (False, OTHER_TENANT)
    assert v2.classify("https://accounts.example.com") is None
    assert v2.classify(None) is None
    v1 = IssuerPolicy.of(f"https://sts.windows.net/{TENANT}/", ())
    assert v1.classify(f"https://login.microsoftonline.com/{TENANT}/v2.0") == (True, TENANT)
    common = IssuerPolicy.of("https://login.microsoftonline.com/{tenantid}/v2.0", (TENANT,))
    assert common.classify(f"https://sts.windows.net/{TENANT}/") == (True, TENANT)
    assert common.classify(f"https://sts.windows.net/{OTHER_TENANT}/") == (False, OTHER_TENANT)
    assert common.classify("https://login.microsoftonline.com/{tenantid}/v2.0") is None
    plain = IssuerPolicy.of("https://keycloak.example/realms/acme", ())
    assert plain.classify("https://keycloak.example/realms/acme") == (True, None)
    assert plain.classify("https://keycloak.example/realms/acme/") == (True, None)
    assert plain.classify("https://keycloak.example/realms/other") is None


def test_looks_like_jwt() -> None:
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")  # alg none has no signature: still ours
    assert not looks_like_jwt("sk-llmb-abc.def.ghi")
    assert not looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0")
    assert not looks_like_jwt("eyJ.a b.c")


async def test_key_set_single_flight_and_bounded_refresh(clock: FakeClock) -> None:
    fetches = 0
    published = ["rsa1"]
    gate = asyncio.Event()

    async def load() -> dict[str, Any]:
        nonlocal fetches
        fetches += 1
        await gate.wait()
        return {"keys": [public_jwk(k) for k in published]}

    keys = KeySet(load, ttl_s=3600, min_refresh_s=30)
    first = [asyncio.ensure_future(keys.candidates("rsa1")) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert [len(found) for found in await asyncio.gather(*first)] == [1] * 50
    assert fetches == 1  # fifty requests, one fetch
    published.append("rsa2")
    burst = await asyncio.gather(
        *(keys.candidates(f"unknown-{i}") for i in range(50)), keys.candidates("rsa2")
    )
    assert fetches == 2 and burst[-1] and not any(burst[:-1])
    assert await keys.candidates("unknown-again") == [] and fetches == 2
    clock.advance(29)
    assert await keys.candidates("unknown-again") == [] and fetches == 2
    clock.advance(2)
    assert await keys.candidates("unknown-again") == [] and fetches == 3


async def test_key_set_outage_backs_off(clock: FakeClock) -> None:
    fetches = 0

    async def load() -> dict[str, Any]:
        nonlocal fetches
        fetches += 1
        raise oidc_module.FetchFailed("GET keys answered 503")

    keys = KeySet(load, ttl_s=3600, min_refresh_s=30)
    for _ in range(20):
        with pytest.raises(ProviderUnavailable):
            await keys.candidates("rsa1")
    assert fetches == 1  # within the back-off nobody asks the provider again
    clock.advance(oidc_module.RETRY_AFTER_FAILURE_S + 0.1)
    with pytest.raises(ProviderUnavailable):
        await keys.candidates("rsa1")
    assert fetches == 2


def test_settings_from_environment() -> None:
    base = {"LLM_BACKEND_CONFIG": "config/demo.yaml"}
    off = Settings.from_env(base).oidc
    assert not off.enabled and not off.console_enabled
    on = Settings.from_env(
        {
            **base,
            "OIDC_ISSUER": f"https://login.microsoftonline.com/{TENANT}/v2.0/",
            "OIDC_AUDIENCE": "api://llm-backend, 6a3c8e1f-0d2b-4c5a-9e7f-1b2c3d4e5f60",
            "OIDC_LEEWAY_S": "30",
            "OIDC_ALGORITHMS": "rs256,ES256",
            "OIDC_CLIENT_ID": "console",
            "OIDC_CLIENT_SECRET": "s3cret",
            "OIDC_ADMIN_GROUPS": "g1, g2",
            "OIDC_ADMIN_ROLES": "LLM.Admin",
            "OIDC_SCOPES": "openid email",
        }
    ).oidc
    assert on.issuer == f"https://login.microsoftonline.com/{TENANT}/v2.0"
    assert on.audience == ("api://llm-backend", "6a3c8e1f-0d2b-4c5a-9e7f-1b2c3d4e5f60")
    assert on.algorithms == ("RS256", "ES256") and on.leeway_s == 30
    assert on.admin_groups == ("g1", "g2") and on.admin_roles == ("LLM.Admin",)
    assert on.scopes == ("openid", "email") and on.console_enabled
    assert "s3cret" not in repr(on)
    # the console's client id is the audience when none is named
    assert Settings.from_env(
        {**base, "OIDC_ISSUER": "https://idp.example", "OIDC_CLIENT_ID": "c"}
    ).oidc.audience == ("c",)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"OIDC_ISSUER": "https://idp.example"}, "OIDC_AUDIENCE"),
        ({"OIDC_ISSUER": "http://idp.example", "OIDC_AUDIENCE": "a"}, "https"),
        ({"OIDC_ISSUER": "https://idp.example", "OIDC_AUDIENCE": "a", "OIDC_ALGORITHMS": "HS256"}, "HS256"),
        ({"OIDC_ISSUER": "https://idp.example", "OIDC_AUDIENCE": "a", "OIDC_ALGORITHMS": "none"}, "none"),
        (
            {"OIDC_ISSUER": "https://login.microsoftonline.com/common/v2.0", "OIDC_AUDIENCE": "a"},
            "OIDC_ALLOWED_TENANTS",
        ),
        (
            {"OIDC_ISSUER": "https://idp.example", "OIDC_AUDIENCE": "a", "OIDC_LEEWAY_S": "-1"},
            "OIDC_LEEWAY_S",
        ),
    ],
)
def test_bad_settings_say_what_to_fix(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"LLM_BACKEND_CONFIG": "config/demo.yaml", **env})
    assert words in str(error.value)


def test_oidc_settings_defaults() -> None:
    settings = OidcSettings()
    assert "none" not in settings.algorithms and not any(a.startswith("HS") for a in settings.algorithms)
    assert settings.leeway_s == 60
