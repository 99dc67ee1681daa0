"""Gunicorn settings for llm-backend: uvicorn workers, long timeouts for streams, graceful shutdown."""

import multiprocessing
import os
import tempfile

host = os.environ.get("HOST", "127.0.0.1")
port = int(os.environ.get("PORT", "8080"))
bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]

workers = int(os.environ.get("WEB_CONCURRENCY", str(min(multiprocessing.cpu_count(), 4))))
# uvicorn's worker (uvloop + httptools) with deadlines for request heads and bodies, a cap on header size and
# on open connections (HEADER_TIMEOUT, BODY_TIMEOUT, MAX_HEADER_BYTES, MAX_CONNECTIONS; see llm_backend/server.py)
worker_class = "llm_backend.server.Worker"

# Streams of long completions can run for minutes: the worker timeout only guards against hung workers
# (uvicorn workers heartbeat from their event loop), and graceful_timeout bounds how long a SIGTERM waits
# for in-flight requests and the recorder's drain before the worker is killed.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "600"))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "120"))
keepalive = int(os.environ.get("KEEPALIVE", "75"))

# Per-worker resources (database engine, upstream clients, recorder) are created in the ASGI lifespan,
# after the fork, so preloading only shares the imported code.
preload_app = False

accesslog = None  # llm-backend logs one structured line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# gunicorn's and uvicorn's own lines in the app's format: with LOG_FORMAT=json every line is a JSON record
logger_class = "llm_backend.logs.GunicornLogger"
# Whose X-Forwarded-For is believed is decided by the app (TRUSTED_PROXIES), in one place: uvicorn must not
# rewrite the client address before the app sees it.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "")

# One scrape of /metrics sees the whole pod: every worker writes its metrics to files in
# PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and the worker answering a scrape sums them.
# Unset: a private directory for this master, removed when it exits. Either way emptied as the master starts
# (one directory per master: two masters sharing one would count each other's requests).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-backend-metrics-")
    os.environ["LLM_BACKEND_METRICS_DIR_PRIVATE"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

# No runtime control socket: nothing uses it, and a read-only root filesystem has nowhere to put it.
control_socket_disable = True


def on_starting(server):  # noqa: ARG001 - gunicorn's hook signature
    """Check the configuration once in the master, so mistakes stop start-up with one line each."""
    import sys

    from llm_backend.config import ConfigError, Settings
    from llm_backend.logs import report_config_error
    from llm_backend.server import ServerConfigError, ServerLimits

    from llm_backend.metrics import wipe_multiprocess_dir

    wipe_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # an earlier run's counts are not ours
    try:
        Settings.from_env()
        ServerLimits.from_env()
    except ConfigError as exc:
        report_config_error(exc.problems)  # every problem, one line each (JSON under LOG_FORMAT=json)
        sys.exit(2)
    except ServerConfigError as exc:
        report_config_error([str(exc)])
        sys.exit(2)


def child_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    """A worker ended: drop its live gauges (in flight, backlog) from the metrics; its counters stay summed."""
    from llm_backend.metrics import worker_exited

    worker_exited(worker.pid)


def on_exit(server):  # noqa: ARG001 - gunicorn's hook signature
    """Remove the private metrics directory (an operator's PROMETHEUS_MULTIPROC_DIR stays)."""
    import shutil

    private = os.environ.get("LLM_BACKEND_METRICS_DIR_PRIVATE")
    if private and private == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(private, ignore_errors=True)
