"""Opt-in OpenTelemetry tracing: on only when the standard OTEL_* variables ask for it, and then loaded.

Nothing of OpenTelemetry is imported unless tracing is on (`llm_backend.tracing.otel` holds all of it);
with it off, the request path sees `None` where a tracer would be, and that is all it pays.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: The variable the OpenTelemetry GenAI instrumentations read to put prompts and completions in spans.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Our bound on each captured content attribute (gen_ai.input.messages, gen_ai.output.messages), in characters.
CONTENT_MAX_ENV = "LLM_BACKEND_OTEL_CONTENT_MAX_CHARS"
DEFAULT_CONTENT_MAX = 16_384
DEFAULT_SERVICE_NAME = "llm-backend"
_EXPORTERS = ("otlp", "console")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the environment asks of tracing (the SDK reads the rest of OTEL_* itself)."""

    exporters: tuple[str, ...]  # otlp | console
    capture_content: bool = False
    content_max_chars: int = DEFAULT_CONTENT_MAX


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def tracing_config(environ: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The tracing the environment asks for; None when it asks for none.

    On when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or
    `OTEL_TRACES_EXPORTER` names `otlp` or `console`; off when `OTEL_SDK_DISABLED=true` or
    `OTEL_TRACES_EXPORTER=none`, whatever else is set (as the SDK's own configuration does)."""
    env = os.environ if environ is None else environ
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return None
    named = [e.strip().lower() for e in (env.get("OTEL_TRACES_EXPORTER") or "").split(",") if e.strip()]
    if "none" in named:
        return None
    unknown = [e for e in named if e not in _EXPORTERS]
    if unknown:
        logger.warning(
            "OTEL_TRACES_EXPORTER names exporters this server does not ship (%s); it exports with: %s",
            ", ".join(unknown),
            ", ".join(_EXPORTERS),
        )
    exporters = tuple(e for e in named if e in _EXPORTERS)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporters:
        if not endpoint:
            return None
        exporters = ("otlp",)
    capture = (env.get(CAPTURE_CONTENT_ENV) or "").strip().lower()
    try:
        limit = int(env.get(CONTENT_MAX_ENV) or DEFAULT_CONTENT_MAX)
    except ValueError:
        logger.warning("%s is not a whole number; using %d", CONTENT_MAX_ENV, DEFAULT_CONTENT_MAX)
        limit = DEFAULT_CONTENT_MAX
    return TracingConfig(
        exporters=exporters,
        # `true`, or the newer instrumentations' values that put content on spans
        capture_content=_true(capture) or capture in ("span_only", "span_and_event"),
        content_max_chars=max(256, limit),
    )


async def start_tracing(stack: contextlib.AsyncExitStack, environ: Mapping[str, str] | None = None) -> Any:
    """Set tracing up for this worker (after the fork), flushed and shut down when `stack` closes.

    Returns the tracer the services hold (llm_backend.tracing.otel.Tracer), or None when tracing is off
    (then nothing of OpenTelemetry has been imported)."""
    config = tracing_config(environ)
    if config is None:
        return None
    from llm_backend.tracing.otel import Tracer

    tracer = Tracer.from_config(config)
    stack.push_async_callback(tracer.shutdown)
    logger.info(
        "tracing on: exporting spans with %s%s",
        ", ".join(config.exporters),
        "; message content captured" if config.capture_content else "",
    )
    return tracer
