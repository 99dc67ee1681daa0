"""Fake OpenAI/Azure upstream: a raw asyncio (uvloop + httptools) HTTP/1.1 keep-alive server."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import httptools
import orjson

T = TypeVar("T")

MODEL = "gpt-4o-mini-2024-07-18"
CONTENT = "Hello! This is a fixed answer from the benchmark upstream. How can I help you today?"
USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 20,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def completion_body() -> bytes:
    """The fixed non-streaming chat.completion answer."""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000001",
            "object": "chat.completion",
            "created": 1732240000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": CONTENT, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
            "service_tier": "default",
            "system_fingerprint": "fp_bench0001",
        }
    )


def response_bytes(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """A complete keep-alive HTTP/1.1 response with Content-Length."""
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode()
        + b"\r\nx-request-id: bench\r\nconnection: keep-alive\r\n\r\n" + body
    )  # fmt: skip


def sse_events(chunks: int, include_usage: bool) -> list[bytes]:
    """The SSE events of one stream (OpenAI framing), the last being ``data: [DONE]``."""
    base = {
        "id": "chatcmpl-bench0000000000000000000000002",
        "object": "chat.completion.chunk",
        "created": 1732240000,
        "model": MODEL,
        "service_tier": "default",
        "system_fingerprint": "fp_bench0001",
    }
    words = CONTENT.split(" ")
    events: list[bytes] = []
    for i in range(chunks):
        last = i == chunks - 1
        delta: dict[str, object] = {}
        if i == 0:
            delta["role"] = "assistant"
        if not last:
            delta["content"] = ("" if i == 0 else " ") + words[i % len(words)]
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}
        chunk: dict[str, object] = {**base, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if include_usage:
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


RESPONSE_USAGE = {
    "input_tokens": 9,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 29,
}


def response_object(status: str = "completed", text: str = CONTENT) -> dict[str, object]:
    """The fixed Responses API response object."""
    done = status == "completed"
    return {
        "id": "resp_bench00000000000000000000000000000001",
        "object": "response",
        "created_at": 1732240000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": MODEL,
        "output": [
            {
                "id": "msg_bench0000000000000000000000000001",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if done
        else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": RESPONSE_USAGE if done else None,
        "metadata": {},
    }


def response_events(chunks: int) -> list[bytes]:
    """The typed events of one Responses stream: created, text deltas, completed (no [DONE])."""
    words = CONTENT.split(" ")
    deltas = [("" if i == 0 else " ") + words[i % len(words)] for i in range(max(1, chunks - 1))]
    events: list[dict[str, object]] = [
        {"type": "response.created", "response": response_object("in_progress")}
    ]
    for d in deltas:
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_bench0000000000000000000000000001",
                "output_index": 0,
                "content_index": 0,
                "delta": d,
                "logprobs": [],
            }
        )
    events.append({"type": "response.completed", "response": response_object(text="".join(deltas))})
    out = []
    for seq, e in enumerate(events):
        e["sequence_number"] = seq
        out.append(b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n")
    return out


def chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of transfer-encoding: chunked."""
    return b"%x\r\n%b\r\n" % (len(data), data)


COMPLETION = response_bytes("200 OK", completion_body())
RESPONSE = response_bytes("200 OK", orjson.dumps(response_object()))
NOT_FOUND = response_bytes(
    "404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}'
)
BAD_REQUEST = response_bytes(
    "400 Bad Request", b'{"error":{"message":"bad json","type":"invalid_request_error"}}'
)
MODELS = response_bytes(
    "200 OK", orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
)
OK = response_bytes("200 OK", b'{"status":"ok"}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"x-request-id: bench\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n"
)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; requests are answered in order (streams block later requests)."""

    chunks = 20
    interval = 0.005

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.pending: list[tuple[bytes, bytes, bytes]] = []
        self.streaming = False
        self.method = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(BAD_REQUEST)
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.pending.append((self.parser.get_method(), self.url, b"".join(self.body)))
        if not self.streaming:
            self.drain()

    def drain(self) -> None:
        """Answer queued requests until one starts a stream."""
        while self.pending and not self.streaming and self.transport is not None:
            method, url, body = self.pending.pop(0)
            path = url.split(b"?", 1)[0]
            if method == b"POST" and path.endswith(b"/chat/completions"):
                if b'"stream"' in body:
                    try:
                        request = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        self.transport.write(BAD_REQUEST)
                        continue
                    if request.get("stream"):
                        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                        self.streaming = True
                        asyncio.get_running_loop().create_task(self.stream(include_usage))
                        return
                self.transport.write(COMPLETION)
            elif method == b"POST" and path.endswith(b"/responses"):
                if b'"stream"' in body and orjson.loads(body).get("stream"):
                    self.streaming = True
                    asyncio.get_running_loop().create_task(self.stream(False, response_events(self.chunks)))
                    return
                self.transport.write(RESPONSE)
            elif path.endswith(b"/models"):
                self.transport.write(MODELS)
            elif path in (b"/", b"/health", b"/healthz", b"/readyz"):
                self.transport.write(OK)
            else:
                self.transport.write(NOT_FOUND)

    async def stream(self, include_usage: bool, events: list[bytes] | None = None) -> None:
        if events is None:
            events = sse_events(self.chunks, include_usage)
        try:
            for i, event in enumerate(events):
                if self.transport is None:
                    return
                if i == 0:
                    self.transport.write(STREAM_HEAD + chunked(event))
                elif i < self.chunks:
                    await asyncio.sleep(self.interval)
                    if self.transport is None:
                        return
                    self.transport.write(chunked(event))
                else:  # usage chunk and [DONE] follow the last content chunk without delay
                    self.transport.write(chunked(event))
            if self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        finally:
            self.streaming = False
        self.drain()


async def serve(host: str, port: int, ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if ready_fd is not None:
        os.write(ready_fd, f"{bound}\n".encode())
        os.close(ready_fd)
    else:
        print(f"fake upstream listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="delay between stream chunks")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--ready-fd", type=int, default=None, help="write the bound port to this fd")
    parser.add_argument(
        "--no-gc", action="store_true", help="no cyclic garbage collection (see quiet_instrument)"
    )
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.no_gc:
        quiet_instrument()
    UpstreamProtocol.chunks = max(1, args.chunks)
    UpstreamProtocol.interval = args.interval_ms / 1000
    run(serve(args.host, args.port, args.ready_fd))


def quiet_instrument() -> None:
    """Switch off the cyclic garbage collector in a benchmark's own process (fake upstream, load generator).
    Holding 10,000 streams, their collections pause for up to 300 ms, and a short request the upstream
    answers late is charged to the gateway. A real upstream does not pause so; a run leaks a few MB."""
    gc.collect()
    gc.freeze()
    gc.disable()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        print("uvloop missing: using the default event loop", file=sys.stderr)
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
