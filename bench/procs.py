"""Child processes for the benchmark: pinning, process groups, teardown, readiness and RSS sampling."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_children: list[subprocess.Popen[bytes]] = []

# CPU layout on a 2-core machine: the gateway (gunicorn master and its worker, which inherits the
# affinity) gets CPU 0 to itself; the fake upstream, the load generator and this orchestrator share CPU 1.
GATEWAY_CPU = 0
CLIENT_CPU = 1


def pinning_possible() -> bool:
    """True when CPUs 0 and 1 are both usable by this process."""
    try:
        return {GATEWAY_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False


def _preexec(cpu: int | None) -> Callable[[], None]:
    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        with contextlib.suppress(Exception):  # Linux: die with the benchmark even if it is SIGKILLed
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def spawn(
    args: Sequence[str],
    *,
    cpu: int | None = None,
    env: dict[str, str] | None = None,
    stdout: int | object = subprocess.DEVNULL,
    stderr: int | object = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start a child in its own process group (so it and its children can be torn down together)."""
    proc = subprocess.Popen(
        list(args),
        cwd=cwd,
        env=env,
        stdout=stdout,  # type: ignore[arg-type]
        stderr=stderr,  # type: ignore[arg-type]
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_preexec(cpu),
        pass_fds=tuple(pass_fds),
    )
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it does not exit within ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Also reap stragglers left in the group (e.g. a gunicorn worker whose master already exited).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    """Tear down every child still running, newest first."""
    for proc in reversed(list(_children)):
        stop(proc, timeout=5)


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get_status(url: str, timeout: float = 2.0) -> int:
    """Status code of a GET, 0 if the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} was ready")
        status = http_get_status(url, timeout=1.0)
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s (last status {status or 'no answer'})")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
    return found


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/<pid>/status; 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class RssSampler:
    """Samples VmRSS of the gateway's worker processes (children of the master) in a thread."""

    def __init__(self, master_pid: int, interval: float = 0.2) -> None:
        self.master_pid = master_pid
        self.interval = interval
        self.peak_kb: dict[int, int] = {}
        self.last_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def worker_pids(self) -> list[int]:
        # gunicorn: the workers are the master's children; a single-process server is measured itself.
        return children_of(self.master_pid) or [self.master_pid]

    def sample(self) -> None:
        for pid in self.worker_pids():
            rss = status_kb(pid, "VmRSS")
            hwm = status_kb(pid, "VmHWM")
            if rss:
                self.last_kb[pid] = rss
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), rss, hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, object]:
        """Peak and last RSS in MB of the largest worker."""
        peak = max(self.peak_kb.values(), default=0)
        last = max(self.last_kb.values(), default=0)
        return {
            "worker_pids": sorted(self.peak_kb),
            "rss_peak_mb": round(peak / 1024, 1) if peak else None,
            "rss_end_mb": round(last / 1024, 1) if last else None,
        }
