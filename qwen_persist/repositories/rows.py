"""Typed records the read side returns: one dataclass per table row, plus the shapes built from them.

Documents (request and response bodies, provider payloads, metadata) are returned as they were received:
the NUL escape the writer applies for PostgreSQL (`bodies.restore_nul`) is undone here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import RowMapping

from ..bodies import restore_nul
from ..sessions import SessionInfo

T = TypeVar("T")


def shallow_dict(record: Any) -> dict[str, Any]:
    """A record's fields as a dict, the stored documents shared rather than copied: the readers (the JSON
    encoder, the CLI) only read them, and ``dataclasses.asdict``'s deep copy of every body took 10 ms of
    a 100-exchange page (benchmarks/bench_read.py)."""
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


__all__ = [
    "ExchangeRecord",
    "Page",
    "RequestRecord",
    "ResponseRecord",
    "SessionDetail",
    "SessionInfo",
    "StatsRow",
]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A ``requests`` row."""

    id: int
    request_id: str
    session_id: str
    capture_id: str | None
    timestamp: int
    created_at: int
    method: str
    path: str
    openai_request: Any
    qwen_request: Any
    model: str | None
    stream: bool
    user: str | None
    metadata: Any
    provider: str | None

    @classmethod
    def from_row(cls, row: RowMapping) -> RequestRecord:
        return cls(
            id=row["id"],
            request_id=row["request_id"],
            session_id=row["session_id"],
            capture_id=row["capture_id"],
            timestamp=row["timestamp"],
            created_at=row["created_at"],
            method=row["method"],
            path=row["path"],
            openai_request=restore_nul(row["openai_request"]),
            qwen_request=restore_nul(row["qwen_request"]),
            model=row["model"],
            stream=bool(row["stream"]),
            user=row["user"],
            metadata=restore_nul(row["metadata"]),
            provider=row["provider"],
        )

    def to_dict(self) -> dict[str, Any]:
        return shallow_dict(self)


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """A ``responses`` row. ``request_id`` is the numeric id of its ``requests`` row."""

    id: int
    request_id: int
    session_id: str
    response_id: str
    upstream_id: str | None
    timestamp: int
    created_at: int
    status_code: int | None
    openai_response: Any
    qwen_response: Any
    parent_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None
    error: str | None
    duration_ms: int | None
    first_byte_ms: int | None
    headers: Any

    @property
    def failed(self) -> bool:
        """An error recorded, or an error status (4xx/5xx) sent: `exchanges.failed`, in Python."""
        return self.error is not None or (self.status_code is not None and self.status_code >= 400)

    @property
    def succeeded(self) -> bool:
        """A complete answer: a 2xx or 3xx status and no error of any kind (the stats' definition)."""
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 400

    @classmethod
    def from_row(cls, row: RowMapping) -> ResponseRecord:
        values = {name: row[name] for name in _RESPONSE_FIELDS}
        for name in ("openai_response", "qwen_response"):
            values[name] = restore_nul(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return shallow_dict(self)


_RESPONSE_FIELDS = tuple(field.name for field in dataclasses.fields(ResponseRecord))


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    """A request with its response (None while the response is still being written, or never came)."""

    request: RequestRecord
    response: ResponseRecord | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.request.to_dict(),
            "response": self.response.to_dict() if self.response is not None else None,
        }


@dataclass(frozen=True, slots=True)
class SessionDetail:
    """A session with the number of requests it holds."""

    session: SessionInfo
    request_count: int

    def to_dict(self) -> dict[str, Any]:
        return {**shallow_dict(self.session), "request_count": self.request_count}


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, in the order asked for.

    ``offset`` is set for offset pagination, ``after`` for cursor pagination (the id the page starts
    after). ``has_more`` says whether a next page exists; ``total`` (all matching rows) is only counted
    when asked for, since counting a large table costs more than reading a page of it.
    """

    items: list[T]
    limit: int
    has_more: bool
    offset: int | None = None
    after: int | str | None = None
    total: int | None = None


@dataclass(frozen=True, slots=True)
class StatsRow:
    """Figures for one group of exchanges (all of them when stats are not grouped).

    ``group`` holds the grouping keys asked for: ``model`` and/or ``day`` (``YYYY-MM-DD``, UTC) or
    ``hour`` (``YYYY-MM-DDTHH:00Z``). Percentiles are continuous (interpolated, as PostgreSQL's
    ``percentile_cont``), over the exchanges that have the figure; None when none has it.
    """

    group: dict[str, Any]
    count: int  # requests
    succeeded: int  # 2xx/3xx responses without an error
    errors: int  # responses with an error or an error status
    pending: int  # requests without a response (in flight, or their response is still being written)
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    duration_ms: dict[str, float | None]  # p50, p95, p99
    first_byte_ms: dict[str, float | None]  # p50, p95, p99

    @property
    def success_rate(self) -> float | None:
        """Succeeded ÷ answered (requests with a response); None when nothing was answered."""
        answered = self.succeeded + self.errors
        return self.succeeded / answered if answered else None

    def to_dict(self) -> dict[str, Any]:
        return {**shallow_dict(self), "success_rate": self.success_rate}
