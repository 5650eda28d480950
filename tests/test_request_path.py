"""The lean request path (issue #12): nothing an exchange leaves for the garbage collector, disconnect
watchers that end with their exchange whatever the server does, and cheaper ids that stay what they were.

Most tests drive the middleware in process with a server shaped like uvicorn's (the body, then a
receive() that waits for the client to leave or the response to complete); the writer is replaced by a
list, so only the request path is under test. The uvicorn tests are in test_reliability.py and
test_fidelity.py (a deaf app, a client that gives up before a JSON answer) and one here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import serve

from qwen_persist import PersistenceMiddleware
from qwen_persist.middleware import _ExchangeResponder
from qwen_persist.records import CLIENT_DISCONNECTED, CapturedRequest, CapturedResponse
from qwen_persist.sessions import api_key_fingerprint, new_request_id

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}'


class Server:
    """One request/response cycle. ``answers_after_response``: like uvicorn, a waiting receive()
    answers ``http.disconnect`` once the response is complete; otherwise it waits until cancelled."""

    def __init__(self, *, answers_after_response: bool = True) -> None:
        self.answers_after_response = answers_after_response
        self.event = asyncio.Event()
        self.read = False
        self.complete = False
        self.gone = False
        self.sent: list[bytes] = []
        self.receives_cancelled = 0
        self.receives_answered = 0

    def leave(self) -> None:
        self.gone = True
        self.event.set()

    async def receive(self) -> dict[str, Any]:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        try:
            while not (self.gone or (self.complete and self.answers_after_response)):
                self.event.clear()
                await self.event.wait()
        except asyncio.CancelledError:
            self.receives_cancelled += 1
            raise
        self.receives_answered += 1
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone:
            return  # dropped without a word, as uvicorn does
        if message["type"] == "http.response.body":
            self.sent.append(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
                self.event.set()


def scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


async def json_app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": ANSWER})


async def stream_app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for index in range(5):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % index, "more_body": True})
        await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@pytest.fixture
def captured(tmp_path: Path) -> Iterator[tuple[PersistenceMiddleware, list[Any]]]:
    """A middleware whose writer only collects the records (it never starts)."""
    middleware = PersistenceMiddleware(
        json_app, database_url=f"sqlite:///{tmp_path / 'unused.db'}", spill_dir=str(tmp_path / "spill")
    )
    records: list[Any] = []
    middleware.writer.submit = records.append  # type: ignore[method-assign]
    yield middleware, records
    middleware.engine.dispose()


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def _exchange(
    middleware: PersistenceMiddleware, server: Server, *, leave_after: int | None = None
) -> None:
    call = asyncio.ensure_future(middleware(scope(), server.receive, server.send))
    if leave_after is not None:
        await _turns(leave_after)
        server.leave()
    await call
    await _turns(4)  # what the exchange left scheduled: the watcher's answer, the sweep


@pytest.mark.parametrize(
    ("app", "leave_after"),
    [(json_app, None), (stream_app, None), (stream_app, 4)],
    ids=["json", "stream", "client-leaves"],
)
def test_an_exchange_leaves_nothing_for_the_collector(
    captured: tuple[PersistenceMiddleware, list[Any]], app: Any, leave_after: int | None
) -> None:
    """Once an exchange has ended, its responder and records are freed by reference counting (here the
    records live on in the list standing in for the writer), never by a collection: the disconnect
    watcher once left a reference cycle per exchange through a cancelled task's traceback.

    Not an app that raises: its exception's traceback holds the task running it, which holds the
    exception, so that exchange's frames (the app's, holding our receive and send) wait for a
    collection whether the middleware is there or not."""
    middleware, records = captured
    middleware.app = app
    ours = (_ExchangeResponder, CapturedRequest, CapturedResponse)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        asyncio.run(_exchange(middleware, Server(), leave_after=leave_after))
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, ours)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
    request, response = records
    assert isinstance(request, CapturedRequest) and isinstance(response, CapturedResponse)
    if leave_after is not None:
        assert response.error == CLIENT_DISCONNECTED
    else:
        assert response.error is None and response.status_code == 200


def test_a_watcher_the_server_answers_is_not_cancelled(
    captured: tuple[PersistenceMiddleware, list[Any]],
) -> None:
    middleware, records = captured

    async def main() -> list[Server]:
        servers = [Server() for _ in range(8)]
        await asyncio.gather(*(_exchange(middleware, server) for server in servers))
        return servers

    servers = asyncio.run(main())
    assert [(s.receives_answered, s.receives_cancelled) for s in servers] == [(1, 0)] * 8
    assert [r.error for r in records if isinstance(r, CapturedResponse)] == [None] * 8


def test_a_watcher_the_server_leaves_waiting_is_cancelled(
    captured: tuple[PersistenceMiddleware, list[Any]],
) -> None:
    """A server that never answers a receive() made before the response completed: the watcher is
    cancelled a couple of loop turns after its exchange ended, also on a second event loop (the first
    one's sweep went with it), and the exchanges are complete, not disconnected."""
    middleware, records = captured

    async def main() -> list[Server]:
        servers = [Server(answers_after_response=False) for _ in range(3)]
        await asyncio.gather(*(_exchange(middleware, server) for server in servers))
        return servers

    for _ in range(2):
        servers = asyncio.run(main())
        assert [(s.receives_answered, s.receives_cancelled) for s in servers] == [(0, 1)] * 3
    assert [r.error for r in records if isinstance(r, CapturedResponse)] == [None] * 6


def test_watchers_end_with_their_exchanges_under_uvicorn(migrated_url: str, tmp_path: Path) -> None:
    """Over one keep-alive connection, JSON and streamed exchanges by an app that never listens leave
    no task waiting on the server's receive() behind them."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/waiting":
            waiting = [
                task
                for task in asyncio.all_tasks()
                if getattr(task.get_coro(), "__qualname__", "").endswith(".receive")
            ]
            body = str(len(waiting)).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        stream = json.loads(await _body(receive)).get("stream", False)
        await (stream_app if stream else json_app)(scope, _replay(), send)

    middleware = PersistenceMiddleware(app, database_url=migrated_url, spill_dir=str(tmp_path))
    with serve(middleware) as base, httpx.Client(base_url=base) as http:
        for index in range(10):
            response = http.post("/v1/chat/completions", json={"messages": [], "stream": index % 2 == 1})
            assert response.status_code == 200
            assert uuid.UUID(response.headers["x-request-id"]).version == 4
        assert http.get("/waiting").text == "0"


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay() -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    return receive


def test_request_ids_are_random_uuid4_strings_and_new_in_a_forked_child() -> None:
    ids = [new_request_id() for _ in range(5000)]  # past one 4 KiB read of random bytes
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert status == 0 and uuid.UUID(child).version == 4
    # Without renewing its random bytes at fork, the child would hand out the parent's next id.
    assert child != new_request_id()


def test_api_key_fingerprints_are_remembered_within_bounds(
    captured: tuple[PersistenceMiddleware, list[Any]],
) -> None:
    middleware, _ = captured
    keys = [f"sk-{index}" for index in range(600)]
    for key in keys + keys[:10]:
        assert middleware._fingerprint(key) == api_key_fingerprint(key)
        assert len(middleware._fingerprints) <= 256
    assert len({middleware._fingerprint(key) for key in keys}) == len(keys)
