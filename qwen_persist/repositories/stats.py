"""Figures over any set of exchanges: counts, success rate, tokens, duration and time-to-first-byte
percentiles, optionally grouped by model and by day or hour (UTC).

Everything is computed in the database, in one pass over the matching exchanges, except on SQLite the
percentiles: it has no percentile function, so there the pass lists each group's values
(``group_concat``) and they are ranked in Python, interpolated exactly as PostgreSQL's ``percentile_cont``
does. Both backends therefore give the same figures for the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, case, func, select

from ..models import requests_table, responses_table
from .base import Repository, in_thread
from .exchanges import failed, request_conditions, succeeded
from .queries import InvalidParameter, RequestFilter
from .rows import StatsRow

GROUPS = ("model", "day", "hour")
PERCENTILES = (0.5, 0.95, 0.99)
MEASURES = ("duration_ms", "first_byte_ms")
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000

_req = requests_table.c
_resp = responses_table.c


def check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    groups = tuple(dict.fromkeys(group_by))
    for name in groups:
        if name not in GROUPS:
            raise InvalidParameter("group_by", f"must be among {', '.join(GROUPS)}; got {name!r}")
    if "day" in groups and "hour" in groups:
        raise InvalidParameter("group_by", "day and hour cannot be combined")
    return groups


def _group_expressions(groups: tuple[str, ...]) -> list[ColumnElement[Any]]:
    expressions = {
        "model": _req.model,
        "day": _req.timestamp // _DAY_MS,
        "hour": _req.timestamp // _HOUR_MS,
    }
    return [expressions[name] for name in groups]


def _labelled(expressions: list[ColumnElement[Any]], groups: tuple[str, ...]) -> list[ColumnElement[Any]]:
    return [expression.label("g_" + name) for expression, name in zip(expressions, groups, strict=True)]


def _group_value(name: str, value: Any) -> Any:
    if value is None or name == "model":
        return value
    moment = datetime.fromtimestamp(
        int(value) * (_DAY_MS if name == "day" else _HOUR_MS) / 1000, timezone.utc
    )
    return moment.date().isoformat() if name == "day" else moment.strftime("%Y-%m-%dT%H:00Z")


class StatsRepository(Repository):
    """Stats over exchanges (requests with their responses)."""

    def summary(self, filter: RequestFilter | None = None, group_by: Sequence[str] = ()) -> list[StatsRow]:
        """One `StatsRow` per group (ordered by the group keys), or a single row over everything matching
        ``filter`` when ``group_by`` is empty (zeros when nothing matches)."""
        groups = check_group_by(group_by)
        terms, _ = request_conditions(filter or RequestFilter())
        expressions = _group_expressions(groups)
        keys = _labelled(expressions, groups)
        source = requests_table.outerjoin(responses_table, _resp.request_id == _req.id)
        with self.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            totals = [
                func.count().label("count"),
                func.coalesce(func.sum(case((succeeded(), 1), else_=0)), 0).label("succeeded"),
                func.coalesce(func.sum(case((failed(), 1), else_=0)), 0).label("errors"),
                func.coalesce(func.sum(case((_resp.id.is_(None), 1), else_=0)), 0).label("pending"),
                *(
                    func.coalesce(func.sum(_resp[name]), 0).label(name)
                    for name in ("prompt_tokens", "completion_tokens", "total_tokens")
                ),
            ]
            if postgres:
                totals += [
                    func.percentile_cont(p).within_group(_resp[measure]).label(f"{measure}_{i}")
                    for measure in MEASURES
                    for i, p in enumerate(PERCENTILES)
                ]
            else:
                # SQLite has no percentile function: the group's values come back listed, in the same
                # pass over the rows as the totals, and are ranked here (`_percentiles`).
                totals += [func.group_concat(_resp[m]).label(f"{m}_values") for m in MEASURES]
            query = select(*keys, *totals).select_from(source).where(*terms)
            if keys:
                query = query.group_by(*keys)
            rows = conn.execute(query).all()
        percentiles = {
            _key(row, groups): {
                measure: (
                    [row._mapping[f"{measure}_{i}"] for i in range(len(PERCENTILES))]
                    if postgres
                    else _percentiles(row._mapping[f"{measure}_values"])
                )
                for measure in MEASURES
            }
            for row in rows
        }
        result = []
        for row in rows:
            values = row._mapping
            if values["count"] == 0 and keys:
                continue
            key = _key(row, groups)
            figures = percentiles.get(key, {})
            result.append(
                StatsRow(
                    group={name: _group_value(name, value) for name, value in zip(groups, key, strict=True)},
                    count=int(values["count"]),
                    succeeded=int(values["succeeded"]),
                    errors=int(values["errors"]),
                    pending=int(values["pending"]),
                    prompt_tokens=int(values["prompt_tokens"]),
                    completion_tokens=int(values["completion_tokens"]),
                    total_tokens=int(values["total_tokens"]),
                    **{measure: _named(figures.get(measure)) for measure in MEASURES},
                )
            )
        result.sort(key=lambda stats: tuple((v is not None, v or "") for v in stats.group.values()))
        return result

    asummary = in_thread(summary)


def _key(row: Any, groups: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(row._mapping["g_" + name] for name in groups)


def _named(values: Sequence[Any] | None) -> dict[str, float | None]:
    names = [f"p{round(p * 100)}" for p in PERCENTILES]
    if values is None:
        return dict.fromkeys(names)
    return {
        name: (float(value) if value is not None else None) for name, value in zip(names, values, strict=True)
    }


def _percentiles(listed: str | None) -> list[float | None] | None:
    """The percentiles of the values SQLite's ``group_concat`` listed (None: there were none),
    interpolated as PostgreSQL's ``percentile_cont`` does, so both backends give the same figures.

    One pass over the rows for the totals and the values alike: numbering the values in SQL instead,
    with a window function per measure, read the joined rows three times and took twice as long (a day
    of a million exchanges, benchmarks/bench_read.py).
    """
    if not listed:
        return None
    ordered = sorted(map(float, listed.split(",")))
    return [_interpolate(ordered, p * (len(ordered) - 1)) for p in PERCENTILES]


def _interpolate(ordered: Sequence[float], position: float) -> float:
    """The value at ``position`` (0 to n-1) of sorted values, linear between neighbours (as
    ``percentile_cont``)."""
    low = math.floor(position)
    fraction = position - low
    if fraction == 0 or low + 1 >= len(ordered):
        return float(ordered[low])
    return ordered[low] + (ordered[low + 1] - ordered[low]) * fraction
