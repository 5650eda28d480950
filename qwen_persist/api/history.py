"""The history endpoints: sessions, requests, responses and stats (the original's phases 5 to 7).

Every read goes through the repositories' ``a``-prefixed methods (the query runs in the `History`'s read
threads) and every answer carrying records is built there too (`responses.answer`), so a large page never
holds up the event loop. Lists answer ``{"object": "list", "data", ...}`` (`responses.list_body`); errors
are OpenAI-shaped (`errors`); ids, times and documents are the stored values as they are.

Request and response ids in paths are the numeric row ids. The id a client received in ``X-Request-Id``
has a route of its own (``/requests/by-request-id/{request_id}``): a UUID is never read as a number.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..repositories import InvalidParameter, ResponseFilter, SessionFilter
from ..repositories.exchanges import check_id
from ..repositories.rows import ExchangeRecord, ResponseRecord, SessionInfo, shallow_dict
from .errors import not_found
from .params import (
    PAGE,
    REQUEST_FILTERS,
    TIME_RANGE,
    boolean,
    group_by,
    integer,
    pagination,
    read_query,
    request_filter,
    text,
    time,
)
from .responses import JSON, answer, history, list_body, plain_list

# ------------------------------------------------------------------------------------------- sessions


def _session(info: SessionInfo) -> dict[str, Any]:
    return shallow_dict(info)


def _session_id(request: Request) -> str:
    session_id: str = request.path_params["session_id"]
    return session_id


async def list_sessions(request: Request) -> Response:
    query = read_query(request, ("active", *TIME_RANGE, *PAGE))
    filter = SessionFilter(
        active=boolean(query, "active"), since=time(query, "since"), until=time(query, "until")
    )
    page = await history(request).sessions.alist(filter, pagination(query, numeric_cursor=False))
    return await answer(request, lambda: list_body(page, _session, lambda info: info.id))


async def get_session(request: Request) -> Response:
    read_query(request, ())
    session_id = _session_id(request)
    detail = await history(request).sessions.adetail(session_id)
    if detail is None:
        raise not_found("session", session_id)
    return JSON(detail.to_dict())


async def session_requests(request: Request) -> Response:
    """The session's exchanges, oldest first unless ``order=desc``."""
    query = read_query(request, (*(name for name in REQUEST_FILTERS if name != "session_id"), *PAGE))
    session_id = _session_id(request)
    filter = request_filter(query, session_id=session_id)
    page_spec = pagination(query, numeric_cursor=True, descending=False)
    store = history(request)
    if await store.sessions.aget(session_id) is None:
        raise not_found("session", session_id)
    page = await store.requests.aexchanges(filter, page_spec)
    return await answer(request, lambda: list_body(page, _exchange, _exchange_id))


async def session_stats(request: Request) -> Response:
    query = read_query(request, (*(name for name in REQUEST_FILTERS if name != "session_id"), "group_by"))
    session_id = _session_id(request)
    filter, groups = request_filter(query, session_id=session_id), group_by(query)
    store = history(request)
    if await store.sessions.aget(session_id) is None:
        raise not_found("session", session_id)
    rows = await store.stats.asummary(filter, groups)
    return JSON(plain_list(row.to_dict() for row in rows))


async def delete_session(request: Request) -> Response:
    """The session with all its requests and responses."""
    read_query(request, ())
    session_id = _session_id(request)
    if not await history(request).sessions.adelete(session_id):
        raise not_found("session", session_id)
    return JSON({"id": session_id, "object": "session.deleted", "deleted": True})


async def purge_expired(request: Request) -> Response:
    """Every expired session with its history; answers how many sessions went."""
    read_query(request, ())
    deleted = await history(request).sessions.apurge_expired()
    return JSON({"object": "sessions.purged", "deleted": deleted})


# ------------------------------------------------------------------------------------------- requests


def _exchange(record: ExchangeRecord) -> dict[str, Any]:
    return record.to_dict()


def _exchange_id(record: ExchangeRecord) -> int:
    return record.request.id


def _row_id(request: Request) -> int:
    """The numeric row id in the path."""
    return check_id(request.path_params["id"], "id")


def _request_row_id(request: Request) -> int:
    try:
        return _row_id(request)
    except InvalidParameter as exc:
        # Most likely the X-Request-Id a client received: say where that one is looked up.
        raw = request.path_params["id"]
        other = request.url.path.rsplit("/", 1)[0] + "/by-request-id/" + raw
        if request.method == "GET":
            hint = f"look up an X-Request-Id at {other}"
        else:
            # The by-request-id route only reads: it gives the numeric id this route takes.
            hint = f"for an X-Request-Id, GET {other} gives its numeric id"
        raise InvalidParameter(
            "id", f"{exc.message}; request ids here are the numeric row ids, {hint}"
        ) from None


async def list_requests(request: Request) -> Response:
    """Requests, each with its response (``response``: null while none is stored), newest first."""
    query = read_query(request, (*REQUEST_FILTERS, *PAGE))
    filter, page_spec = request_filter(query), pagination(query, numeric_cursor=True)
    page = await history(request).requests.aexchanges(filter, page_spec)
    return await answer(request, lambda: list_body(page, _exchange, _exchange_id))


async def get_request(request: Request) -> Response:
    read_query(request, ())
    id = _request_row_id(request)
    record = await history(request).requests.aexchange(id)
    if record is None:
        raise not_found("request", id)
    return await answer(request, record.to_dict)


async def get_request_by_request_id(request: Request) -> Response:
    read_query(request, ())
    request_id: str = request.path_params["request_id"]
    record = await history(request).requests.aexchange_by_request_id(request_id)
    if record is None:
        raise not_found("request", request_id)
    return await answer(request, record.to_dict)


async def delete_request(request: Request) -> Response:
    """The request with its response; its session stays."""
    read_query(request, ())
    id = _request_row_id(request)
    if not await history(request).requests.adelete(id):
        raise not_found("request", id)
    return JSON({"id": id, "object": "request.deleted", "deleted": True})


# ------------------------------------------------------------------------------------------- responses


def _response(record: ResponseRecord) -> dict[str, Any]:
    return record.to_dict()


async def list_responses(request: Request) -> Response:
    query = read_query(
        request, ("session_id", "request_id", "finish_reason", "has_error", *TIME_RANGE, *PAGE)
    )
    filter = ResponseFilter(
        session_id=text(query, "session_id"),
        request_id=integer(query, "request_id", minimum=1),
        finish_reason=text(query, "finish_reason"),
        has_error=boolean(query, "has_error"),
        since=time(query, "since"),
        until=time(query, "until"),
    )
    page = await history(request).responses.alist(filter, pagination(query, numeric_cursor=True))
    return await answer(request, lambda: list_body(page, _response, lambda record: record.id))


async def get_response(request: Request) -> Response:
    read_query(request, ())
    id = _row_id(request)
    record = await history(request).responses.aget(id)
    if record is None:
        raise not_found("response", id)
    return await answer(request, record.to_dict)


# ------------------------------------------------------------------------------------------- stats


async def stats(request: Request) -> Response:
    """Figures over the exchanges the request filters select, grouped by ``group_by`` (``model`` and/or
    ``day`` or ``hour``); one row over everything when not grouped."""
    query = read_query(request, (*REQUEST_FILTERS, "group_by"))
    rows = await history(request).stats.asummary(request_filter(query), group_by(query))
    return JSON(plain_list(row.to_dict() for row in rows))


def routes(prefix: str) -> list[BaseRoute]:
    """The history routes under ``prefix``. Literal paths come before the ``{id}`` they would otherwise
    fall into, and session ids may hold slashes (a client's ``X-Session-Id`` can)."""
    return [
        Route(f"{prefix}/sessions", list_sessions, methods=["GET"]),
        Route(f"{prefix}/sessions/purge-expired", purge_expired, methods=["POST"]),
        Route(f"{prefix}/sessions/{{session_id:path}}/requests", session_requests, methods=["GET"]),
        Route(f"{prefix}/sessions/{{session_id:path}}/stats", session_stats, methods=["GET"]),
        Route(f"{prefix}/sessions/{{session_id:path}}", get_session, methods=["GET"]),
        Route(f"{prefix}/sessions/{{session_id:path}}", delete_session, methods=["DELETE"]),
        Route(f"{prefix}/requests", list_requests, methods=["GET"]),
        Route(
            f"{prefix}/requests/by-request-id/{{request_id:path}}", get_request_by_request_id, methods=["GET"]
        ),
        Route(f"{prefix}/requests/{{id}}", get_request, methods=["GET"]),
        Route(f"{prefix}/requests/{{id}}", delete_request, methods=["DELETE"]),
        Route(f"{prefix}/responses", list_responses, methods=["GET"]),
        Route(f"{prefix}/responses/stats", stats, methods=["GET"]),
        Route(f"{prefix}/responses/{{id}}", get_response, methods=["GET"]),
        Route(f"{prefix}/stats", stats, methods=["GET"]),
    ]
