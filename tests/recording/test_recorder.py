"""The write-behind recorder: batching, drain on stop, spill on outage, replay in order, exactly once."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from llm_backend.db.models import Conversation, Message, RequestLog
from llm_backend.db.session import make_engine, session_scope
from llm_backend.recording import recorder as recorder_module
from llm_backend.recording import sink
from llm_backend.recording.recorder import Recorder
from llm_backend.recording.records import RequestRecord
from llm_backend.recording.sink import record_from_json, record_to_json, write_batch
from tests.recording.conftest import MakeRecord


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def row_ids(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(sa.select(RequestLog.request_id).order_by(RequestLog.request_id)))


def count(engine: Engine, model: type[Any]) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def spill_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def broken_engine(backend: str, tmp_path: Path) -> Engine:
    """An engine whose every connection fails: a SQLite file in a missing directory, a closed port."""
    if backend == "sqlite":
        return make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    return make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")


class Switch:
    """An engine factory the test can point at a broken engine and then at a working one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self) -> Engine:
        return self.engine


def chat_turns(make_record: MakeRecord, key_id: str = "key_a") -> list[RequestRecord]:
    u1, a1 = {"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}
    u2, a2 = {"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}
    u3, a3 = {"role": "user", "content": "three"}, {"role": "assistant", "content": "3"}
    return [
        make_record(key_id=key_id, request_messages=[u1], response_message=a1),
        make_record(key_id=key_id, request_messages=[u1, a1, u2], response_message=a2),
        make_record(key_id=key_id, request_messages=[u1, a1, u2, a2, u3], response_message=a3),
    ]


def test_record_json_roundtrip(make_record: MakeRecord) -> None:
    record = make_record(
        request_messages=[{"role": "user", "content": "hé"}], response_message={"role": "assistant"}
    )
    line = record_to_json(record)
    assert "\n" not in line
    assert record_from_json(line) == record
    assert record_from_json(line.encode()) == record


async def test_every_submit_becomes_a_row_after_stop(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    rec = Recorder(engine, batch_size=50, flush_interval=0.05, spill_path=tmp_path / "spill.jsonl")
    await rec.start()
    records = [make_record() for _ in range(500)]
    for i, record in enumerate(records):
        rec.submit(record)
        if i % 100 == 0:
            await asyncio.sleep(0)
    await rec.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)
    stats = rec.stats()
    assert stats["pending"] == 0 and stats["spilled"] == 0 and stats["written"] == 500
    assert stats["failed_batches"] == 0 and stats["last_error"] is None
    assert spill_lines(tmp_path / "spill.jsonl") == []


async def test_batches_are_size_and_time_bounded(
    engine: Engine, make_record: MakeRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def spy(eng: Engine, records: Any, *, record_content: bool) -> sink.BatchResult:
        sizes.append(len(records))
        return write_batch(eng, records, record_content=record_content)

    monkeypatch.setattr(recorder_module, "write_batch", spy)
    rec = Recorder(engine, batch_size=10, flush_interval=0.3, spill_path=tmp_path / "spill.jsonl")
    await rec.start()
    for _ in range(25):
        rec.submit(make_record())
    await wait_until(lambda: rec.stats()["written"] == 20, timeout=30)
    assert sizes[:2] == [10, 10]
    # the last 5 wait for the flush interval, then go in one batch without stop()
    await wait_until(lambda: rec.stats()["written"] == 25, timeout=30)
    assert sizes == [10, 10, 5]
    # a lone record is written within the flush interval too
    rec.submit(make_record())
    await wait_until(lambda: rec.stats()["written"] == 26, timeout=30)
    await rec.stop()
    assert sizes == [10, 10, 5, 1]
    assert count(engine, RequestLog) == 26


async def test_submit_before_start_and_after_stop_is_kept(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    rec = Recorder(engine, spill_path=spill)
    early = make_record()
    rec.submit(early)
    await rec.start()
    await rec.stop()
    assert row_ids(engine) == [early.request_id]
    late = make_record()
    rec.submit(late)  # after stop: kept in the spill file for the next process
    assert [json.loads(line)["request_id"] for line in spill_lines(spill)] == [late.request_id]
    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await nxt.stop()
    assert row_ids(engine) == sorted([early.request_id, late.request_id])


async def test_database_down_spills_then_replays_exactly_once(
    engine: Engine,
    backend: str,
    make_record: MakeRecord,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="llm_backend.recording")
    switch = Switch(broken_engine(backend, tmp_path))
    spill = tmp_path / "spill" / "records.jsonl"
    rec = Recorder(switch, batch_size=20, flush_interval=0.02, retry_interval=0.1, spill_path=spill)
    await rec.start()
    records = [make_record() for _ in range(95)]
    turns = chat_turns(make_record)
    for i, record in enumerate(records):
        rec.submit(record)
        if i == 40:
            for turn in turns:
                rec.submit(turn)
        if i % 10 == 0:
            await asyncio.sleep(0.01)  # serving goes on while the database is down
    total = len(records) + len(turns)
    await wait_until(lambda: rec.stats()["spilled"] == total)
    stats = rec.stats()
    assert stats["pending"] == 0 and stats["failed_batches"] >= 1 and stats["last_error"]
    assert stats["written"] == 0
    lines = spill_lines(spill)
    assert len(lines) == total
    order = [json.loads(line)["request_id"] for line in lines]
    assert (
        order.index(turns[0].request_id) < order.index(turns[1].request_id) < order.index(turns[2].request_id)
    )
    assert any("spilling" in r.getMessage() and "spilled=" in r.getMessage() for r in caplog.records)

    switch.engine = engine  # the database is back
    await wait_until(lambda: rec.stats()["spilled"] == 0)
    await rec.stop()
    expected = sorted(r.request_id for r in [*records, *turns])
    assert row_ids(engine) == expected  # every record, exactly once
    assert spill_lines(spill) == []
    assert rec.stats()["written"] == total
    assert any("recovered" in r.getMessage() for r in caplog.records)
    # replayed in order: the three turns still thread into one conversation
    assert count(engine, Conversation) == 1
    assert count(engine, Message) == 6


async def test_partly_written_spill_is_replayed_without_duplicates(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    turns = chat_turns(make_record)
    plain = [make_record() for _ in range(10)]
    everything = [*plain[:5], *turns, *plain[5:]]
    spill = tmp_path / "spill.jsonl"
    spill.write_text("".join(record_to_json(r) + "\n" for r in everything))
    # a previous process wrote part of it (the transaction committed) but died before truncating the file
    write_batch(engine, [*plain[:5], turns[0], turns[1]], record_content=True)
    rec = Recorder(engine, batch_size=4, spill_path=spill)
    assert rec.stats()["spilled"] == 0
    await rec.start()
    await wait_until(lambda: rec.stats()["spilled"] == 0)
    await rec.stop()
    assert row_ids(engine) == sorted(r.request_id for r in everything)
    assert count(engine, Conversation) == 1
    assert count(engine, Message) == 6
    assert spill_lines(spill) == []


async def test_leftover_spill_file_with_torn_last_line(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    records = [make_record() for _ in range(7)]
    spill = tmp_path / "spill.jsonl"
    torn = record_to_json(make_record())[:25]
    spill.write_text("".join(record_to_json(r) + "\n" for r in records) + torn)
    rec = Recorder(engine, batch_size=3, spill_path=spill)
    await rec.start()
    assert rec.stats()["spilled"] == 8
    await rec.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)
    assert rec.stats()["rejected"] == 1
    assert rec.rejected_path.read_text() == torn + "\n"
    assert spill_lines(spill) == []


async def test_full_buffer_spills_oldest_first(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    rec = Recorder(engine, max_buffer=10, batch_size=5, spill_path=spill)
    records = [make_record() for _ in range(25)]
    for record in records:  # not started yet: the buffer fills up
        rec.submit(record)
    stats = rec.stats()
    assert (stats["pending"], stats["spilled"]) == (10, 15)
    assert [json.loads(line)["request_id"] for line in spill_lines(spill)] == [
        r.request_id for r in records[:15]
    ]
    await rec.start()
    await rec.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)
    assert rec.stats() | {"last_error": None} == {
        "pending": 0,
        "spilled": 0,
        "written": 25,
        "failed_batches": 0,
        "rejected": 0,
        "last_error": None,
    }


async def test_stop_with_database_down_keeps_everything_for_next_start(
    engine: Engine, backend: str, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "spill.jsonl"
    rec = Recorder(broken_engine(backend, tmp_path), batch_size=8, retry_interval=0.05, spill_path=spill)
    await rec.start()
    records = [make_record() for _ in range(30)]
    for record in records:
        rec.submit(record)
    await rec.stop(timeout=10)
    assert rec.stats()["spilled"] == 30 and rec.stats()["pending"] == 0
    assert len(spill_lines(spill)) == 30
    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await nxt.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)


async def test_stop_timeout_spills_what_is_in_flight(
    engine: Engine, make_record: MakeRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, finished = threading.Event(), threading.Event()

    def slow_engine() -> Engine:
        started.set()
        time.sleep(0.6)  # a database that takes its time
        return engine

    def write_then_tell(eng: Engine, records: Any, *, record_content: bool) -> sink.BatchResult:
        try:
            return write_batch(eng, records, record_content=record_content)
        finally:
            finished.set()

    monkeypatch.setattr(recorder_module, "write_batch", write_then_tell)

    spill = tmp_path / "spill.jsonl"
    rec = Recorder(slow_engine, batch_size=5, flush_interval=0.01, spill_path=spill)
    await rec.start()
    records = [make_record() for _ in range(12)]
    for record in records:
        rec.submit(record)
    await asyncio.sleep(0.1)  # the first batch is in flight
    await rec.stop(timeout=0.2)
    spilled = {json.loads(line)["request_id"] for line in spill_lines(spill)}
    assert {r.request_id for r in records} <= spilled | set(row_ids(engine))
    assert len(spilled) >= 7
    # the abandoned write may still commit: let it end (however long that takes here), then the replay
    # below must not duplicate it
    if started.is_set():
        assert await asyncio.to_thread(finished.wait, 60)
    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await nxt.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)


async def test_records_refused_by_the_database_are_kept_aside(
    engine: Engine, make_record: MakeRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison = make_record()
    real = sink.record_to_row

    def picky(record: RequestRecord, conversation_id: str | None) -> dict[str, Any]:
        if record.request_id == poison.request_id:
            raise ValueError("refused")
        return real(record, conversation_id)

    monkeypatch.setattr(sink, "record_to_row", picky)
    rec = Recorder(engine, batch_size=10, spill_path=tmp_path / "spill.jsonl")
    await rec.start()
    good = [make_record() for _ in range(4)]
    for record in [*good[:2], poison, *good[2:]]:
        rec.submit(record)
    await rec.stop()
    assert row_ids(engine) == sorted(r.request_id for r in good)
    assert rec.stats()["rejected"] == 1
    kept = [record_from_json(line) for line in rec.rejected_path.read_text().splitlines()]
    assert kept == [poison]


async def test_record_content_off_never_stores_messages(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    rec = Recorder(engine, record_content=False, spill_path=tmp_path / "spill.jsonl")
    await rec.start()
    for turn in chat_turns(make_record):
        rec.submit(turn)
    await rec.stop()
    assert count(engine, RequestLog) == 3
    assert count(engine, Conversation) == 0 and count(engine, Message) == 0


async def test_submit_never_raises_and_is_fast(
    engine: Engine, make_record: MakeRecord, tmp_path: Path
) -> None:
    rec = Recorder(engine, batch_size=200, spill_path=tmp_path / "spill.jsonl")
    await rec.start()
    records = [make_record() for _ in range(2000)]
    # CPU time of this thread: what submit itself costs, whatever else the machine (or the writer) is doing
    started = time.thread_time()
    for record in records:
        rec.submit(record)
    elapsed = time.thread_time() - started
    assert elapsed < 0.5  # microseconds each: no I/O on the hot path
    await rec.stop()
    assert count(engine, RequestLog) == 2000


async def test_failed_batch_goes_before_records_that_overflowed_meanwhile(
    backend: str, make_record: MakeRecord, tmp_path: Path
) -> None:
    broken = broken_engine(backend, tmp_path)

    def slow_broken() -> Engine:
        time.sleep(0.3)  # the write is in flight for a while, then fails
        return broken

    spill = tmp_path / "spill.jsonl"
    rec = Recorder(
        slow_broken, batch_size=5, flush_interval=0.0, max_buffer=3, retry_interval=60, spill_path=spill
    )
    await rec.start()
    records = [make_record() for _ in range(20)]
    for record in records[:5]:
        rec.submit(record)
    await asyncio.sleep(0.1)  # batch of the first 5 is in flight
    for record in records[5:]:
        rec.submit(record)  # the buffer (3) overflows into the spill file, oldest first
    await wait_until(lambda: rec.stats()["spilled"] == 20)
    assert [json.loads(line)["request_id"] for line in spill_lines(spill)] == [r.request_id for r in records]
    await rec.stop(timeout=5)


async def test_each_process_has_its_own_spill_file_and_orphans_are_adopted(
    engine: Engine, backend: str, make_record: MakeRecord, tmp_path: Path
) -> None:
    spill = tmp_path / "spill" / "recorder.jsonl"
    first = Recorder(broken_engine(backend, tmp_path), retry_interval=60, spill_path=spill)
    second = Recorder(broken_engine(backend, tmp_path), retry_interval=60, spill_path=spill)
    await first.start()
    await second.start()  # "another worker": the main file is locked, it takes a file of its own
    records = [make_record() for _ in range(10)]
    for i, record in enumerate(records):
        (first if i % 2 else second).submit(record)
    await first.stop(timeout=30)
    await second.stop(timeout=30)
    files = sorted(p.name for p in spill.parent.iterdir())
    assert len(files) == 2 and "recorder.jsonl" in files
    assert sum(len(spill_lines(spill.parent / name)) for name in files) == 10
    # the next start (any worker) replays both files
    nxt = Recorder(engine, spill_path=spill)
    await nxt.start()
    await nxt.stop()
    assert row_ids(engine) == sorted(r.request_id for r in records)
    assert [p.name for p in spill.parent.iterdir()] == ["recorder.jsonl"]
    assert spill_lines(spill) == []
