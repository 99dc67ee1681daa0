"""The real openai SDK (sync and async) against the gateway's Responses API and Azure v1 routes (mock model)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from llm_backend.config import BackendConfig, ModelConfig
from tests.e2e_recording.conftest import conversations, request_rows, wait_for
from tests.responses.conftest import MODEL

ADMIN = "admin-key-for-tests"


def mock(name: str = MODEL) -> ModelConfig:
    return ModelConfig(name=name, backends=(BackendConfig(provider="mock", name="mock", delay_ms=0),))


@pytest.fixture
def url(serve_app: Callable[..., str]) -> str:
    return serve_app(mock())


def test_create_retrieve_input_items_delete(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    created = client.responses.create(model=MODEL, input="Hello", max_output_tokens=64)
    assert created.status == "completed" and "Hello" in created.output_text
    assert created.usage is not None and created.usage.total_tokens > 0
    again = client.responses.retrieve(created.id)
    assert again.id == created.id and again.output_text == created.output_text
    items = list(client.responses.input_items.list(created.id))
    assert [getattr(i, "role", None) for i in items] == ["user"]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)  # the backend that had it says so


def test_unknown_response_is_openais_404(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve("resp_never_created")
    assert "resp_never_created" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_never_created")
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_cancel_reaches_the_owner(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    created = client.responses.create(model=MODEL, input="Hello")
    with pytest.raises(openai.BadRequestError) as err:  # the mock, like OpenAI, cancels only background ones
        client.responses.cancel(created.id)
    assert "background" in err.value.message


def test_streams_raw_and_with_the_helper(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    kinds = [e.type for e in client.responses.create(model=MODEL, input="Hello", stream=True)]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 3
    with client.responses.stream(model=MODEL, input="Stream me") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and "Stream me" in final.output_text
    assert client.responses.retrieve(final.id).id == final.id, "a streamed response is remembered too"


def test_three_turn_chain_is_one_conversation(url: str, migrated: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    first = client.responses.create(model=MODEL, input="first question", instructions="Be brief.")
    second = client.responses.create(model=MODEL, input="second question", previous_response_id=first.id)
    with client.responses.stream(
        model=MODEL, input=[{"role": "user", "content": "third question"}], previous_response_id=second.id
    ) as stream:
        third = stream.get_final_response()
    assert third.previous_response_id == second.id
    wait_for(lambda: len(request_rows(migrated)) >= 3, what="three rows")
    wait_for(lambda: sum(c["message_count"] for c in conversations(migrated)) >= 7, what="messages")
    (conv,) = conversations(migrated)
    roles = [(m["role"], m["content"]) for m in conv["messages"]]
    assert roles[0] == ("system", "Be brief.")
    assert [r for r, _ in roles] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [c for r, c in roles if r == "user"] == ["first question", "second question", "third question"]
    assert roles[-1][1] == third.output_text
    rows = request_rows(migrated)
    assert {r["conversation_id"] for r in rows} == {conv["id"]}
    listed = httpx.get(url + "/api/conversations").json()["data"]
    assert [c["id"] for c in listed] == [conv["id"]]


def test_function_call_items(url: str, migrated: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools)
    follow = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        tools=tools,
        input=[
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temp_c": 21}'},
        ],
    )
    assert "temp_c" in follow.output_text
    wait_for(lambda: sum(c["message_count"] for c in conversations(migrated)) >= 5, what="messages")
    (conv,) = conversations(migrated)
    messages = conv["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "tool", "assistant"]
    assert messages[1]["tool_calls"] is None
    call, output = messages[2], messages[3]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "get_weather"
    assert output["role"] == "tool" and output["tool_call_id"] == "call_1"


def test_input_tokens_count(url: str, migrated: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    counted = client.responses.input_tokens.count(model=MODEL, input="count these words please")
    assert counted.input_tokens > 0
    wait_for(
        lambda: any(r["operation"] == "responses.input_tokens" for r in request_rows(migrated)), what="row"
    )


def test_invalid_bodies_are_openai_errors(url: str) -> None:
    r = httpx.post(url + "/v1/responses", json={"input": "no model"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": 42})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "input" in r.json()["error"]["param"]
    ok = httpx.post(
        url + "/v1/responses", json={"model": MODEL, "input": [{"type": "future_item", "x": 1}], "unknown": 1}
    )
    assert ok.status_code == 200, ok.text


async def test_async_client(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x")
    created = await client.responses.create(model=MODEL, input="async hello")
    assert (await client.responses.retrieve(created.id)).id == created.id
    follow = await client.responses.create(model=MODEL, input="more", previous_response_id=created.id)
    assert follow.previous_response_id == created.id
    kinds = [e.type async for e in await client.responses.create(model=MODEL, input="s", stream=True)]
    assert kinds[-1] == "response.completed"
    async with client.responses.stream(model=MODEL, input="helper") as stream:
        final = await stream.get_final_response()
    assert final.output_text
    items = [i async for i in client.responses.input_items.list(created.id)]
    assert len(items) == 1
    await client.responses.delete(created.id)
    await client.close()


def test_azure_v1_base_url_with_keys(serve_app: Callable[..., str]) -> None:
    """OpenAI(base_url=…/openai/v1/) as Microsoft documents it: Bearer or api-key, api-version ignored."""
    url = serve_app(mock(), auth="keys", admin_key=ADMIN)
    bearer = openai.OpenAI(base_url=url + "/openai/v1/", api_key=ADMIN)
    reply = bearer.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert bearer.responses.create(model=MODEL, input="hi").output_text
    assert [m.id for m in bearer.models.list()] == [MODEL]
    assert bearer.embeddings.create(model=MODEL, input="x").data
    api_key = openai.OpenAI(
        base_url=url + "/openai/v1/",
        api_key="unused",
        default_headers={"api-key": ADMIN, "Authorization": ""},
        default_query={"api-version": "preview"},
    )
    assert api_key.responses.create(model=MODEL, input="hi").output_text
    nobody = openai.OpenAI(base_url=url + "/openai/v1/", api_key="sk-llmb-wrong")
    with pytest.raises(openai.AuthenticationError):
        nobody.responses.create(model=MODEL, input="hi")


def test_azure_openai_client_responses(url: str) -> None:
    client = openai.AzureOpenAI(azure_endpoint=url, api_key="x", api_version="2025-04-01-preview")
    created = client.responses.create(model=MODEL, input="from AzureOpenAI")
    assert client.responses.retrieve(created.id).id == created.id
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
