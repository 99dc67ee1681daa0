"""Slow and oversized requests through gunicorn: deadlines for heads and bodies, 431, the connection cap."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from tests.e2e_hostile.conftest import address, open_fds, read_answer, wait_until

pytestmark = pytest.mark.fault

PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"


def _error(answer: bytes, status: int) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


class Trickler(threading.Thread):
    """Keeps `count` connections open that send their headers one byte at a time and never finish; a
    connection the server closes is replaced at once, as an attacker would."""

    def __init__(self, addr: tuple[str, int], count: int) -> None:
        super().__init__(daemon=True)
        self.addr = addr
        self.count = count
        self.closed_by_server = 0
        self.answers: list[bytes] = []
        self.opened = 0
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.sel = selectors.DefaultSelector()

    def _open(self) -> None:
        s = socket.create_connection(self.addr, timeout=30)
        s.sendall(PARTIAL)
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def run(self) -> None:
        for _ in range(self.count):
            self._open()
        self.ready.set()
        last = 0.0
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if len(self.answers) < 20 and data:
                    self.answers.append(data)
                self.sel.unregister(s)
                s.close()
                self.closed_by_server += 1
                self._open()
            if time.monotonic() - last > 0.5:  # one more header byte on every connection
                last = time.monotonic()
                for key in list(self.sel.get_map().values()):
                    try:
                        key.fileobj.send(b"X")  # type: ignore[union-attr]
                    except OSError:
                        pass
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def test_trickling_connections_are_closed_while_normal_requests_are_answered(hostile_server: Any) -> None:
    url, worker = hostile_server(HEADER_TIMEOUT="3")
    attacker = Trickler(address(url), 3000)
    attacker.start()
    try:
        assert attacker.ready.wait(60), "could not open the attacking connections"
        latencies = []
        with httpx.Client(base_url=url, timeout=10) as client:
            # the attack runs on: connections closed by the server are reopened at once
            until = time.monotonic() + 8
            while time.monotonic() < until:
                started = time.monotonic()
                r = client.get("/healthz", headers={"connection": "close"})
                latencies.append(time.monotonic() - started)
                assert r.status_code == 200, r.text
                reply = client.post(
                    "/v1/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                )
                assert reply.status_code == 200, reply.text
            # the server closed every trickling connection once its header deadline passed
            wait_until(lambda: attacker.closed_by_server >= 3000, timeout=60)
        assert len(latencies) >= 5
        assert max(latencies) < 10
        assert any(a.startswith(b"HTTP/1.1 408 ") for a in attacker.answers), attacker.answers[:3]
    finally:
        attacker.stop.set()
        attacker.join(30)
    # and once the attack stops, the worker's descriptors come back
    wait_until(lambda: open_fds(worker) < 200, timeout=30)


def test_an_idle_or_slow_head_is_closed_after_the_header_timeout(hostile_server: Any) -> None:
    url, _ = hostile_server(HEADER_TIMEOUT="2")
    idle = socket.create_connection(address(url))
    slow = socket.create_connection(address(url))
    started = time.monotonic()
    slow.sendall(PARTIAL)
    assert read_answer(idle) == b""  # never sent a byte: closed without an answer
    answer = read_answer(slow)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.8  # not before the deadline
    assert _error(answer, 408)["code"] == "request_timeout"
    # a complete request on a fresh connection is answered as usual
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_a_body_that_does_not_arrive_is_cut_off_after_the_body_timeout(hostile_server: Any) -> None:
    url, _ = hostile_server(BODY_TIMEOUT="2")
    s = socket.create_connection(address(url))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    s.sendall(b"Content-Length: 1000\r\n\r\n{")
    started = time.monotonic()
    answer = read_answer(s)
    assert time.monotonic() - started >= 1.8
    assert _error(answer, 408)["code"] == "request_timeout"


@pytest.mark.parametrize("shape", ["one huge header", "many headers"])
def test_headers_over_the_limit_are_refused_with_431(hostile_server: Any, shape: str) -> None:
    url, worker = hostile_server(MAX_HEADER_BYTES="16384")
    s = socket.create_connection(address(url))
    if shape == "one huge header":
        # a client that would send 50 MB of one header: the server answers long before it is done
        def flood() -> None:
            try:
                s.sendall(PARTIAL + b"X-Big: ")
                for _ in range(50 * 16):
                    s.sendall(b"a" * 65536)
            except OSError:
                pass

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
    else:
        s.sendall(PARTIAL + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(1000)) + b"\r\n")
    answer = read_answer(s)
    error = _error(answer, 431)
    assert error["code"] == "request_header_fields_too_large"
    assert "16384" in error["message"]
    s.close()
    # headers just under the limit are fine
    ok = httpx.get(url + "/healthz", headers={"X-Fine": "v" * 8000}, timeout=10)
    assert ok.status_code == 200
    assert open_fds(worker) < 200


def test_at_the_connection_cap_idle_connections_make_room_for_new_ones(hostile_server: Any) -> None:
    url, worker = hostile_server(MAX_CONNECTIONS="100", HEADER_TIMEOUT="120")
    sockets = [socket.create_connection(address(url)) for _ in range(400)]
    try:
        for s in sockets[::2]:
            s.sendall(PARTIAL)
        # every new client is served: the connection waiting longest for its headers makes room
        for _ in range(20):
            assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        wait_until(lambda: open_fds(worker) < 100 + 60, timeout=30)
    finally:
        for s in sockets:
            s.close()


def test_when_every_connection_is_busy_a_new_one_is_refused_with_503(hostile_server: Any) -> None:
    url, _ = hostile_server(MAX_CONNECTIONS="20", MOCK_DELAY_MS="2000")
    streams = []
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    try:
        for _ in range(20):
            s = socket.create_connection(address(url))
            s.sendall(request)
            s.settimeout(30)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            streams.append(s)
        refused = socket.create_connection(address(url))
        refused.sendall(PARTIAL + b"\r\n")
        answer = read_answer(refused)
        error = _error(answer, 503)
        assert error["code"] == "overloaded"
        assert b"retry-after: 1" in answer.lower()
    finally:
        for s in streams:
            s.close()
    # once the streams are gone there is room again
    wait_until(lambda: _healthy(url), timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
