"""Per-worker storage wiring: the database engine, the schema readiness check and the recorder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from llm_backend.config import Settings

logger = logging.getLogger(__name__)


class SchemaCheck:
    """Readiness of the database schema, cached for a few seconds (one query per probe at most)."""

    def __init__(self, engine: Any, ttl: float = 5.0) -> None:
        self.engine = engine
        self.ttl = ttl
        self._at = 0.0
        self._value: tuple[bool, str] = (False, "not checked yet")

    async def __call__(self) -> tuple[str, bool, str]:
        now = time.monotonic()
        if now - self._at > self.ttl or not self._value[0]:
            from llm_backend.db.schema import schema_status

            self._value = await asyncio.to_thread(schema_status, self.engine)
            self._at = now
        return "database", self._value[0], self._value[1]


async def setup_storage(settings: Settings, resources: Any, stack: contextlib.AsyncExitStack) -> None:
    from llm_backend.db.session import make_engine

    engine = make_engine(
        settings.database_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
        pool_timeout_s=settings.db_pool_timeout_s,
    )
    stack.callback(engine.dispose)
    resources.engine = engine
    check = SchemaCheck(engine)
    resources.extra_checks.append(check)
    _, ok, message = await check()
    if not ok:
        logger.error("database not ready: %s", message)
    if not settings.recording:
        logger.warning("LLM_BACKEND_RECORDING=false: requests are not recorded")
        return
    from llm_backend.recording.recorder import Recorder

    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # never a reason not to start: the recorder runs memory-only and says so
        logger.error("recorder: data directory %s cannot be created (%s)", data_dir, exc)
    # the recorder gives each worker its own journal beside this one and replays those of workers that died
    spill = data_dir / "recorder-spill.jsonl"
    # Batches of up to 500 rows at most a quarter second apart: few transactions under load, and rows
    # still land well within a second.
    recorder = Recorder(
        engine,
        spill_path=spill,
        record_content=settings.record_content,
        batch_size=500,
        flush_interval=0.25,
        journal=settings.recorder_journal,
        max_memory_records=settings.recorder_max_memory_records,
    )
    await recorder.start()
    stack.push_async_callback(recorder.stop)
    resources.recorder = recorder
    resources.extra_checks.append(RecorderCheck(recorder))
    resources.metrics.gauge(
        "llm_backend_recorder_pending", "Records queued in memory, not yet written.", lambda: recorder.pending
    )
    resources.metrics.gauge(
        "llm_backend_recorder_spilled",
        "Records in the journal (spill file) waiting for the database.",
        lambda: recorder.stats()["spilled"],
    )
    resources.metrics.gauge(
        "llm_backend_recorder_written", "Records written this run.", lambda: recorder.stats()["written"]
    )
    resources.metrics.gauge(
        "llm_backend_recorder_memory_only",
        "Records held only in memory because the journal (spill file) cannot be written.",
        lambda: recorder.health()["memory_only"],
    )
    resources.metrics.gauge(
        "llm_backend_recorder_dropped",
        "Records dropped this run: the memory bound was reached while neither the database nor the journal "
        "could take them (stays 0 otherwise).",
        lambda: recorder.health()["dropped"],
    )
    resources.metrics.gauge(
        "llm_backend_recorder_journal_ok",
        "1 when the recorder's journal can be written, 0 when records are kept in memory only.",
        lambda: 1.0 if recorder.health()["journal_ok"] else 0.0,
    )


class RecorderCheck:
    """Readiness of the recorder: always ready (serving goes on), with `degraded: ...` in the message when
    records are only in memory, were dropped, or wait in the journal for the database.

    Not a 503: a full disk or a database outage hits every replica at once, and taking them all out of
    service would turn a recording problem into an outage; the metrics and the log carry the alarm."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    async def __call__(self) -> tuple[str, bool, str]:
        health = self.recorder.health()
        degraded = health["degraded"]
        return "recorder", True, f"degraded: {degraded}" if degraded else "ok"
