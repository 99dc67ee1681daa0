"""Runs one load point with wrk (preferred) or the Python load generator, in a separate pinned process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench.loadgen import request_body
from bench.procs import CLIENT_CPU, spawn

WRK_INSTALL_HINT = "wrk not found: install it for honest numbers (Debian/Ubuntu: apt-get install wrk)"

_LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def lua_quote(text: str) -> str:
    """A Lua long-bracket string literal that cannot be closed by ``text``."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def wrk_script(path: Path, headers: dict[str, str], url: str = "/v1/chat/completions") -> Path:
    """Write the wrk Lua script posting the non-streaming body for ``url`` with ``headers``."""
    body = request_body(stream=False, path=urlsplit(url).path)
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_quote(body.decode())}"]
    all_headers = {"Content-Type": "application/json", "Authorization": "Bearer bench", **headers}
    lines += [f"wrk.headers[ {lua_quote(k)} ] = {lua_quote(v)}" for k, v in all_headers.items()]
    path.write_text("\n".join(lines) + "\n" + _LUA_DONE)
    return path


def wrk_available() -> bool:
    """True when a wrk binary is on PATH."""
    return shutil.which("wrk") is not None


def _cpu(pin: bool) -> int | None:
    return CLIENT_CPU if pin else None


def _communicate(proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError("load generator did not finish in time") from None
    return out.decode(errors="replace"), err.decode(errors="replace")


def run_wrk(
    url: str, concurrency: int, duration: float, headers: dict[str, str], script_dir: Path, pin: bool
) -> dict[str, object]:
    """One wrk run (one thread: it shares a core with the upstream); returns the normalized result."""
    script = wrk_script(script_dir / "bench.lua", headers, url)
    secs = max(1, round(duration))
    args = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{secs}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
    ]
    proc = spawn([*args, url], cpu=_cpu(pin), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _communicate(proc, timeout=secs + 30)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}): {(err or out).strip()[-500:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    elapsed = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    ok = raw["requests"] - raw["status"]  # wrk counts non-2xx/3xx answers in errors.status
    return {
        "tool": "wrk",
        "concurrency": concurrency,
        "duration_s": elapsed,
        "requests": raw["requests"],
        "rps": ok / elapsed if elapsed else 0.0,
        "errors": raw["status"] + socket_errors,
        "non_2xx": raw["status"],
        "socket_errors": socket_errors,
        "latency_ms": {
            "p50": raw["p50_us"] / 1000,
            "p90": raw["p90_us"] / 1000,
            "p99": raw["p99_us"] / 1000,
            "max": raw["max_us"] / 1000,
            "mean": raw["mean_us"] / 1000,
        },
    }


def run_python(
    url: str, concurrency: int, duration: float, headers: dict[str, str], stream: bool, pin: bool
) -> dict[str, object]:
    """One run of ``bench.loadgen`` in its own process."""
    args = [sys.executable, "-m", "bench.loadgen", "--url", url, "-c", str(concurrency), "-d", str(duration)]
    if stream:
        args.append("--stream")
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    proc = spawn(args, cpu=_cpu(pin), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _communicate(proc, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed (exit {proc.returncode}): {err.strip()[-500:]}")
    result: dict[str, object] = json.loads(out)
    return result


def run_point(
    url: str,
    concurrency: int,
    duration: float,
    headers: dict[str, str],
    *,
    stream: bool,
    tool: str,
    script_dir: Path,
    pin: bool,
) -> dict[str, object]:
    """Non-streaming points use ``tool`` (wrk or python); streaming points always use the Python timer."""
    if not stream and tool == "wrk":
        return run_wrk(url, concurrency, duration, headers, script_dir, pin)
    return run_python(url, concurrency, duration, headers, stream, pin)
