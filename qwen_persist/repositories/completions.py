"""Stored completions: the captured exchanges as OpenAI's Stored Completions API sees them.

A *stored completion* is an exchange that ended in a complete ``chat.completion``: a response row with a
2xx/3xx status, no error of any kind, and a ``chat.completion`` body (a stream's is the one rebuilt from
its chunks). Errors, cut-off streams and requests still in flight are not stored completions.

Ids: a completion is known by the id the client saw, the upstream's completion id
(``responses.upstream_id``), or by the library's ``response_id`` when the upstream gave none. An upstream
may repeat ids (some local servers always answer ``chatcmpl-1``); the newest response carrying an id
(by the response's end, then row id) owns it, and an older one is listed under its ``response_id``, so
every stored completion has an id of its own and pages never show one twice. ``response_id`` finds any
of them.

Order: lists follow the requests' arrival (then row id), the order of the completions' ``created`` that
OpenAI lists by; the requests' time and (model, time) indexes give it without sorting.

Metadata: ``requests.metadata`` holds the client's OpenAI ``metadata`` together with a few keys the library
writes itself (`LIBRARY_METADATA_KEYS`). The client's metadata is everything else: what is shown, what
``metadata[key]=value`` filters on, and what `CompletionRepository.update_metadata` replaces; the library's
keys are never shown or matched, and survive an update. The request body (``openai_request``) stays as
the client sent it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    or_,
    select,
    true,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql

from ..bodies import escape_nul, escape_text, restore_nul
from ..models import requests_table, responses_table
from .base import Repository, in_thread, paginate
from .exchanges import delete_exchanges, exchange_from_row, exchanges_query, succeeded
from .queries import InvalidParameter, Pagination
from .rows import Page, RequestRecord, ResponseRecord

# The keys the library itself writes into ``requests.metadata`` (never the client's metadata):
# - client_request_id: the client's X-Request-Id, when another request already held it (writes.py);
# - assigned_request_id / sent_request_id: when the app set an X-Request-Id of its own (writes.py);
# - capture_problem: why a request body was kept only in part, or not at all (records.py);
# - qwen_persist_original_text: bodies whose text compact JSON would not reproduce, kept by the
#   migrations from a legacy database (alembic 0002/0003).
LIBRARY_METADATA_KEYS = frozenset(
    {
        "client_request_id",
        "assigned_request_id",
        "sent_request_id",
        "capture_problem",
        "qwen_persist_original_text",
    }
)

DEFAULT_LIMIT = 20  # OpenAI's default page size for stored completions and their messages
MAX_LIMIT = 100
# OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

COMPLETION_ORDER = ("timestamp",)

_req = requests_table.c
_resp = responses_table.c


def client_metadata(metadata: Any) -> dict[str, Any]:
    """The client's part of a request's ``metadata``: all but the library's own keys."""
    if not isinstance(metadata, dict):
        return {}
    return {key: value for key, value in metadata.items() if key not in LIBRARY_METADATA_KEYS}


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str]:
    """Metadata a client may set, within OpenAI's limits (None: none)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidParameter(param, "must be an object of string keys and string values, or null")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidParameter(param, f"at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}")
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > MAX_METADATA_KEY:
            raise InvalidParameter(param, f"keys are strings of at most {MAX_METADATA_KEY} characters")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise InvalidParameter(
                param, f"the value of {key!r} must be a string of at most {MAX_METADATA_VALUE} characters"
            )
        if key in LIBRARY_METADATA_KEYS:
            raise InvalidParameter(param, f"{key!r} is a key qwen_persist keeps for itself")
    return dict(metadata)


def _text_parts(content: list[Any]) -> str | None:
    texts = [
        part["text"]
        for part in content
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    ]
    return "\n".join(texts) if texts else None


def store_message(completion_id: str, index: int, message: Any) -> dict[str, Any]:
    """One request message as OpenAI's ``ChatCompletionStoreMessage``: the message as sent, with an
    ``id`` (``<completion id>-<index>``, as OpenAI numbers them) and ``content_parts`` (the parts array
    when the content was one, its text parts joined by newlines then being the ``content``)."""
    item: dict[str, Any] = dict(message) if isinstance(message, dict) else {"content": message}
    content = item.get("content")
    if isinstance(content, list):
        item["content"] = _text_parts(content)
        item["content_parts"] = content
    else:
        item["content_parts"] = None
    item["id"] = f"{completion_id}-{index}"
    return item


@dataclass(frozen=True, slots=True)
class StoredCompletion:
    """One stored completion: the id the client knows it by, with its request and response rows."""

    id: str
    request: RequestRecord
    response: ResponseRecord

    @property
    def metadata(self) -> dict[str, Any]:
        """The client's metadata (the library's own keys left out)."""
        return client_metadata(self.request.metadata)

    def to_openai(self) -> dict[str, Any]:
        """The ``chat.completion`` object as OpenAI serves a stored one: the completion the client received
        (rebuilt from the chunks for a stream), under this id, with the client's metadata."""
        body = dict(self.response.openai_response)
        body["id"] = self.id
        body["metadata"] = self.metadata
        return body

    def messages(self) -> list[dict[str, Any]]:
        """The request's messages as ``chat.completion.store_message`` objects, in the order sent."""
        body = self.request.openai_request
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return []
        return [store_message(self.id, index, message) for index, message in enumerate(messages)]


@dataclass(frozen=True, slots=True)
class CompletionFilter:
    """Which stored completions: ``model`` as the client asked for it (the request's ``model``), and
    client ``metadata`` pairs that must all match (string values, compared exactly)."""

    model: str | None = None
    metadata: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidParameter("model", f"{self.model!r} is not a string")
        if self.metadata is not None:
            if not isinstance(self.metadata, Mapping):
                raise InvalidParameter("metadata", "must map keys to values")
            for key, value in self.metadata.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise InvalidParameter("metadata", f"{key!r}: keys and values are strings")


# ------------------------------------------------------------------------------------------------- SQL


def walked(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """``condition``, in a form no planner estimates from (``CASE WHEN … THEN true ELSE false END``).

    Lists stop after one page only when the database walks a time index and filters as it goes. Left
    bare, SQLite reads a success range off the (status_code, timestamp) index and PostgreSQL takes a JSON
    test or metadata match for rare (1/200, 1/1000: it has no statistics for them), and both then sort
    every match to return twenty. The form they cannot see through is estimated as common (PostgreSQL:
    one row in two), which it is; a rare metadata value costs a scan in any plan, no index holds them.
    """
    return case((condition, true()), else_=false())


def stored(responses: Any = _resp) -> ColumnElement[bool]:
    """A stored completion: a complete, successful answer (`exchanges.succeeded`: 2xx/3xx, no error)
    whose body is a ``chat.completion``."""
    return and_(
        succeeded(responses), responses.openai_response["object"].as_string() == literal("chat.completion")
    )


def client_id() -> ColumnElement[str]:
    """The id a stored completion is known by: its upstream id, unless a newer stored completion carries
    the same one (or there is none): then its ``response_id``. Served by the upstream_id index."""
    newer = responses_table.alias("newer")
    superseded = exists().where(
        newer.c.upstream_id == _resp.upstream_id,
        stored(newer.c),
        or_(
            newer.c.timestamp > _resp.timestamp,
            and_(newer.c.timestamp == _resp.timestamp, newer.c.id > _resp.id),
        ),
    )
    return case(
        (or_(_resp.upstream_id.is_(None), superseded), _resp.response_id), else_=_resp.upstream_id
    ).label("completion_id")


def _query() -> Any:
    return exchanges_query(answered=True).add_columns(client_id()).where(walked(stored()))


def _completion(row: Any) -> StoredCompletion:
    exchange = exchange_from_row(row)
    assert exchange.response is not None  # an inner join
    return StoredCompletion(row._mapping["completion_id"], exchange.request, exchange.response)


def _find(conn: Connection, completion_id: str) -> Any:
    """The row of the stored completion ``completion_id`` names: the newest with that upstream id, else the
    one with that response id."""
    if not isinstance(completion_id, str) or not completion_id:
        return None
    query = (
        _query()
        .where(or_(_resp.upstream_id == completion_id, _resp.response_id == completion_id))
        .order_by(_resp.timestamp.desc(), _resp.id.desc())
        .limit(1)
    )
    return conn.execute(query).first()


def _variants(key: str, value: str) -> list[tuple[str, str]]:
    """The spellings a pair can be stored in: as is, and NUL-escaped (a document holding NUL anywhere is
    stored escaped as a whole; one that holds NUL cannot be stored as is)."""
    spellings = [] if "\x00" in key + value else [(key, value)]
    escaped = (escape_text(key), escape_text(value))
    if escaped != (key, value):
        spellings.append(escaped)
    return spellings


def _metadata_term(dialect: str, index: int, key: str, value: str) -> ColumnElement[bool]:
    """``metadata[key] == value`` for a string value. PostgreSQL: JSONB containment. SQLite: json_each,
    which reads keys with any characters (its JSON paths cannot spell a key holding a quote)."""
    terms: list[ColumnElement[bool]] = []
    for number, (k, v) in enumerate(_variants(key, value)):
        if dialect == "postgresql":
            terms.append(type_coerce(_req.metadata, postgresql.JSONB).contains({k: v}))
        else:
            pairs = func.json_each(_req.metadata).table_valued("key", "value", "type")
            pair = pairs.alias(f"metadata_{index}_{number}")
            terms.append(exists().where(pair.c.key == k, pair.c.type == "text", pair.c.value == v))
    return or_(*terms)


def _filter_terms(dialect: str, f: CompletionFilter) -> list[ColumnElement[bool]]:
    terms: list[ColumnElement[bool]] = []
    if f.model is not None:
        terms.append(_req.model == f.model)
    for index, (key, value) in enumerate((f.metadata or {}).items()):
        # The library's keys are never client metadata: no stored completion has them.
        if key in LIBRARY_METADATA_KEYS:
            terms.append(false())
        else:
            terms.append(walked(_metadata_term(dialect, index, key, value)))
    return terms


# ------------------------------------------------------------------------------------------ repository


class CompletionRepository(Repository):
    """Stored completions (see the module's docstring): list, get, their messages, metadata updates,
    deletes."""

    def get(self, completion_id: str) -> StoredCompletion | None:
        """By the id the client saw (the newest exchange with that upstream id), or by response id."""
        with self.engine.connect() as conn:
            row = _find(conn, completion_id)
        return _completion(row) if row is not None else None

    def list(
        self, filter: CompletionFilter | None = None, page: Pagination | None = None
    ) -> Page[StoredCompletion]:
        """Stored completions matching ``filter``, oldest first unless ``page`` says otherwise (OpenAI's
        default; 20 a page), by the request's arrival, then id: the order of the completions' ``created``,
        which OpenAI lists by, read in the order of the requests' time and (model, time) indexes.
        ``page.after`` is a completion id."""
        f = filter or CompletionFilter()
        p = page or Pagination(limit=DEFAULT_LIMIT, descending=False)
        p.column(COMPLETION_ORDER)
        query = _query().where(*_filter_terms(self.engine.dialect.name, f))
        with self.engine.connect() as conn:
            cursor = p
            after_time: int | None = None
            if p.after is not None:
                row = _find(conn, str(p.after))
                if row is None:
                    raise InvalidParameter("after", f"no stored chat completion has id {p.after!r}")
                after_time = row._mapping["timestamp"]
                cursor = dataclasses.replace(p, after=row._mapping["id"])  # the request's row id
            rows, more, total = paginate(
                conn,
                query,
                key=_req.timestamp,
                tiebreak=_req.id,
                page=cursor,
                after_key=lambda _conn, _after: after_time,
            )
        return Page(
            [_completion(row) for row in rows],
            limit=p.limit,
            has_more=more,
            offset=p.offset if p.after is None else None,
            after=p.after,
            total=total,
        )

    def messages(self, completion_id: str, page: Pagination | None = None) -> Page[dict[str, Any]] | None:
        """The request messages of a stored completion (None: no such completion), in the order sent
        unless ``page`` says otherwise; ``page.after`` is a message id."""
        p = page or Pagination(limit=DEFAULT_LIMIT, descending=False)
        completion = self.get(completion_id)
        if completion is None:
            return None
        items = completion.messages()
        if p.descending:
            items.reverse()
        start = p.offset
        if p.after is not None:
            ids = [item["id"] for item in items]
            if p.after not in ids:
                raise InvalidParameter("after", f"{completion.id!r} has no message {p.after!r}")
            start = ids.index(p.after) + 1
        chosen = items[start : start + p.limit]
        return Page(
            chosen,
            limit=p.limit,
            has_more=start + p.limit < len(items),
            offset=p.offset if p.after is None else None,
            after=p.after,
            total=len(items) if p.count_total else None,
        )

    def update_metadata(
        self, completion_id: str, metadata: Mapping[str, str] | None
    ) -> StoredCompletion | None:
        """Replace the client's metadata of a stored completion (None or ``{}``: remove it), keeping the
        library's own keys; the updated completion, or None when there is no such completion.

        Within OpenAI's limits (16 pairs, keys up to 64 characters, string values up to 512), and not
        using a key of the library's (`LIBRARY_METADATA_KEYS`): else `InvalidParameter`.
        """
        wanted = check_metadata(metadata)
        with self.engine.begin() as conn:
            row = _find(conn, completion_id)
            if row is None:
                return None
            completion = _completion(row)
            # Locked while it is rewritten (PostgreSQL; SQLite writes one transaction at a time anyway).
            current = conn.execute(
                select(_req.metadata).where(_req.id == completion.request.id).with_for_update()
            ).scalar_one()
            kept = restore_nul(current) if isinstance(current, dict) else {}
            merged = {key: value for key, value in kept.items() if key in LIBRARY_METADATA_KEYS}
            merged.update(wanted)
            conn.execute(
                update(requests_table)
                .where(_req.id == completion.request.id)
                .values(metadata=escape_nul(merged) if merged else None)
            )
        request = dataclasses.replace(completion.request, metadata=merged or None)
        return dataclasses.replace(completion, request=request)

    def delete(self, completion_id: str) -> str | None:
        """Delete a stored completion (its request and response rows; the session stays); the id it was
        known by, or None when there is no such completion."""
        with self.engine.begin() as conn:
            row = _find(conn, completion_id)
            if row is None:
                return None
            delete_exchanges(conn, [row._mapping["id"]])
            return str(row._mapping["completion_id"])

    aget = in_thread(get)
    alist = in_thread(list)
    amessages = in_thread(messages)
    aupdate_metadata = in_thread(update_metadata)
    adelete = in_thread(delete)
