"""The many-streams point: one worker holds N slow streams while short requests keep being timed."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.harness import RESULTS, gateway_env, write_config
from bench.loadgen import percentile, request_body
from bench.upstream import quiet_instrument, run

CHAT = "/v1/chat/completions"
FD_RESERVE = 256  # as llm_backend.server
BACKLOG_ALLOWANCE_S = 30.0  # how long after the ramp the streams' first bytes may come and all still be held


def log(message: str) -> None:
    print(f"[bench streams {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    for target in (max(hard, 1 << 17), hard):  # root may lift the hard limit; else the hard one
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft


@dataclass
class Results:
    connect_ms: list[float] = field(default_factory=list)  # TCP connect of each new stream
    ttfb_ms: list[float] = field(default_factory=list)  # first byte of each new stream
    late_ttfb_ms: list[float] = field(default_factory=list)  # ... of the streams opened when most were held
    short_ms: dict[str, list[float]] = field(default_factory=lambda: {"ramp": [], "hold": [], "after": []})
    errors: dict[str, int] = field(default_factory=dict)
    completed: int = 0
    open_now: int = 0
    peak_open: int = 0
    backlog_s: float = 0.0  # from the end of the ramp until every stream had its first byte
    held_at_end: int = 0  # streams still open at the end of the hold

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _request(host: str, port: int, stream: bool) -> bytes:
    body = request_body(stream)
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def one_stream(host: str, port: int, res: Results, late: bool) -> None:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        res.error("connect")
        return
    res.connect_ms.append((time.perf_counter() - started) * 1000)
    res.open_now += 1
    res.peak_open = max(res.peak_open, res.open_now)
    try:
        writer.write(_request(host, port, True))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            res.error(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            return
        first = await reader.read(65536)
        ttfb = (time.perf_counter() - started) * 1000
        res.ttfb_ms.append(ttfb)
        if late:
            res.late_ttfb_ms.append(ttfb)
        seen = first
        while b"data: [DONE]" not in seen[-64:]:
            chunk = await reader.read(65536)
            if not chunk:
                res.error("stream ended early")
                return
            seen = seen[-64:] + chunk
        res.completed += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        res.error(f"connection: {type(exc).__name__}")
    finally:
        res.open_now -= 1
        writer.close()


PHASES = ("ramp", "hold", "after")


async def prober(
    host: str, port: int, res: Results, phase: Callable[[], str], stopped: Callable[[], bool]
) -> None:
    """Short (non-streaming) requests on one keep-alive connection, every 50 ms, timed one by one."""
    raw = _request(host, port, False)
    reader = writer = None
    while not stopped():
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            res.short_ms[phase()].append((time.perf_counter() - started) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                res.error("short " + head.split(b"\r\n", 1)[0].decode(errors="replace"))
        except (OSError, asyncio.IncompleteReadError, StopIteration):
            res.error("short connection")
            writer = None
        await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def probe_process(host: str, port: int, phase: Any, stop: Any, out: Any) -> None:
    """The prober in its own process and event loop, as a real client: in the loop that reads 10,000
    streams it would time its own loop's lag, not the gateway's answer."""
    quiet_instrument()
    res = Results()
    run(prober(host, port, res, lambda: PHASES[phase.value], stop.is_set))
    out.put((res.short_ms, res.errors))


async def drive(host: str, port: int, streams: int, ramp: float, hold: float, after: float) -> Results:
    res = Results()
    ctx = multiprocessing.get_context("spawn")
    phase, stop, out = ctx.Value("i", 0), ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=probe_process, args=(host, port, phase, stop, out), daemon=True)
    probe.start()
    tasks = []
    started = time.monotonic()
    for i in range(streams):
        delay = started + ramp * i / streams - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_stream(host, port, res, late=i >= streams * 0.9)))
    log(f"{streams} streams started in {time.monotonic() - started:.1f} s; waiting for their first bytes")
    # the hold begins once every stream is open and has had its first byte: a worker that opens streams
    # more slowly than they arrive works off its backlog first, and that time counts as the ramp's
    while len(res.ttfb_ms) + sum(res.errors.values()) < streams and not all(t.done() for t in tasks):
        await asyncio.sleep(0.1)
    res.backlog_s = time.monotonic() - started - ramp
    log(f"all streams answered {res.backlog_s:.1f} s after the ramp; holding {res.open_now} for {hold:g} s")
    phase.value = PHASES.index("hold")
    await asyncio.sleep(hold)
    log(f"held: {res.open_now} open (peak {res.peak_open}); waiting for the streams to end")
    res.held_at_end = res.open_now
    await asyncio.gather(*tasks)
    phase.value = PHASES.index("after")
    await asyncio.sleep(after)
    stop.set()
    short_ms, errors = await asyncio.to_thread(out.get, True, 30)
    await asyncio.to_thread(probe.join, 10)
    res.short_ms = short_ms
    for kind, n in errors.items():
        res.errors[kind] = res.errors.get(kind, 0) + n
    return res


def summary(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --streams N", description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument(
        "--ramp",
        type=float,
        default=100.0,
        help="seconds over which the streams are opened (one worker opens about 130 a second while holding "
        "thousands: a faster ramp measures its backlog)",
    )
    parser.add_argument("--hold", type=float, default=10.0, help="seconds all streams are held open")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of short requests after the burst")
    parser.add_argument("--interval-ms", type=float, default=5000.0, help="ms between a stream's chunks")
    parser.add_argument(
        "--backend-connections",
        type=int,
        default=None,
        help="the backend's max_connections (default: streams + 100)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS.with_name("streams.json"))
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)

    fd_limit = raise_fd_limit()
    fit = (fd_limit - FD_RESERVE) // 2 - 50  # the worker holds a client and an upstream socket per stream
    streams = args.streams
    if streams > fit:
        log(f"the fd limit ({fd_limit}, not raisable here) allows {fit} streams per worker, not {streams}")
        streams = fit
    pin = not args.no_pin and procs.pinning_possible()
    # slow streams: a chunk every interval, long enough to outlast the ramp, a backlog and the hold
    chunks = int((args.ramp + BACKLOG_ALLOWANCE_S + args.hold) * 1000 / args.interval_ms) + 2
    with tempfile.TemporaryDirectory(prefix="llmb-streams-") as tmp_name:
        tmp = Path(tmp_name)
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "bench.upstream", "--port", "0", "--ready-fd", str(write_fd)]
        cmd += ["--chunks", str(chunks), "--interval-ms", str(args.interval_ms), "--no-gc"]
        if pin:
            cmd += ["--cpu", str(procs.CLIENT_CPU)]
            os.sched_setaffinity(0, {procs.CLIENT_CPU})
        upstream = procs.spawn(cmd, stderr=None, pass_fds=[write_fd])
        os.close(write_fd)
        with os.fdopen(read_fd) as fh:
            upstream_port = int(fh.readline().strip())
        config = write_config(tmp / "bench.yaml", "openai", upstream_port)
        backend_connections = args.backend_connections or streams + 100
        config.write_text(config.read_text() + f"          max_connections: {backend_connections}\n")
        port = procs.free_port()
        env = {**gateway_env(tmp, port, config), "MAX_CONNECTIONS": str(streams + 50)}
        bin_dir = Path(sys.executable).parent
        procs.spawn([str(bin_dir / "llm-backend"), "migrate"], env=env).wait(60)
        gateway_log = tmp / "gateway.log"
        with gateway_log.open("wb") as out:
            gateway = procs.spawn(
                [str(bin_dir / "gunicorn"), "-c", "gunicorn.conf.py", "llm_backend.asgi:app"],
                cpu=procs.GATEWAY_CPU if pin else None,
                env=env,
                stdout=out,
                stderr=out,
            )
        try:
            procs.wait_ready(f"http://127.0.0.1:{port}/readyz", gateway, 60)
            log(f"gateway on :{port}, upstream on :{upstream_port}; {streams} streams over {args.ramp:g} s")
            quiet_instrument()  # this process reads the 10,000 streams
            with procs.RssSampler(gateway.pid) as rss:
                res = run(drive("127.0.0.1", port, streams, args.ramp, args.hold, args.after))
        finally:
            procs.stop(gateway, timeout=15)
            procs.stop(upstream)
            text = gateway_log.read_text(errors="replace")
            tail = text[-2000:]
            notable = [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line][-20:]
    out: dict[str, Any] = {
        "streams": streams,
        "interval_ms": args.interval_ms,
        "backend_max_connections": backend_connections,
        "requested_streams": args.streams,
        "fd_limit": fd_limit,
        "peak_open": res.peak_open,
        "backlog_s": round(res.backlog_s, 1),
        "held_at_end": res.held_at_end,
        "completed": res.completed,
        "errors": res.errors,
        "rss": rss.summary(),
        "connect_ms": summary(res.connect_ms),
        "ttfb_ms": summary(res.ttfb_ms),
        "ttfb_last_10pct_ms": summary(res.late_ttfb_ms),
        "short_ms": {k: summary(v) for k, v in res.short_ms.items()},
        "gateway_log": notable,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if res.errors:
        print("--- gateway log (tail) ---\n" + tail, file=sys.stderr)
    rss_peak = out["rss"]["rss_peak_mb"] or 0
    hold_p99 = out["short_ms"]["hold"]["p99"] or 0
    ok = (
        not res.errors
        and rss_peak <= 600
        and hold_p99 <= 50
        and res.completed == streams
        and res.held_at_end == streams
    )
    print(
        f"\n{streams} streams: RSS peak {rss_peak} MB (target <= 600), new-stream first byte p50 "
        f"{out['ttfb_ms']['p50']:.1f} / p99 {out['ttfb_ms']['p99']:.1f} ms, short requests while opening "
        f"p99 {out['short_ms']['ramp']['p99'] or 0:.1f} ms, while {res.held_at_end} were held p99 "
        f"{hold_p99:.1f} ms (target <= 50), after the burst max {out['short_ms']['after']['max'] or 0:.1f} ms, "
        f"errors {sum(res.errors.values())}: {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
