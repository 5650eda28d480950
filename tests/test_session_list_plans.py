"""The sessions list filtered on expiry (``active``) gives the same sessions in the same order whichever
way the query is shaped: on SQLite the repository counts the matches and either walks the sessions in
order or starts from the few that match (`few_matches`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from qwen_persist.repositories import History, Pagination, SessionFilter

ACTIVE, EXPIRED = 5, 35


@pytest.fixture
def history(migrated_url: str) -> Iterator[History]:
    with History(migrated_url) as store:
        for i in range(ACTIVE + EXPIRED):
            # Interleaved in time, so the active ones are not simply the newest.
            store.sessions.create(f"s-{i:02}", f"question {i}", 3_600_000 if i % 8 == 0 else 1)
            time.sleep(0.002)
        yield store


def _walk(history: History, f: SessionFilter, limit: int, *, cursor: bool) -> list[str]:
    seen: list[str] = []
    while True:
        page = Pagination(
            limit=limit, after=seen[-1] if cursor and seen else None, offset=0 if cursor else len(seen)
        )
        result = history.sessions.list(f, page)
        seen += [s.id for s in result.items]
        if not result.has_more:
            return seen


def test_active_and_expired_pages(history: History) -> None:
    everything = history.sessions.list(None, Pagination(limit=1000)).items
    assert len(everything) == ACTIVE + EXPIRED
    now = time.time_ns() // 1_000_000
    for active in (True, False):
        expected = [s.id for s in everything if (s.expires_at > now) == active]
        assert len(expected) == (ACTIVE if active else EXPIRED)
        for limit in (1, 2, 3, 50):
            for cursor in (False, True):
                assert _walk(history, SessionFilter(active=active), limit, cursor=cursor) == expected


def test_sqlite_takes_both_shapes(history: History) -> None:
    if history.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL chooses the plan from its statistics")
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(history.engine, "before_cursor_execute", record)
    try:
        history.sessions.list(SessionFilter(active=True), Pagination(limit=1))
        walked = statements[-1]
        history.sessions.list(SessionFilter(active=True), Pagination(limit=50))
        fetched = statements[-1]
    finally:
        event.remove(history.engine, "before_cursor_execute", record)
    assert "sessions.expires_at + ?" in walked and "IN (SELECT" not in walked
    assert "sessions.id IN (SELECT sessions.id" in fetched and "expires_at + ?" not in fetched
