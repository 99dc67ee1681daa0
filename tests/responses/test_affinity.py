"""State affinity: a stored response is continued, read and deleted only at the backend that created it."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from llm_backend.db import migrate
from tests.conftest import assert_openai_error, closed_port_url, gunicorn_server
from tests.e2e_recording.conftest import request_rows, wait_for
from tests.responses.conftest import MODEL, Upstream, azure, json_reply, response_object

_ids = itertools.count(1)


def region(server: HTTPServer, name: str) -> Upstream:
    """A fake Azure region (v1 API): every response it creates has an id naming it."""
    up = Upstream(server)

    def create(request: Request) -> Response:
        body = orjson.loads(request.get_data())
        rid = f"resp_{name}_{next(_ids)}"
        return json_reply(
            response_object(f"{name} answers", rid=rid, previous_response_id=body.get("previous_response_id"))
        )

    def read(request: Request) -> Response:
        rid = request.path.split("/")[4]
        if request.path.endswith("/input_items"):
            return json_reply(
                {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
            )
        if request.method == "DELETE":
            return json_reply({"id": rid, "object": "response", "deleted": True})
        return json_reply(response_object(f"{name} answers", rid=rid))

    up.on("/openai/v1/responses", create)
    for method in ("GET", "DELETE"):
        up.on(re.compile(r"^/openai/v1/responses/resp_[^/]+(/input_items)?$"), read, method=method)
    return up


@pytest.fixture
def west_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


def two_regions(a: HTTPServer | str, b: HTTPServer | str, *, prefer: str) -> ModelConfig:
    return ModelConfig(
        name=MODEL,
        backends=(
            azure(a, "A", priority=0 if prefer == "A" else 1),
            azure(b, "B", priority=0 if prefer == "B" else 1),
        ),
        retries=1,
    )


def _create(c: Any, **body: Any) -> Any:
    return c.post("/v1/responses", json={"model": MODEL, "input": "hello", **body})


def test_chain_stays_on_its_backend_when_another_is_preferred(
    httpserver: HTTPServer, west_server: HTTPServer, make_app: Callable[..., Any], migrated: str
) -> None:
    a, b = region(httpserver, "A"), region(west_server, "B")
    with make_app(two_regions(httpserver, west_server, prefer="A")).test_client() as c:
        first = _create(c).json()
    assert first["id"].startswith("resp_A_")
    # another replica (same database, its own memory) that prefers B
    with make_app(two_regions(httpserver, west_server, prefer="B")).test_client() as c:
        fresh = _create(c).json()
        assert fresh["id"].startswith("resp_B_"), "new chains go to the preferred backend"
        second = _create(c, previous_response_id=first["id"]).json()
        third = _create(c, previous_response_id=second["id"]).json()
        assert c.get(f"/v1/responses/{first['id']}").status_code == 200
        assert (
            c.get(
                f"/v1/responses/{first['id']}/input_items", params={"limit": "5", "order": "asc"}
            ).status_code
            == 200
        )
        assert c.delete(f"/v1/responses/{first['id']}").status_code == 200
    assert second["id"].startswith("resp_A_") and third["id"].startswith("resp_A_")
    reads = [q for q in a.requests if q.method in ("GET", "DELETE")]
    assert [(q.method, q.path) for q in reads] == [
        ("GET", f"/openai/v1/responses/{first['id']}"),
        ("GET", f"/openai/v1/responses/{first['id']}/input_items"),
        ("DELETE", f"/openai/v1/responses/{first['id']}"),
    ]
    assert dict(reads[1].args) == {"limit": "5", "order": "asc"}
    assert len(b.requests) == 1, "B only ever saw the fresh chain"
    wait_for(lambda: len(request_rows(migrated)) >= 7, what="rows")
    ops = sorted(r["operation"] for r in request_rows(migrated))
    assert ops.count("responses") == 4 and "responses.retrieve" in ops and "responses.delete" in ops


def test_owner_down_is_a_clear_503_not_another_backend(
    httpserver: HTTPServer, west_server: HTTPServer, make_app: Callable[..., Any], migrated: str
) -> None:
    region(httpserver, "A")
    b = region(west_server, "B")
    with make_app(two_regions(httpserver, west_server, prefer="A")).test_client() as c:
        first = _create(c).json()
    gone = closed_port_url()
    with make_app(two_regions(gone, west_server, prefer="A")).test_client() as c:
        r = _create(c, previous_response_id=first["id"])
        error = assert_openai_error(r, 503, code="no_backend_available")
        assert first["id"] in error["message"]
        assert int(r.headers["Retry-After"]) >= 1
        g = c.get(f"/v1/responses/{first['id']}")
        assert_openai_error(g, 503)
        assert "Retry-After" in g.headers
        assert b.requests == [], "never failed over to a backend that does not have the response"
        # a new chain (and store: false) fails over as chat does
        assert _create(c, store=False).json()["id"].startswith("resp_B_")
    rows = [r for r in request_rows(migrated) if r["status_code"] == 503]
    assert rows and all(r["backend"] == "A" for r in rows)


def test_owner_circuit_open_answers_503_with_retry_after(
    httpserver: HTTPServer, west_server: HTTPServer, make_app: Callable[..., Any]
) -> None:
    a = region(httpserver, "A")
    region(west_server, "B")
    with make_app(two_regions(httpserver, west_server, prefer="A")).test_client() as c:
        first = _create(c).json()
        a.server.clear()
        a.server.expect_request("/openai/v1/responses").respond_with_json(
            {"error": {"message": "down"}}, status=500
        )
        for _ in range(6):  # new chains fail over to B while A's failures open its circuit
            assert _create(c, store=False).status_code == 200
        r = _create(c, previous_response_id=first["id"])
        assert_openai_error(r, 503, code="no_backend_available")
        assert int(r.headers["Retry-After"]) >= 1


def test_responses_of_another_key_are_not_found(
    httpserver: HTTPServer, make_app: Callable[..., Any], tmp_path: Path
) -> None:
    region(httpserver, "A")
    app = make_app(ModelConfig(name=MODEL, backends=(azure(httpserver, "A"),)), auth="keys", admin_key="adm")
    with app.test_client() as c:
        keys = [
            c.post("/admin/keys", json={"name": n}, headers={"Authorization": "Bearer adm"}).json()["key"]
            for n in ("alice", "bob")
        ]
        first = c.post(
            "/v1/responses",
            json={"model": MODEL, "input": "hi"},
            headers={"Authorization": f"Bearer {keys[0]}"},
        ).json()
        theirs = c.get(f"/v1/responses/{first['id']}", headers={"Authorization": f"Bearer {keys[1]}"})
        assert_openai_error(theirs, 404)
        mine = c.get(f"/v1/responses/{first['id']}", headers={"api-key": keys[0]})
        assert mine.status_code != 404


@pytest.mark.fault
def test_affinity_across_two_gunicorn_workers(
    httpserver: HTTPServer, west_server: HTTPServer, tmp_path: Path
) -> None:
    """Two workers, B preferred but refusing new chains: follow-ups always reach A, whichever worker serves them."""
    region(httpserver, "A")
    b = Upstream(west_server)

    def b_answers(request: Request) -> Response:
        if orjson.loads(request.get_data()).get("previous_response_id"):
            return json_reply(response_object("WRONG BACKEND", rid="resp_B_wrong"))
        return json_reply({"error": {"message": "busy"}}, 429, {"Retry-After": "0"})

    b.on("/openai/v1/responses", b_answers)
    db = f"sqlite:///{tmp_path}/gw.db"
    migrate.upgrade(db)
    config = tmp_path / "models.yaml"
    config.write_text(
        f"""
models:
  - name: {MODEL}
    retries: 1
    backends:
      - {{provider: azure, name: A, priority: 1, endpoint: "{httpserver.url_for("").rstrip("/")}", deployment: d, api_version: v1, api_key: k}}
      - {{provider: azure, name: B, priority: 0, endpoint: "{west_server.url_for("").rstrip("/")}", deployment: d, api_version: v1, api_key: k}}
"""
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "LLM_BACKEND_CONFIG": str(config),
        "DATABASE_URL": db,
        "LLM_BACKEND_AUTH": "none",
        "WEB_CONCURRENCY": "2",
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
    }
    with gunicorn_server(env, tmp_path / "gunicorn.log") as (_, url):
        chains = []
        for _ in range(6):
            with httpx.Client(base_url=url, headers={"Connection": "close"}, timeout=30) as h:
                chains.append(h.post("/v1/responses", json={"model": MODEL, "input": "start"}).json()["id"])
        assert all(rid.startswith("resp_A_") for rid in chains), chains
        for rid in chains:
            for _ in range(2):
                with httpx.Client(base_url=url, headers={"Connection": "close"}, timeout=30) as h:
                    r = h.post(
                        "/v1/responses", json={"model": MODEL, "input": "more", "previous_response_id": rid}
                    )
                    assert r.status_code == 200, r.text
                    assert r.json()["id"].startswith("resp_A_"), r.text
                    rid = r.json()["id"]
                    assert h.get(f"/v1/responses/{rid}").json()["id"] == rid
    assert not [q for q in b.requests if orjson.loads(q.get_data()).get("previous_response_id")]
