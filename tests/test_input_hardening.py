"""Bad input is answered with an OpenAI-shaped 4xx, never a 500: bodies that are not objects on every
POST/PATCH route, durations and times we cannot represent, NUL in a URL, parameter errors worded as OpenAI
words them; the Azure routes take a null `model`; the served spec names its server; the long-URL refusal."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from openai import AzureOpenAI
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import ModelConfig
from llm_backend.db import migrate
from llm_backend.durations import MAX_DAYS, DurationTooLong, parse_duration
from tests.conftest import (
    API_VERSION,
    AZURE_CHAT_PATH,
    DEPLOYMENT,
    REPO,
    USER_MESSAGES,
    assert_openai_error,
    azure_backend,
    azure_chat_completion,
    mock_model,
    openai_backend,
)

ADMIN = "adm-" + "k" * 28
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
SPEC = yaml.safe_load((REPO / "openapi" / "openapi.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def admin_client(make_client: Callable[..., Any], tmp_path: Path) -> Any:
    """An app with keys, the admin key and a migrated database (admin and conversation routes work)."""
    url = f"sqlite:///{tmp_path}/admin.db"
    migrate.upgrade(url)
    return make_client([mock_model()], auth="keys", admin_key=ADMIN, database_url=url, recording=True)


# -- a body that is not a JSON object, on every POST and PATCH route of the spec -------------------------------


def _write_operations() -> list[tuple[str, str, bool | None]]:
    out = []
    for path, item in SPEC["paths"].items():
        for method in ("post", "patch", "put"):
            op = item.get(method)
            if op is not None:
                # the console's forms take application/x-www-form-urlencoded only: a JSON body is a 415
                json_body = "application/json" in op.get("requestBody", {}).get(
                    "content", {"application/json": 1}
                )
                has_body = "requestBody" in op if json_body else None
                out.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path), has_body))
    return out


WRITE_OPERATIONS = _write_operations()
NOT_OBJECTS = {"null": b"null", "array": b"[]", "string": b'"hello"', "number": b"42", "true": b"true"}


def test_the_spec_has_the_write_routes_we_expect() -> None:
    paths = {p for _, p, _ in WRITE_OPERATIONS}
    assert {"/v1/chat/completions", "/api/conversations", "/admin/keys", "/api/conversations/x"} <= paths
    assert len(WRITE_OPERATIONS) >= 13


@pytest.mark.parametrize(
    ("method", "path", "has_body"), WRITE_OPERATIONS, ids=[f"{m} {p}" for m, p, _ in WRITE_OPERATIONS]
)
def test_a_body_that_is_not_an_object_is_a_400_on_every_write_route(
    admin_client: Any, method: str, path: str, has_body: bool | None
) -> None:
    for kind, raw in NOT_OBJECTS.items():
        r = admin_client.request(
            method, path, content=raw, headers={**ADMIN_HEADERS, "Content-Type": "application/json"}
        )
        if has_body is None:  # a form route
            assert_openai_error(r, 415, code="unsupported_media_type")
        elif has_body:
            error = assert_openai_error(r, 400, code="invalid_json", type_="invalid_request_error")
            assert "must be a JSON object" in error["message"], kind
        else:  # a route that takes no body ignores one; its answer must still be an OpenAI-shaped 4xx
            assert 400 <= r.status_code < 500, (kind, r.text)
            assert_openai_error(r, r.status_code)


def test_an_absent_body_on_an_optional_body_route_is_still_fine(admin_client: Any) -> None:
    r = admin_client.post("/api/conversations", headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    assert r.json()["object"] == "conversation"


# -- durations and times ---------------------------------------------------------------------------------------


def test_durations_are_bounded() -> None:
    assert parse_duration("90d").days == 90
    assert parse_duration(f"{MAX_DAYS}d").days == MAX_DAYS
    for text in (f"{MAX_DAYS + 1}d", "999999999d", "99999999999d", "9999999999w"):
        with pytest.raises(DurationTooLong):
            parse_duration(text)
    with pytest.raises(ValueError):
        parse_duration("9" * 5000 + "d")  # too many digits to be a duration at all


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=999999999d", "since"),
        (f"since={MAX_DAYS + 1}d", "since"),
        ("since=yesterday", "since"),
        ("until=9999-12-31T23:00:00-05:00", "until"),  # past 9999 once in UTC
        ("since=0001-01-01T00:30:00%2B01:00", "since"),  # before year 1 once in UTC
        ("until=not-a-time", "until"),
    ],
)
def test_usage_with_a_time_out_of_range_is_a_400(admin_client: Any, query: str, param: str) -> None:
    r = admin_client.get(f"/admin/usage?{query}", headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, param=param, code="invalid_value")
    r = admin_client.get(f"/admin/requests?{query}", headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, param=param, code="invalid_value")


def test_usage_with_a_long_but_representable_window_works(admin_client: Any) -> None:
    r = admin_client.get(f"/admin/usage?since={MAX_DAYS}d&until=9999-12-31T23:59:59Z", headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_in", "99999999999d"),
        ("expires_in", "999999999d"),
        ("expires_in", "9999999999w"),
        ("expires_at", "9999-12-31T23:00:00-05:00"),
        ("expires_at", "0001-01-01T00:00:00+05:00"),
    ],
)
def test_key_expiry_out_of_range_is_a_400(admin_client: Any, field: str, value: str) -> None:
    r = admin_client.post("/admin/keys", json={"name": "k", field: value}, headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, param=field)
    created = admin_client.post("/admin/keys", json={"name": "k"}, headers=ADMIN_HEADERS)
    assert created.status_code == 201
    r = admin_client.patch(f"/admin/keys/{created.json()['id']}", json={field: value}, headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, param=field)


def test_key_expiry_at_the_edge_is_accepted(admin_client: Any) -> None:
    r = admin_client.post(
        "/admin/keys", json={"name": "k", "expires_at": "9999-12-31T18:00:00-05:00"}, headers=ADMIN_HEADERS
    )
    assert r.status_code == 201, r.text
    stored = admin_client.get(f"/admin/keys/{r.json()['id']}", headers=ADMIN_HEADERS).json()["expires_at"]
    assert datetime.fromisoformat(stored) == datetime(9999, 12, 31, 23, 0, tzinfo=UTC)


@pytest.mark.parametrize("query", ["created_after=9999-12-31T23:00:00-05:00", "created_before=nope"])
def test_conversation_filters_out_of_range_are_a_400(admin_client: Any, query: str) -> None:
    r = admin_client.get(f"/api/conversations?{query}", headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, param=query.split("=")[0])


# -- NUL in a path or a query parameter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/conversations/a%00b",
        "/api/conversations/a%00b/export",
        "/api/conversations?q=a%00b",
        "/api/conversations?owner=%00",
        "/admin/keys/key_%00",
        "/admin/keys?owner=x%00",
        "/admin/usage?key_id=%00",
        "/admin/requests?client_request_id=a%00",
        "/v1/models/mo%00ck",
    ],
)
def test_a_nul_in_the_url_is_a_400_before_any_lookup(admin_client: Any, url: str) -> None:
    r = admin_client.get(url, headers=ADMIN_HEADERS)
    error = assert_openai_error(r, 400, code="invalid_url", type_="invalid_request_error")
    assert "NUL" in error["message"]
    assert r.headers["x-request-id"].startswith("req_")
    r = admin_client.delete(url, headers=ADMIN_HEADERS)
    assert_openai_error(r, 400, code="invalid_url")


# -- parameter errors in OpenAI's words ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "param", "code", "message"),
    [
        (
            "/api/conversations/x/export?format=pdf",
            "format",
            "invalid_value",
            "Invalid value: 'pdf'. Supported values are: 'json', 'markdown'.",
        ),
        (
            "/api/conversations?limit=abc",
            "limit",
            "invalid_type",
            "Invalid type for 'limit': expected an integer, but got a string instead.",
        ),
        (
            "/api/conversations?limit=1000",
            "limit",
            "integer_above_max_value",
            "Invalid 'limit': integer above maximum value. Expected a value <= 100, but got 1000 instead.",
        ),
        (
            "/api/conversations?limit=0",
            "limit",
            "integer_below_min_value",
            "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        (
            "/admin/requests?limit=5000",
            "limit",
            "integer_above_max_value",
            "Invalid 'limit': integer above maximum value. Expected a value <= 1000, but got 5000 instead.",
        ),
        (
            "/admin/requests?client_request_id=" + "c" * 513,
            "client_request_id",
            "string_above_max_length",
            "Invalid 'client_request_id': string too long. Expected a string with maximum length 512, "
            "but got a string with length 513 instead.",
        ),
    ],
)
def test_parameter_errors_read_like_openai(
    admin_client: Any, url: str, param: str, code: str, message: str
) -> None:
    r = admin_client.get(url, headers=ADMIN_HEADERS)
    error = assert_openai_error(r, 400, param=param, code=code, type_="invalid_request_error")
    assert error["message"] == message
    assert "Failed validating" not in r.text and "On instance" not in r.text


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "message"),
    [
        (
            "/v1/chat/completions",
            {"model": "mock", "messages": USER_MESSAGES, "temperature": 5},
            "temperature",
            "decimal_above_max_value",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
        ),
        (
            "/v1/chat/completions",
            {"model": "mock", "messages": USER_MESSAGES, "n": 0},
            "n",
            "integer_below_min_value",
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        (
            "/v1/chat/completions",
            {"model": "mock", "messages": []},
            "messages",
            "empty_array",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array "
            "instead.",
        ),
        (
            "/v1/chat/completions",
            {"model": "mock", "messages": USER_MESSAGES, "stop": ["a", "b", "c", "d", "e"]},
            "stop",
            "array_above_max_length",
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with "
            "length 5 instead.",
        ),
        (
            "/v1/chat/completions",
            {"model": "", "messages": USER_MESSAGES},
            "model",
            "empty_string",
            "Invalid 'model': empty string. Expected a string with minimum length 1, but got an empty string "
            "instead.",
        ),
        (
            "/v1/embeddings",
            {"model": "mock", "input": "x", "encoding_format": "hex"},
            "encoding_format",
            "invalid_value",
            "Invalid value: 'hex'. Supported values are: 'float', 'base64'.",
        ),
        (
            "/api/conversations",
            {"title": "t", "colour": "blue"},
            "colour",
            "unknown_parameter",
            "Unknown parameter: 'colour'.",
        ),
        (
            "/api/conversations",
            {"title": "t" * 256},
            "title",
            "string_above_max_length",
            "Invalid 'title': string too long. Expected a string with maximum length 255, but got a string "
            "with length 256 instead.",
        ),
        (
            "/api/conversations/x",
            {},
            "title",
            "missing_required_parameter",
            "Missing required parameter: 'title'.",
        ),
    ],
)
def test_body_errors_read_like_openai(
    admin_client: Any, path: str, body: dict[str, Any], param: str, code: str, message: str
) -> None:
    method = "PATCH" if path == "/api/conversations/x" else "POST"
    r = admin_client.request(method, path, json=body, headers=ADMIN_HEADERS)
    error = assert_openai_error(r, 400, param=param, code=code)
    assert error["message"] == message
    assert "Failed validating" not in r.text


# -- the Azure routes: the deployment names the model, `model` in the body may be null or absent ----------------


@pytest.fixture
def azure_upstream(httpserver: HTTPServer) -> list[dict[str, Any]]:
    """The fake Azure deployment; returns the list of JSON bodies it received."""
    seen: list[dict[str, Any]] = []

    def handle(request: Request) -> Response:
        seen.append(orjson.loads(request.get_data()))
        return Response(orjson.dumps(azure_chat_completion()), content_type="application/json")

    httpserver.expect_request(AZURE_CHAT_PATH, method="POST").respond_with_handler(handle)
    return seen


# The body LangChain's AzureChatOpenAI(azure_deployment=...) sends: "model" is there, and null.
LANGCHAIN_BODY = {
    "messages": [{"role": "user", "content": "Say hello"}],
    "model": None,
    "stream": False,
    "n": 1,
    "temperature": 0.7,
}


def test_azure_route_takes_a_null_model_as_langchain_sends_it(
    make_client: Callable[..., Any], httpserver: HTTPServer, azure_upstream: list[dict[str, Any]]
) -> None:
    client = make_client([ModelConfig(name=DEPLOYMENT, backends=(azure_backend(httpserver),))])
    url = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    r = client.post(url, content=orjson.dumps(LANGCHAIN_BODY), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    # Azure picks the model by the deployment in the path; the body goes on as the client sent it
    assert azure_upstream[-1] == LANGCHAIN_BODY
    # and without a model at all
    no_model = {k: v for k, v in LANGCHAIN_BODY.items() if k != "model"}
    r = client.post(url, json=no_model)
    assert r.status_code == 200, r.text
    assert azure_upstream[-1] == no_model
    # a model of the wrong type is still refused, in OpenAI's words
    r = client.post(url, json={**no_model, "model": 4})
    error = assert_openai_error(r, 400, param="model", code="invalid_type")
    assert error["message"] == "Invalid type for 'model': expected a string, but got an integer instead."


def test_azure_sdk_with_a_none_model_reaches_the_deployment(
    serve: Callable[..., str], httpserver: HTTPServer, azure_upstream: list[dict[str, Any]]
) -> None:
    base = serve([ModelConfig(name=DEPLOYMENT, backends=(azure_backend(httpserver),))])
    client = AzureOpenAI(
        azure_endpoint=base,
        azure_deployment=DEPLOYMENT,
        api_version=API_VERSION,
        api_key="unused",
        max_retries=0,
    )
    try:
        reply = client.chat.completions.create(model=None, messages=USER_MESSAGES)  # type: ignore[arg-type]
    finally:
        client.close()
    assert reply.choices[0].message.content
    assert azure_upstream[-1]["messages"] == USER_MESSAGES
    assert azure_upstream[-1].get("model") is None


def test_azure_route_to_an_openai_upstream_names_the_model(
    make_client: Callable[..., Any], httpserver: HTTPServer
) -> None:
    seen: list[dict[str, Any]] = []

    def handle(request: Request) -> Response:
        seen.append(orjson.loads(request.get_data()))
        return Response(orjson.dumps(azure_chat_completion()), content_type="application/json")

    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(handle)
    client = make_client([ModelConfig(name="gpt-4o", backends=(openai_backend(httpserver),))])
    r = client.post(
        f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
        content=orjson.dumps(LANGCHAIN_BODY),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert seen[-1]["model"] == "gpt-4o"  # an OpenAI-style server needs the model in the body
    assert seen[-1]["messages"] == LANGCHAIN_BODY["messages"]


# -- the served spec, Swagger UI and the licence ------------------------------------------------------------------


def test_served_spec_names_this_server_and_docs_load_it(client: Any) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["servers"] == [{"url": "/", "description": "this server"}]
    assert spec["info"]["license"]["name"] == "MIT"
    assert "servers:" in client.get("/openapi.yaml").text
    docs = client.get("/docs/")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text and "swagger-ui" in docs.text.lower()


def test_served_spec_behind_a_prefix_names_the_prefix(make_settings: Callable[..., Any]) -> None:
    from starlette.testclient import TestClient

    from llm_backend.app import create_app

    app = create_app(make_settings())
    with TestClient(app, root_path="/gateway") as c:  # what a path-prefixing proxy tells the app
        spec = c.get("/openapi.json").json()
    assert spec["servers"] == [{"url": "/gateway/", "description": "this server"}]


def test_the_licence_file_matches_the_spec() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "The llm-backend authors" in text
    assert SPEC["info"]["license"]["name"] == "MIT"


# -- a 100 KB URL, through the server as deployed --------------------------------------------------------------


@pytest.fixture
def gunicorn_url(tmp_path: Path) -> Iterator[str]:
    import os

    from tests.conftest import gunicorn_server

    env = {
        "PATH": os.environ.get("PATH", ""),
        "LLM_BACKEND_AUTH": "none",
        "LLM_BACKEND_RECORDING": "false",
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "LLM_BACKEND_DATA_DIR": str(tmp_path),
        "LLM_BACKEND_CONFIG": str(REPO / "config" / "demo.yaml"),
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "warning",
    }
    with gunicorn_server(env, tmp_path / "gunicorn.log", ready_path="/healthz") as (_, url):
        yield url


def _raw_get(url: str, target: str) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def _length(data: bytes) -> int:
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data)
    return int(match.group(1)) if match else 0


def test_a_100kb_url_is_refused_with_a_414_and_the_server_goes_on(gunicorn_url: str) -> None:
    answer = _raw_get(gunicorn_url, "/v1/models?q=" + "a" * 100_000)
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    # the worker lives on
    assert httpx.get(gunicorn_url + "/healthz", timeout=10).status_code == 200


def test_a_100kb_url_is_refused_in_openai_shape(gunicorn_url: str) -> None:
    answer = _raw_get(gunicorn_url, "/v1/models?q=" + "a" * 100_000)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "uri_too_long"


def test_a_request_the_parser_refuses_gets_an_openai_shaped_400(gunicorn_url: str) -> None:
    host, port = gunicorn_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data[:200]
    assert b"application/json" in head.lower()
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert httpx.get(gunicorn_url + "/healthz", timeout=10).status_code == 200
