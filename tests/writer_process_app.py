"""A minimal recorded app with the writer in a child process, for tests that run it under uvicorn in a
process of its own (``uvicorn writer_process_app:app --app-dir tests``), built from the environment."""

from __future__ import annotations

import os
from typing import Any

from starlette.types import Receive, Scope, Send

from qwen_persist import PersistenceMiddleware

ANSWER = (
    b'{"id":"chatcmpl-w","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'
)


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": ANSWER})


async def exchange(middleware: PersistenceMiddleware, text: str) -> None:
    """One exchange through ``middleware`` in process, without a server."""
    body = b'{"model":"m","messages":[{"role":"user","content":"%s"}]}' % text.encode()
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await middleware({**scope, "query_string": b""}, receive, send)
    assert sent[0]["status"] == 200


def _build() -> PersistenceMiddleware:
    return PersistenceMiddleware(
        answer,
        database_url=os.environ["WRITER_TEST_DATABASE_URL"],
        spill_dir=os.environ["WRITER_TEST_SPILL"],
        writer="process",
    )


app = _build() if "WRITER_TEST_DATABASE_URL" in os.environ else None
