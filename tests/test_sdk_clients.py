"""The real openai SDK (sync and async, OpenAI and AzureOpenAI) against the app served on a real port."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

import openai
import orjson
import pytest
from pytest_httpserver import HTTPServer

from llm_backend.config import ModelConfig
from tests.conftest import (
    AZURE_CHAT_PATH,
    AZURE_EMBEDDINGS_PATH,
    CONTENT_FILTER_RESULTS,
    PROMPT_FILTER_RESULTS,
    UPSTREAM_KEY,
    USER_MESSAGES,
    azure_backend,
    azure_chat_completion,
    azure_stream_chunks,
    sse_body,
)

API_VERSION = "2024-10-21"


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)


def async_sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)


def azure_sdk(url: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=url, api_key="x", api_version=API_VERSION, max_retries=0, timeout=10
    )


def async_azure_sdk(url: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=url, api_key="x", api_version=API_VERSION, max_retries=0, timeout=10
    )


@pytest.fixture
def azure_url(serve: Callable[..., str], httpserver: HTTPServer) -> str:
    """A real-port server whose gpt-4o is the Azure deployment played by httpserver."""
    return serve([ModelConfig(name="gpt-4o", aliases=("gpt-4",), backends=(azure_backend(httpserver),))])


# -- OpenAI, sync ------------------------------------------------------------------------------------------


def test_sync_chat(mock_url: str) -> None:
    with sdk(mock_url) as client:
        completion = client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hello there"}], n=2, seed=1, user="u1"
        )
    assert completion.object == "chat.completion"
    assert len(completion.choices) == 2
    assert "hello there" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_sync_chat_stream(mock_url: str) -> None:
    with sdk(mock_url) as client:
        stream = client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
    assert chunks and all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "mock model" in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sync_chat_stream_with_usage(mock_url: str) -> None:
    with sdk(mock_url) as client:
        chunks = list(
            client.chat.completions.create(
                model="mock", messages=USER_MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )


def test_sync_models_list_and_retrieve(mock_url: str) -> None:
    with sdk(mock_url) as client:
        ids = [m.id for m in client.models.list()]
        assert ids == ["mock", "gpt-3.5-turbo", "gpt-4o-mini"]
        model = client.models.retrieve("gpt-3.5-turbo")
        assert model.id == "gpt-3.5-turbo" and model.object == "model"
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("nope")
    assert info.value.code == "model_not_found"


def test_sync_completions(mock_url: str) -> None:
    with sdk(mock_url) as client:
        c = client.completions.create(model="mock", prompt="Once upon a time", max_tokens=20)
        assert c.object == "text_completion" and "Once upon a time" in c.choices[0].text
        streamed = list(client.completions.create(model="mock", prompt="Once upon a time", stream=True))
    assert "".join(s.choices[0].text for s in streamed if s.choices) == c.choices[0].text


def test_sync_embeddings_float_and_base64(mock_url: str) -> None:
    with sdk(mock_url) as client:
        floats = client.embeddings.create(
            model="mock", input=["a", "b"], encoding_format="float", dimensions=8
        )
        default = client.embeddings.create(model="mock", input=["a", "b"], dimensions=8)  # base64 on the wire
        raw = client.embeddings.with_raw_response.create(
            model="mock", input="a", dimensions=8, encoding_format="base64"
        )
    assert [len(d.embedding) for d in floats.data] == [8, 8]
    assert all(isinstance(v, float) for v in floats.data[0].embedding)
    for f, d in zip(floats.data, default.data, strict=True):
        assert d.embedding == pytest.approx(f.embedding, abs=1e-6)
    wire = orjson.loads(raw.http_response.content)
    assert isinstance(wire["data"][0]["embedding"], str)
    decoded = struct.unpack("<8f", base64.b64decode(wire["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(floats.data[0].embedding, abs=1e-6)


def test_sync_errors_are_typed_by_the_sdk(mock_url: str) -> None:
    with sdk(mock_url) as client:
        with pytest.raises(openai.NotFoundError) as nf:
            client.chat.completions.create(model="gpt-17", messages=USER_MESSAGES)
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="mock", messages=USER_MESSAGES, temperature="hot")  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    assert bad.value.param == "temperature" and bad.value.type == "invalid_request_error"


def test_sync_request_id_is_exposed(mock_url: str) -> None:
    with sdk(mock_url) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock", messages=USER_MESSAGES, extra_headers={"X-Request-Id": "sdk-req-1"}
        )
    assert raw.headers["x-client-request-id"] == "sdk-req-1"
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse().choices[0].message.role == "assistant"


# -- OpenAI SDK through the app to a fake Azure -------------------------------------------------------------


def test_sync_chat_through_azure_keeps_filter_results(azure_url: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(azure_chat_completion("Hi!"))
    with sdk(azure_url) as client:
        c = client.chat.completions.create(
            model="gpt-4", messages=USER_MESSAGES, extra_body={"data_sources": [{"type": "x"}]}
        )
    assert c.choices[0].message.content == "Hi!"
    assert c.model_extra is not None and c.model_extra["prompt_filter_results"] == PROMPT_FILTER_RESULTS
    assert c.choices[0].model_extra["content_filter_results"] == CONTENT_FILTER_RESULTS  # type: ignore[index]
    req = httpserver.log[0][0]
    assert req.headers["api-key"] == UPSTREAM_KEY
    assert orjson.loads(req.get_data())["data_sources"] == [{"type": "x"}]
    assert "Bearer x" not in str(req.headers)


def test_sync_stream_through_azure_never_has_empty_choices(azure_url: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(
        sse_body(*azure_stream_chunks()), content_type="text/event-stream"
    )
    with sdk(azure_url) as client:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=USER_MESSAGES, stream=True))
    # a UI that reads choices[0] of every chunk must not break
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello! How can I help?"
    assert chunks[0].model_extra is not None and chunks[0].model_extra["prompt_filter_results"]


def test_sync_rate_limit_through_azure(azure_url: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_json(
        {"error": {"code": "429", "message": "Rate limit is exceeded. Try again in 7 seconds."}},
        status=429,
        headers={"Retry-After": "7"},
    )
    with sdk(azure_url) as client, pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o", messages=USER_MESSAGES)
    assert info.value.response.headers["retry-after"] == "7"


def test_sync_embeddings_base64_through_azure(azure_url: str, httpserver: HTTPServer) -> None:
    vector = [0.25, -0.5, 0.125]
    b64 = base64.b64encode(struct.pack("<3f", *vector)).decode()
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": b64}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    httpserver.expect_request(AZURE_EMBEDDINGS_PATH).respond_with_json(answer)
    with sdk(azure_url) as client:
        result = client.embeddings.create(model="gpt-4o", input="hello")
    assert result.data[0].embedding == vector
    sent = orjson.loads(httpserver.log[0][0].get_data())
    assert sent == {"model": "gpt-4o", "input": "hello", "encoding_format": "base64"}


def test_sync_embeddings_float_through_azure(azure_url: str, httpserver: HTTPServer) -> None:
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    httpserver.expect_request(AZURE_EMBEDDINGS_PATH).respond_with_json(answer)
    with sdk(azure_url) as client:
        result = client.embeddings.create(model="gpt-4o", input=["hello"], encoding_format="float")
    assert result.data[0].embedding == [0.1, 0.2]
    assert orjson.loads(httpserver.log[0][0].get_data())["encoding_format"] == "float"


# -- OpenAI, async -------------------------------------------------------------------------------------------


async def test_async_chat_and_stream(mock_url: str) -> None:
    async with async_sdk(mock_url) as client:
        c = await client.chat.completions.create(model="mock", messages=USER_MESSAGES)
        stream = await client.chat.completions.create(model="mock", messages=USER_MESSAGES, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == c.choices[0].message.content


async def test_async_models_embeddings_completions(mock_url: str) -> None:
    async with async_sdk(mock_url) as client:
        models = [m.id async for m in client.models.list()]
        model = await client.models.retrieve("mock")
        emb = await client.embeddings.create(model="mock", input="x", dimensions=4)
        emb_f = await client.embeddings.create(model="mock", input="x", dimensions=4, encoding_format="float")
        comp = await client.completions.create(model="mock", prompt="abc")
    assert "mock" in models and model.id == "mock"
    assert emb.data[0].embedding == pytest.approx(emb_f.data[0].embedding, abs=1e-6)
    assert comp.choices[0].text


async def test_async_stream_through_azure(azure_url: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(
        sse_body(*azure_stream_chunks()), content_type="text/event-stream"
    )
    async with async_sdk(azure_url) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=USER_MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 19
    assert all(c.choices for c in chunks[:-1])


# -- AzureOpenAI SDK against the Azure-style routes -----------------------------------------------------------


def test_azure_sdk_chat_stream_embeddings(mock_url: str) -> None:
    with azure_sdk(mock_url) as client:
        c = client.chat.completions.create(model="mock", messages=USER_MESSAGES)
        assert c.choices[0].message.content
        chunks = list(
            client.chat.completions.create(model="gpt-3.5-turbo", messages=USER_MESSAGES, stream=True)
        )
        assert (
            "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            == c.choices[0].message.content
        )
        emb = client.embeddings.create(model="mock", input=["a"], dimensions=4)
        assert len(emb.data[0].embedding) == 4
        comp = client.completions.create(model="mock", prompt="hey")
        assert comp.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=USER_MESSAGES)


def test_azure_sdk_to_azure_upstream(azure_url: str, httpserver: HTTPServer) -> None:
    answer = orjson.dumps(azure_chat_completion("From Azure"))
    httpserver.expect_request(AZURE_CHAT_PATH).respond_with_data(answer, content_type="application/json")
    with azure_sdk(azure_url) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=USER_MESSAGES)
    assert raw.http_response.content == answer
    assert raw.parse().choices[0].message.content == "From Azure"
    req = httpserver.log[0][0]
    assert req.path == AZURE_CHAT_PATH and req.headers["api-key"] == UPSTREAM_KEY


async def test_async_azure_sdk(mock_url: str) -> None:
    async with async_azure_sdk(mock_url) as client:
        c = await client.chat.completions.create(model="mock", messages=USER_MESSAGES)
        stream = await client.chat.completions.create(model="mock", messages=USER_MESSAGES, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        emb = await client.embeddings.create(model="mock", input="a", dimensions=4, encoding_format="float")
    assert text == c.choices[0].message.content
    assert len(emb.data[0].embedding) == 4
