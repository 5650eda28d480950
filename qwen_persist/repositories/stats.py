"""Figures over any set of exchanges: counts, success rate, tokens, duration and time-to-first-byte
percentiles, optionally grouped by model and by day or hour (UTC).

Everything is computed in the database. PostgreSQL has ``percentile_cont``; SQLite has no percentile
function, so there a window function numbers each group's values in order and only the one or two rows
around each percentile leave the database, to be interpolated exactly as ``percentile_cont`` does. Both
backends therefore give the same figures for the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, Integer, case, cast, func, or_, select

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
            query = select(*keys, *totals).select_from(source).where(*terms)
            if keys:
                query = query.group_by(*keys)
            rows = conn.execute(query).all()
            if postgres:
                percentiles = {
                    _key(row, groups): {
                        measure: [row._mapping[f"{measure}_{i}"] for i in range(len(PERCENTILES))]
                        for measure in MEASURES
                    }
                    for row in rows
                }
            else:
                percentiles = _sqlite_percentiles(conn, expressions, groups, terms, source)
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


def _sqlite_percentiles(
    conn: Connection,
    expressions: list[ColumnElement[Any]],
    groups: tuple[str, ...],
    terms: list[ColumnElement[bool]],
    source: Any,
) -> dict[tuple[Any, ...], dict[str, list[float | None]]]:
    """Per group and measure, the percentiles interpolated from the rows on either side of each rank."""
    found: dict[tuple[Any, ...], dict[str, list[float | None]]] = {}
    for measure in MEASURES:
        value: Column[Any] = _resp[measure]
        partition = expressions or None
        ranked = (
            select(
                *_labelled(expressions, groups),
                value.label("v"),
                (func.row_number().over(partition_by=partition, order_by=value) - 1).label("i"),
                func.count().over(partition_by=partition).label("n"),
            )
            .select_from(source)
            .where(*terms, value.is_not(None))
            .subquery()
        )
        # Only the rows at floor(p*(n-1)) and the one after it, for each p, leave the database.
        wanted = [
            or_(
                ranked.c.i == cast(p * (ranked.c.n - 1), Integer),
                ranked.c.i == cast(p * (ranked.c.n - 1), Integer) + 1,
            )
            for p in PERCENTILES
        ]
        picked: dict[tuple[Any, ...], dict[int, float]] = {}
        sizes: dict[tuple[Any, ...], int] = {}
        for row in conn.execute(select(ranked).where(or_(*wanted))):
            key = _key(row, groups)
            picked.setdefault(key, {})[row.i] = row.v
            sizes[key] = row.n
        for key, ranks in picked.items():
            n = sizes[key]
            found.setdefault(key, {})[measure] = [_interpolate(ranks, p * (n - 1)) for p in PERCENTILES]
    return found


def _interpolate(ranks: dict[int, float], position: float) -> float:
    low = math.floor(position)
    fraction = position - low
    if fraction == 0 or low + 1 not in ranks:
        return float(ranks[low])
    return ranks[low] + (ranks[low + 1] - ranks[low]) * fraction
