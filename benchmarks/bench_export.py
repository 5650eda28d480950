"""``qwen-persist export`` throughput and peak memory on 100,000 stored exchanges (SPEC §10: ≥ 20,000
exchanges/s in < 150 MB).

    python -m benchmarks.bench_export                  # ~2 min; --count, --repeats, --backends

Each backend gets a fresh migrated database filled with ``--count`` exchanges of a realistic size (a
system prompt, a few turns of history, a reply of a few sentences; one in ten a tool call round trip,
one in twenty an upstream error), inserted in bulk. Then ``qwen-persist export`` runs as a child process
of its own, through the console entry point, for each format, writing to a file: its wall time gives
exchanges/s, and ``os.wait4`` gives that child's own peak RSS. The *floor* run exports nothing (a filter
no row matches): the process's start-up footprint (Python, SQLAlchemy, the driver, rich), so the
difference is what exporting costs. Every run's line count is checked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from qwen_persist.engine import make_engine
from qwen_persist.models import requests_table, responses_table, sessions_table

from .common import fresh_database, machine, postgres_available, spread, workspace

SYSTEM = (
    "You are a support assistant for an online bookshop. Answer briefly and politely, cite the order "
    "number when there is one, and never promise a delivery date the tracking data does not show."
)
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by number",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
    },
}
CHUNK = 5000


def _exchange(i: int, start: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    session = f"bench-{i // 4}"
    at = start + i * 10
    history = [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Hello, I ordered three books last week (order {1000 + i}). Where are they?",
        },
        {"role": "assistant", "content": "Let me check that order for you. One moment please."},
        {"role": "user", "content": "Thanks. Also, can I still add a gift note to the parcel?"},
    ]
    body: dict[str, Any] = {"model": "qwen-plus", "messages": history, "stream": i % 2 == 0}
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "Your order shipped on Tuesday and is with the carrier; tracking shows delivery "
        "expected on Friday. A gift note can no longer be added once a parcel has shipped, but we can "
        "email a printable note to the recipient if you like.",
    }
    status, error, finish = 200, None, "stop"
    if i % 10 == 0:
        body["tools"] = [TOOL]
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": json.dumps({"order": str(1000 + i)})},
                }
            ],
        }
        finish = "tool_calls"
    completion: Any = {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion",
        "created": at // 1000,
        "model": "qwen-plus",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 96, "completion_tokens": 54, "total_tokens": 150},
    }
    if i % 20 == 7:
        status, error, finish = 429, "Rate limit reached", None
        completion = {"error": {"message": error, "type": "requests", "code": "rate_limit_exceeded"}}
    session_row = {
        "id": session,
        "chat_id": None,
        "parent_id": None,
        "first_user_message": history[1]["content"],
        "message_count": len(history),
        "created_at": at,
        "updated_at": at,
        "last_accessed": at,
        "expires_at": at + 1_800_000,
        "ids_updated_at": None,
    }
    request = {
        "id": i + 1,
        "request_id": str(uuid.UUID(int=i)),
        "session_id": session,
        "capture_id": f"bench-{i}",
        "timestamp": at,
        "created_at": at,
        "method": "POST",
        "path": "/v1/chat/completions",
        "openai_request": body,
        "qwen_request": None,
        "model": "qwen-plus",
        "stream": body["stream"],
        "user": None,
        "metadata": {"team": "books", "shard": str(i % 8)},
        "provider": None,
    }
    response = {
        "request_id": i + 1,
        "session_id": session,
        "response_id": f"resp-{i}",
        "upstream_id": completion.get("id"),
        "timestamp": at + 800,
        "created_at": at + 800,
        "status_code": status,
        "openai_response": completion,
        "qwen_response": None,
        "parent_id": None,
        "prompt_tokens": None if error else 96,
        "completion_tokens": None if error else 54,
        "total_tokens": None if error else 150,
        "finish_reason": finish,
        "error": error,
        "duration_ms": 800 + i % 400,
        "first_byte_ms": 120 + i % 80,
        "headers": None,
    }
    return session_row, request, response


def fill(url: str, count: int) -> None:
    """``count`` exchanges, inserted in bulk (a benchmark fixture, not how the middleware writes)."""
    engine = make_engine(url)
    start = int(time.time() * 1000) - count * 10
    try:
        for first in range(0, count, CHUNK):
            rows = [_exchange(i, start) for i in range(first, min(first + CHUNK, count))]
            sessions = list({row[0]["id"]: row[0] for row in rows}.values())
            with engine.begin() as conn:
                conn.execute(insert(sessions_table), sessions)
                conn.execute(insert(requests_table), [row[1] for row in rows])
                conn.execute(insert(responses_table), [row[2] for row in rows])
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:  # the ids were given: move the sequence past them
                conn.exec_driver_sql("SELECT setval('requests_id_seq', (SELECT max(id) FROM requests))")
            # What autovacuum would have done by the time anyone exports a table this size.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


# Linux counts what a child inherits at fork in its peak RSS (ru_maxrss survives exec), so the export is
# started by a small launcher process rather than by this one, which holds the fixture's rows.
LAUNCHER = """
import os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss)
"""


def export(url: str, fmt: str, out: Path, *extra: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, lines) of one ``qwen-persist export`` child."""
    argv = [sys.executable, "-m", "qwen_persist.cli", "export", "--database-url", url, "--format", fmt]
    argv += ["-o", str(out), "--no-progress", *extra]
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *argv], capture_output=True, text=True, check=False, timeout=600
    )
    code, seconds, peak_kib = done.stdout.split()
    if code != "0":
        raise SystemExit(f"export failed ({code}): {done.stderr}")
    with out.open("rb") as file:
        lines = sum(1 for _ in file)
    return float(seconds), int(peak_kib) / 1024, lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    backends = args.backends.split(",")
    if "postgresql" in backends and not postgres_available():
        print("PostgreSQL unreachable: measuring SQLite only", file=sys.stderr)
        backends.remove("postgresql")
    print(machine())
    successes = args.count - args.count // 20
    with workspace() as workdir:
        for backend in backends:
            with fresh_database(backend, workdir) as url:
                began = time.perf_counter()
                fill(url, args.count)
                print(
                    f"\n{backend}: {args.count:,} exchanges inserted in {time.perf_counter() - began:.1f} s"
                )
                _, floor_rss, _ = export(url, "jsonl", workdir / "floor.jsonl", "--model", "no-such-model")
                print(f"  floor (start-up, nothing exported): peak RSS {floor_rss:.0f} MiB")
                for fmt, expected in (("jsonl", args.count), ("openai-chat", successes)):
                    rates, peaks = [], []
                    for _ in range(args.repeats):
                        out = workdir / f"export-{fmt}.jsonl"
                        seconds, peak, lines = export(url, fmt, out)
                        if lines != expected:
                            raise SystemExit(f"{fmt}: {lines} lines, expected {expected}")
                        rates.append(args.count / seconds)
                        peaks.append(peak)
                        size = out.stat().st_size / 2**20
                        out.unlink()
                    print(
                        f"  {fmt:<12} {spread(rates, '{:,.0f}')} exchanges/s,"
                        f"  peak RSS {spread(peaks, '{:.0f}')} MiB  ({expected:,} lines, {size:.0f} MiB)"
                    )


if __name__ == "__main__":
    main()
