"""Each request's cost in the request log, exact, at the prices of the model that answered: pytest-httpserver
plays Azure (its v1 API) answering with another model than the one asked for (the model router's case, a
snapshot name), the real openai SDK is the client; then the sums in `llm-backend usage` and /admin/usage."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import openai
import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import BackendConfig, ModelConfig, Prices
from llm_backend.services.pricing import cost_of
from tests.e2e_recording.conftest import request_rows, row_by_id, sse_response, stream_events, wait_for
from tests.responses.conftest import event_blocks, event_stream, response_object
from tests.test_cli_ux import run

ROUTER = Prices(input=1.0, cached_input=1.0, output=1.0)  # what the router would cost, were it billed
NANO = Prices(input=0.10, cached_input=0.025, output=0.40)
GPT_4O = Prices(input=2.50, cached_input=1.25, output=10.00)
EMBED = Prices(input=0.02, cached_input=0.02, output=0.0)
ADMIN_KEY = "admin-key-for-pricing-tests"

# 1200 prompt tokens of which 1024 from the cache, 300 completion tokens of which 120 reasoning
CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 0},
}
# at nano's prices: (176 * 0.10 + 1024 * 0.025 + 300 * 0.40) / 1e6 = 163.2 / 1e6
NANO_CHAT_COST = 0.0001632
# at gpt-4o's prices: (176 * 2.5 + 1024 * 1.25 + 300 * 10) / 1e6 = (440 + 1280 + 3000) / 1e6
GPT_4O_CHAT_COST = 0.00472


def test_the_expected_figures_are_the_exact_decimal_ones() -> None:
    assert Decimal(176) * Decimal("0.10") + 1024 * Decimal("0.025") + 300 * Decimal("0.40") == Decimal(
        "163.2"
    )
    assert float(Decimal("163.2") / 1_000_000) == NANO_CHAT_COST


class Azure:
    """Azure's v1 API played by pytest-httpserver: each path answers with what `reply[path](body)` says."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.bodies: list[dict[str, Any]] = []
        self.reply: dict[str, Callable[[dict[str, Any]], Response]] = {}
        for path in ("/openai/v1/chat/completions", "/openai/v1/embeddings", "/openai/v1/responses"):
            server.expect_request(path, method="POST").respond_with_handler(self._handler(path))

    def _handler(self, path: str) -> Callable[[Request], Response]:
        def handle(request: Request) -> Response:
            body = orjson.loads(request.get_data())
            self.bodies.append(body)
            return self.reply[path](body)

        return handle

    def backend(self, deployment: str) -> BackendConfig:
        return BackendConfig(
            provider="azure",
            name=f"azure-{deployment}",
            endpoint=self.server.url_for("").rstrip("/"),
            deployment=deployment,
            api_version="v1",
            api_key="upstream-key",
        )


def jsonr(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


def chat_answer(model: str, usage: dict[str, Any] | None = CHAT_USAGE) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1739000000,
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi."}}
        ],
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def chat_stream(model: str, usage: dict[str, Any] | None) -> Response:
    events = stream_events(("Hel", "lo", "!"), usage)
    for e in events[1:]:
        e["model"] = model
    return sse_response(events)


@pytest.fixture
def azure(httpserver: HTTPServer) -> Azure:
    return Azure(httpserver)


def models(azure: Azure) -> list[ModelConfig]:
    """The model router (priced, so that a wrong fallback would show), the models it may pick, gpt-4o,
    an embedding model, and one without prices."""
    return [
        ModelConfig(name="model-router", backends=(azure.backend("model-router"),), retries=0, prices=ROUTER),
        ModelConfig(
            name="gpt-4.1-nano",
            backends=(BackendConfig(provider="mock", name="m"),),
            context_window=1047576,
            prices=NANO,
        ),
        ModelConfig(name="gpt-4o", backends=(azure.backend("gpt-4o"),), retries=0, prices=GPT_4O),
        ModelConfig(
            name="text-embedding-3-small", backends=(azure.backend("text-embedding-3-small"),), prices=EMBED
        ),
        ModelConfig(name="unpriced", backends=(azure.backend("unpriced"),), retries=0),
    ]


def sdk(c: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)


def rid(name: str) -> dict[str, Any]:
    return {"extra_headers": {"X-Request-Id": name}}


MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def test_chat_cost_is_that_of_the_model_that_answered(
    db_url: str, app_for: Callable[..., Any], azure: Azure
) -> None:
    app = app_for(db_url, models(azure))
    with app.test_client() as c:
        client = sdk(c)
        # the model router answers with the model it chose, by its dated name
        azure.reply["/openai/v1/chat/completions"] = lambda body: jsonr(
            chat_answer("gpt-4.1-nano-2025-04-14" if body["model"] == "model-router" else "gpt-4o-2024-08-06")
        )
        done = client.chat.completions.create(model="model-router", messages=MESSAGES, **rid("router"))
        assert done.model == "gpt-4.1-nano-2025-04-14"
        # a gpt-4o deployment answers with its snapshot's name
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **rid("snapshot"))
        # a model the router picked that is not configured: the router's own prices
        azure.reply["/openai/v1/chat/completions"] = lambda body: jsonr(chat_answer("gpt-5-2025-08-07"))
        client.chat.completions.create(model="model-router", messages=MESSAGES, **rid("unknown"))
        # no prices anywhere: no cost
        client.chat.completions.create(model="unpriced", messages=MESSAGES, **rid("unpriced"))
        # the Azure-style route (the deployment in the path, no model in the body) is priced the same way
        azure.reply["/openai/v1/chat/completions"] = lambda body: jsonr(chat_answer("gpt-4o-2024-08-06"))
        az = openai.AzureOpenAI(
            azure_endpoint="http://testserver",
            api_key="x",
            api_version="2024-10-21",
            http_client=c,
            max_retries=0,
        )
        az.chat.completions.create(model="gpt-4o", messages=MESSAGES, **rid("azure-style"))
    router = row_by_id(db_url, "router")
    assert (router["prompt_tokens"], router["cached_tokens"], router["completion_tokens"]) == (
        1200,
        1024,
        300,
    )
    assert router["model"] == "model-router"  # the routed model stays what the row is grouped by
    assert router["cost"] == NANO_CHAT_COST
    assert row_by_id(db_url, "snapshot")["cost"] == GPT_4O_CHAT_COST
    # (1200 - 1024) * 1 + 1024 * 1 + 300 * 1 = 1500 per million
    assert row_by_id(db_url, "unknown")["cost"] == 0.0015
    assert row_by_id(db_url, "unpriced")["cost"] is None
    azure_style = row_by_id(db_url, "azure-style")
    assert azure_style["route"].startswith("/openai/deployments/") and azure_style["cost"] == GPT_4O_CHAT_COST


@pytest.mark.parametrize("client_wants_usage", [True, False])
def test_stream_cost_is_exact_whether_or_not_the_client_asked_for_usage(
    db_url: str, app_for: Callable[..., Any], azure: Azure, client_wants_usage: bool
) -> None:
    azure.reply["/openai/v1/chat/completions"] = lambda body: chat_stream(
        "gpt-4.1-nano-2025-04-14", CHAT_USAGE
    )
    app = app_for(db_url, models(azure))
    options = {"stream_options": {"include_usage": True}} if client_wants_usage else {}
    with app.test_client() as c:
        chunks = list(
            sdk(c).chat.completions.create(
                model="model-router", messages=MESSAGES, stream=True, **options, **rid("stream")
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello!"
        assert any(ch.usage is not None for ch in chunks) is client_wants_usage
    row = row_by_id(db_url, "stream")
    assert row["stream"] is True and row["tokens_estimated"] is False
    assert row["cost"] == NANO_CHAT_COST


def test_stream_without_usage_costs_its_estimate(
    db_url: str, app_for: Callable[..., Any], azure: Azure
) -> None:
    azure.reply["/openai/v1/chat/completions"] = lambda body: chat_stream("gpt-4o-2024-08-06", None)
    app = app_for(db_url, models(azure))
    with app.test_client() as c:
        list(sdk(c).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, **rid("est")))
    row = row_by_id(db_url, "est")
    assert row["tokens_estimated"] is True and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["cost"] == cost_of(
        GPT_4O,
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cached_tokens=0,
    )
    assert row["cost"] > 0


RESPONSES_USAGE = {
    "input_tokens": 2000,
    "input_tokens_details": {"cached_tokens": 1536},
    "output_tokens": 700,
    "output_tokens_details": {"reasoning_tokens": 512},
    "total_tokens": 2700,
}
# gpt-4o: (464 * 2.5 + 1536 * 1.25 + 700 * 10) / 1e6 = (1160 + 1920 + 7000) / 1e6
GPT_4O_RESPONSES_COST = 0.01008


def test_responses_cost_json_and_stream(db_url: str, app_for: Callable[..., Any], azure: Azure) -> None:
    def reply(body: dict[str, Any]) -> Response:
        if body.get("stream"):
            return Response(
                event_stream(event_blocks(usage=RESPONSES_USAGE)), content_type="text/event-stream"
            )
        return jsonr(response_object(usage=RESPONSES_USAGE))  # answers "model": "gpt-4o-2024-08-06"

    azure.reply["/openai/v1/responses"] = reply
    app = app_for(db_url, models(azure))
    with app.test_client() as c:
        client = sdk(c)
        done = client.responses.create(model="model-router", input="Hello", **rid("resp-json"))
        assert done.model == "gpt-4o-2024-08-06"
        events = list(
            client.responses.create(model="model-router", input="Hello", stream=True, **rid("resp-sse"))
        )
        assert events[-1].type == "response.completed"
    for name in ("resp-json", "resp-sse"):
        row = row_by_id(db_url, name)
        assert row["operation"] == "responses"
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (2000, 1536, 700)
        assert row["cost"] == GPT_4O_RESPONSES_COST, name


def test_embeddings_cost_only_their_prompt(db_url: str, app_for: Callable[..., Any], azure: Azure) -> None:
    azure.reply["/openai/v1/embeddings"] = lambda body: jsonr(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 12345, "total_tokens": 12345},
        }
    )
    app = app_for(db_url, models(azure))
    with app.test_client() as c:
        sdk(c).embeddings.create(model="text-embedding-3-small", input="some text", **rid("embed"))
    row = row_by_id(db_url, "embed")
    assert row["operation"] == "embeddings"
    assert row["cost"] == 0.0002469  # 12345 * 0.02 / 1e6, exactly


def test_failed_requests_cost_nothing_where_prices_are_known(
    db_url: str, app_for: Callable[..., Any], azure: Azure
) -> None:
    filtered = {"error": {"code": "content_filter", "message": "The prompt was filtered.", "param": "prompt"}}
    azure.reply["/openai/v1/chat/completions"] = lambda body: jsonr(filtered, 400)
    app = app_for(db_url, models(azure))
    with app.test_client() as c:
        for model, name in (("gpt-4o", "err-priced"), ("unpriced", "err-unpriced"), ("nope", "err-unknown")):
            with pytest.raises(openai.APIStatusError):
                sdk(c).chat.completions.create(model=model, messages=MESSAGES, **rid(name))
    assert row_by_id(db_url, "err-priced")["cost"] == 0.0
    assert row_by_id(db_url, "err-unpriced")["cost"] is None
    assert row_by_id(db_url, "err-unknown")["cost"] is None


def test_usage_sums_cost_in_cli_and_admin(db_url: str, app_for: Callable[..., Any], azure: Azure) -> None:
    answers = {"model-router": "gpt-4.1-nano-2025-04-14", "gpt-4o": "gpt-4o", "unpriced": "in-house-model"}
    azure.reply["/openai/v1/chat/completions"] = lambda body: jsonr(chat_answer(answers[body["model"]]))
    app = app_for(db_url, models(azure), admin_key=ADMIN_KEY)
    with app.test_client() as c:
        client = sdk(c)
        for i in range(7):
            client.chat.completions.create(model="model-router", messages=MESSAGES, **rid(f"r{i}"))
        for i in range(3):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **rid(f"g{i}"))
        client.chat.completions.create(model="unpriced", messages=MESSAGES, **rid("u"))
        # recording is write-behind: the report reads what has reached the database
        wait_for(lambda: len(request_rows(db_url)) == 11, what="11 recorded requests")
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        report = c.get("/admin/usage", params={"group_by": "model"}, headers=admin)
        assert report.status_code == 200, report.text
        listed = c.get("/admin/requests", params={"client_request_id": "r3"}, headers=admin).json()["data"]
    assert len(request_rows(db_url)) == 11
    by_model = {r["model"]: r for r in report.json()["data"]}
    # 7 x 163.2e-6 and 3 x 4720e-6, with no float noise from adding them up
    assert by_model["model-router"]["cost"] == 0.0011424
    assert by_model["gpt-4o"]["cost"] == 0.01416
    assert by_model["unpriced"]["cost"] is None
    assert by_model["model-router"]["total_tokens"] == 7 * 1500  # the old fields are still there
    assert listed[0]["request_id"] and listed[0]["cost"] == NANO_CHAT_COST

    env = {"DATABASE_URL": db_url}
    as_json = json.loads(run("usage", "--since", "1d", "--group-by", "model", "--json", env=env).stdout)
    assert {r["model"]: r["cost"] for r in as_json} == {
        "gpt-4o": 0.01416,
        "model-router": 0.0011424,
        "unpriced": None,
    }
    table = run("usage", "--since", "1d", "--group-by", "model", env=env)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[-1] == "cost" and header.split()[:2] == ["model", "requests"]
    shown = {line.split()[0]: line.split()[-1] for line in lines}
    assert shown == {"gpt-4o": "0.014160", "model-router": "0.001142", "unpriced": "-"}
