"""The recorder's journal: provisional records of a dead process become rows, compaction, an unwritable disk."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import RequestLog
from llm_backend.db.session import session_scope
from llm_backend.recording.journal import Journal, resolve
from llm_backend.recording.recorder import Recorder, _line, _provisional_line
from llm_backend.recording.records import OUTCOME_INTERRUPTED, RequestRecord, Usage
from llm_backend.recording.sink import write_batch
from tests.recording.conftest import MakeRecord
from tests.recording.test_recorder import Switch, broken_engine, row_ids, wait_until


def rows(engine: Engine) -> dict[str, RequestLog]:
    with session_scope(engine) as session:
        found = list(session.scalars(sa.select(RequestLog)))
        session.expunge_all()
    return {r.request_id: r for r in found}


def die(rec: Recorder) -> None:
    """What SIGKILL leaves: the journal as written, no drain, the lock released."""
    assert rec._task is not None
    rec._task.cancel()
    rec._journal.close()


def provisional(make_record: MakeRecord, **kw: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "outcome": OUTCOME_INTERRUPTED,
        "error_type": "worker_died",
        "status_code": 502,
        "stream": True,
        "usage": Usage(12, 0, 12, estimated=True),
    }
    fields.update(kw)
    return make_record(**fields)


def test_resolve_turns_unfinished_entries_into_records(make_record: MakeRecord, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.jsonl")
    assert journal.open() is None
    done, cut = provisional(make_record), provisional(make_record)
    finished = replace(done, outcome="ok", status_code=200, error_type=None)
    later = replace(cut, usage=Usage(12, 7, 19, estimated=True))
    for line in (_provisional_line(done), _provisional_line(cut), _line(finished), _provisional_line(later)):
        journal.append(line)
    journal.close()
    lines = list(resolve((tmp_path / "j.jsonl").read_bytes().splitlines(keepends=True)))
    data = [json.loads(line) for line in lines]
    assert [d["request_id"] for d in data] == [done.request_id, cut.request_id]
    assert data[0]["outcome"] == "ok"
    assert data[1]["outcome"] == OUTCOME_INTERRUPTED and "j" not in data[1]
    assert data[1]["usage"] == {**data[1]["usage"], "completion_tokens": 7, "estimated": True}


async def test_a_killed_process_leaves_a_row_for_every_request(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "data" / "recorder.jsonl"
    rec = Recorder(engine, batch_size=1000, flush_interval=60, spill_path=spill)
    await rec.start()
    written = [make_record() for _ in range(3)]
    for record in written:
        rec.submit(record)
    write_batch(engine, written[:2], record_content=True)  # the batch of two committed before the kill
    cut = provisional(make_record)
    rec.started(cut)
    rec.started(replace(cut, usage=Usage(12, 30, 42, estimated=True)))
    answered = make_record()
    rec.started(provisional(make_record, request_id=answered.request_id))
    rec.submit(answered)
    die(rec)

    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await wait_until(lambda: nxt.stats()["spilled"] == 0 and nxt.pending == 0)
    await nxt.stop()
    found = rows(engine)
    assert sorted(found) == sorted([*(r.request_id for r in written), cut.request_id, answered.request_id])
    row = found[cut.request_id]
    assert row.outcome == OUTCOME_INTERRUPTED and row.error_type == "worker_died"
    assert (row.prompt_tokens, row.completion_tokens, row.tokens_estimated) == (12, 30, True)
    assert found[answered.request_id].outcome == "ok"
    assert spill.read_bytes() == b""


async def test_a_dead_workers_journal_is_adopted_by_the_next(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "data" / "recorder.jsonl"
    first = Recorder(engine, flush_interval=60, batch_size=1000, spill_path=spill)
    second = Recorder(engine, flush_interval=60, batch_size=1000, spill_path=spill)
    await first.start()
    await second.start()  # another worker: a file of its own
    assert second._journal.path != spill
    cut = provisional(make_record)
    second.started(cut)
    die(second)
    await first._adopt_orphans()  # what the running worker does every ADOPT_INTERVAL
    await wait_until(lambda: first.stats()["spilled"] == 0)
    await first.stop()
    assert rows(engine)[cut.request_id].outcome == OUTCOME_INTERRUPTED
    assert [p.name for p in spill.parent.iterdir()] == ["recorder.jsonl"]


async def test_journal_is_compacted_once_written_keeping_running_requests(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "recorder.jsonl"
    rec = Recorder(engine, batch_size=50, flush_interval=0.01, spill_path=spill, compact_bytes=20_000)
    await rec.start()
    running = provisional(make_record)
    rec.started(running)
    for i in range(600):
        record = make_record()
        rec.started(provisional(make_record, request_id=record.request_id))
        rec.submit(record)
        if i % 50 == 0:
            await asyncio.sleep(0.02)
    await wait_until(lambda: rec.stats()["written"] == 600 and rec.pending == 0)
    await wait_until(lambda: spill.stat().st_size < 20_000)
    die(rec)  # the running request is still in the journal after compaction
    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await nxt.stop()
    found = rows(engine)
    assert len(found) == 601
    assert found[running.request_id].outcome == OUTCOME_INTERRUPTED


async def test_many_running_requests_do_not_make_every_pass_rewrite_the_journal(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    """Thousands of held streams keep more provisional bytes than compact_bytes: a rewrite is due only
    once it at least halves the file, so the bytes rewritten stay within the bytes appended."""
    spill = tmp_path / "recorder.jsonl"
    rec = Recorder(engine, batch_size=50, flush_interval=0.01, spill_path=spill, compact_bytes=4_000)
    await rec.start()
    rewrites: list[int] = []
    real_compact = rec._journal.compact

    def counting_compact(keep: bytes, start: int) -> None:
        rewrites.append(len(keep))
        real_compact(keep, start)

    rec._journal.compact = counting_compact  # type: ignore[method-assign]
    running = [provisional(make_record) for _ in range(100)]  # far more than compact_bytes together
    for record in running:
        rec.started(record)
    held = spill.stat().st_size
    assert held > 4 * 4_000
    appended = 0
    for _ in range(20):  # requests come and go while the others are held
        record = make_record()
        line = _provisional_line(provisional(make_record, request_id=record.request_id))
        rec.started(provisional(make_record, request_id=record.request_id))
        rec.submit(record)
        appended += len(line) + len(_line(record))
        await wait_until(lambda: rec.pending == 0)
        await rec._maintain()
    await rec._maintain()
    assert sum(rewrites) <= appended  # not the held entries over and over on every pass
    assert spill.stat().st_size <= held + 2 * appended
    for record in running:  # the held streams end: what is left is dropped
        rec.submit(replace(record, outcome="ok", status_code=200, error_type=None))
    await wait_until(lambda: rec.pending == 0 and rec.stats()["written"] == 120)
    await rec._maintain()
    await wait_until(lambda: spill.stat().st_size == 0)
    await rec.stop()
    assert len(rows(engine)) == 120


async def test_unwritable_journal_keeps_records_in_memory_until_the_database_is_back(
    engine: Engine, backend: str, make_record: MakeRecord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llm_backend.recording")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    switch = Switch(broken_engine(backend, tmp_path))
    rec = Recorder(
        switch,
        batch_size=10,
        flush_interval=0.01,
        retry_interval=0.05,
        spill_path=blocker / "recorder.jsonl",
        max_memory_records=40,
        max_buffer=10,
        fallback_dir=tmp_path / "fallback",
    )
    await rec.start()  # never fails because of the journal's directory
    records = [make_record() for _ in range(45)]
    for record in records:
        rec.submit(record)
    health = rec.health()
    assert health["journal_ok"] is False and "not writable" in health["degraded"]
    assert rec.pending == 40 and health["memory_only"] == 40
    assert health["dropped"] == 5  # the memory bound: the oldest go, counted and logged
    assert any("dropped a record" in r.getMessage() for r in caplog.records)
    switch.engine = engine  # the database is back: written straight from memory
    await wait_until(lambda: rec.pending == 0)
    assert row_ids(engine) == sorted(r.request_id for r in records[5:])
    assert rec.health()["memory_only"] == 0
    # database down again at shutdown: what memory holds goes to a file elsewhere, and the log says where
    switch.engine = broken_engine(backend, tmp_path)
    late = [make_record() for _ in range(3)]
    for record in late:
        rec.submit(record)
    await rec.stop(timeout=5)
    kept = list((tmp_path / "fallback").iterdir())
    assert len(kept) == 1
    assert [json.loads(line)["request_id"] for line in kept[0].read_text().splitlines()] == [
        r.request_id for r in late
    ]
    assert any(
        str(kept[0]) in r.getMessage() and "recorder stopped" in r.getMessage() for r in caplog.records
    )


async def test_a_full_disk_at_start_leaves_the_left_journal_whole_and_is_retried(
    engine: Engine, make_record: MakeRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill = tmp_path / "data" / "recorder.jsonl"
    spill.parent.mkdir()
    cut = provisional(make_record)
    spill.write_bytes(_provisional_line(cut))  # what a killed worker left: a request it never finished
    before = spill.read_bytes()

    def no_space(self: Journal, fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Journal, "_replace", no_space)
    rec = Recorder(engine, spill_path=spill, retry_interval=0.05)
    await rec.start()  # boots anyway, memory-only
    assert rec.health()["journal_ok"] is False and "No space left" in rec.health()["degraded"]
    assert spill.read_bytes() == before  # the left journal was not cut short by the failed rewrite
    served = make_record()
    rec.submit(served)
    await wait_until(lambda: served.request_id in rows(engine))
    monkeypatch.undo()  # space again: the journal is opened, and what it held becomes a row
    await wait_until(lambda: cut.request_id in rows(engine))
    assert rec.health()["journal_ok"] is True
    await rec.stop()
    assert rows(engine)[cut.request_id].outcome == OUTCOME_INTERRUPTED


def test_progress_entries_are_spread_out_when_many_requests_run() -> None:
    """Each running stream re-journals its progress at most once a second, and all of them together at
    most PROGRESS_PER_S times a second: 10,000 held streams each every 100 s."""
    from llm_backend.services.accounting import PROGRESS_INTERVAL, PROGRESS_PER_S, Accountant

    class Sink:
        open_entries = 0

        def submit(self, record: RequestRecord) -> None: ...

        def started(self, record: RequestRecord) -> None: ...

        def running(self) -> int:
            return self.open_entries

    sink = Sink()
    accountant = Accountant(sink)  # type: ignore[arg-type]
    assert accountant.progress_interval() == PROGRESS_INTERVAL
    sink.open_entries = 10_000
    assert accountant.progress_interval() == 10_000 / PROGRESS_PER_S
    assert Accountant(None).progress_interval() == PROGRESS_INTERVAL
