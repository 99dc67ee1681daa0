"""The per-backend connection limit: configurable, and streams beyond it wait instead of failing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from bench.upstream import UpstreamProtocol
from llm_backend.config import DEFAULT_MAX_CONNECTIONS, BackendConfig, ConfigError, load_models_file
from llm_backend.upstream.sdk import SdkBackend

BODY = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def _models(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  - name: m\n    backends:\n      - provider: openai\n"
        "        base_url: http://127.0.0.1:9/v1\n        api_key: x\n" + extra
    )
    return path


def test_max_connections_is_read_from_the_models_file(tmp_path: Path) -> None:
    (default,) = load_models_file(_models(tmp_path, ""), {})
    assert default.backends[0].max_connections == DEFAULT_MAX_CONNECTIONS == 10_000
    (model,) = load_models_file(_models(tmp_path, "        max_connections: 25\n"), {})
    assert model.backends[0].max_connections == 25
    for bad in ("0", "-3", "many", "true"):
        with pytest.raises(ConfigError, match="max_connections"):
            load_models_file(_models(tmp_path, f"        max_connections: {bad}\n"), {})


async def _stream_through(limit: int, streams: int, seconds: float) -> list[tuple[str, int]]:
    """Open `streams` slow streams (each `seconds` long) at once through one SdkBackend; returns the
    (event, stream) pairs in the order they happened."""
    saved = UpstreamProtocol.chunks, UpstreamProtocol.interval
    UpstreamProtocol.chunks, UpstreamProtocol.interval = 10, seconds / 10
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = SdkBackend(
        BackendConfig(
            provider="openai",
            name="pool",
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="x",
            max_connections=limit,
        )
    )
    events: list[tuple[str, int]] = []

    async def one(i: int) -> None:
        stream = await backend.open_stream("chat/completions", BODY, model="m")
        events.append(("opened", i))
        async for _ in stream:
            pass
        events.append(("ended", i))

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(streams))), 60)
    finally:
        await backend.close()
        server.close()
        UpstreamProtocol.chunks, UpstreamProtocol.interval = saved
    return events


def test_streams_beyond_the_limit_wait_for_a_connection() -> None:
    events = asyncio.run(_stream_through(limit=2, streams=3, seconds=0.5))
    first_end = next(n for n, (kind, _) in enumerate(events) if kind == "ended")
    opened_before = [i for kind, i in events[:first_end] if kind == "opened"]
    assert len(opened_before) == 2  # the third waited for a connection to come free
    assert sorted(i for kind, i in events if kind == "ended") == [0, 1, 2]


def test_a_large_limit_holds_many_streams_at_once() -> None:
    events = asyncio.run(_stream_through(limit=500, streams=150, seconds=10))
    first_end = next(n for n, (kind, _) in enumerate(events) if kind == "ended")
    assert len([e for e in events[:first_end] if e[0] == "opened"]) == 150  # all open before any ended
