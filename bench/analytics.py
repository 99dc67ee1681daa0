"""Analytics at scale: `python -m bench.analytics`.

Creates a PostgreSQL database (`llmb_analytics_<random>`) on the server of `--database-url` (default
BENCH_DATABASE_URL or TEST_DATABASE_URL), migrates it, bulk-loads `--rows` request rows (default 10
million) spread over `--days` days (default 90) with COPY, builds their rollups with the same statements
as `llm-backend rollups rebuild`, and then times, `--runs` times each:

- the console overview's data call (`services.analytics.overview`) for the last 30 days, unfiltered and
  filtered by a key;
- the request log's first page (50 rows) with one filter: a model, a key, an end user, an outcome
  (errors), a client IP.

It prints p50 / p95 / max in ms per call (target: p95 at most 200 ms) and drops the database unless
`--keep`. Loading takes a few minutes on a 2-core machine (the rows are generated in Python and the
indexes built after the COPY); `--rows 1000000` is a quick look.

Data shape: 40 keys, 400 end users (each on one key, behind one of 150 client IPs), 6 models with two
backends each, operations chat / embeddings / responses (85 / 10 / 5 %), outcomes ok 95 %, error 4 %
(three kinds), client_disconnected 1 %, half of them streamed (with a time to first token), latency
log-normal around 800 ms.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from llm_backend.db import migrate
from llm_backend.db.models import RequestLog
from llm_backend.db.repositories import RollupRepository
from llm_backend.db.session import make_engine, normalize_url, session_scope
from llm_backend.services.analytics import RequestFilter, overview, request_page

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "text-embedding-3-large", "gpt-5"]
ERRORS = [("rate_limit_exceeded", 429), ("upstream_error", 502), ("invalid_request_error", 400)]
COLUMNS = (
    "request_id",
    "created_at",
    "route",
    "operation",
    "status_code",
    "outcome",
    "error_type",
    "stream",
    "model_requested",
    "model",
    "provider",
    "backend",
    "deployment",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "tokens_estimated",
    "latency_ms",
    "ttft_ms",
    "key_id",
    "user",
    "client_ip",
    "conversation_id",
    "client_request_id",
    "cost",
)
N = r"\N"


def _log(msg: str) -> None:
    print(f"[analytics {datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


def _server_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if not url:
        sys.exit("set --database-url, BENCH_DATABASE_URL or TEST_DATABASE_URL (a PostgreSQL server)")
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() != "postgresql":
        sys.exit("the analytics bench needs PostgreSQL")
    return parsed.render_as_string(hide_password=False)


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")


def _lines(start: int, count: int, now: datetime, days: int, rng: random.Random) -> str:
    """`count` request rows in COPY text form."""
    keys = [f"key_{k:04d}" for k in range(40)]
    users = [
        (f"user-{u:03d}@example.com", keys[u % 40], f"10.{u % 150 // 50}.{u % 50}.{u % 150}")
        for u in range(400)
    ]
    span = days * 86400.0
    out = []
    for i in range(start, start + count):
        when = now - timedelta(seconds=rng.random() * span)
        user, key, ip = users[int(rng.paretovariate(1.2)) % 400]
        model = MODELS[int(rng.random() ** 2 * 6)]
        r = rng.random()
        operation = "embeddings" if model.startswith("text-") else ("responses" if r < 0.05 else "chat")
        backend = f"{model}/{'eastus' if rng.random() < 0.7 else 'westeu'}"
        r = rng.random()
        error_type = N
        status = 200
        if r < 0.95:
            outcome = "ok"
        elif r < 0.99:
            outcome = "error"
            error_type, status = ERRORS[int(rng.random() * 3)]
        else:
            outcome = "client_disconnected"
        stream = operation == "chat" and rng.random() < 0.5
        latency = min(rng.lognormvariate(math.log(800), 0.8), 120000.0)
        ttft = f"{latency * rng.uniform(0.05, 0.4):.1f}" if stream else N
        prompt = int(rng.expovariate(1 / 900))
        completion = 0 if operation == "embeddings" else int(rng.expovariate(1 / 250))
        cached = int(prompt * rng.random() * 0.5) if rng.random() < 0.3 else 0
        out.append(
            "\t".join(
                (
                    f"req_{i:016x}",
                    when.isoformat(),
                    f"/v1/{operation}",
                    operation,
                    str(status),
                    outcome,
                    error_type,
                    "t" if stream else "f",
                    model,
                    model,
                    "azure",
                    backend,
                    model,
                    "1",
                    str(prompt),
                    str(completion),
                    str(prompt + completion),
                    str(cached),
                    "0",
                    "f",
                    f"{latency:.1f}",
                    ttft,
                    key,
                    user,
                    ip,
                    N,
                    N,
                    f"{prompt * 2.5e-6 + completion * 1e-5:.9f}",
                )
            )
        )
    return "\n".join(out) + "\n"


def load(url: str, rows: int, days: int) -> None:
    engine = make_engine(url)
    table = RequestLog.__table__
    indexes = list(table.indexes)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        for ix in indexes:
            ix.drop(conn)
    now = datetime.now(UTC)
    rng = random.Random(11)
    started = time.monotonic()
    chunk = 100_000
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        columns = ", ".join(f'"{c}"' for c in COLUMNS)
        with cur.copy(f"COPY request_log ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for start in range(0, rows, chunk):
                copy.write(_lines(start, min(chunk, rows - start), now, days, rng))
                if start and start % 1_000_000 == 0:
                    _log(f"  {start:,} rows ({time.monotonic() - started:.0f} s)")
        raw.commit()
    finally:
        raw.close()
    _log(f"copied {rows:,} rows in {time.monotonic() - started:.0f} s; building indexes")
    t = time.monotonic()
    with engine.begin() as conn:
        for ix in indexes:
            ix.create(conn)
    _log(f"indexes in {time.monotonic() - t:.0f} s; building rollups")
    t = time.monotonic()
    with session_scope(engine, write=True) as session:
        covered = RollupRepository(session).rebuild(keep_pruned=False)
    _log(f"rollups of {covered:,} requests in {time.monotonic() - t:.0f} s")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
        sizes = conn.exec_driver_sql(
            "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE relname LIKE 'usage_%%' ORDER BY 1"
        ).all()
    _log("rollup rows: " + ", ".join(f"{n} {c:,}" for n, c in sizes))
    engine.dispose()


def _time(fn: object, runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    p95 = samples[min(len(samples) - 1, math.ceil(0.95 * len(samples)) - 1)]
    return {"p50": statistics.median(samples), "p95": p95, "max": samples[-1]}


def measure(url: str, runs: int) -> list[tuple[str, dict[str, float]]]:
    engine = make_engine(url)
    now = datetime.now(UTC)
    since = now - timedelta(days=30)
    calls = [
        ("overview 30d", lambda: overview(engine, since=since, until=now)),
        ("overview 30d, one key", lambda: overview(engine, since=since, until=now, key_id="key_0003")),
        ("overview 7d (hourly)", lambda: overview(engine, since=now - timedelta(days=7), until=now)),
        ("overview 24h", lambda: overview(engine, since=now - timedelta(hours=24), until=now)),
    ]
    for name, flt in (
        ("model", RequestFilter(since=since, until=now, model="o3-mini")),
        ("key", RequestFilter(since=since, until=now, key_id="key_0017")),
        ("user", RequestFilter(since=since, until=now, user="user-123@example.com")),
        ("outcome=error", RequestFilter(since=since, until=now, outcome="error")),
        ("client ip", RequestFilter(since=since, until=now, client_ip="10.1.7.57")),
        ("backend", RequestFilter(since=since, until=now, backend="gpt-4.1/westeu")),
    ):
        calls.append((f"request page, {name}", lambda flt=flt: request_page(engine, flt, limit=50)))  # type: ignore[misc]
    results = []
    for name, fn in calls:
        fn()  # warm the cache and the plan
        results.append((name, _time(fn, runs)))
        r = results[-1][1]
        _log(f"{name:32s} p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms  max {r['max']:7.1f} ms")
    engine.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analytics", description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", help="a PostgreSQL server (its database is not used)")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--runs", type=int, default=40, help="timed calls per measurement")
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    parser.add_argument("--reuse", metavar="URL", help="measure an existing loaded database instead")
    args = parser.parse_args(argv)
    if args.reuse:
        measure(normalize_url(args.reuse), args.runs)
        return 0
    server = _server_url(args)
    name = f"llmb_analytics_{uuid.uuid4().hex[:10]}"
    admin = _admin(server)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        t = time.monotonic()
        load(url, args.rows, args.days)
        _log(f"loaded in {time.monotonic() - t:.0f} s")
        results = measure(url, args.runs)
        worst = max(r["p95"] for _, r in results)
        _log(f"worst p95 {worst:.1f} ms: {'PASS' if worst <= 200 else 'MISS'} (target 200 ms)")
    finally:
        if args.keep:
            _log(f"kept {make_url(url).render_as_string(hide_password=True)}")
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
