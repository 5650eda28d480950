"""Memory: a 100 MB stream through the middleware, and the queue under a stalled database.

    python -m benchmarks.bench_memory                # ~1 minute

1. A 100 MB SSE response (realistic OpenAI chunks relayed in 64 KB pieces) through the bare server and
   the wrapped one (SQLite), interleaved; the server's peak RSS (VmHWM) is read before shutdown, and the
   exchange must be stored. The middleware keeps at most ``max_body_bytes`` (16 MB by default) of raw
   stream; past that it rebuilds the completion as the bytes pass, so growth is bounded by the
   completion's size, not by the stream's.
2. In process, no HTTP: SQLite locked by another connection (``BEGIN EXCLUSIVE``) while exchanges keep
   coming; the queue depth is sampled after every exchange and must never exceed ``queue_size``; the
   rest goes to the journal. After the lock is released and the middleware closed, written = accepted
   (the writer loads the journal back by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import socket
import sqlite3
import sys
import time
from typing import Any

from .app import make_app
from .common import CLIENT_CORE, fresh_database, machine, pin_self, server, workspace

STREAM_BYTES = 100 * 1024 * 1024


def stream_through(port: int, total: int) -> int:
    """POST one huge streamed request and read it to the end; returns the bytes received."""
    body = b'{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"long answer"}]}'
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(
            b"POST /v1/chat/completions?bytes=%d HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (total, len(body), body)
        )
        received = 0
        while chunk := conn.recv(1 << 20):
            received += len(chunk)
    return received


def big_stream(repeats: int) -> list[str]:
    problems = []
    with workspace() as workdir:
        for repeat in range(repeats):
            for variant in ("bare", "wrapped", "process"):
                with fresh_database("sqlite", workdir) as url:
                    with server(variant, url if variant != "bare" else None, workdir) as run:
                        idle = run.rss_mb()
                        began = time.perf_counter()
                        received = stream_through(run.port, STREAM_BYTES)
                        elapsed = time.perf_counter() - began
                        time.sleep(0.5)  # the writer stores the exchange (its JSON encoding counts too)
                        peak = run.peak_rss_mb()
                    stored = f"rows={run.requests_rows}/{run.responses_rows}" if variant != "bare" else ""
                    print(
                        f"  repeat {repeat} {variant:8} {received / 2**20:6.1f} MiB in {elapsed:5.2f} s;"
                        f" RSS idle {idle:6.1f} MiB, peak {peak:6.1f} MiB (+{peak - idle:5.1f}) {stored}",
                        flush=True,
                    )
                    if variant != "bare" and not run.all_persisted:
                        problems.append(f"100 MB stream not stored: {stored}")
    return problems


async def stalled_database(exchanges: int, queue_size: int) -> list[str]:
    from qwen_persist import PersistenceMiddleware

    problems = []
    # One warning line per spilled record would bury the figures; the counters below say it all.
    logging.getLogger("qwen_persist").setLevel(logging.ERROR)
    with workspace() as workdir, fresh_database("sqlite", workdir) as url:
        path = url.removeprefix("sqlite:///")
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # the writer's transactions now wait, then fail and retry
        middleware = PersistenceMiddleware(
            make_app(str(workdir / "answered")),
            database_url=url,
            queue_size=queue_size,
            batch_size=100,
            spill_dir=str(workdir / "spill"),
            writer="thread",  # the in-process queue whose depth this measures
        )
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        max_depth = 0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        began = time.perf_counter()
        for i in range(exchanges):
            await _call(middleware, body, i)
            max_depth = max(max_depth, middleware.stats().queue_depth)
        elapsed = time.perf_counter() - began
        stalled = middleware.stats()
        locker.execute("ROLLBACK")
        locker.close()
        final = await middleware.aclose(60)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"  {exchanges} exchanges in {elapsed:.2f} s against a locked SQLite file,"
            f" queue_size={queue_size}:"
            f" max queue depth {max_depth}, spilled while locked {stalled.spilled},"
            f" written while locked {stalled.written}"
        )
        print(
            f"  after unlock + aclose: accepted {final.accepted}, written {final.written},"
            f" spilled {final.spilled}, failed {final.failed};"
            f" peak RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
        )
        if max_depth > queue_size:
            problems.append(f"queue depth {max_depth} exceeded queue_size {queue_size}")
        # Journaled while locked, then loaded back by the writer itself once the lock was gone.
        if final.written != final.accepted or final.failed:
            problems.append(f"records unaccounted for: {final}")
        if stalled.spilled == 0:
            problems.append("nothing journaled while the database was locked")
    return problems


async def _call(app: Any, body: bytes, i: int) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1000 + i % 50000),
        "server": ("127.0.0.1", 80),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exchanges", type=int, default=3000)
    parser.add_argument("--queue-size", type=int, default=500)
    args = parser.parse_args()
    pin_self(CLIENT_CORE)
    print(machine())
    print(f"1. {STREAM_BYTES // 2**20} MiB SSE response, bare vs wrapped (SQLite, max_body_bytes 16 MiB)")
    problems = big_stream(args.repeats)
    print("2. stalled database: bounded queue, the rest journaled, then stored")
    problems += asyncio.run(stalled_database(args.exchanges, args.queue_size))
    print("all bounded and accounted for:", "yes" if not problems else "NO")
    for problem in problems:
        print("  " + problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
