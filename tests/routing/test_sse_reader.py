"""The upstream SSE reader: events split wherever the bytes break, read straight from aiohttp's body reader
(one await per chunk), and through httpx where the body is encoded; a connection read to [DONE] is reused."""

from __future__ import annotations

import asyncio
import gzip
import time

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from bench.upstream import UpstreamProtocol
from llm_backend.config import BackendConfig, Timeouts
from llm_backend.upstream.base import SseSplitter
from llm_backend.upstream.errors import UpstreamBadResponse, UpstreamTimeout
from llm_backend.upstream.sdk import SdkBackend
from tests.conftest import sse_body

BODY = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
EVENTS = (
    b'event: response.created\r\ndata: {"a":1}\r\n\r\n'
    b": a comment, no data\n\n"
    b'data: {"b":\ndata: 2}\n\n'
    b"id: 7\ndata:no-space\n\n"
    b"data: [DONE]"  # the last event without its blank line
)
EXPECTED = [
    (b'event: response.created\ndata: {"a":1}', b'{"a":1}'),
    (b'data: {"b":\ndata: 2}', b'{"b":\n2}'),
    (b"id: 7\ndata:no-space", b"no-space"),
    (b"data: [DONE]", b"[DONE]"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(EVENTS)])
def test_events_are_the_same_wherever_the_bytes_break(size: int) -> None:
    splitter, events = SseSplitter(), []
    for start in range(0, len(EVENTS), size):
        events += splitter.feed(EVENTS[start : start + size])
    assert events + splitter.close() == EXPECTED


def _backend(httpserver: HTTPServer, **kw) -> SdkBackend:
    return SdkBackend(
        BackendConfig(provider="openai", name="sse", base_url=httpserver.url_for("/v1"), api_key="x", **kw)
    )


async def _read(backend: SdkBackend) -> tuple[list, bool]:
    stream = await backend.open_stream("chat/completions", BODY, model="m")
    direct = stream._content is not None  # type: ignore[attr-defined]
    try:
        return [orjson.loads(p) async for p in stream], direct
    finally:
        await backend.close()


CHUNKS = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("Hel", "lo", "!")]


def test_a_plain_stream_is_read_from_aiohttp_and_its_connection_reused() -> None:
    connections: list[object] = []

    class Upstream(UpstreamProtocol):  # the benchmark's keep-alive upstream, counting its connections
        chunks, interval = 3, 0.0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            connections.append(transport)
            super().connection_made(transport)

    async def twice() -> list[tuple[int, bool]]:
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = SdkBackend(
            BackendConfig(provider="openai", name="sse", base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        )
        results = []
        try:
            for _ in range(2):
                stream = await backend.open_stream("chat/completions", BODY, model="m")
                payloads = [orjson.loads(p) async for p in stream]
                results.append((len(payloads), stream._content is not None))  # type: ignore[attr-defined]
        finally:
            await backend.close()
            server.close()
        return results

    results = asyncio.run(twice())
    assert results == [(Upstream.chunks, True)] * 2
    assert len(connections) == 1  # read to [DONE]: the connection went back to the pool


def test_an_encoded_stream_is_decoded_through_httpx(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/v1/chat/completions").respond_with_data(
        gzip.compress(sse_body(*CHUNKS)),
        content_type="text/event-stream",
        headers={"Content-Encoding": "gzip"},
    )
    assert asyncio.run(_read(_backend(httpserver))) == (CHUNKS, False)


def test_a_stream_cut_before_done_is_a_bad_response(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/v1/chat/completions").respond_with_data(
        sse_body(*CHUNKS, done=False), content_type="text/event-stream"
    )
    with pytest.raises(UpstreamBadResponse, match="ended before it was complete"):
        asyncio.run(_read(_backend(httpserver)))


def test_one_timer_ends_a_stream_past_its_total_timeout(httpserver: HTTPServer) -> None:
    def handler(request: Request) -> Response:
        def body():
            yield sse_body(CHUNKS[0], done=False)
            time.sleep(3)  # within first_byte (the read timeout), past the total
            yield sse_body(*CHUNKS[1:])

        return Response(body(), content_type="text/event-stream")

    httpserver.expect_request("/v1/chat/completions").respond_with_handler(handler)
    backend = _backend(httpserver, timeout=Timeouts(connect=1, first_byte=30, total=0.5))

    async def first_then_timeout() -> list:
        seen: list = []
        with pytest.raises(UpstreamTimeout, match="total timeout"):
            await _collect_into(backend, seen)
        return seen

    assert asyncio.run(first_then_timeout()) == CHUNKS[:1]


async def _collect_into(backend: SdkBackend, seen: list) -> None:
    stream = await backend.open_stream("chat/completions", BODY, model="m")
    assert stream._content is not None  # type: ignore[attr-defined]
    try:
        async for payload in stream:
            seen.append(orjson.loads(payload))
    finally:
        await backend.close()
