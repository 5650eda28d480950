"""What every repository shares: its engine, the async face, pagination with a total order."""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Executor
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Select,
    Table,
    func,
    literal_column,
    select,
    tuple_,
)

from .queries import InvalidParameter, Pagination

P = ParamSpec("P")
R = TypeVar("R")


class _InThread(Protocol):
    executor: Executor | None


S = TypeVar("S", bound=_InThread)


def in_thread(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """The async twin of a sync repository method: the same call, run in the repository's executor, so
    a slow query never blocks the event loop (the ``a`` prefix, as in Django's ``aget``)."""

    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(method, self, *args, **kwargs))

    run.__name__ = "a" + method.__name__
    run.__qualname__ = method.__qualname__.rpartition(".")[0] + "." + run.__name__
    run.__doc__ = f"The async twin of `{method.__name__}`, run off the event loop."
    return run


class Repository:
    """Holds the engine; each public method runs in a connection (reads) or transaction (writes) of its
    own, and its ``a``-prefixed twin does the same off the event loop in ``executor`` (None: asyncio's
    default thread pool)."""

    def __init__(self, engine: Engine, executor: Executor | None = None) -> None:
        self.engine = engine
        self.executor = executor


# SQLite has no statistics (nothing runs ANALYZE), so for a page ordered by one column and filtered on
# another the repositories tell it which plan to take: walk the order's index and test each row (cheap when
# most rows match), or fetch the matching rows by the filter's index and sort them (cheap when few do).
# A walked row costs about a sixteenth of a fetched-and-sorted one (SQLite 3.40, benchmarks/bench_read.py
# on 1,000,000 exchanges), so fetching wins while the matches number fewer than
# sqrt(rows to reach x rows in the table / 16). Left to itself, SQLite took an equality on an indexed
# column for selective whatever the value, and sorted 970,000 status_code=200 exchanges for one page.
WALK_TO_SORT = 16


def few_matches(
    conn: Connection, table: Table, terms: Sequence[ColumnElement[bool]], page: Pagination
) -> bool:
    """On SQLite: whether the rows of ``table`` that ``terms`` keep are few enough that fetching them all
    and sorting beats walking the order's index for ``page``. They are counted only up to that break-even
    number; the table's size is taken as its largest rowid (read from the index, not counted)."""
    rows = conn.execute(select(func.max(literal_column("rowid"))).select_from(table)).scalar() or 0
    reach = page.limit + 1 + (page.offset if page.after is None else 0)
    cap = math.isqrt(reach * int(rows) // WALK_TO_SORT) + 1
    matching: Select[Any] = select(literal_column("1")).select_from(table).where(*terms)
    found = conn.execute(select(func.count()).select_from(matching.limit(cap).subquery())).scalar_one()
    return int(found) < cap


def paginate(
    conn: Connection,
    query: Select[Any],
    *,
    key: Column[Any],
    tiebreak: Column[Any],
    page: Pagination,
    after_key: Callable[[Connection, Any], Any],
) -> tuple[Sequence[Any], bool, int | None]:
    """Rows of ``query`` for ``page`` ordered by ``key`` then ``tiebreak`` (a unique column), both in the
    page's direction; also whether more rows follow, and the total when the page asks for it.

    ``after_key(conn, after)`` returns the ``key`` value of the row the cursor names, or raises
    `InvalidParameter` when there is no such row.
    """
    total = None
    if page.count_total:
        total = int(
            conn.execute(select(func.count()).select_from(query.order_by(None).subquery())).scalar_one()
        )
    if page.descending:
        ordered = query.order_by(key.desc(), tiebreak.desc())
    else:
        ordered = query.order_by(key.asc(), tiebreak.asc())
    if page.after is not None:
        cursor = tuple_(after_key(conn, page.after), page.after)
        position: ColumnElement[bool] = (
            tuple_(key, tiebreak) < cursor if page.descending else tuple_(key, tiebreak) > cursor
        )
        ordered = ordered.where(position)
    else:
        ordered = ordered.offset(page.offset)
    rows = conn.execute(ordered.limit(page.limit + 1)).all()
    return rows[: page.limit], len(rows) > page.limit, total


def lookup_key(
    column: Column[Any], id_column: Column[Any], param: str = "after"
) -> Callable[[Connection, Any], Any]:
    """An ``after_key`` for `paginate`: the value of ``column`` in the row whose ``id_column`` is the
    cursor."""

    def find(conn: Connection, after: Any) -> Any:
        row = conn.execute(select(column).where(id_column == after)).first()
        if row is None:
            raise InvalidParameter(param, f"no row has id {after!r}")
        return row[0]

    return find
