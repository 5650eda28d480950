"""Requests and responses: reading, listing and deleting exchanges.

An exchange is a ``requests`` row with its ``responses`` row (absent while the response is in flight or
being written). Lists order by a whitelisted column, then id, newest first unless asked otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, and_, delete, func, literal_column, or_, select

from ..models import requests_table, responses_table
from .base import Repository, few_matches, in_thread, lookup_key, paginate
from .documents import raw_exchange_from_row, raw_exchanges_query
from .queries import InvalidParameter, Pagination, RequestFilter, ResponseFilter, parse_int
from .rows import ExchangeRecord, Page, RequestRecord, ResponseRecord

REQUEST_ORDER = ("timestamp", "created_at", "id")
RESPONSE_ORDER = ("timestamp", "created_at", "id")

_req = requests_table.c
_resp = responses_table.c
# Response columns when selected beside the request's: prefixed, since both tables have id, timestamp...
_RESPONSE_LABELS = [column.label("response_" + column.name) for column in responses_table.c]


def failed(responses: Any = _resp) -> ColumnElement[bool]:
    """A response that is not a success: an error recorded, or an error status sent."""
    # A literal 400, not a bound parameter: SQLite uses the partial index only for the same expression.
    return or_(responses.error.is_not(None), responses.status_code >= literal_column("400"))


def not_failed() -> ColumnElement[bool]:
    """No error recorded and no error status sent: a success, or a request still in flight."""
    return and_(_resp.error.is_(None), func.coalesce(_resp.status_code, 0) < 400)


def succeeded(responses: Any = _resp) -> ColumnElement[bool]:
    """A complete answer: 2xx/3xx and no error (what the stats count and the stored completions list)."""
    return and_(responses.error.is_(None), responses.status_code >= 200, responses.status_code < 400)


def request_conditions(f: RequestFilter) -> tuple[list[ColumnElement[bool]], bool]:
    """The WHERE terms for ``f``, and whether they need a response (an inner join to the responses: the
    planner may then start from a responses index, such as the failures' partial index)."""
    answered = f.has_error is True or f.status_code is not None
    return [*_request_terms(f), *_response_terms(f)], answered


def _request_terms(f: RequestFilter) -> list[ColumnElement[bool]]:
    terms: list[ColumnElement[bool]] = []
    if f.session_id is not None:
        terms.append(_req.session_id == f.session_id)
    if f.model is not None:
        terms.append(_req.model == f.model)
    if f.stream is not None:
        terms.append(_req.stream.is_(f.stream))
    if f.since is not None:
        terms.append(_req.timestamp >= f.since)
    if f.until is not None:
        terms.append(_req.timestamp <= f.until)
    return terms


def _response_terms(f: RequestFilter, *, walk: bool = False) -> list[ColumnElement[bool]]:
    """The terms on the response. ``walk``: spelled so that SQLite cannot drive the query from an index on
    them (an expression over the column rather than the column), and walks the requests in order."""
    terms: list[ColumnElement[bool]] = []
    # An error status is an error already. Said twice, the two correlated terms mislead PostgreSQL's
    # estimate: it took 429 AND has_error for a few hundred rows and sorted all 20,000 (0.3 s).
    implied = f.has_error is True and f.status_code is not None and f.status_code >= 400
    if f.has_error is not None and not implied:
        # No response yet is not an error: a request in flight counts as "no error".
        terms.append(failed() if f.has_error else not_failed())
    if f.status_code is not None:
        status = _resp.status_code + 0 if walk else _resp.status_code
        terms.append(status == f.status_code)
    return terms


def filter_by_response(
    conn: Connection, query: Select[Any], f: RequestFilter, page: Pagination, *, joined: bool
) -> Select[Any]:
    """``query`` over requests (with their responses outer-joined when ``joined``) narrowed to the
    requests whose response matches the filter's response terms (``has_error``, ``status_code``).

    The page is ordered by a request column and filtered on a response column, so no one index serves
    both: the database either walks the requests in order and probes each one's response, or fetches
    every matching response and sorts. PostgreSQL chooses from its statistics; SQLite is told
    (`few_matches`).
    """
    positive = f.has_error is not False  # a request without a response matches has_error=false
    if conn.dialect.name == "sqlite" and positive and (f.has_error or f.status_code is not None):
        if few_matches(conn, responses_table, _response_terms(f), page):
            return query.where(_req.id.in_(select(_resp.request_id).where(*_response_terms(f))))
        return _joined(query, joined).where(*_response_terms(f, walk=True))
    terms = _response_terms(f)
    return _joined(query, joined).where(*terms) if terms else query


def _joined(query: Select[Any], joined: bool) -> Select[Any]:
    if joined:
        return query
    return query.select_from(requests_table.outerjoin(responses_table, _resp.request_id == _req.id))


def response_conditions(f: ResponseFilter) -> list[ColumnElement[bool]]:
    terms: list[ColumnElement[bool]] = []
    if f.session_id is not None:
        terms.append(_resp.session_id == f.session_id)
    if f.request_id is not None:
        terms.append(_resp.request_id == f.request_id)
    if f.finish_reason is not None:
        terms.append(_resp.finish_reason == f.finish_reason)
    if f.has_error is not None:
        terms.append(failed() if f.has_error else not_failed())
    if f.since is not None:
        terms.append(_resp.timestamp >= f.since)
    if f.until is not None:
        terms.append(_resp.timestamp <= f.until)
    return terms


def exchange_from_row(row: Any) -> ExchangeRecord:
    mapping = row._mapping
    response = None
    if mapping["response_id"] is not None:
        response = ResponseRecord.from_row(
            {column.name: mapping["response_" + column.name] for column in responses_table.c}  # type: ignore[arg-type]
        )
    return ExchangeRecord(RequestRecord.from_row(mapping), response)


def exchanges_join(answered: bool = False, responses_where: ColumnElement[bool] | None = None) -> Any:
    """Requests with their responses: only the answered ones (inner join), or all (outer join).

    ``responses_where`` narrows the joined responses (a range of request ids, say, that lets PostgreSQL
    start its index scan of responses there instead of at the first row)."""
    on = _resp.request_id == _req.id
    if responses_where is not None:
        on = and_(on, responses_where)
    if answered:
        return requests_table.join(responses_table, on)
    return requests_table.outerjoin(responses_table, on)


def exchanges_query(
    answered: bool = False, responses_where: ColumnElement[bool] | None = None
) -> Select[Any]:
    """Requests with their responses: the columns `exchange_from_row` reads."""
    return select(requests_table, *_RESPONSE_LABELS).select_from(exchanges_join(answered, responses_where))


def _cursor_id(page: Pagination) -> Pagination:
    """Request and response cursors are numeric ids."""
    if page.after is None or isinstance(page.after, int):
        return page
    return dataclasses.replace(page, after=parse_int(page.after, "after", minimum=1))


class RequestRepository(Repository):
    """Requests, alone or with their responses (`ExchangeRecord`)."""

    def get(self, id: int) -> RequestRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(requests_table).where(_req.id == id)).first()
        return RequestRecord.from_row(row._mapping) if row is not None else None

    def get_by_request_id(self, request_id: str) -> RequestRecord | None:
        """By the id the client received in ``X-Request-Id``."""
        with self.engine.connect() as conn:
            row = conn.execute(select(requests_table).where(_req.request_id == request_id)).first()
        return RequestRecord.from_row(row._mapping) if row is not None else None

    def exchange(self, id: int) -> ExchangeRecord | None:
        """A request with its response, by numeric id."""
        return self._exchange(_req.id == id)

    def exchange_by_request_id(self, request_id: str) -> ExchangeRecord | None:
        """A request with its response, by the id the client received in ``X-Request-Id``."""
        return self._exchange(_req.request_id == request_id)

    def _exchange(self, where: ColumnElement[bool]) -> ExchangeRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(exchanges_query().where(where)).first()
        return exchange_from_row(row) if row is not None else None

    def list(
        self, filter: RequestFilter | None = None, page: Pagination | None = None
    ) -> Page[RequestRecord]:
        """Requests matching ``filter``, newest first unless ``page`` says otherwise."""
        f, p = filter or RequestFilter(), _cursor_id(page or Pagination())
        return self._page(
            select(requests_table), f, p, lambda row: RequestRecord.from_row(row._mapping), joined=False
        )

    def exchanges(
        self, filter: RequestFilter | None = None, page: Pagination | None = None
    ) -> Page[ExchangeRecord]:
        """Requests with their responses, matching ``filter``, newest first unless ``page`` says
        otherwise."""
        f, p = filter or RequestFilter(), _cursor_id(page or Pagination())
        return self._page(exchanges_query(), f, p, exchange_from_row, joined=True)

    def _page(
        self, query: Select[Any], f: RequestFilter, page: Pagination, convert: Any, *, joined: bool
    ) -> Page[Any]:
        key = requests_table.c[page.column(REQUEST_ORDER)]
        with self.engine.connect() as conn:
            query = filter_by_response(conn, query.where(*_request_terms(f)), f, page, joined=joined)
            rows, more, total = paginate(
                conn, query, key=key, tiebreak=_req.id, page=page, after_key=lookup_key(key, _req.id)
            )
        return Page(
            [convert(row) for row in rows],
            limit=page.limit,
            has_more=more,
            offset=page.offset if page.after is None else None,
            after=page.after,
            total=total,
        )

    def iter_exchanges(
        self,
        filter: RequestFilter | None = None,
        *,
        batch_size: int = 1000,
        descending: bool = False,
        after: int | None = None,
        raw_documents: bool = False,
    ) -> Iterator[ExchangeRecord]:
        """Every matching exchange, oldest first (by id) unless ``descending``, read in batches by cursor:
        constant memory however many there are, and each batch a short read. ``after``: only those past
        that request id (newer, or older when ``descending``), whether or not a row has that id.

        ``raw_documents``: the JSON documents (bodies, metadata, headers) come as `jsonlib.RawJSON`, the
        text the database holds, unparsed (`jsonlib.dumps` writes them as they are; ``.parse()``)."""
        f = filter or RequestFilter()
        terms, answered = request_conditions(f)
        build = raw_exchanges_query if raw_documents else exchanges_query
        convert = raw_exchange_from_row if raw_documents else exchange_from_row
        while True:
            if after is None:
                batch = build(answered).where(*terms)
            else:
                # The bound on both sides of the join: each batch reads from the cursor on, not from the
                # first row (PostgreSQL would otherwise merge-join responses from their start each time).
                batch = build(answered, _resp.request_id < after if descending else _resp.request_id > after)
                batch = batch.where(*terms, _req.id < after if descending else _req.id > after)
            batch = batch.order_by(_req.id.desc() if descending else _req.id.asc()).limit(batch_size)
            with self.engine.connect() as conn:
                rows = conn.execute(batch).all()
            for row in rows:
                yield convert(row)
            if len(rows) < batch_size:
                return
            after = rows[-1]._mapping["id"]

    def delete(self, id: int) -> bool:
        """Delete a request and its response; the session stays."""
        with self.engine.begin() as conn:
            return bool(delete_exchanges(conn, [id]))

    aget = in_thread(get)
    aget_by_request_id = in_thread(get_by_request_id)
    aexchange = in_thread(exchange)
    aexchange_by_request_id = in_thread(exchange_by_request_id)
    alist = in_thread(list)
    aexchanges = in_thread(exchanges)
    adelete = in_thread(delete)


class ResponseRepository(Repository):
    """Responses."""

    def get(self, id: int) -> ResponseRecord | None:
        return self._one(_resp.id == id)

    def get_by_response_id(self, response_id: str) -> ResponseRecord | None:
        return self._one(_resp.response_id == response_id)

    def _one(self, where: ColumnElement[bool]) -> ResponseRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(responses_table).where(where)).first()
        return ResponseRecord.from_row(row._mapping) if row is not None else None

    def list(
        self, filter: ResponseFilter | None = None, page: Pagination | None = None
    ) -> Page[ResponseRecord]:
        """Responses matching ``filter``, newest first unless ``page`` says otherwise."""
        f, p = filter or ResponseFilter(), _cursor_id(page or Pagination())
        key = responses_table.c[p.column(RESPONSE_ORDER)]
        query = select(responses_table).where(*response_conditions(f))
        with self.engine.connect() as conn:
            rows, more, total = paginate(
                conn, query, key=key, tiebreak=_resp.id, page=p, after_key=lookup_key(key, _resp.id)
            )
        return Page(
            [ResponseRecord.from_row(row._mapping) for row in rows],
            limit=p.limit,
            has_more=more,
            offset=p.offset if p.after is None else None,
            after=p.after,
            total=total,
        )

    aget = in_thread(get)
    aget_by_response_id = in_thread(get_by_response_id)
    alist = in_thread(list)


def delete_exchanges(conn: Connection, request_ids: list[int]) -> int:
    """Delete requests by id with their responses, responses first, so no row is ever left without its
    partner even where foreign keys are not enforced (a SQLite connection without ``foreign_keys=ON``)."""
    if not request_ids:
        return 0
    conn.execute(delete(responses_table).where(_resp.request_id.in_(request_ids)))
    return int(conn.execute(delete(requests_table).where(_req.id.in_(request_ids))).rowcount)


def check_id(value: Any, param: str = "id") -> int:
    """A numeric row id, from an int or its digits."""
    try:
        return parse_int(value, param, minimum=1)
    except InvalidParameter:
        raise InvalidParameter(param, f"{value!r} is not a numeric id") from None
