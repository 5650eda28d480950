"""What the indexes cost the write floor: µs per exchange of raw driver inserts, schema against schema.

    python -m benchmarks.bench_indexes                      # ~2 min: SQLite and PostgreSQL, 5 repeats
    python -m benchmarks.bench_indexes --backends sqlite --exchanges 5000 --repeats 3

One exchange is three rows, as the writer stores it: a session (a new conversation, as in every
HTTP benchmark), its request and its response, with realistic JSON bodies of about 1 KB each. They are
inserted with the drivers themselves, no SQLAlchemy and no writer in the way (``sqlite3`` ``executemany``;
psycopg ``executemany``), one transaction per batch of the writer's size (500 records, 250 exchanges),
into an empty database of each schema:

- ``0006``: migrated to ``0006_read_indexes``;
- ``0007``: migrated to ``0007_drop_unused_indexes`` (the head when this was written);
- ``0007-created_at`` (not a revision): 0007 without ``requests(created_at)`` and
  ``responses(created_at)``, which only the lists' ``order_by=created_at`` uses: what serving that order
  from the time indexes would save;
- ``unique-only`` (not a revision): no index but the primary keys' and the UNIQUE constraints': the floor
  under any index choice.

Each schema is migrated once into a template (a SQLite file copied, a PostgreSQL ``CREATE DATABASE …
TEMPLATE``), so every run starts from the same empty schema. Within each repeat the variants run side by
side, in a rotated order, each on a fresh copy; printed: median [min..max] µs per exchange over the
repeats, and each variant's difference from 0006 in the same repeat. Only the inserts and commits are
timed; the rows are built before. SQLite: WAL, ``synchronous=NORMAL``, ``foreign_keys=ON`` (the
library's engine settings), a file in the temporary directory (``--sqlite-dir /dev/shm``: in memory,
which leaves the disk's own noise out of a shared machine's figures). PostgreSQL: ``BENCH_POSTGRES_URL``
(default ``postgresql://root@127.0.0.1:5432/test``), default settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text

from qwen_persist.engine import make_engine, normalize_url
from qwen_persist.migrate import upgrade

from .common import POSTGRES_ADMIN_URL, machine, postgres_available, spread, workspace

TABLES = ("sessions", "requests", "responses")
CREATED_AT = ("ix_requests_created_at", "ix_responses_created_at")
# Variant -> (revision, indexes dropped after it; None: every index that is not a constraint's).
VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "0006": ("0006_read_indexes", ()),
    "0007": ("0007_drop_unused_indexes", ()),
    "0007-created_at": ("0007_drop_unused_indexes", CREATED_AT),
    "unique-only": ("0007_drop_unused_indexes", None),
}
BATCH_EXCHANGES = 250  # the writer's default batch: 500 records, a request and a response per exchange
SESSION_COLUMNS = (
    "id, chat_id, parent_id, first_user_message, message_count, created_at, updated_at, last_accessed,"
    " expires_at, ids_updated_at"
)
REQUEST_COLUMNS = (
    'id, session_id, request_id, capture_id, "timestamp", created_at, method, path, openai_request,'
    ' qwen_request, model, stream, "user", metadata, provider'
)
RESPONSE_COLUMNS = (
    'id, request_id, session_id, response_id, upstream_id, "timestamp", created_at, status_code,'
    " openai_response, qwen_response, parent_id, prompt_tokens, completion_tokens, total_tokens,"
    " finish_reason, error, duration_ms, first_byte_ms, headers"
)
# The JSON columns' positions among the columns above: PostgreSQL casts their text to jsonb.
JSON_REQUEST = (8, 9, 13)
JSON_RESPONSE = (8, 9, 18)

Rows = dict[str, list[tuple[Any, ...]]]


def make_rows(n: int, start_ms: int) -> Rows:
    """``n`` exchanges as the writer would store them, bodies of about 1 KB each (JSON text)."""
    sessions, requests, responses = [], [], []
    for i in range(n):
        at = start_ms + i
        session = f"sess-{uuid.uuid4().hex}"
        question = f"Question {i}: how do I make a sourdough starter more active in a cold kitchen?"
        body = {
            "model": "qwen-plus",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant. " * 12},
                {"role": "user", "content": question},
                {"role": "assistant", "content": "Feed it twice a day with equal weights. " * 6},
                {"role": "user", "content": "And if it still does not rise?"},
            ],
            "temperature": 0.7,
            "stream": False,
        }
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": at // 1000,
            "model": "qwen-plus",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Keep it somewhere warmer. " * 30},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 231, "completion_tokens": 180, "total_tokens": 411},
        }
        sessions.append((session, None, None, question, 5, at, at + 900, at, at + 1_800_000, None))
        requests.append(
            (
                i + 1,
                session,
                str(uuid.uuid4()),
                f"bench-{i + 1:x}",
                at,
                at,
                "POST",
                "/v1/chat/completions",
                json.dumps(body),
                None,
                "qwen-plus",
                False,
                None,
                None,
                None,
            )
        )
        responses.append(
            (
                i + 1,
                i + 1,
                session,
                f"resp-{uuid.uuid4()}",
                answer["id"],
                at + 900,
                at + 900,
                200,
                json.dumps(answer),
                None,
                None,
                231,
                180,
                411,
                "stop",
                None,
                900,
                120,
                None,
            )
        )
    return {"sessions": sessions, "requests": requests, "responses": responses}


def _insert(table: str, columns: str, placeholder: str, casts: Sequence[int] = ()) -> str:
    count = columns.count(",") + 1
    values = [placeholder + ("::jsonb" if i in casts else "") for i in range(count)]
    return f"INSERT INTO {table} ({columns}) VALUES ({', '.join(values)})"


def _statements(placeholder: str, postgres: bool) -> dict[str, str]:
    return {
        "sessions": _insert("sessions", SESSION_COLUMNS, placeholder),
        "requests": _insert("requests", REQUEST_COLUMNS, placeholder, JSON_REQUEST if postgres else ()),
        "responses": _insert("responses", RESPONSE_COLUMNS, placeholder, JSON_RESPONSE if postgres else ()),
    }


def _batches(rows: Rows) -> Iterator[dict[str, list[tuple[Any, ...]]]]:
    for first in range(0, len(rows["requests"]), BATCH_EXCHANGES):
        yield {table: rows[table][first : first + BATCH_EXCHANGES] for table in TABLES}


def _dropped(variant: str, present: Sequence[str]) -> list[str]:
    names = VARIANTS[variant][1]
    return [name for name in present if name.startswith("ix_")] if names is None else list(names)


# -- SQLite ------------------------------------------------------------------------------------------


def sqlite_template(workdir: Path, variant: str) -> Path:
    path = workdir / f"template-{variant}.db"
    upgrade(f"sqlite:///{path}", VARIANTS[variant][0])
    with sqlite3.connect(path) as conn:
        present = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " AND tbl_name IN ('sessions', 'requests', 'responses')"
            )
        ]
        for name in _dropped(variant, present):
            conn.execute(f"DROP INDEX {name}")
    conn.close()
    return path


def run_sqlite(template: Path, path: Path, rows: Rows) -> float:
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    statements = _statements("?", postgres=False)
    began = time.perf_counter()
    for batch in _batches(rows):
        conn.execute("BEGIN")
        for table in TABLES:
            conn.executemany(statements[table], batch[table])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return elapsed


# -- PostgreSQL --------------------------------------------------------------------------------------


def _postgres_url(database: str) -> str:
    return normalize_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def _libpq(database: str) -> str:
    return _postgres_url(database).replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def postgres_databases() -> Iterator[Callable[[str], None]]:
    """A function that runs one statement as the administrator (CREATE/DROP DATABASE); every database
    whose name starts with this run's prefix is dropped at the end."""
    admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def admin_sql(statement: str) -> None:
        with admin.connect() as conn:
            conn.execute(text(statement))
        if statement.startswith("CREATE DATABASE"):
            made.append(statement.split('"')[1])

    try:
        yield admin_sql
    finally:
        with admin.connect() as conn:
            for name in reversed(made):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_template(admin_sql: Callable[[str], None], prefix: str, variant: str) -> str:
    name = f"{prefix}_t_{variant.replace('-', '_')}"
    admin_sql(f'CREATE DATABASE "{name}"')
    url = _postgres_url(name)
    upgrade(url, VARIANTS[variant][0])
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            present = list(
                conn.execute(
                    text(
                        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
                        " JOIN pg_class t ON t.oid = x.indrelid"
                        " WHERE t.relname IN ('sessions', 'requests', 'responses')"
                    )
                ).scalars()
            )
            for index in _dropped(variant, present):
                conn.execute(text(f"DROP INDEX {index}"))
    finally:
        engine.dispose()
    return name


def run_postgres(admin_sql: Callable[[str], None], template: str, name: str, rows: Rows) -> float:
    import psycopg

    admin_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    statements = _statements("%s", postgres=True)
    with psycopg.connect(_libpq(name)) as conn:
        began = time.perf_counter()
        for batch in _batches(rows):
            with conn.cursor() as cursor:
                for table in TABLES:
                    cursor.executemany(statements[table], batch[table])
            conn.commit()
        elapsed = time.perf_counter() - began
    admin_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    return elapsed


# -- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--sqlite-dir",
        type=Path,
        help="where the SQLite files go (default: a temporary directory); /dev/shm leaves the disk out",
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    backends = [b for b in args.backends.split(",") if b]
    if "postgresql" in backends and not postgres_available():
        print(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: SQLite only")
        backends.remove("postgresql")
    print(machine())
    rows = make_rows(args.exchanges, time.time_ns() // 1_000_000)
    sizes = [len(r[8]) for r in rows["requests"][:1]] + [len(r[8]) for r in rows["responses"][:1]]
    print(
        f"{args.exchanges:,} exchanges per run (request body {sizes[0]} B, response body {sizes[1]} B),"
        f" {BATCH_EXCHANGES} per transaction, {args.repeats} repeats"
    )
    figures: dict[str, dict[str, list[float]]] = {}
    with workspace() as scratch:
        workdir = scratch
        if args.sqlite_dir:
            workdir = Path(tempfile.mkdtemp(prefix="qp-bench-", dir=args.sqlite_dir))
        for backend in backends:
            us = figures.setdefault(backend, {})
            with postgres_databases() as admin_sql:
                prefix = f"qp_bench_ix_{uuid.uuid4().hex[:8]}"
                if backend == "sqlite":
                    sqlite_templates = {v: sqlite_template(workdir, v) for v in variants}
                else:
                    postgres_templates = {v: postgres_template(admin_sql, prefix, v) for v in variants}
                # One untimed run first: the file system's and the server's caches are warm for all.
                if backend == "sqlite":
                    run_sqlite(sqlite_templates[variants[0]], workdir / "run.db", rows)
                else:
                    run_postgres(admin_sql, postgres_templates[variants[0]], f"{prefix}_run", rows)
                for repeat in range(args.repeats):
                    order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
                    line = []
                    for variant in order:
                        if backend == "sqlite":
                            seconds = run_sqlite(sqlite_templates[variant], workdir / "run.db", rows)
                        else:
                            run_name = f"{prefix}_run"
                            seconds = run_postgres(admin_sql, postgres_templates[variant], run_name, rows)
                        us.setdefault(variant, []).append(seconds / args.exchanges * 1e6)
                        line.append(f"{variant} {us[variant][-1]:6.1f}")
                    print(f"  {backend:10} repeat {repeat}: " + "  ".join(line) + " µs/exchange", flush=True)
        if workdir != scratch:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nµs per exchange (3 rows), median [min..max]; difference from 0006 in the same repeat")
    print(f"{'backend':10} {'variant':16} {'µs/exchange':>24} {'- 0006':>24} {'÷ 0006':>22}")
    for backend, per in figures.items():
        for variant, values in per.items():
            base = per.get("0006")
            delta = [v - b for v, b in zip(values, base, strict=True)] if base else []
            ratio = [v / b for v, b in zip(values, base, strict=True)] if base else []
            print(
                f"{backend:10} {variant:16} {spread(values, '{:.1f}'):>24}"
                f" {spread(delta, '{:+.1f}'):>24} {spread(ratio):>22}"
            )
    if args.json:
        summary = {
            backend: {variant: {"median": statistics.median(v), "runs": v} for variant, v in per.items()}
            for backend, per in figures.items()
        }
        args.json.write_text(json.dumps({"exchanges": args.exchanges, "us_per_exchange": summary}, indent=1))


if __name__ == "__main__":
    main()
