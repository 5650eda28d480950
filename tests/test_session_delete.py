"""Deleting one session, however long: in short transactions, never one statement over all its request
ids (PostgreSQL refuses more than 65,535 parameters; on SQLite one long transaction holds the proxy's
writer off until it spills live traffic to its journal).

The long sessions are bulk-inserted through SQLAlchemy Core (tens of thousands of exchanges through the
proxy would take minutes); the live traffic beside the deletion goes through the real proxy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_upstream
import httpx
import openai
import openai_proxy
import pytest
from sqlalchemy import Engine, String, cast, func, insert, literal, select
from support import serve

from qwen_persist import middleware_of
from qwen_persist.api import create_app
from qwen_persist.engine import make_engine
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.repositories import History, PruningRepository

POSTGRES_PARAMETER_LIMIT = 65_535


def add_session(engine: Engine, session_id: str, exchanges: int, *, answered: bool = True) -> None:
    """A session of ``exchanges`` requests, each answered unless ``answered`` is false: one INSERT ...
    SELECT per table over a counting CTE, so a session longer than PostgreSQL's parameter limit takes a
    second or two rather than the minute executemany would."""
    q, r = requests_table.c, responses_table.c
    numbers = select(literal(0).label("n")).cte("numbers", recursive=True)
    numbers = numbers.union_all(select(numbers.c.n + 1).where(numbers.c.n < exchanges - 1))
    name = literal(session_id + "-") + cast(numbers.c.n, String)
    at = literal(1000) + numbers.c.n
    with engine.begin() as conn:
        conn.execute(
            insert(sessions_table).values(
                id=session_id,
                first_user_message="hi",
                message_count=exchanges,
                created_at=1,
                updated_at=1,
                last_accessed=1,
                expires_at=10**13,
            )
        )
        request_values = {
            q.session_id: literal(session_id),
            q.request_id: name,
            q.capture_id: name,
            q.timestamp: at,
            q.created_at: at,
            q.method: literal("POST"),
            q.path: literal("/v1/chat/completions"),
            q.openai_request: literal({"model": "m", "messages": []}, q.openai_request.type),
            q.model: literal("m"),
            q.stream: literal(False),
        }
        conn.execute(
            insert(requests_table).from_select(
                list(request_values), select(*request_values.values()).select_from(numbers)
            )
        )
        if answered:
            response_values = {
                r.request_id: q.id,
                r.session_id: q.session_id,
                r.response_id: q.request_id,
                r.timestamp: q.timestamp,
                r.created_at: q.created_at,
                r.status_code: literal(200),
                r.openai_response: literal({"object": "chat.completion"}, r.openai_response.type),
                r.finish_reason: literal("stop"),
            }
            conn.execute(
                insert(responses_table).from_select(
                    list(response_values), select(*response_values.values()).where(q.session_id == session_id)
                )
            )


def counts(engine: Engine, session_id: str) -> tuple[int, int, int]:
    """The session's rows: (sessions, requests, responses)."""
    with engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(table).where(column == session_id)).scalar_one()
            for table, column in (
                (sessions_table, sessions_table.c.id),
                (requests_table, requests_table.c.session_id),
                (responses_table, responses_table.c.session_id),
            )
        )


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


def test_a_session_of_any_length_is_deleted_with_all_its_exchanges(migrated_url: str, engine: Engine) -> None:
    """Through the repository and through the API, with batches smaller than the session; a pending
    request goes too, and the other sessions stay whole."""
    add_session(engine, "long", 1234)
    add_session(engine, "pending", 7, answered=False)
    add_session(engine, "other", 5)
    with History(migrated_url) as history:
        assert history.sessions.delete("long", batch_size=100, pause=0.0)
        assert counts(engine, "long") == (0, 0, 0)
        assert not history.sessions.delete("long")
        assert history.pruning.delete_session("pending", batch_size=3).to_dict() == {
            "requests": 7,
            "responses": 0,
            "sessions": 1,
        }
        assert not history.sessions.delete("never-was")
    assert counts(engine, "other") == (1, 5, 5)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_session_of_more_requests_than_postgresql_takes_parameters_is_deleted(
    migrated_url: str, engine: Engine
) -> None:
    """One ``IN (...)`` over every request id of the session cannot be sent to PostgreSQL at all."""
    size = POSTGRES_PARAMETER_LIMIT + 100
    add_session(engine, "huge-repo", size)
    add_session(engine, "huge-api", size)
    add_session(engine, "other", 3)
    with History(migrated_url) as history:
        assert history.sessions.delete("huge-repo")
    assert counts(engine, "huge-repo") == (0, 0, 0)
    with (
        serve(create_app(migrated_url, api_anonymous=True)) as base,
        httpx.Client(base_url=base, timeout=120) as api,
    ):
        answer = api.delete("/v1/sessions/huge-api")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"id": "huge-api", "object": "session.deleted", "deleted": True}
        assert api.get("/v1/sessions/huge-api").status_code == 404
    assert counts(engine, "huge-api") == (0, 0, 0)
    assert counts(engine, "other") == (1, 3, 3)


@pytest.fixture
def upstream() -> Iterator[str]:
    with serve(fake_upstream.create_app()) as url:
        yield url


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_deleting_a_long_session_does_not_hold_the_writer_off(
    migrated_url: str, engine: Engine, upstream: str, tmp_path: Path
) -> None:
    """Traffic keeps flowing through the proxy while a long session is deleted through its API: every
    exchange is stored directly, none spilled to the journal for want of the database."""
    add_session(engine, "long", 60_000)
    app = openai_proxy.create_app(
        f"{upstream}/v1", "", database_url=migrated_url, spill_dir=str(tmp_path / "spill"), api_anonymous=True
    )
    done = threading.Event()
    sent: list[str] = []
    errors: list[BaseException] = []

    def send(base: str) -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0)
        try:
            while not done.is_set():
                raw = client.chat.completions.with_raw_response.create(
                    model="fake-text",
                    messages=[{"role": "user", "content": f"hello {len(sent)}"}],
                    extra_headers={"x-session-id": "busy"},
                )
                sent.append(raw.headers["x-request-id"])
        except BaseException as exc:
            errors.append(exc)

    with serve(app) as base, httpx.Client(base_url=base, timeout=120) as api:
        sender = threading.Thread(target=send, args=(base,))
        sender.start()
        try:
            answer = api.delete("/v1/sessions/long")
        finally:
            done.set()
            sender.join(timeout=60)
        assert answer.status_code == 200, answer.text
    stats: Any = middleware_of(app).stats()  # after the shutdown's flush
    assert not errors
    assert len(sent) > 5  # the traffic did run beside the deletion
    assert stats.spilled == 0 and stats.failed == 0
    assert counts(engine, "long") == (0, 0, 0)
    assert counts(engine, "busy")[1:] == (len(sent), len(sent))


def test_a_request_stored_in_the_session_during_the_deletion_is_deleted_not_orphaned(
    migrated_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy stores a request in the session after the batches have emptied it: the session row is
    not deleted from under it (its statement checks again), and another round takes the request too."""
    add_session(engine, "racing", 10)
    original = PruningRepository._delete_exchanges
    rounds: list[int] = []

    def then_a_new_request(self: PruningRepository, *args: Any) -> Any:
        result = original(self, *args)
        rounds.append(result.requests)
        if len(rounds) == 1:
            with engine.begin() as conn:
                conn.execute(
                    insert(requests_table).values(
                        session_id="racing",
                        request_id="late",
                        capture_id="late",
                        timestamp=5000,
                        created_at=5000,
                        method="POST",
                        path="/v1/chat/completions",
                        openai_request={"model": "m", "messages": []},
                        stream=False,
                    )
                )
        return result

    monkeypatch.setattr(PruningRepository, "_delete_exchanges", then_a_new_request)
    with History(migrated_url) as history:
        deleted = history.pruning.delete_session("racing", batch_size=4)
    assert rounds == [10, 1]
    assert deleted.to_dict() == {"requests": 11, "responses": 10, "sessions": 1}
    assert counts(engine, "racing") == (0, 0, 0)
