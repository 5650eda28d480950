"""The requests lists filtered on the response (``status_code``, ``has_error``) give the same rows in the
same order whichever way the query is shaped.

On SQLite the repository counts the matches and either walks the requests in order, probing each
response, or starts from the matching responses and sorts (`filter_by_response`); both shapes are
exercised here on real traffic and compared with the answer worked out in Python from every exchange.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from traffic import record_traffic

from qwen_persist.migrate import upgrade
from qwen_persist.repositories import ExchangeRecord, History, Pagination, RequestFilter

# Each filter with how many of the recorded exchanges match it (3 rounds of `record_traffic`: 24 answered
# 200 over four models, half of them streamed; three 429s, JSON; three 500s, streamed).
COUNTS = {
    RequestFilter(status_code=200): 24,
    RequestFilter(status_code=429): 3,
    RequestFilter(status_code=500): 3,
    RequestFilter(status_code=404): 0,
    RequestFilter(has_error=True): 6,
    RequestFilter(has_error=False): 24,
    RequestFilter(has_error=True, status_code=429): 3,
    RequestFilter(has_error=False, status_code=500): 0,
    RequestFilter(has_error=True, stream=True): 3,
    RequestFilter(status_code=200, model="fake-tool"): 6,
}
FILTERS = list(COUNTS)
LIMITS = [1, 2, 5, 50]


@pytest.fixture(scope="module")
def history(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    # 3 rounds: 24 answered 200, three 429s and three 500s.
    upgrade(module_database_url)
    record_traffic(module_database_url, tmp_path_factory.mktemp("traffic"), rounds=3)
    with History(module_database_url) as store:
        yield store


def _matches(f: RequestFilter, exchange: ExchangeRecord) -> bool:
    request, response = exchange.request, exchange.response
    if f.model is not None and request.model != f.model:
        return False
    if f.stream is not None and request.stream != f.stream:
        return False
    failed = response is not None and (response.error is not None or (response.status_code or 0) >= 400)
    if f.has_error is not None and failed != f.has_error:
        return False
    return f.status_code is None or (response is not None and response.status_code == f.status_code)


def _expected(history: History, f: RequestFilter) -> list[int]:
    everything = list(history.requests.iter_exchanges())
    ordered = sorted(everything, key=lambda e: (e.request.timestamp, e.request.id), reverse=True)
    return [e.request.id for e in ordered if _matches(f, e)]


def _walk(history: History, f: RequestFilter, limit: int, *, cursor: bool, full: bool) -> list[int]:
    """Every page of the list, by offset or by cursor, until ``has_more`` says there is no more."""
    seen: list[int] = []
    while True:
        if cursor:
            page = Pagination(limit=limit, after=seen[-1] if seen else None)
        else:
            page = Pagination(limit=limit, offset=len(seen))
        result = history.requests.exchanges(f, page) if full else history.requests.list(f, page)
        ids = [item.request.id if isinstance(item, ExchangeRecord) else item.id for item in result.items]
        seen += ids
        assert len(ids) <= limit
        if not result.has_more:
            return seen
        assert len(ids) == limit


@pytest.mark.parametrize("f", FILTERS, ids=repr)
def test_filtered_pages_are_the_matching_exchanges_in_order(history: History, f: RequestFilter) -> None:
    expected = _expected(history, f)
    assert len(expected) == COUNTS[f]
    for limit in LIMITS:
        for cursor in (False, True):
            for full in (False, True):
                assert _walk(history, f, limit, cursor=cursor, full=full) == expected, (limit, cursor, full)


def test_the_filtered_totals_count_the_matches(history: History) -> None:
    for f in FILTERS:
        page = history.requests.list(f, Pagination(limit=1, count_total=True))
        assert page.total == len(_expected(history, f)), f


def test_sqlite_takes_both_shapes(history: History) -> None:
    """Common matches are walked (the status spelled as an expression, so no index on it drives the
    query); rare ones are fetched first (the requests whose id is among the matching responses')."""
    if history.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL chooses the plan from its statistics")
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(history.engine, "before_cursor_execute", record)
    try:
        history.requests.exchanges(RequestFilter(status_code=200), Pagination(limit=1))
        walked = list(statements)
        statements.clear()
        history.requests.exchanges(RequestFilter(status_code=500), Pagination(limit=50))
        fetched = list(statements)
    finally:
        event.remove(history.engine, "before_cursor_execute", record)
    page_query = walked[-1]
    assert "responses.status_code + ?" in page_query and "IN (SELECT" not in page_query
    page_query = fetched[-1]
    assert "requests.id IN (SELECT responses.request_id" in page_query and "status_code + ?" not in page_query


def test_redundant_error_term_is_dropped(history: History) -> None:
    """An error status is an error: has_error=true adds nothing to it (and misleads PostgreSQL's
    estimate if it is sent along), so both filters give the same pages."""
    for limit in LIMITS:
        both = _walk(history, RequestFilter(has_error=True, status_code=429), limit, cursor=True, full=True)
        alone = _walk(history, RequestFilter(status_code=429), limit, cursor=True, full=True)
        assert both == alone and len(alone) == 3


def test_stats_filtered_on_the_response(history: History) -> None:
    for f in FILTERS:
        (row,) = history.stats.summary(f)
        assert row.count == len(_expected(history, f)), f
