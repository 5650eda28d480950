"""The repositories (the read side's Python API) against traffic recorded through the real middleware,
on SQLite and PostgreSQL: every filter against a reference computed in Python over all rows, pages in a
total order by offset and by cursor, stats against percentiles computed here, deletes without orphans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from support import percentile_cont
from traffic import Traffic, record_traffic

from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.records import CapturedRequest, request_op
from qwen_persist.repositories import (
    ExchangeRecord,
    History,
    InvalidParameter,
    Pagination,
    RequestFilter,
    ResponseFilter,
    SessionFilter,
    parse_duration,
    parse_since,
    parse_time,
    writes,
)
from qwen_persist.repositories.queries import parse_bool
from qwen_persist.repositories.writes import write_ops
from qwen_persist.sessions import session_row
from qwen_persist.writer import Writer


@pytest.fixture(scope="module")
def recorded(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[History, Traffic]]:
    """Two rounds of recorded traffic (16 successes, 4 errors), read-only for the module's tests."""
    upgrade(module_database_url)
    traffic = record_traffic(module_database_url, tmp_path_factory.mktemp("traffic"), rounds=2)
    history = History(module_database_url)
    yield history, traffic
    history.close()


@pytest.fixture
def history(migrated_url: str, tmp_path: Path) -> Iterator[tuple[History, Traffic]]:
    """A database of its own with one round of traffic, for tests that delete."""
    traffic = record_traffic(migrated_url, tmp_path)
    store = History(migrated_url)
    yield store, traffic
    store.close()


def everything(history: History) -> list[ExchangeRecord]:
    return list(history.requests.iter_exchanges(batch_size=7))


def counts(history: History) -> tuple[int, int, int]:
    with history.engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (sessions_table, requests_table, responses_table)
        )


# --------------------------------------------------------------------------------------- what was seen


def test_every_exchange_reads_back_as_the_client_saw_it(recorded: tuple[History, Traffic]) -> None:
    history, traffic = recorded
    assert len(everything(history)) == len(traffic.seen) == 20
    for seen in traffic.seen:
        exchange = history.requests.exchange_by_request_id(seen.request_id)
        assert exchange is not None and exchange.response is not None
        request, response = exchange.request, exchange.response
        assert (request.model, request.stream, response.status_code) == (seen.model, seen.stream, seen.status)
        assert history.requests.exchange(request.id) == exchange
        assert (
            history.requests.get(request.id) == request == history.requests.get_by_request_id(seen.request_id)
        )
        assert history.responses.get(response.id) == response
        assert history.responses.get_by_response_id(response.response_id) == response
        if seen.status == 200:
            assert response.succeeded and response.error is None
            assert response.upstream_id == seen.completion_id
            message = response.openai_response["choices"][0]["message"]
            assert message.get("content") == seen.content or seen.model == "fake-tool"
        else:
            assert not response.succeeded and response.error
        if seen.metadata:
            assert request.metadata == seen.metadata
    assert history.requests.exchange(10**9) is None
    assert history.requests.exchange_by_request_id("no-such-id") is None
    assert history.responses.get(10**9) is None


# --------------------------------------------------------------------------------------------- filters

REQUEST_FILTERS: list[tuple[dict[str, Any], Callable[[ExchangeRecord], bool]]] = [
    ({}, lambda e: True),
    ({"model": "fake-tool"}, lambda e: e.request.model == "fake-tool"),
    ({"stream": True}, lambda e: e.request.stream),
    (
        {"stream": False, "model": "fake-text"},
        lambda e: not e.request.stream and e.request.model == "fake-text",
    ),
    ({"session_id": "s-alpha"}, lambda e: e.request.session_id == "s-alpha"),
    ({"has_error": True}, lambda e: e.response is not None and not e.response.succeeded),
    ({"has_error": False}, lambda e: e.response is not None and e.response.succeeded),
    ({"status_code": 429}, lambda e: e.response is not None and e.response.status_code == 429),
    ({"status_code": 200, "session_id": "s-beta"}, lambda e: False),
    ({"model": "x' OR '1'='1"}, lambda e: False),
    ({"session_id": "'; DROP TABLE requests; --"}, lambda e: False),
]


@pytest.mark.parametrize(("given", "expected"), REQUEST_FILTERS)
def test_request_filters_match_a_reference(
    recorded: tuple[History, Traffic], given: dict[str, Any], expected: Callable[[ExchangeRecord], bool]
) -> None:
    history, _ = recorded
    before = counts(history)
    want = sorted((e.request.id for e in everything(history) if expected(e)), reverse=True)
    page = history.requests.list(RequestFilter(**given), Pagination(limit=1000, count_total=True))
    assert [r.id for r in page.items] == want
    assert page.total == len(want) and not page.has_more
    exchanges = history.requests.exchanges(RequestFilter(**given), Pagination(limit=1000))
    assert [e.request.id for e in exchanges.items] == want
    assert counts(history) == before


def test_time_range_filters(recorded: tuple[History, Traffic]) -> None:
    history, _ = recorded
    rows = everything(history)
    times = sorted(e.request.timestamp for e in rows)
    since, until = times[5], times[14]
    page = history.requests.list(RequestFilter(since=since, until=until), Pagination(limit=1000))
    assert sorted(r.id for r in page.items) == sorted(
        e.request.id for e in rows if since <= e.request.timestamp <= until
    )
    ends = sorted(e.response.timestamp for e in rows if e.response)
    responses = history.responses.list(ResponseFilter(since=ends[3], until=ends[10]), Pagination(limit=1000))
    assert sorted(r.id for r in responses.items) == sorted(
        e.response.id for e in rows if e.response and ends[3] <= e.response.timestamp <= ends[10]
    )


RESPONSE_FILTERS: list[tuple[dict[str, Any], Callable[[ExchangeRecord], bool]]] = [
    ({"finish_reason": "length"}, lambda e: e.response is not None and e.response.finish_reason == "length"),
    ({"has_error": True}, lambda e: e.response is not None and not e.response.succeeded),
    ({"session_id": "s-beta", "has_error": False}, lambda e: False),
    ({"session_id": "s-alpha"}, lambda e: e.request.session_id == "s-alpha"),
    ({"finish_reason": "' OR 1=1 --"}, lambda e: False),
]


@pytest.mark.parametrize(("given", "expected"), RESPONSE_FILTERS)
def test_response_filters_match_a_reference(
    recorded: tuple[History, Traffic], given: dict[str, Any], expected: Callable[[ExchangeRecord], bool]
) -> None:
    history, _ = recorded
    rows = everything(history)
    want = sorted((e.response.id for e in rows if e.response is not None and expected(e)), reverse=True)
    page = history.responses.list(ResponseFilter(**given), Pagination(limit=1000))
    assert [r.id for r in page.items] == want
    one = rows[3]
    assert one.response is not None
    assert [r.id for r in history.responses.list(ResponseFilter(request_id=one.request.id)).items] == [
        one.response.id
    ]


# ------------------------------------------------------------------------------------------ pagination


@pytest.mark.parametrize("order_by", ["timestamp", "created_at", "id"])
@pytest.mark.parametrize("descending", [True, False])
def test_offset_and_cursor_pages_walk_the_same_total_order(
    recorded: tuple[History, Traffic], order_by: str, descending: bool
) -> None:
    history, _ = recorded
    full = history.requests.list(page=Pagination(limit=1000, order_by=order_by, descending=descending))
    expected = [r.id for r in full.items]
    keys = [(getattr(r, order_by), r.id) for r in full.items]
    assert keys == sorted(keys, reverse=descending)  # ties broken by id, in the same direction

    by_offset, offset = [], 0
    while True:
        page = history.requests.list(
            page=Pagination(limit=3, offset=offset, order_by=order_by, descending=descending)
        )
        by_offset += [r.id for r in page.items]
        offset += 3
        if not page.has_more:
            break
    by_cursor, after = [], None
    while True:
        page = history.requests.list(
            page=Pagination(limit=3, after=after, order_by=order_by, descending=descending)
        )
        by_cursor += [r.id for r in page.items]
        if not page.has_more:
            break
        after = page.items[-1].id
    assert by_offset == by_cursor == expected


def test_pages_hold_a_total_order_when_every_timestamp_ties(migrated_url: str) -> None:
    """Rows written in one batch share their millisecond: without id as a tiebreak, LIMIT/OFFSET pages
    could repeat some and skip others."""
    history = History(migrated_url)
    ops = []
    for i in range(25):
        ops.append(
            {
                "op": "request",
                "capture_id": f"tie-{i}",
                "session": session_row("s-tie", "hi", 1, 1000, 60_000),
                "request": {
                    "request_id": f"tie-{i}",
                    "capture_id": f"tie-{i}",
                    "session_id": "s-tie",
                    "timestamp": 1000,
                    "created_at": 1000,
                    "method": "POST",
                    "path": "/v1/chat/completions",
                    "openai_request": {"model": "m", "messages": []},
                    "qwen_request": None,
                    "model": "m",
                    "stream": False,
                    "user": None,
                    "metadata": None,
                    "provider": None,
                },
            }
        )
    with history.engine.begin() as conn:
        write_ops(conn, ops)
    for descending in (True, False):
        seen: list[int] = []
        after = None
        for _ in range(10):
            page = history.requests.list(
                RequestFilter(session_id="s-tie"), Pagination(limit=4, after=after, descending=descending)
            )
            seen += [r.id for r in page.items]
            if not page.has_more:
                break
            after = page.items[-1].id
        assert seen == sorted(seen, reverse=descending) and len(set(seen)) == 25
        sessions = history.sessions.list(page=Pagination(limit=1, after="s-tie"))
        assert sessions.items == [] and not sessions.has_more
    history.close()


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: Pagination(limit=0), "limit"),
        (lambda: Pagination(limit=1001), "limit"),
        (lambda: Pagination(limit="x"), "limit"),  # type: ignore[arg-type]
        (lambda: Pagination(offset=-1), "offset"),
        (lambda: Pagination(offset=3, after=5), "after"),
        (lambda: RequestFilter(since=10, until=5), "until"),
        (lambda: RequestFilter(stream="yes"), "stream"),  # type: ignore[arg-type]
        (lambda: RequestFilter(status_code=99), "status_code"),
        (lambda: ResponseFilter(request_id=0), "request_id"),
        (lambda: SessionFilter(since=-1), "since"),
        (lambda: parse_time("yesterday-ish", "since"), "since"),
        (lambda: parse_time("2026-13-01", "until"), "until"),
        (lambda: parse_duration("7 fortnights", "older_than"), "older_than"),
        (lambda: parse_duration("0s", "retention"), "retention"),
    ],
)
def test_bad_parameters_name_themselves(make: Callable[[], Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        make()
    assert caught.value.param == param and param in str(caught.value)


def test_order_and_cursor_are_checked_against_the_data(recorded: tuple[History, Traffic]) -> None:
    history, _ = recorded
    with pytest.raises(InvalidParameter, match="order_by") as caught:
        history.requests.list(page=Pagination(order_by="timestamp; DROP TABLE requests"))
    assert caught.value.param == "order_by"
    with pytest.raises(InvalidParameter) as caught:
        history.requests.list(page=Pagination(after=10**9))
    assert caught.value.param == "after"
    with pytest.raises(InvalidParameter) as caught:
        history.requests.list(page=Pagination(after="12abc"))
    assert caught.value.param == "after"
    with pytest.raises(InvalidParameter) as caught:
        history.sessions.list(page=Pagination(after="no-such-session"))
    assert caught.value.param == "after"
    with pytest.raises(InvalidParameter):
        history.stats.summary(group_by=["model", "weekday"])
    with pytest.raises(InvalidParameter):
        history.stats.summary(group_by=["day", "hour"])


def test_times_parse_as_milliseconds_or_iso_8601() -> None:
    assert parse_time("1795507520775") == parse_time(1795507520775) == 1795507520775
    assert parse_time("2026-11-24") == parse_time("2026-11-24T00:00:00Z") == 1795478400000
    assert parse_time("2026-11-24T01:00:00+01:00") == 1795478400000
    assert parse_time("2026-11-24T00:00") == 1795478400000  # no zone: UTC
    assert parse_duration("2h") == 7_200_000 and parse_duration("7d") == 604_800_000
    assert parse_since("2h", 10_000_000) == 2_800_000
    assert parse_since("2026-11-24", 0) == 1795478400000


# ----------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("group_by", [(), ("model",), ("day",), ("model", "hour")])
def test_stats_match_figures_computed_in_python(
    recorded: tuple[History, Traffic], group_by: tuple[str, ...]
) -> None:
    history, _ = recorded
    rows = everything(history)
    groups: dict[tuple[Any, ...], list[ExchangeRecord]] = {}
    for e in rows:
        moment = datetime.fromtimestamp(e.request.timestamp / 1000, timezone.utc)
        label = {"model": e.request.model, "day": f"{moment:%Y-%m-%d}", "hour": f"{moment:%Y-%m-%dT%H}:00Z"}
        groups.setdefault(tuple(label[name] for name in group_by), []).append(e)
    stats = history.stats.summary(group_by=group_by)
    assert [tuple(row.group.values()) for row in stats] == sorted(groups)
    for row in stats:
        members = groups[tuple(row.group[name] for name in group_by)]
        assert row.count == len(members)
        responses = [e.response for e in members if e.response is not None]
        assert row.succeeded == sum(r.succeeded for r in responses)
        assert row.errors == sum(not r.succeeded for r in responses)
        assert row.pending == 0
        assert row.total_tokens == sum(r.total_tokens or 0 for r in responses)
        assert row.prompt_tokens == sum(r.prompt_tokens or 0 for r in responses)
        for measure in ("duration_ms", "first_byte_ms"):
            values = [getattr(r, measure) for r in responses if getattr(r, measure) is not None]
            for name, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                assert getattr(row, measure)[name] == pytest.approx(percentile_cont(values, p))
    if not group_by:
        (only,) = stats
        assert only.count == 20 and only.succeeded == 16 and only.errors == 4
        assert only.success_rate == pytest.approx(0.8)


def test_stats_over_a_filter_and_over_nothing(recorded: tuple[History, Traffic]) -> None:
    history, _ = recorded
    (errors,) = history.stats.summary(RequestFilter(has_error=True))
    assert (errors.count, errors.succeeded, errors.errors, errors.success_rate) == (4, 0, 4, 0.0)
    (nothing,) = history.stats.summary(RequestFilter(model="no-such-model"))
    assert nothing.count == 0 and nothing.success_rate is None and nothing.duration_ms["p95"] is None
    assert history.stats.summary(RequestFilter(model="no-such-model"), group_by=["day"]) == []
    day = history.stats.summary(group_by=["day"])
    assert all(len(row.group["day"]) == 10 for row in day)


# -------------------------------------------------------------------------------------------- sessions


def test_sessions_list_and_detail(recorded: tuple[History, Traffic]) -> None:
    history, traffic = recorded
    page = history.sessions.list(page=Pagination(limit=1000, count_total=True))
    named = {s.session for s in traffic.seen if s.session}
    assert named <= {s.id for s in page.items}
    assert page.total == len(page.items) == len({e.request.session_id for e in everything(history)})
    assert [s.last_accessed for s in page.items] == sorted(
        (s.last_accessed for s in page.items), reverse=True
    )
    detail = history.sessions.detail("s-alpha")
    assert detail is not None and detail.request_count == 8
    assert detail.to_dict()["request_count"] == 8
    assert history.sessions.detail("nobody") is None and history.sessions.get("nobody") is None
    active = history.sessions.list(SessionFilter(active=True), Pagination(limit=1000))
    expired = history.sessions.list(SessionFilter(active=False), Pagination(limit=1000))
    assert len(active.items) == len(page.items) and expired.items == []
    assert history.sessions.metrics() == {"active": len(page.items), "total": len(page.items)}


def test_deletes_cascade_and_leave_no_orphans(history: tuple[History, Traffic]) -> None:
    store, traffic = history
    sessions, requests, responses = counts(store)
    assert store.sessions.delete("s-beta") is True
    assert store.sessions.delete("s-beta") is False
    assert counts(store) == (sessions - 1, requests - 2, responses - 2)
    victim = store.requests.exchange_by_request_id(traffic.seen[0].request_id)
    assert victim is not None
    assert store.requests.delete(victim.request.id) is True
    assert store.requests.delete(victim.request.id) is False
    assert counts(store) == (sessions - 1, requests - 3, responses - 3)
    assert store.sessions.get(victim.request.session_id) is not None  # the session stays
    with store.engine.connect() as conn:
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM responses WHERE request_id NOT IN (SELECT id FROM requests) "
                "OR session_id NOT IN (SELECT id FROM sessions)"
            )
        ).scalar_one()
    assert orphans == 0


def test_purge_expired_deletes_only_expired_sessions_with_their_history(
    history: tuple[History, Traffic],
) -> None:
    store, _ = history
    sessions, requests, responses = counts(store)
    alpha = store.sessions.get("s-alpha")
    assert alpha is not None
    with store.engine.begin() as conn:
        conn.execute(sessions_table.update().where(sessions_table.c.id == "s-alpha").values(expires_at=1))
    assert store.sessions.purge_expired(batch_size=1) == 1
    assert store.sessions.get("s-alpha") is None
    assert counts(store) == (sessions - 1, requests - 4, responses - 4)
    assert store.sessions.purge_expired() == 0


# ------------------------------------------------------------------------------------------ async face


def test_async_twins_give_the_same_answers_off_the_loop(recorded: tuple[History, Traffic]) -> None:
    history, traffic = recorded

    async def main() -> None:
        loop_thread = asyncio.get_running_loop()
        assert loop_thread is not None
        first = traffic.seen[0].request_id
        assert await history.requests.aexchange_by_request_id(
            first
        ) == history.requests.exchange_by_request_id(first)
        pages = await asyncio.gather(
            history.requests.alist(RequestFilter(model="fake-text")),
            history.responses.alist(ResponseFilter(has_error=True)),
            history.sessions.adetail("s-alpha"),
            history.stats.asummary(group_by=["model"]),
        )
        assert pages[0] == history.requests.list(RequestFilter(model="fake-text"))
        assert pages[1] == history.responses.list(ResponseFilter(has_error=True))
        assert pages[2] == history.sessions.detail("s-alpha")
        assert pages[3] == history.stats.summary(group_by=["model"])
        with pytest.raises(InvalidParameter):
            await history.requests.alist(page=Pagination(order_by="nope"))

    asyncio.run(main())


# -------------------------------------------------------------------------------------- index backing

LIST_CALLS: dict[str, Callable[[History], Any]] = {
    "requests": lambda h: h.requests.list(),
    "requests by model": lambda h: h.requests.list(RequestFilter(model="m")),
    "requests by session": lambda h: h.requests.exchanges(RequestFilter(session_id="s")),
    "requests by stream": lambda h: h.requests.list(RequestFilter(stream=True)),
    "requests by time": lambda h: h.requests.list(RequestFilter(since=5, until=10)),
    "requests with errors": lambda h: h.requests.list(RequestFilter(has_error=True)),
    "requests by status": lambda h: h.requests.list(RequestFilter(status_code=500)),
    "responses": lambda h: h.responses.list(),
    "responses by finish reason": lambda h: h.responses.list(ResponseFilter(finish_reason="length")),
    "responses with errors": lambda h: h.responses.list(ResponseFilter(has_error=True)),
    "responses by session": lambda h: h.responses.list(ResponseFilter(session_id="s")),
    "responses by request": lambda h: h.responses.list(ResponseFilter(request_id=1)),
    "sessions": lambda h: h.sessions.list(),
    "active sessions": lambda h: h.sessions.list(SessionFilter(active=True)),
}


@pytest.mark.parametrize("name", LIST_CALLS)
def test_every_list_filter_reads_through_an_index(sqlite_url: str, name: str) -> None:
    """SQLite's plan for each list query: every table is searched or walked through an index, never
    scanned row by row (the 1M-row benchmark shows what that buys)."""
    from sqlalchemy import event

    upgrade(sqlite_url)
    history = History(sqlite_url)
    statements: list[tuple[str, Any]] = []
    event.listen(history.engine, "before_cursor_execute", lambda *args: statements.append((args[2], args[3])))
    LIST_CALLS[name](history)
    assert statements
    with history.engine.connect() as conn:
        for statement, parameters in list(statements):
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
            for step in plan:
                # A scan of a table must walk an index; a scan of a subquery's rows (anon_1) reads
                # what that subquery found, itself checked here step by step.
                if step.startswith("SCAN") and not step.startswith("SCAN anon_"):
                    assert "USING" in step and "INDEX" in step, (name, plan)
    history.close()


# Every query the read side serves beyond the lists' filters: the other orders, lookups, stats, stored
# completions, retention. The writer's own lookups go through the UNIQUE constraints' indexes.
OTHER_CALLS: dict[str, Callable[[History], Any]] = {
    "sessions by creation": lambda h: h.sessions.list(SessionFilter(since=5, until=10)),
    "expired sessions": lambda h: h.sessions.list(SessionFilter(active=False)),
    **{
        f"{name} ordered by {column}": lambda h, name=name, column=column: getattr(h, name).list(
            page=Pagination(order_by=column)
        )
        for name, columns in (
            ("requests", ("created_at", "id")),
            ("responses", ("created_at", "id")),
            ("sessions", ("created_at", "expires_at")),
        )
        for column in columns
    },
    "session detail": lambda h: h.sessions.detail("s"),
    "session metrics": lambda h: h.sessions.metrics(),
    "request by X-Request-Id": lambda h: h.requests.exchange_by_request_id("r"),
    "response by response id": lambda h: h.responses.get_by_response_id("r"),
    "stored completions": lambda h: h.completions.list(),
    "stored completion by id": lambda h: h.completions.get("chatcmpl-1"),
    "stats of a day": lambda h: h.stats.summary(RequestFilter(since=5, until=10)),
    "retention by age": lambda h: h.pruning.delete_older_than(10),
    "expired sessions' cleanup": lambda h: h.pruning.delete_expired(),
    "a session's deletion": lambda h: h.sessions.delete("s"),
}


def test_every_index_serves_a_query(sqlite_url: str) -> None:
    """Each index costs the writer on every insert, so each must be one that some query the read side
    serves is planned through (SQLite's plans): an index no plan names is dead weight on the write path.
    The UNIQUE constraints' own indexes are left out: they hold the constraint whether or not a read uses
    them (the writer's lookups by capture id and request id do)."""
    from sqlalchemy import event

    upgrade(sqlite_url)
    history = History(sqlite_url)
    with history.engine.connect() as conn:
        names = set(
            conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " AND tbl_name IN ('sessions', 'requests', 'responses')"
            ).scalars()
        )
    assert len(names) >= 10  # the check looked at the real schema
    statements: list[tuple[str, Any]] = []
    event.listen(history.engine, "before_cursor_execute", lambda *args: statements.append((args[2], args[3])))
    for call in (*LIST_CALLS.values(), *OTHER_CALLS.values()):
        call(history)
    used: set[str] = set()
    with history.engine.connect() as conn:
        for statement, parameters in statements:
            if not statement.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE")):
                continue
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters):
                used |= {name for name in names if f"INDEX {name} " in row[-1] + " "}
    history.close()
    assert names - used == set()


def test_boolean_spellings_the_error_lists_are_the_accepted_ones() -> None:
    """The README and the error text list every spelling parse_bool takes."""
    for spelling, value in (("yes", True), ("ON", True), ("no", False), ("Off", False)):
        assert RequestFilter(has_error=parse_bool(spelling, "has_error")).has_error is value
    with pytest.raises(InvalidParameter, match="true/false, 1/0, yes/no, on/off"):
        parse_bool("maybe", "has_error")


def test_the_session_list_cursor_as_the_readme_says(migrated_url: str) -> None:
    """A session used while the list is paged moves in last_accessed order (newest first: missed), not in
    created_at order (each seen once)."""
    history = History(migrated_url)
    for i in range(4):
        history.sessions.create(f"s{i}", "hi", 60_000)
        time.sleep(0.005)  # distinct creation and use times

    def walk(order_by: str) -> list[str]:
        first = history.sessions.list(page=Pagination(limit=2, order_by=order_by))
        history.sessions.touch("s0", 60_000)  # used between the first page and the next
        rest = history.sessions.list(page=Pagination(limit=10, after=first.items[-1].id, order_by=order_by))
        return [info.id for info in first.items + rest.items]

    assert walk("last_accessed") == ["s3", "s2", "s1"]  # s0 moved ahead of the cursor: missed
    assert sorted(walk("created_at")) == ["s0", "s1", "s2", "s3"]
    history.close()


def test_a_replica_row_that_lands_after_the_batch_read_is_retried_under_a_fresh_id(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inserts (executemany on SQLite, COPY on PostgreSQL) fail as SQLAlchemy's IntegrityError when
    another writer stored the same request id between this batch's read and its insert, and the writer's
    one retry then files the request under a fresh id."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'

    def op(capture: str) -> dict[str, Any]:
        record = CapturedRequest(
            "same-id", 1000, "POST", "/v1/chat/completions", body, len(body), False, None, None
        )
        record.capture_id = capture
        return request_op(record, ttl_ms=60_000)[0]

    engine = make_engine(migrated_url)
    with engine.begin() as conn:
        write_ops(conn, [op("replica")])
    real, stale_reads = writes._select_in, [1]

    def before_the_replica(conn: Any, columns: str, table: str, key: str, values: Any) -> Any:
        if stale_reads[0] and (table, key) == ("requests", "request_id"):
            stale_reads[0] -= 1
            return []  # read before the replica's row was committed
        return real(conn, columns, table, key, values)

    monkeypatch.setattr(writes, "_select_in", before_the_replica)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        write_ops(conn, [op("ours")])
    stale_reads[0] = 1
    writer = Writer(build_settings(database_url=migrated_url, spill_dir=tmp_path), engine)
    writer._store([op("ours")])
    assert (writer.stats().written, writer.stats().failed) == (1, 0)
    with engine.connect() as conn:
        stored = conn.execute(select(requests_table.c.request_id, requests_table.c.metadata)).all()
    engine.dispose()
    assert len(stored) == 2
    ours = next(row for row in stored if row.request_id != "same-id")
    assert ours.metadata == {"client_request_id": "same-id"}
