"""The writer cannot die and concurrent writers cannot deadlock (issue #9's first findings), on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from support import serve, stored_exchanges, stored_sessions

from qwen_persist import PersistenceMiddleware, current_exchange
from qwen_persist.engine import make_engine
from qwen_persist.journal import Journal
from qwen_persist.migrate import upgrade
from qwen_persist.records import CapturedRequest, CapturedResponse, Reports, request_op, response_op
from qwen_persist.replay import ReplayOutcome, read_ops, replay
from qwen_persist.repositories.writes import write_ops
from qwen_persist.sessions import now_ms

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
}


def impatient_app() -> Starlette:
    """An app that asks for its session but will not wait for it (a wait_for timeout, as apps do)."""

    async def endpoint(request: Request) -> Response:
        await request.body()
        exchange = current_exchange(request)
        assert exchange is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(exchange.session(), timeout=0.0005)
        return JSONResponse(ANSWER)

    return Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])


def test_apps_that_cancel_their_session_wait_do_not_stop_the_writer(
    database_url: str, tmp_path: Path
) -> None:
    upgrade(database_url)
    middleware = PersistenceMiddleware(
        impatient_app(), database_url=database_url, spill_dir=str(tmp_path / "spill"), flush_interval=0.02
    )

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
        return (await client.post("/v1/chat/completions", json=body)).status_code

    with serve(middleware) as base:

        async def run() -> list[int]:
            async with httpx.AsyncClient(base_url=base) as client:
                return await asyncio.gather(*(one(client, i) for i in range(150)))

        statuses = asyncio.run(run())
    assert statuses == [200] * 150
    rows = stored_exchanges(database_url)
    assert len(rows) == 150 and all(response is not None for _, response in rows)
    stats = middleware.stats()
    assert (stats.written, stats.spilled, stats.failed, stats.restarts) == (300, 0, 0, 0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stopped_writer_thread_is_started_again(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    middleware = PersistenceMiddleware(
        impatient_app(), database_url=database_url, spill_dir=str(tmp_path / "s")
    )
    writer = middleware.writer
    original = writer._handle

    def broken(items: list[Any]) -> None:
        writer._handle = original  # type: ignore[method-assign]
        raise SystemExit  # not an Exception: escapes the per-batch guard, as nothing else should

    with serve(middleware) as base, httpx.Client(base_url=base) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "first"}]}
        writer._handle = broken  # type: ignore[method-assign]
        client.post("/v1/chat/completions", json=body)
        for n in range(5):
            client.post(
                "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": f"n{n}"}]}
            )
    assert middleware.stats().restarts == 1
    rows = stored_exchanges(database_url)
    stored = [request.openai_request["messages"][0]["content"] for request, response in rows if response]
    assert stored[-5:] == [f"n{n}" for n in range(5)]


def test_concurrent_writers_do_not_deadlock_on_sessions(database_url: str) -> None:
    # Two writers (two replicas) store batches touching the same sessions in opposite orders.
    upgrade(database_url)
    engine = make_engine(database_url)
    sessions = [f"shared-{i:02d}" for i in range(40)]
    errors: list[BaseException] = []

    def ops_for(order: list[str], tag: str, round_: int) -> list[dict[str, Any]]:
        ops = []
        for n, sid in enumerate(order):
            record = CapturedRequest(
                request_id=f"{tag}-{round_}-{n}",
                arrived_ms=now_ms(),
                method="POST",
                path="/v1/chat/completions",
                body=b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
                body_size=0,
                body_truncated=False,
                session_header=sid,
                key_fingerprint=None,
            )
            ops.append(request_op(record, ttl_ms=60_000)[0])
        return ops

    def writer(order: list[str], tag: str) -> None:
        try:
            for round_ in range(15):
                with engine.begin() as conn:
                    write_ops(conn, ops_for(order, tag, round_))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(sessions, "a")),
        threading.Thread(target=writer, args=(list(reversed(sessions)), "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine.dispose()
    assert errors == []
    assert len(stored_exchanges(database_url)) == 2 * 15 * 40


@pytest.fixture(autouse=True)
def _quiet_writer_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="qwen_persist")


def test_session_answers_within_its_bound_while_the_database_is_locked(
    sqlite_url: str, tmp_path: Path
) -> None:
    upgrade(sqlite_url)
    waits: list[float] = []

    async def endpoint(request: Request) -> Response:
        await request.body()
        exchange = current_exchange(request)
        assert exchange is not None
        started = time.monotonic()
        state = await exchange.session()
        waits.append(time.monotonic() - started)
        assert state is None  # unknown while the database cannot answer
        return JSONResponse(ANSWER)

    app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])
    middleware = PersistenceMiddleware(app, database_url=sqlite_url, spill_dir=str(tmp_path / "s"))
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    with serve(middleware) as base, httpx.Client(base_url=base, timeout=30) as client:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for seconds
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        locker.execute("COMMIT")
    locker.close()
    # The old bound was the database's: 10 s on a locked SQLite file. Now one second, plus scheduling.
    assert len(waits) == 1 and waits[0] < 3.0
    assert len(stored_exchanges(sqlite_url)) == 1  # and nothing was lost


def exchange(
    capture_id: str, request_id: str, arrived: int, *, session: str = "s1", parent_id: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request and response ops of one exchange, as a middleware in some process would make them."""
    request = CapturedRequest(
        request_id=request_id,
        arrived_ms=arrived,
        method="POST",
        path="/v1/chat/completions",
        body=b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        body_size=0,
        body_truncated=False,
        session_header=session,
        key_fingerprint=None,
        capture_id=capture_id,
    )
    op, facts = request_op(request, ttl_ms=3_600_000)
    response = CapturedResponse(
        request_id=request_id,
        capture_id=capture_id,
        status_code=200,
        streamed=False,
        body=json.dumps(ANSWER).encode(),
        body_size=0,
        body_truncated=False,
        ended_ms=arrived + 5,
        duration_ms=5,
        first_byte_ms=1,
        request=facts,
        reports=Reports(parent_id=parent_id, chat_id="chat-1" if parent_id else None),
    )
    return op, response_op(response)


def store(database_url: str, *batches: list[dict[str, Any]]) -> list[Any]:
    engine = make_engine(database_url)
    try:
        outcomes = []
        for batch in batches:
            with engine.begin() as conn:
                outcomes.append(write_ops(conn, batch))
        return outcomes
    finally:
        engine.dispose()


def test_two_replicas_with_one_client_id_in_one_millisecond_both_stored(database_url: str) -> None:
    upgrade(database_url)
    now = now_ms()
    a_request, a_response = exchange("replica-a-1", "client-id", now)
    b_request, b_response = exchange("replica-b-1", "client-id", now)
    # Each replica writes its request first; the responses come in later batches (or a journal).
    store(database_url, [a_request], [b_request], [b_response], [a_response])
    rows = stored_exchanges(database_url)
    assert len(rows) == 2 and all(response is not None for _, response in rows)
    ids = sorted(request.request_id for request, _ in rows)
    assert "client-id" in ids and len(set(ids)) == 2
    renamed = next(request for request, _ in rows if request.request_id != "client-id")
    assert renamed.metadata_ == {"client_request_id": "client-id"}
    # The same records again (a journal replayed twice, a retry after an unclear commit): nothing new.
    outcomes = store(database_url, [a_request, b_request, a_response, b_response])
    assert (outcomes[0].written, outcomes[0].duplicates) == (0, 4)
    assert len(stored_exchanges(database_url)) == 2


def test_session_ids_only_move_forward(database_url: str) -> None:
    upgrade(database_url)
    now = now_ms()
    old_request, old_response = exchange("p-1", "r-old", now, parent_id="parent-old")
    new_request, new_response = exchange("p-2", "r-new", now + 1000, parent_id="parent-new")
    # Delivered newest first: separate batches, then one batch, then a replay of the old turn alone.
    store(database_url, [old_request], [new_request, new_response], [old_response])
    session = stored_sessions(database_url)["s1"]
    assert (session.parent_id, session.ids_updated_at) == ("parent-new", now + 1000)
    older_request, older_response = exchange("p-3", "r-3", now - 5000, parent_id="parent-older")
    store(database_url, [older_request], [older_response])
    assert stored_sessions(database_url)["s1"].parent_id == "parent-new"
    # In one batch, in either order.
    fresh = [*exchange("q-1", "q-new", now + 2000, session="s2", parent_id="p-new")]
    stale = [*exchange("q-2", "q-old", now, session="s2", parent_id="p-old")]
    store(database_url, fresh + stale)
    assert stored_sessions(database_url)["s2"].parent_id == "p-new"


@pytest.fixture
def hung_server() -> Any:
    """A TCP server that accepts connections and never answers: a PostgreSQL that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"postgresql://root@127.0.0.1:{server.getsockname()[1]}/test"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_shutdown_is_bounded_when_the_database_hangs(
    hung_server: str, database_url: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    middleware = PersistenceMiddleware(impatient_app(), database_url=hung_server, spill_dir=str(spill))

    async def run() -> float:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(middleware), base_url="http://t"
        ) as client:
            for i in range(20):
                body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        started = time.monotonic()
        await middleware.aclose(timeout=1.0)
        return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert elapsed < 3.0  # the connect timeout alone is 5 s; the shutdown bound is what counts
    outcome = ReplayOutcome()
    ops = [op for path in sorted(spill.glob("journal-*.log")) for op in read_ops(path, outcome)]
    assert len({(op["op"], op.get("capture_id") or op["request"]["capture_id"]) for op in ops}) == 40
    # What the journal holds is whole: loaded into a working database, every exchange is there.
    upgrade(database_url)
    assert replay(make_engine(database_url), sorted(spill.glob("journal-*.log"))).written == 40
    assert len([r for r in stored_exchanges(database_url) if r[1] is not None]) == 20


def test_a_rejected_record_is_set_aside_and_the_rest_stored(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    good = [op for i in range(3) for op in exchange(f"c-{i}", f"r-{i}", now_ms() + i, session=f"s{i}")]
    bad_request, bad_response = exchange("c-bad", "r-bad", now_ms())
    # NUL in a text column: PostgreSQL refuses it (the writer escapes NUL; a hand-made record need not).
    bad_request["request"]["model"] = "m\x00"
    journal = Journal(tmp_path / "spill")
    journal.append([*good[:2], bad_request, *good[2:], bad_response])
    journal.close()
    [segment] = sorted((tmp_path / "spill").glob("journal-*.log"))
    outcome = replay(make_engine(database_url), [segment])
    postgres = database_url.startswith("postgresql")
    assert outcome.written == (6 if postgres else 8)
    assert [op["op"] for op, _ in outcome.rejected] == (["request"] if postgres else [])
    # The writer does the same by itself: the rejected record goes to the dead-letter file.
    other = tmp_path / "other"
    middleware = PersistenceMiddleware(impatient_app(), database_url=database_url, spill_dir=str(other))
    bad_request = exchange("c-bad-2", "r-bad-2", now_ms())[0]
    bad_request["request"]["model"] = "m\x00"
    middleware.writer._store([bad_request])
    letters = list(other.glob("dead-letter-*.jsonl"))
    assert len(letters) == (1 if postgres else 0)
    if postgres:
        [line] = letters[0].read_text().splitlines()
        assert json.loads(line)["op"]["request"]["request_id"] == "r-bad-2" and middleware.stats().failed == 1


def test_the_writer_loads_a_journal_left_behind_by_itself(database_url: str, tmp_path: Path) -> None:
    # Segments an earlier process left (a crash), a response before its request (a full queue).
    upgrade(database_url)
    spill = tmp_path / "spill"
    first = exchange("left-1", "r-1", now_ms(), session="s-left")
    second = exchange("left-2", "r-2", now_ms() + 1, session="s-left", parent_id="p-2")
    journal = Journal(spill)
    journal.append([first[1], first[0]])
    journal.append([second[0], second[1], first[1]])  # and a response journaled twice
    journal.close()
    middleware = PersistenceMiddleware(impatient_app(), database_url=database_url, spill_dir=str(spill))
    middleware.writer.start()  # as the lifespan startup does
    deadline = time.monotonic() + 10
    while len([r for r in stored_exchanges(database_url) if r[1] is not None]) < 2:
        assert time.monotonic() < deadline, "the journal was not loaded"
        time.sleep(0.05)
    stats = middleware.writer.close()
    assert (stats.written, stats.failed, stats.duplicates) == (4, 0, 1)
    assert not list(spill.glob("journal-*.log")) and not list(spill.glob("dead-letter-*"))
    assert stored_sessions(database_url)["s-left"].parent_id == "p-2"


def test_a_replica_taking_the_same_request_id_mid_batch_costs_no_record(
    database_url: str, tmp_path: Path
) -> None:
    """Two replicas, one client X-Request-Id: the other replica commits it between this batch's check of
    taken ids and its insert. The unique violation is a race, not the record's fault: the batch is read
    again, files its request under a fresh id, and nothing is set aside. (PostgreSQL: SQLite lets one
    writer at a time, so there the check and the insert cannot be split.)"""
    from sqlalchemy import event

    upgrade(database_url)
    middleware = PersistenceMiddleware(impatient_app(), database_url=database_url, spill_dir=str(tmp_path))
    mine = [exchange("replica-a-7", "shared-id", now_ms())[0]]  # a batch of one: nothing to split
    # Another conversation: the other replica must not wait on this batch's lock of session s1.
    theirs = exchange("replica-b-7", "shared-id", now_ms(), session="s2")[0]
    raced: list[bool] = []

    def other_replica_commits_first(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO requests") and not raced:
            raced.append(True)
            store(database_url, [theirs])

    if database_url.startswith("postgresql"):
        event.listen(middleware.engine, "before_cursor_execute", other_replica_commits_first)
    middleware.writer._store(mine)
    rows = stored_exchanges(database_url)
    assert len(rows) == (2 if raced else 1)
    assert any(request.capture_id == "replica-a-7" for request, _ in rows)
    assert middleware.stats().failed == 0 and not list(tmp_path.glob("dead-letter-*"))
    if raced:
        assert sorted(request.metadata_ is not None for request, _ in rows) == [False, True]
    middleware.engine.dispose()


def test_a_database_never_migrated_is_probed_with_backoff_and_named(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that answers but has no tables is an outage like any other: probed with backoff (not
    every few milliseconds, which flooded the log), its warning says which command fixes it, and once
    migrated the journaled exchange is stored without a hand."""
    caplog.set_level("WARNING", logger="qwen_persist")
    app = PersistenceMiddleware(impatient_app(), database_url=database_url, spill_dir=str(tmp_path / "spill"))
    with serve(app) as url:
        assert (
            httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": []}).status_code == 200
        )
        time.sleep(2.0)
        warnings = [r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()]
        assert 1 <= len(warnings) <= 3, warnings  # before: one every 0.1 s
        assert "qwen-persist db upgrade" in warnings[0]
        upgrade(database_url)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not stored_exchanges(database_url):
            time.sleep(0.2)
    [(_, response)] = stored_exchanges(database_url)
    assert response is not None and response.status_code == 200
