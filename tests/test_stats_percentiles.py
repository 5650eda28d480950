"""Stats give the same figures on SQLite and PostgreSQL: counts and sums from the database, percentiles
from PostgreSQL's ``percentile_cont`` or, on SQLite, ranked in Python from the values listed by the same
pass over the rows. Both are checked against figures worked out here from every stored exchange."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from support import percentile_cont
from traffic import record_traffic

from qwen_persist.migrate import upgrade
from qwen_persist.repositories import ExchangeRecord, History, RequestFilter
from qwen_persist.repositories.stats import _percentiles


@pytest.fixture(scope="module")
def history(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    upgrade(module_database_url)
    record_traffic(module_database_url, tmp_path_factory.mktemp("traffic"), rounds=2)
    with History(module_database_url) as store:
        yield store


def _reference(exchanges: list[ExchangeRecord], measure: str) -> dict[str, float | None]:
    values = [
        float(getattr(e.response, measure))
        for e in exchanges
        if e.response is not None and getattr(e.response, measure) is not None
    ]
    return {f"p{round(p * 100)}": percentile_cont(values, p) for p in (0.5, 0.95, 0.99)}


def _group(e: ExchangeRecord, by: str) -> Any:
    if by == "model":
        return e.request.model
    return datetime.fromtimestamp(e.request.timestamp / 1000, timezone.utc).date().isoformat()


@pytest.mark.parametrize("group_by", [(), ("model",), ("day",)])
def test_figures_match_the_stored_exchanges(history: History, group_by: tuple[str, ...]) -> None:
    exchanges = list(history.requests.iter_exchanges())
    assert len(exchanges) == 20
    rows = history.stats.summary(RequestFilter(), group_by)
    groups: dict[tuple[Any, ...], list[ExchangeRecord]] = {}
    for e in exchanges:
        groups.setdefault(tuple(_group(e, by) for by in group_by), []).append(e)
    assert [tuple(row.group.values()) for row in rows] == sorted(groups, key=lambda k: [str(v) for v in k])
    for row in rows:
        members = groups[tuple(row.group.values())]
        assert row.count == len(members)
        assert row.errors == sum(1 for e in members if e.response and e.response.status_code != 200)
        assert row.total_tokens == sum((e.response.total_tokens or 0) for e in members if e.response)
        for measure in ("duration_ms", "first_byte_ms"):
            expected = _reference(members, measure)
            figures = getattr(row, measure)
            assert set(figures) == set(expected)
            for name, value in expected.items():
                assert figures[name] == pytest.approx(value, rel=1e-12), (row.group, measure, name)


def test_percentiles_of_listed_values() -> None:
    """SQLite lists a group's values as text; whole numbers and reals (a REAL kept in an INTEGER column
    of an old database) alike."""
    assert _percentiles(None) is None
    assert _percentiles("") is None
    assert _percentiles("7") == [7.0, 7.0, 7.0]
    p50, p95, p99 = _percentiles("4,1,2.5,10")  # type: ignore[misc]
    assert p50 == pytest.approx(3.25)  # between 2.5 and 4
    assert p95 == pytest.approx(4 + (10 - 4) * 0.85)
    assert p99 == pytest.approx(4 + (10 - 4) * 0.97)
