"""Writer efficiency without HTTP: persisted exchanges/s ÷ raw ``sqlite3`` executemany of the same rows.

    python -m benchmarks.bench_writer                # ~30 s; --profile to see where the writer's time goes

Each repeat (the two interleaved, on the same file system):
- *writer*: N captured exchanges (request + response records as the middleware makes them, JSON or SSE
  bodies) are submitted to a `Writer` on a fresh migrated SQLite file; timed until ``close()`` returns,
  i.e. until every exchange is stored.
- *raw*: the rows the writer stored (sessions, requests, responses) are read back and inserted into
  another fresh migrated file with plain ``sqlite3`` ``executemany``, one transaction per batch of the
  writer's batch size, same pragmas (WAL, synchronous=NORMAL). No parsing, no JSON encoding: a ceiling.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.records import CapturedRequest, CapturedResponse
from qwen_persist.sessions import new_request_id, now_ms
from qwen_persist.writer import Writer

from .app import _chunk
from .common import machine, spread, workspace

TABLES = ("sessions", "requests", "responses")


def make_records(n: int, stream: bool) -> list[CapturedRequest | CapturedResponse]:
    """The records the middleware would hand over for ``n`` exchanges of the benchmark app."""
    sse = b"".join(_chunk(0, {"content": "The"}, None) for _ in range(18))
    sse = _chunk(0, {"role": "assistant", "content": ""}, None) + sse + _chunk(0, {}, "stop")
    sse += b"data: [DONE]\n\n"
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
    records: list[CapturedRequest | CapturedResponse] = []
    start = now_ms()
    for i in range(n):
        body = json.dumps(
            {
                "model": "bench-model",
                "stream": stream,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"Question number {i} about foxes?"},
                ],
            }
        ).encode()
        rid = new_request_id()
        records.append(
            CapturedRequest(
                rid, start + i, "POST", "/v1/chat/completions", body, len(body), False, None, None
            )
        )
        answer = sse if stream else completion
        records.append(
            CapturedResponse(rid, 200, stream, answer, len(answer), False, start + i + 5, 5, 1, None)
        )
    return records


def run_writer(url: str, records: list[CapturedRequest | CapturedResponse], batch_size: int) -> float:
    settings = build_settings(database_url=url, queue_size=len(records) + 10, batch_size=batch_size)
    engine = make_engine(url)
    writer = Writer(settings, engine)
    writer.start()
    began = time.perf_counter()
    for record in records:
        writer.submit(record)
    stats = writer.close()
    elapsed = time.perf_counter() - began
    engine.dispose()
    if stats.written != len(records):
        raise RuntimeError(f"writer stored {stats.written} of {len(records)} records: {stats}")
    return elapsed


def read_rows(path: Path) -> dict[str, tuple[list[str], list[tuple[object, ...]]]]:
    with sqlite3.connect(path) as conn:
        out = {}
        for table in TABLES:
            cursor = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
            out[table] = ([d[0] for d in cursor.description], cursor.fetchall())
        return out


def run_raw(
    path: Path, rows: dict[str, tuple[list[str], list[tuple[object, ...]]]], batch_size: int
) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    statements = {
        table: f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        for table, (cols, _) in rows.items()
    }
    # The writer stores a batch of `batch_size` records (about batch_size/2 exchanges) per transaction.
    exchanges = len(rows["requests"][1])
    per_tx = max(1, batch_size // 2)
    began = time.perf_counter()
    for first in range(0, exchanges, per_tx):
        conn.execute("BEGIN")
        for table in TABLES:
            conn.executemany(statements[table], rows[table][1][first : first + per_tx])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--profile", choices=["json", "sse"], help="cProfile the writer's work on one mode, print the top"
    )
    args = parser.parse_args()
    print(machine())
    if args.profile:
        import cProfile
        import pstats

        with workspace() as workdir:
            url = f"sqlite:///{workdir / 'profile.db'}"
            upgrade(url)
            records = make_records(args.exchanges, stream=args.profile == "sse")
            profiler = cProfile.Profile()
            # The writer thread does the work: profile it by running the same loop in this thread.
            settings = build_settings(database_url=url, batch_size=args.batch_size)
            writer = Writer(settings, make_engine(url))
            profiler.enable()
            for first in range(0, len(records), args.batch_size):
                writer._store(writer._to_ops(records[first : first + args.batch_size]))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    figures: dict[str, dict[str, list[float]]] = {}
    with workspace() as workdir:
        for repeat in range(args.repeats):
            for mode in ("json", "sse"):
                records = make_records(args.exchanges, stream=mode == "sse")
                path = workdir / f"writer-{repeat}-{mode}.db"
                upgrade(f"sqlite:///{path}")
                writer_s = run_writer(f"sqlite:///{path}", records, args.batch_size)
                rows = read_rows(path)
                raw_path = workdir / f"raw-{repeat}-{mode}.db"
                upgrade(f"sqlite:///{raw_path}")
                raw_s = run_raw(raw_path, rows, args.batch_size)
                per = figures.setdefault(mode, {"writer": [], "raw": [], "ratio": []})
                per["writer"].append(args.exchanges / writer_s)
                per["raw"].append(args.exchanges / raw_s)
                per["ratio"].append(
                    raw_s and writer_s and (args.exchanges / writer_s) / (args.exchanges / raw_s)
                )
                print(
                    f"  repeat {repeat} {mode:4} writer {args.exchanges / writer_s:8.0f}/s"
                    f"  raw {args.exchanges / raw_s:8.0f}/s",
                    flush=True,
                )
    print(
        f"\n{args.exchanges} exchanges x {args.repeats} repeats, batch {args.batch_size}; median [min..max]"
    )
    print(f"{'mode':5} {'writer exchanges/s':>26} {'raw executemany/s':>26} {'writer ÷ raw':>22}")
    for mode, per in figures.items():
        print(
            f"{mode:5} {spread(per['writer'], '{:.0f}'):>26} {spread(per['raw'], '{:.0f}'):>26}"
            f" {spread(per['ratio']):>22}"
        )
    for mode, per in figures.items():
        ratio = statistics.median(per["ratio"])
        print(f"goal writer/raw >= 0.75 ({mode}): {ratio:.3f} {'met' if ratio >= 0.75 else 'NOT met'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
