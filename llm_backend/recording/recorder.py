"""The write-behind recorder: a bounded in-memory queue, batched database writes, a spill file for outages."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from llm_backend.recording.records import RequestRecord
from llm_backend.recording.sink import BatchResult, record_from_json, record_to_json, write_batch
from llm_backend.recording.spill import SpillFile, SpillFileBusy, append_detached

logger = logging.getLogger(__name__)

EngineSource = Engine | Callable[[], Engine]
STILL_SPILLING_LOG_INTERVAL = 30.0


def _line(record: RequestRecord) -> bytes:
    return (record_to_json(record) + "\n").encode("utf-8")


class Recorder:
    """Hands request records to the database without ever slowing or failing the request that made them.

    `submit` only appends to an in-memory deque. A background task (started in the ASGI lifespan, after
    gunicorn forks) writes batches of up to `batch_size` records, at most `flush_interval` seconds after
    the first one arrived, each in one transaction, in a worker thread. When a batch fails (database down
    or locked, schema behind) or the buffer holds `max_buffer` records, records go to the append-only
    spill file (fsync'd); while the file holds records, newer ones are queued behind them, and every
    `retry_interval` seconds the file is replayed in order, idempotently on request_id, then truncated.
    A spill file left by an earlier process is replayed after `start`. `stop` drains everything to the
    database or, failing that, to the spill file. Records the database refuses for a data reason (after
    being retried one by one) are appended to `<spill_path>.rejected` and logged as errors.

    Each process needs its own spill file: the file is locked while in use, and a process that finds
    `spill_path` taken (another gunicorn worker) uses `<stem>.<pid><suffix>` next to it. At start, a
    recorder adopts the spill files of processes that are gone, so nothing waits for a pid to come back.

    `engine_factory_or_engine` is an Engine or a callable returning one; a callable is called for every
    batch (return a shared engine from it), which lets the engine be replaced while the recorder runs.
    """

    def __init__(
        self,
        engine_factory_or_engine: EngineSource,
        *,
        batch_size: int = 200,
        flush_interval: float = 0.2,
        max_buffer: int = 10_000,
        spill_path: Path,
        record_content: bool = True,
        retry_interval: float = 1.0,
    ) -> None:
        if isinstance(engine_factory_or_engine, Engine):
            engine = engine_factory_or_engine
            self._engine_factory: Callable[[], Engine] = lambda: engine
        else:
            self._engine_factory = engine_factory_or_engine
        self.batch_size = max(1, batch_size)
        self.flush_interval = max(0.0, flush_interval)
        self.max_buffer = max(1, max_buffer)
        self.record_content = record_content
        self.retry_interval = max(0.01, retry_interval)
        self.spill_path = Path(spill_path)
        self.rejected_path = self.spill_path.with_name(self.spill_path.name + ".rejected")
        self._spill = SpillFile(self.spill_path)
        self._buffer: collections.deque[RequestRecord] = collections.deque()
        self._inflight: list[RequestRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._records_event: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._written = 0
        self._failed_batches = 0
        self._rejected = 0
        self._last_error: str | None = None
        self._spilling_since: float | None = None
        self._last_spill_log = 0.0

    # -- the hot path ---------------------------------------------------------------------------------------

    def submit(self, record: RequestRecord) -> None:
        """Queue a record. Never blocks on the database, never raises."""
        try:
            if self._closed:
                # Past stop(): the file keeps it for the next process to replay.
                self._spill_records([record], reason="recorder stopped")
                return
            if len(self._buffer) >= self.max_buffer:
                # Full: the oldest queued record goes to the spill file, so the file stays oldest-first.
                self._spill_records([self._buffer[0]], reason="buffer full")
                self._buffer.popleft()
            self._buffer.append(record)
            self._wake()
        except Exception:
            logger.exception("recorder: could not queue request %s", getattr(record, "request_id", "?"))
            try:
                self._buffer.append(record)
            except Exception:
                logger.error("recorder: lost request record %r", record)

    def _wake(self) -> None:
        event, loop = self._records_event, self._loop
        if event is None or loop is None or event.is_set():
            return
        # Wake the writer for the first record of a batch and for a full one, not for each record in
        # between: it is waiting out the flush interval then, and each wake-up costs the serving loop.
        queued = len(self._buffer)
        if 1 < queued < self.batch_size:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is loop:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: the record waits for stop() (or the next start)
            logger.debug("recorder: event loop closed; record queued without wake-up")

    def _spill_records(self, records: list[RequestRecord], *, reason: str) -> None:
        """Append to the spill file now (flushed to the OS; the background task fsyncs)."""
        lines = [_line(r) for r in records]
        if self._closed:
            append_detached(self._spill.path, lines)
            logger.warning(
                "recorder stopped: %d records appended to %s for the next start", len(lines), self._spill.path
            )
            return
        if not self._spill.is_open:
            self._open_spill()
        before = self._spill.count
        self._spill.append(lines)
        self._note_spilling(reason, started=before == 0)

    def _note_spilling(self, reason: str, *, started: bool) -> None:
        now = time.monotonic()
        if self._spilling_since is None:
            self._spilling_since = now
            started = True
        if started or now - self._last_spill_log >= STILL_SPILLING_LOG_INTERVAL:
            self._last_spill_log = now
            logger.warning(
                "recorder spilling to %s (%s): pending=%d spilled=%d last_error=%s",
                self._spill.path,
                reason,
                self.pending,
                self._spill.count,
                self._last_error,
            )

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spill file (replaying what an earlier process left) and start the background task."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._records_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        leftover = await asyncio.to_thread(self._open_spill)
        leftover += await asyncio.to_thread(self._adopt_orphans)
        if leftover:
            logger.warning(
                "recorder: %d records spilled by an earlier run in %s; replaying them first",
                leftover,
                self._spill.path,
            )
        self._task = asyncio.create_task(self._run(), name="llm-backend-recorder")
        if self._buffer:
            self._records_event.set()

    async def stop(self, timeout: float = 30) -> None:  # noqa: ASYNC109 (the drain deadline)
        """Write everything queued to the database (or, if it cannot take it in time, to the spill file)."""
        if self._closed:
            return
        if self._task is None:
            await self.start()
        assert self._task is not None and self._stop_event is not None
        self._stopping = True
        self._stop_event.set()
        if self._records_event is not None:
            self._records_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            logger.warning("recorder: drain did not finish in %.1fs; spilling the rest", timeout)
            self._task.cancel()
        except Exception:
            logger.exception("recorder: background task failed; spilling the rest")
        if not self._task.done():
            try:
                await self._task
            except BaseException:  # cancelled (or failed): whatever is left in memory is spilled below
                pass
        leftover = [*self._inflight, *self._buffer]
        self._inflight = []
        self._buffer.clear()
        if leftover:
            self._spill_records(leftover, reason="shutdown")
        self._spill.close()
        self._closed = True
        if self._spill.count:
            logger.warning(
                "recorder stopped with %d records in %s; the next start replays them",
                self._spill.count,
                self._spill.path,
            )
        else:
            logger.info("recorder stopped: all records written (%d this run)", self._written)

    def _open_spill(self) -> int:
        """Open (and lock) this process's spill file; returns the records found in it."""
        if self._spill.is_open:
            return 0
        stem, suffix = self.spill_path.stem, self.spill_path.suffix
        pid = os.getpid()
        for name in (
            self.spill_path.name,
            f"{stem}.{pid}{suffix}",
            f"{stem}.{pid}-{secrets.token_hex(4)}{suffix}",
        ):
            spill = SpillFile(self.spill_path.with_name(name))
            try:
                found = spill.open()
            except SpillFileBusy:
                continue
            self._spill = spill
            return found
        raise SpillFileBusy(f"no free spill file next to {self.spill_path}")

    def _adopt_orphans(self) -> int:
        """Take over the spill files of processes that are gone (unlocked siblings of ours)."""
        stem, suffix = self.spill_path.stem, self.spill_path.suffix
        sibling = re.compile(rf"^{re.escape(stem)}(\.[0-9]+(-[0-9a-f]+)?)?{re.escape(suffix)}$")
        adopted = 0
        directory = self.spill_path.parent
        if not directory.is_dir():
            return 0
        for path in sorted(directory.iterdir()):
            if path == self._spill.path or not sibling.match(path.name) or not path.is_file():
                continue
            taken = self._spill.adopt(path)
            if taken:
                logger.warning(
                    "recorder: adopted %d spilled records of a stopped process from %s", taken, path
                )
            adopted += taken
        return adopted

    # -- observability --------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._inflight)

    def stats(self) -> dict[str, Any]:
        """pending (in memory), spilled (in the spill file, not yet replayed), written, failed_batches,
        rejected, last_error."""
        return {
            "pending": self.pending,
            "spilled": self._spill.count,
            "written": self._written,
            "failed_batches": self._failed_batches,
            "rejected": self._rejected,
            "last_error": self._last_error,
        }

    # -- the background task --------------------------------------------------------------------------------

    async def _wait(self, delay: float | None, *, for_records: bool, queued: int = 0) -> None:
        """Sleep `delay` seconds (None: no limit) or until stop or (if `for_records`) the buffer holds more
        than `queued` records."""
        assert self._records_event is not None and self._stop_event is not None
        if for_records:
            self._records_event.clear()
            if len(self._buffer) > queued:
                return
        events = [self._stop_event.wait()]
        if for_records:
            events.append(self._records_event.wait())
        tasks = [asyncio.ensure_future(e) for e in events]
        try:
            await asyncio.wait(tasks, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def _run(self) -> None:
        next_retry = 0.0
        while True:
            try:
                if self._spill.dirty:
                    await asyncio.to_thread(self._spill.sync)
                if self._spill.count:
                    # Spilling: newer records queue up behind the file, which is replayed in order.
                    if self._buffer:
                        self._move_buffer_to_spill()
                        continue
                    now = time.monotonic()
                    if now >= next_retry or self._stopping:
                        if await self._replay_chunk():
                            await asyncio.sleep(0)
                        else:
                            if self._stopping:
                                return  # the database is still down: the file keeps everything
                            next_retry = time.monotonic() + self.retry_interval
                        continue
                    await self._wait(min(next_retry - now, max(self.flush_interval, 0.01)), for_records=False)
                    continue
                if not self._buffer:
                    if self._stopping:
                        return
                    await self._wait(None, for_records=True)
                    continue
                if len(self._buffer) < self.batch_size and not self._stopping:
                    deadline = time.monotonic() + self.flush_interval
                    while len(self._buffer) < self.batch_size and not self._stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        await self._wait(remaining, for_records=True, queued=len(self._buffer))
                await self._write_from_buffer()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the recorder die: note it, back off, go on
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("recorder: unexpected error in the background task")
                if self._inflight:  # put an unfinished batch back at the head of the queue
                    self._buffer.extendleft(reversed(self._inflight))
                    self._inflight = []
                await asyncio.sleep(self.retry_interval)

    def _move_buffer_to_spill(self) -> None:
        count = min(len(self._buffer), self.batch_size * 10)
        self._spill_records(
            list(itertools.islice(self._buffer, count)), reason="queued behind spilled records"
        )
        for _ in range(count):
            self._buffer.popleft()

    async def _write_from_buffer(self) -> None:
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.batch_size))]
        self._inflight = batch
        mark = self._spill.size() if self._spill.is_open else 0
        # If cancelled mid-write (stop timed out), the batch stays in _inflight and stop() spills it.
        result = await self._write(batch)
        if result is None:
            # Keep order: the failed batch goes before anything that overflowed while it was in flight.
            if not self._spill.is_open:
                self._open_spill()
            started = self._spill.count == 0
            self._spill.insert_at(mark, [_line(r) for r in batch])
            self._note_spilling("database write failed", started=started)
            await asyncio.to_thread(self._spill.sync)
        self._inflight = []

    async def _write(self, records: list[RequestRecord]) -> BatchResult | None:
        """Write one batch in a worker thread; None when the database could not take it."""
        try:
            result = await asyncio.to_thread(self._write_sync, records)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed_batches += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            logger.debug("recorder: batch of %d failed", len(records), exc_info=True)
            return None
        self._written += result.written
        if result.rejected:
            await asyncio.to_thread(self._reject, [(_line(r), why) for r, why in result.rejected])
        return result

    def _write_sync(self, records: list[RequestRecord]) -> BatchResult:
        return write_batch(self._engine_factory(), records, record_content=self.record_content)

    async def _replay_chunk(self) -> bool:
        """Replay the next chunk of the spill file; False when the database could not take it."""
        lines, end = self._spill.read_chunk(self.batch_size)
        records: list[RequestRecord] = []
        bad: list[tuple[bytes, str]] = []
        for line in lines:
            try:
                records.append(record_from_json(line))
            except Exception as exc:
                bad.append((line, f"unreadable spilled record: {type(exc).__name__}: {exc}"))
        if records and await self._write(records) is None:
            return False
        if bad:
            await asyncio.to_thread(self._reject, bad)
        emptied = self._spill.advance(end, len(lines))
        if emptied:
            took = time.monotonic() - (self._spilling_since or time.monotonic())
            self._spilling_since = None
            logger.warning(
                "recorder recovered: spill file replayed into the database (%.1fs after spilling began): "
                "pending=%d spilled=0",
                took,
                self.pending,
            )
        return True

    def _reject(self, items: list[tuple[bytes, str]]) -> None:
        """Keep records the database refused in `<spill>.rejected` (never dropped silently)."""
        self._rejected += len(items)
        for _, why in items:
            logger.error("recorder: record refused by the database, kept in %s: %s", self.rejected_path, why)
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line, _ in items)
        with self.rejected_path.open("ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
