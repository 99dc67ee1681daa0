"""Logging set-up: one structured line per event, JSON or text by LOG_FORMAT, level by LOG_LEVEL.

With LOG_FORMAT=json every line the server writes is a JSON object: the app's records, gunicorn's and
uvicorn's own (through `GunicornLogger`, gunicorn.conf.py's `logger_class`), warnings, uncaught exceptions
and, as a last resort, anything a library prints to stdout or stderr (`JsonLines`)."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# connexion.security logs one line per refused key, which a flood of junk would turn into a flood of lines
_QUIET = (
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "openai",
    "uvicorn.access",
    "alembic",
    "azure",
    "connexion.security",
)
logger = logging.getLogger(__name__)


def wants_json(environ: Any = None) -> bool:
    """Whether LOG_FORMAT asks for JSON lines (read here too, before Settings exist or when they fail)."""
    env = os.environ if environ is None else environ
    return str(env.get("LOG_FORMAT", "")).strip().lower() == "json"


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object; `extra={...}` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(data, default=str).decode()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """Control characters as escapes: what a client sent (a path with %0A, a model name) cannot start a
    forged line of its own or hide in the log."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """Human-readable lines; `extra` fields appended as key=value. One record is one line (control characters
    escaped), followed only by its traceback, if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _printable(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extras = [
            f"{k}={_printable(str(v))}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        ]
        if extras:
            line = f"{line} {' '.join(extras)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonLines(io.TextIOBase):
    """A stdout/stderr stand-in for JSON mode: a line that is already a JSON object passes through, any
    other line (a library's print, a traceback printed by hand) becomes one JSON record of its own.

    Log handlers write to the real stream (`raw`), so only stray output takes this detour."""

    def __init__(self, raw: TextIO, name: str, level: str) -> None:
        self.raw = raw
        self.name = name
        self.level = level
        self._partial = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.raw, "encoding", "utf-8"))

    @property
    def buffer(self) -> Any:  # bytes written there bypass the wrapping; rare, and better than a crash
        return self.raw.buffer

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            self._emit(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._emit([self._partial])
                self._partial = ""
        self.raw.flush()

    def _emit(self, lines: list[str]) -> None:
        out = []
        for line in lines:
            if not line.strip():
                continue
            if line.startswith("{") and line.rstrip().endswith("}"):
                out.append(line)
                continue
            record = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "level": self.level,
                "logger": self.name,
                "message": line.rstrip(),
                "pid": os.getpid(),
            }
            out.append(orjson.dumps(record).decode())
        if out:  # stray output is rare: flush each time, as a worker may end with os._exit
            self.raw.write("\n".join(out) + "\n")
            self.raw.flush()


def raw_stream(stream: Any) -> Any:
    """The real stream under a `JsonLines` (log handlers write there directly)."""
    return stream.raw if isinstance(stream, JsonLines) else stream


def _log_uncaught(exc_type: Any, exc: Any, tb: Any, *, thread: str | None = None) -> None:
    where = f" in thread {thread}" if thread else ""
    logging.getLogger("llm_backend").critical(
        "uncaught %s%s: %s", exc_type.__name__, where, exc, exc_info=(exc_type, exc, tb)
    )


def _thread_hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    _log_uncaught(
        args.exc_type, args.exc_value, args.exc_traceback, thread=getattr(args.thread, "name", None)
    )


def _unraisable_hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    logging.getLogger("llm_backend").error(
        "%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object, exc_info=exc
    )


def capture_stray_output() -> None:
    """JSON mode: warnings, uncaught exceptions (main and threads) and stray prints become JSON lines."""
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _thread_hook
    sys.unraisablehook = _unraisable_hook
    if not isinstance(sys.stdout, JsonLines) and sys.stdout is not None:
        sys.stdout = JsonLines(sys.stdout, "stdout", "info")
    if not isinstance(sys.stderr, JsonLines) and sys.stderr is not None:
        sys.stderr = JsonLines(sys.stderr, "stderr", "error")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(raw_stream(sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_llm_backend", False):
            root.removeHandler(h)
    handler._llm_backend = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if level in logging._nameToLevel else "INFO")
    # the SDK's and HTTP clients' request logs would repeat what our access line says (and headers)
    for noisy in _QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_config_error(problems: Sequence[str], *, stream: TextIO | None = None) -> None:
    """Start-up configuration problems, one line each: JSON records under LOG_FORMAT=json, else text."""
    out = raw_stream(stream or sys.stderr)
    if wants_json():
        formatter = JsonFormatter()
        for problem in problems:
            record = logging.LogRecord(
                "llm_backend.config", logging.ERROR, __file__, 0, "%s", (problem,), None
            )
            record.event = "configuration_error"
            out.write(formatter.format(record) + "\n")
    else:
        for problem in problems:
            out.write(f"llm-backend: configuration error: {problem}\n")
        if len(problems) > 1:
            out.write(f"llm-backend: {len(problems)} configuration errors; fix them all before starting\n")
    out.flush()


def _gunicorn_logger_class() -> type:
    from gunicorn.glogging import Logger

    class GunicornLogger(Logger):  # type: ignore[misc]
        """gunicorn's logger (master and workers, and uvicorn's error logger, which shares its handlers)
        in our format: under LOG_FORMAT=json its lines are JSON records like the app's, stray output too."""

        def setup(self, cfg: Any) -> None:
            json_mode = wants_json()
            if json_mode:  # gunicorn's handlers must write to the real streams, not through JsonLines
                sys.stdout, sys.stderr = raw_stream(sys.stdout), raw_stream(sys.stderr)
            super().setup(cfg)
            if not json_mode:
                return
            formatter = JsonFormatter()
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(formatter)
            configure_logging(str(cfg.loglevel).upper(), "json")
            capture_stray_output()

    return GunicornLogger


def __getattr__(name: str) -> Any:
    """`llm_backend.logs.GunicornLogger` (gunicorn.conf.py's logger_class), built on first use so that
    importing this module (the CLI, the app) does not import gunicorn."""
    if name == "GunicornLogger":
        cls = _gunicorn_logger_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
