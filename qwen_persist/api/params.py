"""Query strings as the API reads them: every parameter checked, each mistake a 400 that names it.

An endpoint lists the parameters it accepts; anything else is refused rather than ignored, so a typo such
as ``modle=x`` answers 400 instead of silently returning every row. A parameter given twice, or given
empty, is refused too: neither has one obvious meaning. The values go through the parsers of
`qwen_persist.repositories.queries`, so the API and the CLI accept the same spellings.

A NUL character (``%00``) in a parameter, or in an id in the path, is refused the same way on both
databases: no stored id, name or cursor holds one (PostgreSQL cannot compare text with NUL at all, and
would fail the query). Metadata pairs are the exception: metadata may hold NUL, stored escaped, and a
``metadata[key]=value`` filter finds it as it was sent.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request

from ..repositories import InvalidParameter, Pagination, RequestFilter, parse_time
from ..repositories.queries import DEFAULT_LIMIT, MAX_LIMIT, parse_bool, parse_int

PAGE = ("limit", "offset", "after", "order_by", "order", "total")
TIME_RANGE = ("since", "until")
REQUEST_FILTERS = ("session_id", "model", "stream", "since", "until", "has_error", "status_code")


# Azure OpenAI clients add api-version to every request; it selects nothing here.
IGNORED = ("api-version",)


def read_query(request: Request, accepted: tuple[str, ...], *, pairs: str | None = None) -> dict[str, str]:
    """The query string as one value per name, after refusing names not in ``accepted``, repeated
    names, empty values and NUL characters (in the path's parameters too). With ``pairs="metadata"``,
    ``metadata[key]=value`` parameters are accepted too (values may be empty or hold NUL), under their
    full names: `read_pairs` collects them."""
    for name, value in request.path_params.items():
        _refuse_nul(name, value)
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name in IGNORED:
            continue
        paired = pairs is not None and name.startswith(pairs + "[") and name.endswith("]")
        if name not in accepted and not paired:
            known = ", ".join((*accepted, f"{pairs}[key]") if pairs else accepted) or "none"
            raise InvalidParameter(name, f"unknown parameter (accepted here: {known})")
        if name in values:
            raise InvalidParameter(name, "given more than once")
        if not value.strip() and not paired:
            raise InvalidParameter(name, "is empty; leave it out instead")
        if not paired:
            _refuse_nul(name, value)
        values[name] = value
    return values


def _refuse_nul(name: str, value: object) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise InvalidParameter(name, "holds a NUL character (%00), which no stored id or name holds")


def read_pairs(query: Mapping[str, str], name: str) -> dict[str, str] | None:
    """The ``name[key]=value`` parameters of a query `read_query` accepted, as ``{key: value}``."""
    found = {
        key[len(name) + 1 : -1]: value
        for key, value in query.items()
        if key.startswith(name + "[") and key.endswith("]")
    }
    return found or None


def text(query: Mapping[str, str], name: str) -> str | None:
    return query.get(name)


def integer(
    query: Mapping[str, str], name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    value = query.get(name)
    return None if value is None else parse_int(value, name, minimum=minimum, maximum=maximum)


def boolean(query: Mapping[str, str], name: str) -> bool | None:
    value = query.get(name)
    return None if value is None else parse_bool(value, name)


def time(query: Mapping[str, str], name: str) -> int | None:
    """Milliseconds since the epoch, or ISO-8601 (no zone: UTC)."""
    value = query.get(name)
    return None if value is None else parse_time(value, name)


def pagination(query: Mapping[str, str], *, numeric_cursor: bool, descending: bool = True) -> Pagination:
    """``limit``, ``offset`` or ``after`` (a cursor: the id of the row the page starts after; numeric for
    requests and responses, a session id for sessions), ``order_by``, ``order`` (``asc``/``desc``, the
    list's default when absent) and ``total`` (count every matching row too)."""
    order = query.get("order")
    if order is not None:
        if order.lower() not in ("asc", "desc"):
            raise InvalidParameter("order", f"must be asc or desc; got {order!r}")
        descending = order.lower() == "desc"
    after: int | str | None = query.get("after")
    if after is not None and numeric_cursor:
        after = parse_int(after, "after", minimum=1)
    return Pagination(
        limit=integer(query, "limit", minimum=1, maximum=MAX_LIMIT) or DEFAULT_LIMIT,
        offset=integer(query, "offset", minimum=0) or 0,
        after=after,
        order_by=query.get("order_by"),
        descending=descending,
        count_total=bool(boolean(query, "total")),
    )


def request_filter(query: Mapping[str, str], **fixed: str) -> RequestFilter:
    """The exchanges filter from the query string; ``fixed`` values (the session of a session's own
    list) come from the path instead."""
    return RequestFilter(
        session_id=fixed.get("session_id", text(query, "session_id")),
        model=text(query, "model"),
        stream=boolean(query, "stream"),
        since=time(query, "since"),
        until=time(query, "until"),
        has_error=boolean(query, "has_error"),
        status_code=integer(query, "status_code", minimum=100, maximum=599),
    )


def group_by(query: Mapping[str, str]) -> list[str]:
    """``group_by=model,day`` as its names; the stats repository checks them."""
    value = query.get("group_by")
    if value is None:
        return []
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise InvalidParameter("group_by", f"{value!r} has an empty name")
    return names
