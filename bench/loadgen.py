"""Python load generator (uvloop + httptools, keep-alive): fallback to wrk and the streaming timer."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from bench.upstream import run

CHAT_BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
STREAM_BODY = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
RESPONSES_BODY = {"model": "bench-model", "input": "hi"}
RESPONSES_STREAM_BODY = {**RESPONSES_BODY, "stream": True}
# The end of a complete stream: chat's [DONE], the Responses API's final event.
STREAM_END = {False: b"data: [DONE]", True: b"event: response.completed"}


def is_responses(path: str) -> bool:
    return path.split("?", 1)[0].endswith("/responses")


def request_body(stream: bool, path: str = "/v1/chat/completions") -> bytes:
    """The JSON body the benchmark posts to `path` (a chat completion, or a Responses API request)."""
    if is_responses(path):
        return json.dumps(RESPONSES_STREAM_BODY if stream else RESPONSES_BODY, separators=(",", ":")).encode()
    return json.dumps(STREAM_BODY if stream else CHAT_BODY, separators=(",", ":")).encode()


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(pct / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize_ms(values_ns: list[int]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds."""
    values = sorted(v / 1e6 for v in values_ns)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1] if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


@dataclass
class Response:
    """One timed response."""

    status: int = 0
    ttfb_ns: int = 0
    total_ns: int = 0
    body: bytearray = field(default_factory=bytearray)


class ClientProtocol(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection doing one request at a time."""

    def __init__(self, keep_body: bool) -> None:
        self.keep_body = keep_body
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.future: asyncio.Future[Response] | None = None
        self.response = Response()
        self.started = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError("connection closed by server"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.future is not None and not self.future.done():
                self.future.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def request(self, raw: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.future = asyncio.get_running_loop().create_future()
        self.response = Response()
        self.started = time.perf_counter_ns()
        self.transport.write(raw)
        return self.future

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.response.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.response.ttfb_ns:
            self.response.ttfb_ns = time.perf_counter_ns() - self.started
        if self.keep_body:
            self.response.body += body

    def on_message_complete(self) -> None:
        self.response.total_ns = time.perf_counter_ns() - self.started
        if not self.response.ttfb_ns:
            self.response.ttfb_ns = self.response.total_ns
        if self.future is not None and not self.future.done():
            self.future.set_result(self.response)


@dataclass
class Stats:
    """Accumulated results of all workers."""

    latencies: list[int] = field(default_factory=list)
    ttfbs: list[int] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    bad_streams: int = 0
    events: list[int] = field(default_factory=list)


async def worker(
    host: str,
    port: int,
    raw: bytes,
    stream: bool,
    deadline: float,
    stats: Stats,
    end: bytes = STREAM_END[False],
) -> None:
    loop = asyncio.get_running_loop()
    proto: ClientProtocol | None = None
    while time.monotonic() < deadline:
        try:
            if proto is None or proto.closed:
                _, proto = await loop.create_connection(lambda: ClientProtocol(stream), host, port)
            response = await asyncio.wait_for(proto.request(raw), timeout=30)
        except (TimeoutError, OSError, ConnectionError, httptools.HttpParserError):
            stats.errors += 1
            if proto is not None and proto.transport is not None:
                proto.transport.close()
            proto = None
            await asyncio.sleep(0.01)
            continue
        key = str(response.status)
        stats.statuses[key] = stats.statuses.get(key, 0) + 1
        if response.status != 200:
            stats.errors += 1
            continue
        stats.latencies.append(response.total_ns)
        stats.ttfbs.append(response.ttfb_ns)
        if stream:
            body = bytes(response.body)
            stats.events.append(body.count(b"data:"))
            if end not in body:
                stats.bad_streams += 1
    if proto is not None and proto.transport is not None:
        proto.transport.close()


async def measure(
    url: str, concurrency: int, duration: float, stream: bool, headers: list[str], warmup: float
) -> dict[str, object]:
    """Run ``concurrency`` keep-alive workers against ``url`` for ``duration`` seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    body = request_body(stream, path)
    end = STREAM_END[is_responses(path)]
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if not any(h.lower().startswith("authorization:") for h in headers):
        head.append("Authorization: Bearer bench")
    raw = ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode() + body
    if warmup > 0:
        await asyncio.gather(
            *(
                worker(host, port, raw, stream, time.monotonic() + warmup, Stats(), end)
                for _ in range(concurrency)
            )
        )
    stats = Stats()
    start = time.monotonic()
    await asyncio.gather(
        *(worker(host, port, raw, stream, start + duration, stats, end) for _ in range(concurrency))
    )
    elapsed = time.monotonic() - start
    result: dict[str, object] = {
        "tool": "python",
        "concurrency": concurrency,
        "duration_s": elapsed,
        "requests": len(stats.latencies),
        "rps": len(stats.latencies) / elapsed if elapsed else 0.0,
        "errors": stats.errors,
        "statuses": stats.statuses,
        "latency_ms": summarize_ms(stats.latencies),
    }
    if stream:
        result["ttfb_ms"] = summarize_ms(stats.ttfbs)
        result["bad_streams"] = stats.bad_streams
        result["events_per_stream"] = min(stats.events) if stats.events else 0
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--header", "-H", action="append", default=[], help="extra 'Name: value' header")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    result = run(measure(args.url, args.concurrency, args.duration, args.stream, args.header, args.warmup))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
