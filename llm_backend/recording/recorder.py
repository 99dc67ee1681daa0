"""The write-behind recorder: a bounded in-memory queue, batched database writes, a per-process journal."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.engine import Engine

from llm_backend.logthrottle import LogThrottle
from llm_backend.recording.journal import PROVISIONAL_PREFIX, Journal, JournalBusy, append_detached
from llm_backend.recording.records import RequestRecord
from llm_backend.recording.sink import BatchResult, record_from_json, record_to_json, write_batch

logger = logging.getLogger(__name__)

EngineSource = Engine | Callable[[], Engine]
STILL_SPILLING_LOG_INTERVAL = 60.0
ADOPT_INTERVAL = 30.0  # how often a running recorder looks for journals of processes that died
IDLE_WAKEUP = 5.0  # an idle writer still looks after the journal this often
MAX_OPEN_ENTRIES = 100_000  # provisional entries tracked at once (a bound, far above any concurrency)

Entry = tuple[RequestRecord, int | None]  # a record in memory and where the journal has it (None: nowhere)


def _line(record: RequestRecord) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a value orjson refuses (a huge integer, a lone surrogate): the forgiving encoder
        return (record_to_json(record) + "\n").encode("utf-8", "replace")


def _provisional_line(record: RequestRecord) -> bytes:
    return PROVISIONAL_PREFIX + _line(record)[1:]


def _summary(record: RequestRecord) -> str:
    """A record without its content, for a log line (when nothing else can keep it)."""
    u = record.usage
    return (
        f"request_id={record.request_id} created_at={record.created_at.isoformat()} route={record.route} "
        f"model={record.model or record.model_requested} key_id={record.key_id} outcome={record.outcome} "
        f"status={record.status_code} prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
        f"total_tokens={u.total_tokens} estimated={u.estimated}"
    )


class Recorder:
    """Hands request records to the database without ever slowing or failing the request that made them.

    `submit` appends the record to this process's journal (one `write()`: from then on it survives the
    process being killed) and to an in-memory deque. `started` journals a provisional record when the
    upstream is asked (and again as a stream goes on), so a process that dies mid-request still leaves a
    row for it (outcome `interrupted`, tokens estimated). A background task (started in the ASGI lifespan,
    after gunicorn forks) writes batches of up to `batch_size` records, at most `flush_interval` seconds
    after the first one arrived, each in one transaction, in a worker thread; once written, the journal
    is compacted (only what is still unwritten or in flight stays), so it stays small.

    When a batch fails (database down or locked, schema behind) or the deque holds `max_buffer` records,
    the journal becomes the queue: records leave memory (the journal has them, fsync'd while it is the only
    copy), newer ones queue behind them, and every `retry_interval` seconds the journal is replayed in
    order, idempotently on request_id. When the journal cannot be written (disk full, directory gone or
    read-only), records stay in memory, up to `max_memory_records`, and go straight to the database when
    it is back; past that bound the oldest are dropped, counted and logged (`health()`). A journal that
    cannot be opened never stops the recorder from starting: it runs memory-only and retries. `stop`
    drains everything to the database or says where it kept what it could not write. Records the
    database refuses for a data reason are appended to `<spill_path>.rejected` and logged as errors.

    Each process has its own journal: the file is locked while in use, and a process that finds
    `spill_path` taken (another gunicorn worker) uses `<stem>.<pid><suffix>` next to it. At start and
    every `ADOPT_INTERVAL` seconds, a recorder adopts the journals of processes that are gone.

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
        max_memory_records: int = 50_000,
        spill_path: Path,
        record_content: bool = True,
        retry_interval: float = 1.0,
        journal: bool = True,
        compact_bytes: int = 4 << 20,
        fallback_dir: Path | None = None,
    ) -> None:
        if isinstance(engine_factory_or_engine, Engine):
            engine = engine_factory_or_engine
            self._engine_factory: Callable[[], Engine] = lambda: engine
        else:
            self._engine_factory = engine_factory_or_engine
        self.batch_size = max(1, batch_size)
        self.flush_interval = max(0.0, flush_interval)
        self.max_buffer = max(1, max_buffer)
        self.max_memory_records = max(self.max_buffer, max_memory_records)
        self.record_content = record_content
        self.retry_interval = max(0.01, retry_interval)
        self.spill_path = Path(spill_path)
        self.rejected_path = self.spill_path.with_name(self.spill_path.name + ".rejected")
        self.journal_enabled = journal
        self.compact_bytes = max(1, compact_bytes)
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else Path(tempfile.gettempdir())
        self._journal = Journal(self.spill_path)
        self._journaling = False  # finished and provisional records go to the journal as they come
        self._journal_error: str | None = None
        self._journal_retry_at = 0.0
        self._open: dict[str, tuple[int, bytes]] = {}  # request id -> (offset, line) of provisional entries
        self._open_bytes = 0  # the length of those lines together
        self._buffer: collections.deque[Entry] = collections.deque()
        self._inflight: list[Entry] = []
        self._spill_from: int | None = None  # the journal is the queue from this offset on
        self._spilled = 0  # records in the journal from there on (not in memory)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._records_event: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._written = 0
        self._failed_batches = 0
        self._rejected = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._next_adopt = 0.0
        self._spilling_since: float | None = None
        self._last_spill_log = 0.0
        self._throttle = LogThrottle(logger, STILL_SPILLING_LOG_INTERVAL)

    # -- the hot path ---------------------------------------------------------------------------------------

    def submit(self, record: RequestRecord) -> None:
        """Journal and queue a record. Never blocks on the database, never raises."""
        try:
            if self._closed:
                # Past stop(): the file keeps it for the next process to replay.
                self._keep_after_stop([record])
                return
            offset = None
            if self._journaling:
                if self._open:
                    self._forget_open(record.request_id)
                offset = self._journal_write(_line(record))
                if offset is not None and self._spill_from is not None:
                    self._spilled += 1  # queued behind the journal's records, which are replayed in order
                    return
            if len(self._buffer) >= self.max_buffer:
                self._overflow()
                if offset is not None and self._spill_from is not None:
                    self._spilled += 1  # the journal became the queue
                    return
            self._buffer.append((record, offset))
            self._wake()
        except Exception:
            logger.exception("recorder: could not queue request %s", getattr(record, "request_id", "?"))
            try:
                self._buffer.append((record, None))
            except Exception:
                logger.error("recorder: lost request record %s", _summary(record))

    def started(self, record: RequestRecord) -> None:
        """Journal a provisional record: what to record for this request if the process dies before it is
        submitted (call again to update it, e.g. as a stream goes on). Never raises."""
        if not self._journaling:
            return
        try:
            line = _provisional_line(record)
            offset = self._journal_write(line)
            if offset is not None:
                if len(self._open) >= MAX_OPEN_ENTRIES:
                    self._forget_open(next(iter(self._open)))
                self._forget_open(record.request_id)
                self._open[record.request_id] = (offset, line)
                self._open_bytes += len(line)
        except Exception:
            logger.exception("recorder: could not journal request %s", getattr(record, "request_id", "?"))

    def running(self) -> int:
        """Requests with a provisional entry in the journal (started, not yet submitted)."""
        return len(self._open)

    def _forget_open(self, request_id: str) -> None:
        entry = self._open.pop(request_id, None)
        if entry is not None:
            self._open_bytes -= len(entry[1])

    def _journal_write(self, data: bytes) -> int | None:
        """Append to the journal; the offset, or None when it cannot be written (then noted, retried later)."""
        if self._journal_error is not None and time.monotonic() < self._journal_retry_at:
            return None
        try:
            offset = self._journal.append(data)
        except OSError as exc:
            self._journal_failed(exc)
            return None
        if self._journal_error is not None:
            logger.warning("recorder: journal %s writable again", self._journal.path)
            self._journal_error = None
        return offset

    def _journal_failed(self, exc: BaseException) -> None:
        self._journal_error = f"{type(exc).__name__}: {exc}"
        self._journal_retry_at = time.monotonic() + self.retry_interval
        self._throttle.log(
            "journal-unwritable",
            logging.ERROR,
            "recorder: journal %s cannot be written (%s): records are kept in memory (%d now, at most %d) "
            "until the database takes them",
            self._journal.path,
            self._journal_error,
            self._memory_only(),
            self.max_memory_records,
        )

    def _overflow(self) -> None:
        """The deque is full: the journal becomes the queue, or (if it cannot) memory holds more, up to
        `max_memory_records`, past which the oldest record is dropped."""
        first = None
        if self._journal_error is None:  # (with the journal failing, memory holds records it never had)
            first = next((o for _, o in self._buffer if o is not None), None)
        if first is not None:
            self._enter_spill(first, 0, reason="buffer full")
            if len(self._buffer) < self.max_buffer:
                return
        record, _ = self._buffer[0]
        if not self._journal.is_open and self._journal_error is None and self._task is None:
            self._install_journal(*self._find_journal())  # before start(): open the file for the overflow
        offset = self._journal_write(_line(record)) if self._journal.is_open else None
        if offset is not None:
            self._buffer.popleft()
            self._enter_spill(offset, 1, reason="buffer full")
            return
        if len(self._buffer) >= self.max_memory_records:
            self._buffer.popleft()
            self._dropped += 1
            self._throttle.log(
                "dropped",
                logging.ERROR,
                "recorder: dropped a record (memory bound RECORDER_MAX_MEMORY_RECORDS=%d reached while neither "
                "the database nor the journal can take records; %d dropped so far): %s",
                self.max_memory_records,
                self._dropped,
                _summary(record),
            )

    def _enter_spill(self, offset: int, count: int, *, reason: str) -> None:
        """The journal holds `count` records from `offset` on that are not in memory: replay from there.
        Journaled records still in memory are behind that offset and leave memory too."""
        started = self._spill_from is None
        self._spill_from = offset if self._spill_from is None else min(self._spill_from, offset)
        self._spilled += count
        if any(o is not None for _, o in self._buffer):
            kept = [(r, o) for r, o in self._buffer if o is None]
            self._spilled += len(self._buffer) - len(kept)
            self._buffer = collections.deque(kept)
        self._note_spilling(reason, started=started)
        if started and self._records_event is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._records_event.set)  # the writer may be idle
            except RuntimeError:
                pass

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

    def _note_spilling(self, reason: str, *, started: bool) -> None:
        now = time.monotonic()
        if self._spilling_since is None:
            self._spilling_since = now
            started = True
        if started or now - self._last_spill_log >= STILL_SPILLING_LOG_INTERVAL:
            self._last_spill_log = now
            logger.warning(
                "recorder spilling to %s (%s): pending=%d spilled=%d last_error=%s",
                self._journal.path,
                reason,
                self.pending,
                self._spilled,
                self._last_error,
            )

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal (replaying what an earlier process left) and start the background task.

        Never fails because of the journal's directory: without a journal the recorder runs memory-only,
        says so, and keeps trying to open it."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._records_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        before = self._spilled
        if not self._journal.is_open:
            try:
                self._install_journal(*await asyncio.to_thread(self._find_journal))
            except Exception as exc:
                self._journal_failed(exc)
        await self._adopt_orphans()
        self._journaling = self.journal_enabled and self._journal.is_open
        if self._spilled > before:
            logger.warning(
                "recorder: %d records left by an earlier run in %s; replaying them first",
                self._spilled - before,
                self._journal.path,
            )
        self._next_adopt = time.monotonic() + ADOPT_INTERVAL
        self._task = asyncio.create_task(self._run(), name="llm-backend-recorder")
        if self._buffer:
            self._records_event.set()

    async def stop(self, timeout: float = 30) -> None:  # noqa: ASYNC109 (the drain deadline)
        """Write everything queued to the database; what it cannot take in time stays in the journal (or,
        if that cannot be written, in a file under `fallback_dir`, or at the very least in the log), and
        one log line says how many records are where."""
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
            logger.warning("recorder: drain did not finish in %.1fs; keeping the rest", timeout)
            self._task.cancel()
        except Exception:
            logger.exception("recorder: background task failed; keeping the rest")
        if not self._task.done():
            try:
                await self._task
            except BaseException:  # cancelled (or failed): whatever is left in memory is kept below
                pass
        leftover = [*self._inflight, *self._buffer]
        self._inflight = []
        self._buffer.clear()
        self._journaling = False
        journaled = [r for r, o in leftover if o is not None]
        if journaled:
            first = min(o for _, o in leftover if o is not None)
            self._spill_from = first if self._spill_from is None else min(self._spill_from, first)
            self._spilled += len(journaled)
        memory = [r for r, o in leftover if o is None]
        where: list[str] = []
        lost = 0
        if memory and self._journal.is_open and self._journal_write(b"".join(map(_line, memory))) is not None:
            self._spilled += len(memory)
            memory = []
        if memory:
            lost = self._keep_elsewhere(memory, where)
        if self._journal.is_open:
            # what the database has leaves the journal; what it does not, and unfinished requests, stay
            frontier = self._journal.end if self._spill_from is None else self._spill_from
            keep = b"".join(line for offset, line in self._open.values() if offset < frontier)
            try:
                self._journal.compact(keep, frontier)
            except OSError:
                logger.debug("recorder: could not compact the journal", exc_info=True)
            self._journal.close()
        self._closed = True
        self._throttle.flush()
        if self._spilled:
            where.insert(0, f"{self._spilled} in {self._journal.path}")
        if self._open:
            where.append(f"{len(self._open)} unfinished requests in {self._journal.path}")
        if where or lost:
            logger.warning(
                "recorder stopped: %d records written this run; not written to the database: %s%s; "
                "the next start replays what the journal holds",
                self._written,
                ", ".join(where) or "none",
                f"; {lost} records lost (only logged above: no file could be written)" if lost else "",
            )
        else:
            logger.info("recorder stopped: all records written (%d this run)", self._written)

    def _keep_after_stop(self, records: list[RequestRecord]) -> None:
        data = b"".join(_line(r) for r in records)
        try:
            append_detached(self.spill_path, data)
        except OSError as exc:
            where: list[str] = []
            self._keep_elsewhere(records, where)
            logger.warning(
                "recorder stopped (%s): %d records kept in %s", exc, len(records), ", ".join(where)
            )
            return
        logger.warning(
            "recorder stopped: %d records appended to %s for the next start", len(records), self.spill_path
        )

    def _keep_elsewhere(self, records: list[RequestRecord], where: list[str]) -> int:
        """Keep records the journal could not: a file in `fallback_dir`, else one log line each. Returns
        how many only reached the log."""
        data = b"".join(_line(r) for r in records)
        path = (
            self.fallback_dir / f"{self.spill_path.stem}.{os.getpid()}-{secrets.token_hex(4)}.unwritten.jsonl"
        )
        try:
            append_detached(path, data)
        except OSError as exc:
            for record in records:
                logger.error("recorder: record not kept anywhere (%s): %s", exc, _summary(record))
            where.append(f"{len(records)} only in the log (no file writable)")
            return len(records)
        logger.error(
            "recorder: %d records kept in %s (the journal %s could not take them); move the file into that "
            "directory under the journal's name to replay it",
            len(records),
            path,
            self._journal.path,
        )
        where.append(f"{len(records)} in {path}")
        return 0

    def _find_journal(self) -> tuple[Journal, list[bytes] | None]:
        """Open (and lock) this process's journal; returns it and the records an earlier process left."""
        stem, suffix = self.spill_path.stem, self.spill_path.suffix
        pid = os.getpid()
        for name in (
            self.spill_path.name,
            f"{stem}.{pid}{suffix}",
            f"{stem}.{pid}-{secrets.token_hex(4)}{suffix}",
        ):
            journal = Journal(self.spill_path.with_name(name))
            try:
                found = journal.open()
            except JournalBusy:
                continue
            return journal, found
        raise JournalBusy(f"no free journal file next to {self.spill_path}")

    def _install_journal(self, journal: Journal, found: list[bytes] | None) -> None:
        self._journal = journal
        if self._journal_error is not None:
            logger.warning("recorder: journal %s open again", journal.path)
        self._journal_error = None
        if found:
            self._enter_spill(0, len(found), reason="left by an earlier run")

    async def _adopt_orphans(self) -> None:
        """Take over the journals of processes that are gone (unlocked siblings of ours)."""
        if not self._journal.is_open:
            return
        try:
            taken = await asyncio.to_thread(self._adopt_sync)
        except Exception:
            logger.exception("recorder: could not adopt journals of stopped processes")
            return
        for path, offset, count in taken:
            logger.warning("recorder: adopted %d records of a stopped process from %s", count, path)
            self._enter_spill(offset, count, reason="adopted from a stopped process")

    def _adopt_sync(self) -> list[tuple[Path, int, int]]:
        stem, suffix = self.spill_path.stem, self.spill_path.suffix
        sibling = re.compile(rf"^{re.escape(stem)}(\.[0-9]+(-[0-9a-f]+)?)?{re.escape(suffix)}$")
        directory = self.spill_path.parent
        taken: list[tuple[Path, int, int]] = []
        if not directory.is_dir():
            return taken
        for path in sorted(directory.iterdir()):
            if path == self._journal.path or not sibling.match(path.name) or not path.is_file():
                continue
            got = self._journal.adopt(path)
            if got is not None:
                taken.append((path, *got))
        return taken

    # -- observability --------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._inflight)

    def _memory_only(self) -> int:
        return sum(1 for _, o in itertools.chain(self._inflight, self._buffer) if o is None)

    def stats(self) -> dict[str, Any]:
        """pending (in memory), spilled (in the journal only, not yet replayed), written, failed_batches,
        rejected, last_error."""
        return {
            "pending": self.pending,
            "spilled": self._spilled,
            "written": self._written,
            "failed_batches": self._failed_batches,
            "rejected": self._rejected,
            "last_error": self._last_error,
        }

    def health(self) -> dict[str, Any]:
        """What an operator needs to know beyond `stats`: records only in memory (the journal cannot take
        them), records dropped (the memory bound was hit), the journal's path and error, and `degraded`
        (with the reason) when either is the case."""
        # without the journal (RECORDER_JOURNAL=false) memory is where records wait by design
        memory_only = self._memory_only() if self._task is not None and self.journal_enabled else 0
        reasons = []
        if self.journal_enabled and self._task is not None and self._journal_error is not None:
            reasons.append(f"journal {self._journal.path} not writable ({self._journal_error})")
        if memory_only:
            reasons.append(f"{memory_only} records only in memory (bound {self.max_memory_records})")
        if self._dropped:
            reasons.append(f"{self._dropped} records dropped")
        if self._spilled:
            reasons.append(f"{self._spilled} records waiting in the journal for the database")
        return {
            "memory_only": memory_only,
            "dropped": self._dropped,
            "journal": str(self._journal.path),
            "journal_ok": self._journal_error is None and (self._journal.is_open or not self.journal_enabled),
            "journal_error": self._journal_error,
            "unfinished": len(self._open),
            "degraded": "; ".join(reasons) or None,
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
        while True:
            try:
                await self._maintain()
                now = time.monotonic()
                if now < self._retry_at and not self._stopping:
                    await self._wait(min(self._retry_at - now, IDLE_WAKEUP), for_records=False)
                    continue
                if self._spill_from is not None:
                    replayed = await self._replay_chunk()
                    if replayed is False:
                        if self._stopping:
                            return  # the database is still down: the journal keeps everything
                        self._retry_at = time.monotonic() + self.retry_interval
                    elif replayed is None and self._spill_from is not None:
                        await self._wait(max(self.flush_interval, 0.01), for_records=False)
                    else:
                        await asyncio.sleep(0)
                    continue
                if not self._buffer:
                    if self._stopping:
                        return
                    await self._wait(IDLE_WAKEUP, for_records=True)
                    continue
                if len(self._buffer) < self.batch_size and not self._stopping and not self._retry_at:
                    deadline = time.monotonic() + self.flush_interval
                    while len(self._buffer) < self.batch_size and not self._stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        await self._wait(remaining, for_records=True, queued=len(self._buffer))
                if await self._write_from_buffer():
                    self._retry_at = 0.0
                else:
                    if self._stopping and self._spill_from is None:
                        return  # memory-only records and the database down: stop() keeps them
                    self._retry_at = time.monotonic() + self.retry_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the recorder die: note it, back off, go on
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.exception("recorder: unexpected error in the background task")
                if self._inflight:  # put an unfinished batch back at the head of the queue
                    self._buffer.extendleft(reversed(self._inflight))
                    self._inflight = []
                await asyncio.sleep(self.retry_interval)

    async def _maintain(self) -> None:
        """fsync the journal while it holds the only copy, reopen it when it was lost, adopt orphans now and
        then, and compact it once what it holds is written."""
        now = time.monotonic()
        if self._spill_from is not None and self._journal.dirty:
            try:
                await asyncio.to_thread(self._journal.sync)
            except OSError as exc:
                self._journal_failed(exc)
        if self.journal_enabled and not self._journal.is_open and now >= self._journal_retry_at:
            try:
                self._install_journal(*await asyncio.to_thread(self._find_journal))
                self._journaling = not self._stopping
            except Exception as exc:
                self._journal_failed(exc)
        if now >= self._next_adopt:
            self._next_adopt = now + ADOPT_INTERVAL
            await self._adopt_orphans()
        if self._spill_from is None and self._journal.is_open:
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Drop from the journal what the database has (everything before the first record still in
        memory), keeping the provisional entries of requests still running."""
        journal = self._journal
        frontier = journal.end
        for _, offset in itertools.islice(itertools.chain(self._inflight, self._buffer), 1000):
            if offset is not None:
                frontier = offset
                break
        else:
            if len(self._inflight) + len(self._buffer) > 1000:
                return  # a long memory-only stretch (journal trouble): not now
        written = frontier - (journal.end - journal.size)  # bytes before the frontier
        if written <= 0:
            return
        if self._open or frontier < journal.end:  # a rewrite, not a truncation to empty (that is always due)
            # Rewrite only when that at least halves the file (what it would keep is bounded by the running
            # requests' entries plus the unwritten tail): the bytes rewritten then stay within the bytes
            # appended, however many requests are running. 10,000 held streams keep megabytes of provisional
            # entries, which a rewrite on every pass of the recorder would copy over and over.
            if (
                journal.size < self.compact_bytes
                or self._open_bytes + journal.end - frontier > journal.size // 2
            ):
                return
            keep = b"".join([line for offset, line in self._open.values() if offset < frontier])
        else:
            keep = b""
        try:
            journal.compact(keep, frontier)
        except OSError as exc:
            self._throttle.log(
                "compact", logging.WARNING, "recorder: could not compact journal %s: %s", journal.path, exc
            )

    async def _write_from_buffer(self) -> bool:
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.batch_size))]
        self._inflight = batch
        # If cancelled mid-write (stop timed out), the batch stays in _inflight and stop() keeps it.
        result = await self._write([r for r, _ in batch])
        self._inflight = []
        if result is not None:
            return True
        journaled = [o for _, o in batch if o is not None]
        memory = [(r, o) for r, o in batch if o is None]
        if journaled:
            self._enter_spill(journaled[0], len(journaled), reason="database write failed")
        if memory and self._journal.is_open:  # not journaled yet (journaling off, or the disk was full)
            offset = self._journal_write(b"".join(_line(r) for r, _ in memory))
            if offset is not None:
                self._enter_spill(offset, len(memory), reason="database write failed")
                memory = []
        if memory:  # the journal cannot have them: memory keeps them, at the head of the queue
            self._buffer.extendleft(reversed(memory))
        if self._spill_from is not None:
            try:
                await asyncio.to_thread(self._journal.sync)
            except OSError as exc:
                self._journal_failed(exc)
        else:
            self._throttle.log(
                "memory-only",
                logging.WARNING,
                "recorder: database write failed (%s); %d records held in memory (at most %d), retried every "
                "%.1fs",
                self._last_error,
                self.pending,
                self.max_memory_records,
                self.retry_interval,
            )
        return False

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

    async def _replay_chunk(self) -> bool | None:
        """Replay the next chunk of the journal; False when the database could not take it, None when the
        journal had nothing more (the recorder is back to writing from memory)."""
        assert self._spill_from is not None
        start = self._spill_from
        lines, end = await asyncio.to_thread(self._journal.read_lines, start, self.batch_size)
        if not lines:
            if start >= self._journal.end or not self._journal.is_open:
                self._spill_from = None
                self._spilled = 0
                self._recovered()
            return None
        records: list[RequestRecord] = []
        bad: list[tuple[bytes, str]] = []
        taken = 0
        for line in lines:
            if line.startswith(PROVISIONAL_PREFIX):
                continue  # our own running requests: submit() journals their records
            taken += 1
            try:
                records.append(record_from_json(line))
            except Exception as exc:
                bad.append((line, f"unreadable journal line: {type(exc).__name__}: {exc}"))
        if records and await self._write(records) is None:
            return False
        if bad:
            await asyncio.to_thread(self._reject, bad)
        self._spill_from = end
        self._spilled = max(0, self._spilled - taken)
        if self._spilled <= self.batch_size:
            await self._catch_up()
        return True

    async def _catch_up(self) -> None:
        """Leave spill mode once the replay has (nearly) caught up: the few records journaled while the
        last chunk was written are read back into memory at once (no await in between, so no submit can
        slip past), and the writer goes on from memory."""
        assert self._spill_from is not None
        lines, end = self._journal.read_lines(self._spill_from, self.batch_size * 4)
        if end < self._journal.end:
            return  # more than a little: replay on
        entries: list[Entry] = []
        bad: list[tuple[bytes, str]] = []
        offset = self._spill_from
        for line in lines:
            if not line.startswith(PROVISIONAL_PREFIX):
                try:
                    entries.append((record_from_json(line), offset))
                except Exception as exc:
                    bad.append((line, f"unreadable journal line: {type(exc).__name__}: {exc}"))
            offset += len(line)
        self._buffer.extendleft(reversed(entries))
        self._spill_from = None
        self._spilled = 0
        self._recovered()
        if entries:
            self._wake()
        if bad:
            await asyncio.to_thread(self._reject, bad)

    def _recovered(self) -> None:
        took = time.monotonic() - (self._spilling_since or time.monotonic())
        self._spilling_since = None
        logger.warning(
            "recorder recovered: journal replayed into the database (%.1fs after spilling began): "
            "pending=%d spilled=0",
            took,
            self.pending,
        )

    def _reject(self, items: list[tuple[bytes, str]]) -> None:
        """Keep records the database refused in `<spill>.rejected` (never dropped silently)."""
        self._rejected += len(items)
        for _, why in items:
            logger.error("recorder: record refused by the database, kept in %s: %s", self.rejected_path, why)
        data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line, _ in items)
        try:
            append_detached(self.rejected_path, data)
        except OSError as exc:
            for line, _ in items:
                logger.error(
                    "recorder: refused record not kept (%s): %s", exc, line[:2000].decode("utf-8", "replace")
                )
