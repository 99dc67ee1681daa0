"""The benchmark run: fake upstream, direct points, then each gateway variant one after the other."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from bench import load, procs, report
from bench.loadgen import STREAM_END, is_responses, request_body
from bench.variants import VARIANTS, Variant, VariantContext

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
CHAT_PATH = "/v1/chat/completions"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(v.name for v in VARIANTS)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark llm-backend (1 gunicorn worker) against a fake upstream, direct vs proxy.",
        epilog=(
            "CPU pinning (2+ cores): the gateway (gunicorn master + worker) on CPU 0; the fake upstream, the "
            "load generator and this script on CPU 1. Env: BENCH_DATABASE_URL / TEST_DATABASE_URL enable the "
            "PostgreSQL variant; BENCH_GATEWAY_CMD replaces the gunicorn command."
        ),
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured point (default 8)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of c=64 warm-up per gateway")
    parser.add_argument("--quick", action="store_true", help="short points (~1 minute in total)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of: {names}")
    parser.add_argument("--direct-only", action="store_true", help="measure the fake upstream alone")
    parser.add_argument("--provider", choices=["openai", "azure"], default="openai")
    parser.add_argument("--stream-c16", action="store_true", help="also measure streaming at c=16")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream (default 20)")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="ms between chunks (default 5)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--gateway-cmd",
        default=os.environ.get("BENCH_GATEWAY_CMD"),
        help="command that serves the gateway instead of gunicorn (gets the same env: HOST, PORT, ...)",
    )
    parser.add_argument("--no-migrate", action="store_true", help="skip `llm-backend migrate`")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--list-variants", action="store_true")
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="instead: hold N slow streams on one worker (python -m bench --streams 10000 --help)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0)
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.5
    return args


def write_config(path: Path, provider: str, upstream_port: int) -> Path:
    """The gateway's YAML: one model served by the fake upstream."""
    if provider == "azure":
        backend = (
            "        - provider: azure\n"
            f"          endpoint: http://127.0.0.1:{upstream_port}\n"
            "          deployment: bench\n"
            '          api_version: "2024-10-21"\n'
            "          api_key: x\n"
        )
    else:
        backend = (
            "        - provider: openai\n"
            f"          base_url: http://127.0.0.1:{upstream_port}/v1\n"
            "          api_key: bench-key\n"
        )
    path.write_text("models:\n  - name: bench-model\n    backends:\n" + backend)
    return path


def start_upstream(args: argparse.Namespace, pin: bool) -> tuple[subprocess.Popen[bytes], int]:
    """The fake upstream in its own process; returns it and the port it bound."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "bench.upstream", "--port", "0", "--ready-fd", str(write_fd)]
    cmd += ["--chunks", str(args.chunks), "--interval-ms", str(args.interval_ms)]
    if pin:
        cmd += ["--cpu", str(procs.CLIENT_CPU)]
    proc = procs.spawn(cmd, stderr=None, pass_fds=[write_fd])
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        line = fh.readline().strip()
    if not line:
        raise RuntimeError("fake upstream failed to start")
    return proc, int(line)


def sanity(url: str, headers: dict[str, str]) -> None:
    """One non-streaming and one streaming request must succeed before a target is measured."""
    base = {"Content-Type": "application/json", "Authorization": "Bearer bench", **headers}
    responses = is_responses(url)
    for stream in (False, True):
        body = request_body(stream, urlsplit(url).path)
        req = urllib.request.Request(url, data=body, headers=base, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise RuntimeError(
                f"{'stream' if stream else 'chat'} request answered {exc.code}: {detail}"
            ) from None
        if stream and STREAM_END[responses] not in body:
            raise RuntimeError(f"stream did not end with {STREAM_END[responses]!r}: {body[-300:]!r}")
        if not stream and (b'"output"' if responses else b'"choices"') not in body:
            raise RuntimeError(f"answer without choices/output: {body[:300]!r}")


def measure_target(url: str, headers: dict[str, str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The non-streaming c=1/c=64 points and the streaming point(s) for one target URL."""
    plan = [("c1", 1, False), ("c64", 64, False), ("stream_c1", 1, True)]
    if args.stream_c16:
        plan.append(("stream_c16", 16, True))
    points: dict[str, Any] = {}
    for key, concurrency, stream in plan:
        duration = max(args.duration, 3.0) if stream else args.duration  # ~10 streams/s at c=1
        points[key] = load.run_point(
            url, concurrency, duration, headers, stream=stream, tool=args.tool, script_dir=tmp, pin=args.pin
        )
        p = points[key]
        extra = f", TTFB p50 {p['ttfb_ms']['p50']:.3f} ms" if stream else ""
        log(
            f"  {key:<10} {p['rps']:>10,.0f} req/s  p50 {p['latency_ms']['p50']:.3f} ms  "
            f"p99 {p['latency_ms']['p99']:.3f} ms{extra}  errors {p['errors']}"
        )
    return points


def gateway_env(tmp: Path, port: int, config: Path, variant: Variant | None = None) -> dict[str, str]:
    """The gateway's environment: one worker on `port`, the models file, no auth, SQLite in `tmp`."""
    env = dict(os.environ)
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "LOG_LEVEL": "warning",
            "LLM_BACKEND_CONFIG": str(config),
            "LLM_BACKEND_AUTH": "none",
            "DATABASE_URL": f"sqlite:///{tmp}/bench.db",
            "LLM_BACKEND_DATA_DIR": str(tmp),
            "GRACEFUL_TIMEOUT": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if variant is not None:
        env.update(variant.env)
    return env


def run_variant(variant: Variant, args: argparse.Namespace, root: Path, upstream_port: int) -> dict[str, Any]:
    """Set up, migrate, start, check, measure and stop one gateway variant."""
    tmp = root / variant.name
    tmp.mkdir()
    config = write_config(tmp / "bench.yaml", args.provider, upstream_port)
    port = procs.free_port()
    ctx = VariantContext(variant.name, tmp, args.bin_dir, gateway_env(tmp, port, config, variant))
    ctx.migrated = args.no_migrate
    setup = variant.setup(ctx) if variant.setup else contextlib.nullcontext()
    gateway_log = tmp / "gateway.log"
    with setup:
        ctx.migrate()
        gunicorn = [str(args.bin_dir / "gunicorn"), "-c", "gunicorn.conf.py", "llm_backend.asgi:app"]
        cmd = shlex.split(args.gateway_cmd) if args.gateway_cmd else gunicorn
        with gateway_log.open("wb") as out:
            proc = procs.spawn(
                cmd, cpu=procs.GATEWAY_CPU if args.pin else None, env=ctx.env, stdout=out, stderr=out
            )
        try:
            try:
                procs.wait_ready(f"http://127.0.0.1:{port}/readyz", proc, args.ready_timeout)
                url = f"http://127.0.0.1:{port}{variant.path}"
                sanity(url, ctx.headers)
            except RuntimeError as exc:
                tail = gateway_log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{exc}\n--- gateway log (tail) ---\n{tail}") from None
            with procs.RssSampler(proc.pid) as rss:
                if args.warmup > 0:
                    load.run_python(url, 64, args.warmup, ctx.headers, stream=False, pin=args.pin)
                points = measure_target(url, ctx.headers, args, tmp)
            return {
                "status": "ok",
                "points": points,
                "rss": rss.summary(),
                "description": variant.description,
            }
        finally:
            procs.stop(proc, timeout=15)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if any(a == "--streams" or a.startswith("--streams=") for a in raw):
        from bench import streams  # the many-streams point runs on its own (python -m bench --streams N)

        return streams.main(raw)
    args = parse_args(argv)
    if args.list_variants:
        for v in VARIANTS:
            print(f"{v.name:<20} {v.description}  env={v.env}")
        return 0
    selected = VARIANTS
    if args.variants:
        wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = set(wanted) - {v.name for v in VARIANTS}
        if unknown:
            print(f"unknown variant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        selected = [v for v in VARIANTS if v.name in wanted]
    if args.direct_only:
        selected = []

    args.pin = not args.no_pin and procs.pinning_possible()
    if args.pin:
        os.sched_setaffinity(0, {procs.CLIENT_CPU})
    args.tool = "python" if args.loadgen == "python" else ("wrk" if load.wrk_available() else "python")
    if args.tool == "python" and args.loadgen != "python":
        if args.loadgen == "wrk":
            print(load.WRK_INSTALL_HINT, file=sys.stderr)
            return 2
        log(load.WRK_INSTALL_HINT + "; falling back to the Python load generator")
    args.bin_dir = Path(sys.executable).parent

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    started = time.time()
    out: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadgen": args.tool,
            "streaming_timer": "python (bench.loadgen)",
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "provider": args.provider,
            "pinned": args.pin,
            "stream_chunks": args.chunks,
            "stream_interval_ms": args.interval_ms,
            "gateway_cmd": args.gateway_cmd or "gunicorn -c gunicorn.conf.py llm_backend.asgi:app",
        },
        "direct": {},
        "variants": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="llmb-bench-") as root_name:
            root = Path(root_name)
            upstream, upstream_port = start_upstream(args, args.pin)
            log(f"fake upstream on :{upstream_port} (pid {upstream.pid}); load generator: {args.tool}")
            log("direct to upstream")
            out["direct"] = measure_target(f"http://127.0.0.1:{upstream_port}{CHAT_PATH}", {}, args, root)
            for variant in selected:
                reason = variant.skip() if variant.skip else None
                if reason:
                    log(f"{variant.name}: skipped ({reason})")
                    out["variants"][variant.name] = {"status": "skipped", "reason": reason}
                    continue
                log(f"{variant.name}: {variant.description}")
                try:
                    out["variants"][variant.name] = run_variant(variant, args, root, upstream_port)
                except Exception as exc:  # one broken variant must not stop the others
                    log(f"{variant.name}: ERROR {exc}")
                    out["variants"][variant.name] = {"status": "error", "reason": str(exc).splitlines()[0]}
                    out["variants"][variant.name]["detail"] = str(exc)
            procs.stop(upstream)
    except KeyboardInterrupt:
        log("interrupted: tearing down")
        procs.stop_all()
        return 130
    finally:
        procs.stop_all()

    for variant in selected:
        var = out["variants"].get(variant.name, {})
        if var.get("status") != "ok":
            continue
        base = out["variants"].get(variant.baseline or "", {})
        base_points = base.get("points") if base.get("status") == "ok" else None
        var["derived"] = report.derive(var["points"], out["direct"], var["rss"], base_points)
        var["checks"] = report.checks(
            var["points"], var["derived"], variant.baseline if base_points else None
        )
    out["meta"]["elapsed_s"] = round(time.time() - started, 1)

    print()
    print(
        f"llm-backend benchmark: loadgen {args.tool}, {args.duration:g} s per point, "
        f"provider {args.provider}, "
        f"{'pinned (gateway CPU 0; upstream + load CPU 1)' if args.pin else 'not pinned'}, "
        f"{out['meta']['elapsed_s']:g} s total"
    )
    print(report.table(out["direct"], out["variants"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nresults written to {args.json}")
    missed = [c for v in out["variants"].values() for c in v.get("checks") or [] if c["ok"] is False]
    failed = [n for n, v in out["variants"].items() if v.get("status") == "error"]
    if args.strict and (missed or failed):
        return 1
    return 0
