"""Exchanges whose JSON documents stay the text the database holds: what an export streams.

Parsing every stored body only to write it out again costs most of an export's time (on PostgreSQL the
driver parses JSONB with the standard library). Selected as text instead, each document becomes a
`jsonlib.RawJSON` that `jsonlib.dumps` writes as it is. A document the writer stored with its NUL
characters escaped (`bodies.escape_nul`) is parsed and restored, so what comes out is always what was
received.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, cast, select

from ..bodies import NUL_MARKER, restore_nul
from ..jsonlib import RawJSON, loads
from ..models import requests_table, responses_table
from .rows import ExchangeRecord, RequestRecord, ResponseRecord

REQUEST_DOCUMENTS = ("openai_request", "qwen_request", "metadata")
RESPONSE_DOCUMENTS = ("openai_response", "qwen_response", "headers")
_REQUEST_FIELDS = tuple(field.name for field in dataclasses.fields(RequestRecord))
_RESPONSE_FIELDS = tuple(field.name for field in dataclasses.fields(ResponseRecord))
_ESCAPED = f'"{NUL_MARKER}"'


def raw_exchanges_query(
    answered: bool = False, responses_where: ColumnElement[bool] | None = None
) -> Select[Any]:
    """`exchanges.exchanges_query` with the documents selected as text (a no-op cast on SQLite, JSONB's
    text form on PostgreSQL), the columns in the records' field order (rows are read by position)."""
    from .exchanges import exchanges_join

    columns: list[Any] = [_text(requests_table.c[name], name) for name in _REQUEST_FIELDS]
    columns += [_text(responses_table.c[name], "response_" + name) for name in _RESPONSE_FIELDS]
    return select(*columns).select_from(exchanges_join(answered, responses_where))


def _text(column: Any, label: str) -> Any:
    documents = (*REQUEST_DOCUMENTS, *RESPONSE_DOCUMENTS)
    return (cast(column, Text) if column.name in documents else column).label(label)


def _document(text: str | None) -> Any:
    if text is None:
        return None
    if _ESCAPED in text:
        return restore_nul(loads(text))
    return RawJSON(text)


_REQUEST_DOCUMENT_AT = [_REQUEST_FIELDS.index(name) for name in REQUEST_DOCUMENTS]
_RESPONSE_DOCUMENT_AT = [_RESPONSE_FIELDS.index(name) for name in RESPONSE_DOCUMENTS]
_STREAM_AT = _REQUEST_FIELDS.index("stream")
_SPLIT = len(_REQUEST_FIELDS)


def raw_exchange_from_row(row: Any) -> ExchangeRecord:
    """`exchanges.exchange_from_row` for `raw_exchanges_query` rows, by position (an export reads
    many)."""
    request = list(row[:_SPLIT])
    for at in _REQUEST_DOCUMENT_AT:
        request[at] = _document(request[at])
    request[_STREAM_AT] = bool(request[_STREAM_AT])
    response = None
    if row[_SPLIT] is not None:  # the response's id
        values = list(row[_SPLIT:])
        for at in _RESPONSE_DOCUMENT_AT:
            values[at] = _document(values[at])
        response = ResponseRecord(*values)
    return ExchangeRecord(RequestRecord(*request), response)
