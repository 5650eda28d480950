"""Persistence never breaks the proxy's traffic, and nothing is lost: app exceptions, clients that
vanish, a locked, missing or unreachable database, a full queue, SIGTERM under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fake_upstream
import httpx
import openai_proxy
import pytest
from support import ROOT, serve, stored_exchanges

from qwen_persist import PersistenceMiddleware
from qwen_persist.cli import main as cli
from qwen_persist.engine import SQLITE_BUSY_TIMEOUT_MS
from qwen_persist.migrate import upgrade

USER = [{"role": "user", "content": "hello there"}]
BODY = {"model": "fake-text", "messages": USER}


def chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    event = {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class Boom(Exception):
    pass


async def read_body(receive: Any) -> None:
    while (await receive()).get("more_body", False):
        pass


# -- the app fails --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_app_exception_is_recorded_and_reraised_unchanged(migrated_url: str, tmp_path: Path) -> None:
    raised = Boom("upstream exploded")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await read_body(receive)
        raise raised

    async def streaming_app(scope: Any, receive: Any, send: Any) -> None:
        await read_body(receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": chunk("partial"), "more_body": True})
        raise raised

    for target in (app, streaming_app):
        middleware = PersistenceMiddleware(target, database_url=migrated_url, spill_dir=str(tmp_path))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(middleware), base_url="http://t"
        ) as client:
            with pytest.raises(Boom) as caught:
                await client.post("/v1/chat/completions", json=BODY)
        assert caught.value is raised
        await middleware.aclose()
    (_, before_start), (_, mid_stream) = stored_exchanges(migrated_url)
    assert before_start is not None and mid_stream is not None
    assert (before_start.status_code, before_start.error) == (500, "Boom: upstream exploded")
    assert (mid_stream.status_code, mid_stream.error) == (200, "Boom: upstream exploded")
    assert mid_stream.openai_response["choices"][0]["message"]["content"] == "partial"


def test_disconnect_is_seen_even_when_the_app_never_listens(migrated_url: str, tmp_path: Path) -> None:
    sent = 0

    async def deaf_app(scope: Any, receive: Any, send: Any) -> None:
        # Never calls receive() after the body: the server drops what it sends after the client left.
        nonlocal sent
        await read_body(receive)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(150):
            await send({"type": "http.response.body", "body": chunk(f"w{i} "), "more_body": True})
            sent += 1
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": chunk(None, "stop") + b"data: [DONE]\n\n"})

    middleware = PersistenceMiddleware(deaf_app, database_url=migrated_url, spill_dir=str(tmp_path))
    received = ""
    with serve(middleware) as base, httpx.Client(timeout=10) as http:
        with http.stream("POST", f"{base}/v1/chat/completions", json=BODY) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if received.count(" ") >= 5:
                    break
        deadline = time.monotonic() + 10
        while sent < 150 and time.monotonic() < deadline:  # the app goes on to the end, unaware
            time.sleep(0.05)
        asyncio.run(middleware.aclose())
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error == "client_disconnected" and row.finish_reason is None
    stored = row.openai_response["choices"][0]["message"]["content"]
    assert stored.startswith(received)
    assert len(stored.split()) < 100  # not the 150 words the app went on sending into the void


# -- the database fails ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_url() -> Any:
    with serve(fake_upstream.create_app()) as url:
        yield f"{url}/v1"


def test_locked_sqlite_database_slows_no_request_and_loses_nothing(
    upstream_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    upgrade(sqlite_url)
    app = openai_proxy.create_app(upstream_url, "", database_url=sqlite_url, spill_dir=str(tmp_path))
    with serve(app) as base, httpx.Client() as http:
        locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # no reader or writer gets in until we commit
        try:
            started = time.monotonic()
            statuses = [http.post(f"{base}/v1/chat/completions", json=BODY).status_code for _ in range(20)]
            elapsed = time.monotonic() - started
            assert statuses == [200] * 20
            # All answered while the database was still locked: traffic did not wait for it. A request
            # that waited for the lock would alone take the whole busy timeout, whereas how long 20
            # requests take depends on how busy the machine is: the bound is the former.
            assert elapsed < SQLITE_BUSY_TIMEOUT_MS / 1000
        finally:
            locker.execute("COMMIT")
            locker.close()
    stored = stored_exchanges(sqlite_url)
    assert len(stored) == 20 and all(resp is not None and resp.status_code == 200 for _, resp in stored)


def test_schema_missing_during_traffic_then_records_land(
    upstream_url: str, database_url: str, tmp_path: Path
) -> None:
    # The database exists but nobody ran the migrations yet: the writer retries until they are run.
    app = openai_proxy.create_app(upstream_url, "", database_url=database_url, spill_dir=str(tmp_path))
    with serve(app) as base, httpx.Client() as http:
        statuses = [http.post(f"{base}/v1/chat/completions", json=BODY).status_code for _ in range(10)]
        assert statuses == [200] * 10
        middleware = find_persistence(app)
        deadline = time.monotonic() + 10
        while middleware.stats().retries == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert middleware.stats().retries > 0 and middleware.stats().written == 0
        upgrade(database_url)
    stats = middleware.stats()
    # Journaled while the schema was missing, then loaded back by the writer itself: no manual replay.
    assert (stats.written, stats.failed) == (20, 0) and stats.spilled == stats.replayed > 0
    assert len(stored_exchanges(database_url)) == 10
    assert not list(tmp_path.glob("journal-*.log"))  # a segment is deleted once it is stored


@pytest.mark.anyio
async def test_unreachable_database_spills_and_replay_restores(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = tmp_path / "gone"
    if database_url.startswith("sqlite"):
        # The directory exists when the middleware checks its options and vanishes before any write.
        gone.mkdir()
        down_url = f"sqlite:///{gone / 'dir.db'}"
    else:
        with socket.socket() as sock:  # a port where nothing listens
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        down_url = f"postgresql://root@127.0.0.1:{port}/test?connect_timeout=1"
    spill_dir = tmp_path / "spill"
    upstream = fake_upstream.create_app()

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        await upstream(scope, receive, send)

    # A queue of 4 fills at once while the writer waits for the database: the rest spills right away.
    middleware = PersistenceMiddleware(proxy, database_url=down_url, spill_dir=str(spill_dir), queue_size=4)
    if gone.exists():
        gone.rmdir()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://t") as client:
        bodies = [
            {**BODY, "stream": i % 2 == 1, "messages": [{"role": "user", "content": f"q{i}"}]}
            for i in range(12)
        ]
        responses = [await client.post("/v1/chat/completions", json=body) for body in bodies]
    assert [r.status_code for r in responses] == [200] * 12
    stats = await middleware.aclose(timeout=1.0)
    assert (stats.accepted, stats.written, stats.spilled, stats.failed) == (24, 0, 24, 0)
    [spill] = spill_dir.iterdir()
    assert "Bearer" not in spill.read_text()

    upgrade(database_url)
    assert cli(["replay", str(spill), "--database-url", database_url]) == 0
    assert "24 records written, 0 already stored" in capsys.readouterr().out
    stored = stored_exchanges(database_url)
    assert sorted(req.openai_request["messages"][0]["content"] for req, _ in stored) == sorted(
        f"q{i}" for i in range(12)
    )
    assert {req.request_id for req, _ in stored} == {r.headers["x-request-id"] for r in responses}
    for request, response in stored:
        assert response is not None and response.status_code == 200
        assert (
            response.finish_reason == "stop"
            and request.openai_request["messages"][0]["content"]
            in (response.openai_response["choices"][0]["message"]["content"])
        )
    # Replaying again changes nothing.
    assert cli(["replay", str(spill), "--database-url", database_url]) == 0
    assert "0 records written, 24 already stored" in capsys.readouterr().out
    assert len(stored_exchanges(database_url)) == 12


def find_persistence(app: Any) -> PersistenceMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, PersistenceMiddleware):
        layer = layer.app
    return layer


# -- the process is stopped -----------------------------------------------------------------------


def test_sigterm_during_load_loses_nothing(upstream_url: str, database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "UPSTREAM_BASE_URL": upstream_url,
        "QWEN_PERSIST_DATABASE_URL": database_url,
        "QWEN_PERSIST_SPILL_DIR": str(tmp_path / "spill"),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "openai_proxy:app",
            "--app-dir",
            str(ROOT / "examples"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "proxy did not start"
                time.sleep(0.05)
        outcomes: list[str] = []
        lock = threading.Lock()

        def client(worker: int) -> None:
            with httpx.Client(timeout=30) as http:
                for i in range(1000):
                    body = {
                        "model": "fake-slow",
                        "stream": True,
                        "messages": [{"role": "user", "content": f"{worker}-{i}"}],
                    }
                    try:
                        with http.stream(
                            "POST",
                            f"{base}/v1/chat/completions",
                            json=body,
                            headers={"x-fake-chunks": "10", "x-fake-delay-ms": "10"},
                        ) as response:
                            text = response.read().decode()
                        outcome = "complete" if "[DONE]" in text else "partial"
                    except httpx.TransportError:
                        return  # the server is gone or refuses new connections
                    with lock:
                        outcomes.append(outcome)

        workers = [threading.Thread(target=client, args=(w,)) for w in range(8)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells of it.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        for worker in workers:
            worker.join(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    stored = stored_exchanges(database_url)
    assert outcomes and outcomes.count("complete") >= 8
    # Every exchange the server answered is stored, each with its response row.
    assert len(stored) >= len(outcomes)
    assert all(response is not None for _, response in stored)
    complete = [resp for _, resp in stored if resp is not None and resp.finish_reason == "stop"]
    assert len(complete) >= outcomes.count("complete")
