"""The benchmark server: one minimal OpenAI-compatible app, served bare, wrapped, or the naive way.

Run by the benchmark scripts as ``python -m benchmarks.app VARIANT FD COUNT_FILE [DATABASE_URL]`` in a
child process pinned to one core. FD is a listening socket the parent bound (so no port race); COUNT_FILE
receives the number of chat completion requests the app answered, written at lifespan shutdown, which the
parent compares with the rows the database holds afterwards.

Variants:
- ``bare``: the app alone.
- ``wrapped``: the app inside `PersistenceMiddleware` (persistence on, every exchange written).
- ``naive``: the app inside a `BaseHTTPMiddleware` that buffers the request and the whole response and
  commits one row per request on the event loop: the design `qwen_persist` exists to avoid. It lives
  here only, never in the package.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

SSE_EVENTS = 20  # events per stream, [DONE] included
# Tokens of the fake answer; the stream sends one per event, as real upstreams do.
WORDS = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
BIG_STREAM_CHUNK = 64 * 1024  # a forwarding proxy relays upstream network reads of about this size

answered = 0


def _chunk(created: int, delta: dict[str, Any], finish: str | None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": "bench-model",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _sse_events(created: int) -> AsyncIterator[bytes]:
    yield _chunk(created, {"role": "assistant", "content": ""}, None)
    for i in range(SSE_EVENTS - 3):
        yield _chunk(created, {"content": WORDS[i % len(WORDS)]}, None)
    yield _chunk(created, {}, "stop")
    yield b"data: [DONE]\n\n"


async def _big_stream(total: int) -> AsyncIterator[bytes]:
    # Realistic OpenAI chunks (a few characters of content in ~200 bytes of envelope), relayed in
    # network-sized pieces: what a proxy forwards when a model writes a very long answer.
    event = _chunk(0, {"content": " tok"}, None)
    piece = event * (BIG_STREAM_CHUNK // len(event))
    sent = 0
    while sent < total:
        yield piece
        sent += len(piece)
    yield _chunk(0, {}, "stop") + b"data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    global answered
    answered += 1
    body = json.loads(await request.body())
    created = int(time.time())
    big = request.query_params.get("bytes")
    if big is not None:
        return StreamingResponse(_big_stream(int(big)), media_type="text/event-stream")
    if body.get("stream"):
        return StreamingResponse(_sse_events(created), media_type="text/event-stream")
    return JSONResponse(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": created,
            "model": body.get("model", "bench-model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
        }
    )


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def make_app(count_file: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        with open(count_file, "w") as out:
            out.write(str(answered))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/health", health),
        ],
        lifespan=lifespan,
    )


NAIVE_DDL = (
    "CREATE TABLE IF NOT EXISTS naive_exchanges (id INTEGER PRIMARY KEY, request_body TEXT NOT NULL,"
    " status_code INTEGER, response_body TEXT, created_at BIGINT NOT NULL)"
)


class NaiveRecorder(BaseHTTPMiddleware):
    """Buffer the request and the whole response, then commit one row, all on the request path."""

    def __init__(self, app: ASGIApp, database_url: str) -> None:
        super().__init__(app)
        from sqlalchemy import text

        from qwen_persist.engine import make_engine

        self.engine = make_engine(database_url)
        self.insert = text(
            "INSERT INTO naive_exchanges (request_body, status_code, response_body, created_at)"
            " VALUES (:req, :status, :resp, :now)"
        )
        ddl = NAIVE_DDL
        if self.engine.dialect.name == "postgresql":
            ddl = ddl.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
        with self.engine.begin() as conn:
            conn.execute(text(ddl))

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path != "/v1/chat/completions":
            return await call_next(request)
        request_body = await request.body()
        response = await call_next(request)
        chunks = [chunk async for chunk in response.body_iterator]  # type: ignore[attr-defined]
        response_body = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
        with self.engine.begin() as conn:
            conn.execute(
                self.insert,
                {
                    "req": request_body.decode(),
                    "status": response.status_code,
                    "resp": response_body.decode(),
                    "now": int(time.time() * 1000),
                },
            )
        return Response(
            response_body,
            status_code=response.status_code,
            headers=dict(response.headers),
            media_type=response.media_type,
        )


def build(variant: str, count_file: str, database_url: str | None) -> ASGIApp:
    app = make_app(count_file)
    if variant == "bare":
        return app
    if database_url is None:
        raise SystemExit(f"variant {variant} needs a database URL")
    if variant == "naive":
        return NaiveRecorder(app, database_url)
    if variant in WRITERS:
        from qwen_persist import PersistenceMiddleware

        spill = tempfile.mkdtemp(prefix="qp-bench-spill-")
        return PersistenceMiddleware(app, database_url=database_url, spill_dir=spill, writer=WRITERS[variant])
    raise SystemExit(f"unknown variant {variant!r}")


# The wrapped variants by writer: a thread; a process pinned with the server; a process free to use the
# other core (common.server widens its pinning once it runs).
WRITERS = {"wrapped": "thread", "process": "process", "process-free": "process"}


def main() -> None:
    import uvicorn

    variant, fd, count_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    database_url = sys.argv[4] if len(sys.argv) > 4 else None
    app = build(variant, count_file, database_url)
    # wrk drops its connections mid-response when its time is up; asyncio's warning per write after
    # that is noise here.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    sock = socket.socket(fileno=fd)
    if os.environ.get("BENCH_GC_FREEZE"):
        # The deployment tuning README.md describes: imports and app set-up leave the collector's view,
        # so a full collection no longer pauses every thread for tens of milliseconds.
        gc.freeze()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        http=os.environ.get("BENCH_HTTP", "auto"),
        loop=os.environ.get("BENCH_LOOP", "auto"),
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
