"""What the recorder's journal costs the serving loop per request: `python -m bench.journal`.

Times the hot-path calls a request makes, with and without the journal: a provisional record when the
upstream is asked (`started`) and the final record (`submit`), for a chat record with a short conversation.
The background writer is not running (the database side is the same either way); the figures are CPU
microseconds per request on this machine, to set against a request's whole cost through the gateway
(about 1,000 to 1,700 microseconds in `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from llm_backend.db.session import make_engine
from llm_backend.recording.recorder import Recorder
from llm_backend.recording.records import OUTCOME_INTERRUPTED, RequestRecord, Usage


def _record(i: int) -> RequestRecord:
    return RequestRecord(
        request_id=f"req_{i:012d}",
        created_at=datetime.now(UTC),
        route="/v1/chat/completions",
        operation="chat",
        status_code=200,
        model_requested="gpt-4o",
        model="gpt-4o",
        provider="azure",
        backend="eastus",
        deployment="gpt-4o-prod",
        usage=Usage(25, 9, 34),
        latency_ms=12.5,
        key_id="key_0123456789",
        client_ip="10.0.0.7",
        request_messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in a friendly way, please."},
        ],
        response_message={"role": "assistant", "content": "Hello! How can I help you today?"},
    )


async def _run(journal: bool, n: int, tmp: Path) -> float:
    """Microseconds per request for started() + submit() (journal) or submit() alone."""
    engine = make_engine(f"sqlite:///{tmp / 'unused.db'}")
    rec = Recorder(engine, spill_path=tmp / f"j-{journal}-{time.monotonic_ns()}.jsonl", journal=journal)
    rec._journaling = journal  # the writer task is not started: only the hot path is timed
    if journal:
        await asyncio.to_thread(rec._install_journal, *rec._find_journal())
    records = [_record(i) for i in range(n)]
    provisional = [replace(r, outcome=OUTCOME_INTERRUPTED, request_messages=None) for r in records]
    started = time.perf_counter()
    for p, r in zip(provisional, records, strict=True):
        rec.started(p)
        rec.submit(r)
    elapsed = time.perf_counter() - started
    rec._journal.close()
    engine.dispose()
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per sample")
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        off, on = [], []
        for _ in range(args.samples):  # interleaved, so a busy moment of the machine hits both
            off.append(asyncio.run(_run(False, args.requests, tmp)))
            on.append(asyncio.run(_run(True, args.requests, tmp)))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"recorder hot path, median of {args.samples} x {args.requests} requests:")
    print(f"  without journal  {m_off:7.1f} us/request (submit)")
    print(f"  with journal     {m_on:7.1f} us/request (started + submit, two write() calls)")
    print(f"  journal costs    {m_on - m_off:7.1f} us/request")


if __name__ == "__main__":
    main()
