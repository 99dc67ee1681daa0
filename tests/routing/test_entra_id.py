"""Entra ID auth to Azure: a fake credential's token reaches the upstream as a Bearer token, cached, refreshed."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from llm_backend.upstream import identity
from llm_backend.upstream.identity import REFRESH_MARGIN, SCOPE, TokenProvider
from tests.routing.conftest import answer, chat, content, fail, hits, model, region


class FakeCredential:
    """Stands in for DefaultAzureCredential: hands out tok-1, tok-2, ... each valid for `lifetimes[i]` s."""

    def __init__(self, lifetimes: list[float] | None = None, error: Exception | None = None) -> None:
        self.lifetimes = lifetimes or [3600.0]
        self.error = error
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False

    async def get_token(self, *scopes: str, **kw: Any) -> Any:
        self.scopes.append(scopes)
        if self.error is not None:
            raise self.error
        n = len(self.scopes)
        lifetime = self.lifetimes[min(n, len(self.lifetimes)) - 1]
        return SimpleNamespace(token=f"tok-{n}", expires_on=time.time() + lifetime)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def credential(monkeypatch: pytest.MonkeyPatch) -> FakeCredential:
    cred = FakeCredential()
    monkeypatch.setattr(identity, "make_credential", lambda: cred)
    return cred


def entra(server: HTTPServer, name: str = "eastus", **kw: Any):
    return region(server, name, auth="entra_id", api_key=None, **kw)


def sent_headers(server: HTTPServer) -> list[Any]:
    return [request.headers for request, _ in server.log]


def test_the_token_reaches_the_upstream_and_no_api_key_is_sent(
    open_client, credential: FakeCredential, east: HTTPServer
) -> None:
    answer(east, "east")
    c = open_client(model(entra(east)))
    for _ in range(3):
        assert content(chat(c)) == "east"
    headers = sent_headers(east)
    assert len(headers) == 3
    for h in headers:
        assert h.get("Authorization") == "Bearer tok-1"
        assert "api-key" not in h
    assert credential.scopes == [(SCOPE,)], "one token, fetched once and reused"


def test_the_credential_is_closed_at_shutdown(settings, credential: FakeCredential, east: HTTPServer) -> None:
    from llm_backend.app import create_app

    answer(east)
    with create_app(settings(model(entra(east)))).test_client() as c:
        assert chat(c).status_code == 200
        assert not credential.closed
    assert credential.closed


def test_a_token_near_expiry_is_refreshed(
    open_client, credential: FakeCredential, east: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tok-1 leaves the refresh margin after 30 s; tok-2 lasts an hour
    credential.lifetimes = [REFRESH_MARGIN + 30.0, 3600.0]
    # the token provider's clock, moved by hand (the credential's expiry times stay real ones)
    later = SimpleNamespace(offset=0.0)
    monkeypatch.setattr(identity, "time", SimpleNamespace(time=lambda: time.time() + later.offset))
    answer(east)
    c = open_client(model(entra(east)))
    assert chat(c).status_code == 200
    assert chat(c).status_code == 200
    assert len(credential.scopes) == 1
    later.offset = 31.0
    assert chat(c).status_code == 200
    assert chat(c).status_code == 200
    assert len(credential.scopes) == 2
    assert [h.get("Authorization") for h in sent_headers(east)] == [
        "Bearer tok-1",
        "Bearer tok-1",
        "Bearer tok-2",
        "Bearer tok-2",
    ]


def test_entra_and_api_key_regions_each_send_their_own_credentials(
    open_client, credential: FakeCredential, east: HTTPServer, west: HTTPServer
) -> None:
    fail(east, 503)
    answer(west, "west")
    c = open_client(model(entra(east), region(west, "westus", priority=1)))
    assert content(chat(c)) == "west"
    (east_h,) = sent_headers(east)
    (west_h,) = sent_headers(west)
    assert east_h.get("Authorization") == "Bearer tok-1" and "api-key" not in east_h
    assert west_h.get("api-key") == "key-westus"
    assert "tok-1" not in (west_h.get("Authorization") or "")


async def test_concurrent_callers_share_one_token_fetch() -> None:
    class Slow(FakeCredential):
        async def get_token(self, *scopes: str, **kw: Any) -> Any:
            await asyncio.sleep(0.05)
            return await super().get_token(*scopes, **kw)

    cred = Slow()
    provider = TokenProvider(cred)
    tokens = await asyncio.gather(*(provider() for _ in range(10)))
    assert set(tokens) == {"tok-1"}
    assert len(cred.scopes) == 1
    await provider.close()
    assert cred.closed


def test_a_token_failure_fails_over_to_the_next_region(
    open_client, monkeypatch: pytest.MonkeyPatch, east: HTTPServer, west: HTTPServer
) -> None:
    from azure.core.exceptions import ClientAuthenticationError

    cred = FakeCredential(
        error=ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")
    )
    monkeypatch.setattr(identity, "make_credential", lambda: cred)
    answer(east, "east")
    answer(west, "west")
    c = open_client(model(entra(east), region(west, "westus", priority=1)))
    r = chat(c)
    assert hits(east) == 0
    assert content(r) == "west"
