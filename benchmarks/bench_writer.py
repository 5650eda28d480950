"""Writer CPU per exchange against the floor: what storing an exchange costs beyond the driver's own work.

    python -m benchmarks.bench_writer             # SQLite and PostgreSQL, ~1.5 min; --quick ~15 s
    python -m benchmarks.bench_writer --profile json|sse20|sse500   # cProfile of the writer's work

Each repeat runs, for each backend and kind of exchange (a JSON answer, a 20-event and a 500-event SSE
stream), two things back to back on fresh migrated databases, and the repeats interleave them:
- *writer*: the captured records (request + response, as the middleware hands them over) are submitted
  to a started `Writer` (its thread) and the process's CPU time (``time.process_time``: every thread) is
  read until every exchange is stored. That is all the CPU the writer adds per exchange: rebuilding the
  stream, building ops, deriving the session, serializing, the SQL around the inserts.
- *floor*: the rows the writer stored (sessions, requests, responses, JSON already as text) inserted by
  the raw driver into another fresh database: ``sqlite3`` ``executemany``, or psycopg ``COPY`` (its
  cheapest: executemany costs about twice its client CPU), one transaction per writer batch; for
  streams plus one JSON parse (orjson) per SSE event, the least any rebuilding must do. Client CPU
  only, on both sides (PostgreSQL's own CPU is the server's).

Reported: CPU µs per exchange, median [min..max], and writer ÷ floor. Goals (issue #12): ≤ 1.5 for JSON,
≤ 2.0 for streams.
"""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine, normalize_url
from qwen_persist.records import CapturedRequest, CapturedResponse
from qwen_persist.sessions import CaptureIds, new_request_id, now_ms
from qwen_persist.writer import Writer

from .app import _chunk
from .common import fresh_database, machine, postgres_available, spread, workspace

TABLES = ("sessions", "requests", "responses")
# The JSON columns, read back as text for the floor (it inserts them as the text they are stored as).
JSON_COLUMNS = {"openai_request", "qwen_request", "metadata", "openai_response", "qwen_response", "headers"}
KINDS = {"json": 0, "sse20": 20, "sse500": 500}  # SSE events per response (0: a JSON answer)
GOALS = {"json": 1.5, "sse20": 2.0, "sse500": 2.0}
Rows = dict[str, tuple[list[str], list[tuple[Any, ...]]]]
Record = CapturedRequest | CapturedResponse
PATH = "/v1/chat/completions"


def sse_body(events: int) -> bytes:
    """A stream of ``events`` events as the benchmark app sends it (role, content chunks, stop, [DONE])."""
    words = (_chunk(0, {"content": "The"}, None) for _ in range(events - 3))
    return (
        _chunk(0, {"role": "assistant", "content": ""}, None)
        + b"".join(words)
        + _chunk(0, {}, "stop")
        + b"data: [DONE]\n\n"
    )


def make_records(n: int, events: int) -> list[Record]:
    """The records the middleware would hand over for ``n`` exchanges of the benchmark app."""
    completion = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "bench-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "The quick brown fox."}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
        }
    ).encode()
    answer = sse_body(events) if events else completion
    records: list[Record] = []
    capture_ids = CaptureIds()
    start = now_ms()
    for i in range(n):
        body = json.dumps(
            {
                "model": "bench-model",
                "stream": bool(events),
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Question number {i} about foxes?"},
                ],
            }
        ).encode()
        rid, capture = new_request_id(), capture_ids()
        records.append(
            CapturedRequest(
                rid,
                start + i,
                "POST",
                "/v1/chat/completions",
                body,
                len(body),
                False,
                None,
                None,
                capture_id=capture,
            )
        )
        records.append(
            CapturedResponse(
                rid,
                200,
                bool(events),
                answer,
                len(answer),
                False,
                start + i + 5,
                5,
                1,
                None,
                capture_id=capture,
            )
        )
    return records


def run_writer(url: str, records: list[Record], batch_size: int) -> float:
    """CPU seconds (all threads) the writer thread took to store ``records``."""
    settings = build_settings(database_url=url, queue_size=len(records) + 10, batch_size=batch_size)
    engine = make_engine(url)
    with engine.connect():  # the pool's first connection, made before the clock starts
        pass
    writer = Writer(settings, engine)
    writer.start()
    began = time.process_time()
    for record in records:
        writer.submit(record)
    while writer.stats().written < len(records):
        time.sleep(0.01)  # a poll every 10 ms: a few µs of CPU each, negligible per exchange
    used = time.process_time() - began
    stats = writer.close()
    engine.dispose()
    if stats.written != len(records) or stats.failed:
        raise RuntimeError(f"writer stored {stats.written} of {len(records)} records: {stats}")
    return used


def read_rows(url: str) -> Rows:
    """The stored rows, JSON columns as text, in insertion order."""
    out: Rows = {}
    if url.startswith("sqlite"):
        with sqlite3.connect(normalize_url(url).database or "") as conn:
            for table in TABLES:
                cursor = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
                out[table] = ([d[0] for d in cursor.description], cursor.fetchall())
        return out
    import psycopg

    with psycopg.connect(_libpq(url)) as conn:
        for table in TABLES:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                    "ORDER BY ordinal_position",
                    (table,),
                )
            ]
            picks = ", ".join(f'"{n}"::text' if n in JSON_COLUMNS else f'"{n}"' for n in names)
            order = "created_at" if table == "sessions" else "id"
            out[table] = (names, conn.execute(f"SELECT {picks} FROM {table} ORDER BY {order}").fetchall())
    return out


def _libpq(url: str) -> str:
    return normalize_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sse_payloads(records: list[Record]) -> list[bytes]:
    """Each SSE event's data, as the floor parses it: one parse per event."""
    payloads: list[bytes] = []
    for record in records:
        if isinstance(record, CapturedResponse) and record.streamed:
            for block in record.body.split(b"\n\n"):
                if block.startswith(b"data: ") and block != b"data: [DONE]":
                    payloads.append(block[6:])
    return payloads


def run_floor(url: str, rows: Rows, payloads: list[bytes], batch_size: int) -> float:
    """CPU seconds the raw driver takes to insert ``rows`` (plus one JSON parse per SSE event)."""
    statements = {table: (cols, ", ".join(f'"{c}"' for c in cols)) for table, (cols, _) in rows.items()}
    exchanges = len(rows["requests"][1])
    per_tx = max(1, batch_size // 2)  # the writer stores a batch of batch_size records per transaction
    if url.startswith("sqlite"):
        conn: Any = sqlite3.connect(normalize_url(url).database or "", isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            conn.execute(f"PRAGMA {pragma}")
        marks = "?"
    else:
        import psycopg

        conn = psycopg.connect(_libpq(url), autocommit=True)
        marks = "%s"
    sql = {
        table: f"INSERT INTO {table} ({names}) VALUES ({', '.join([marks] * len(cols))})"
        for table, (cols, names) in statements.items()
    }
    began = time.process_time()
    for payload in payloads:
        orjson.loads(payload)
    cursor = conn.cursor()
    for first in range(0, exchanges, per_tx):
        cursor.execute("BEGIN")
        for table in TABLES:
            part = rows[table][1][first : first + per_tx]
            if marks == "?":
                cursor.executemany(sql[table], part)
            else:  # PostgreSQL's cheapest bulk path
                with cursor.copy(f"COPY {table} ({statements[table][1]}) FROM STDIN") as copy:
                    for row in part:
                        copy.write_row(row)
        cursor.execute("COMMIT")
    used = time.process_time() - began
    conn.close()
    return used


def profile(kind: str, exchanges: int, batch_size: int) -> None:
    import cProfile
    import pstats

    with workspace() as workdir, fresh_database("sqlite", workdir) as url:
        records = make_records(exchanges, KINDS[kind])
        # The writer thread does the work: profile it by running the same steps in this thread.
        writer = Writer(build_settings(database_url=url, batch_size=batch_size), make_engine(url))
        profiler = cProfile.Profile()
        profiler.enable()
        for first in range(0, len(records), batch_size):
            writer._store(writer._to_ops(records[first : first + batch_size]))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--exchanges", type=int, default=2000, help="per repeat (the 500-event kind: a tenth)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="500 exchanges, 3 repeats")
    parser.add_argument("--profile", choices=list(KINDS), help="cProfile the writer's work on one kind")
    args = parser.parse_args(argv)
    if args.quick:
        args.exchanges, args.repeats = 500, 3
    print(machine())
    if args.profile:
        profile(args.profile, args.exchanges, args.batch_size)
        return
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if "postgresql" in backends and not postgres_available():
        print("PostgreSQL not reachable (BENCH_POSTGRES_URL): SQLite only")
        backends.remove("postgresql")
    cases = [(backend, kind) for backend in backends for kind in KINDS]
    inputs = {kind: make_records(_count(args.exchanges, kind), events) for kind, events in KINDS.items()}
    payloads = {kind: sse_payloads(records) for kind, records in inputs.items()}
    # The inputs are not the writer's objects: keep full collections from walking them on its clock.
    gc.collect()
    gc.freeze()
    figures: dict[tuple[str, str], dict[str, list[float]]] = {case: {} for case in cases}
    with workspace() as workdir:
        for backend in backends:  # imports, first connections, statements compiled: not per exchange
            with fresh_database(backend, workdir) as url:
                run_writer(url, make_records(50, 20), args.batch_size)
        for repeat in range(args.repeats):
            for backend, kind in cases:
                n = _count(args.exchanges, kind)
                with fresh_database(backend, workdir) as url:
                    writer_s = run_writer(url, inputs[kind], args.batch_size)
                    rows = read_rows(url)
                with fresh_database(backend, workdir) as url:
                    floor_s = run_floor(url, rows, payloads[kind], args.batch_size)
                per = figures[backend, kind]
                _add(per, "writer", writer_s / n * 1e6)
                _add(per, "floor", floor_s / n * 1e6)
                _add(per, "ratio", writer_s / floor_s)
                print(
                    f"  repeat {repeat} {backend:10} {kind:6} writer {writer_s / n * 1e6:7.1f} µs"
                    f"  floor {floor_s / n * 1e6:7.1f} µs",
                    flush=True,
                )
    print(
        f"\nCPU µs per exchange, {args.repeats} interleaved repeats, {args.exchanges} exchanges "
        f"({_count(args.exchanges, 'sse500')} of 500 events), batch {args.batch_size}; median [min..max]"
    )
    print(f"{'backend':10} {'kind':6} {'writer':>24} {'floor':>24} {'writer ÷ floor':>22}  goal")
    for (backend, kind), per in figures.items():
        ratio = statistics.median(per["ratio"])
        verdict = "met" if ratio <= GOALS[kind] else "NOT met"
        writer, floor = spread(per["writer"], "{:.1f}"), spread(per["floor"], "{:.1f}")
        print(
            f"{backend:10} {kind:6} {writer:>24} {floor:>24} {spread(per['ratio'], '{:.2f}'):>22}"
            f"  ≤ {GOALS[kind]} {verdict}"
        )
    sys.exit(0)


def _count(exchanges: int, kind: str) -> int:
    return max(10, exchanges // 10) if kind == "sse500" else exchanges


def _add(per: dict[str, list[float]], key: str, value: float) -> None:
    per.setdefault(key, []).append(value)


if __name__ == "__main__":
    main()
