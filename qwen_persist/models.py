"""The three tables, as SQLAlchemy Core/ORM metadata.

Alembic revisions are the only way these tables come into being in production; this module is what
`alembic check` compares the migrated database against, and what the writer and read side query.
Timestamps are integer milliseconds since the epoch.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

# Stable constraint names on every backend, so migrations can name what they drop or alter.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TABLE_NAMES = ("sessions", "requests", "responses")
# A response that is not a success; spelled exactly so in queries, which lets SQLite use the partial index.
FAILED = "error IS NOT NULL OR status_code >= 400"


def json_type(*, nullable: bool) -> TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL.

    For nullable columns Python ``None`` must become SQL NULL, not the JSON literal ``null``, so that
    "unknown" stays distinguishable and ``IS NULL`` filters work.
    """
    return JSON(none_as_null=nullable).with_variant(postgresql.JSONB(none_as_null=nullable), "postgresql")


# A 64-bit key on PostgreSQL; on SQLite the key must be spelled INTEGER to alias the rowid.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Session(Base):
    """One conversation. Expiry governs continuation only; it never deletes history."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    # Not indexed: no query looks a session up by its upstream chat id (0007 dropped the original's index).
    chat_id: Mapped[str | None] = mapped_column(Text)
    parent_id: Mapped[str | None] = mapped_column(Text)
    first_user_message: Mapped[str] = mapped_column(Text)
    message_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    last_accessed: Mapped[int] = mapped_column(BigInteger, index=True)  # the list's default order
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    # Arrival time (ms) of the exchange whose chat_id/parent_id these are: they only move forward.
    ids_updated_at: Mapped[int | None] = mapped_column(BigInteger)


class Request(Base):
    """One incoming chat completion request, recorded as soon as its body is complete."""

    __tablename__ = "requests"
    # Each list filter's index ends with the time column, so a page is read in index order (0006).
    __table_args__ = (Index(None, "session_id", "timestamp"), Index(None, "model", "timestamp"))

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    # The (session_id, timestamp) index serves lookups by session_id alone too.
    session_id: Mapped[str] = mapped_column(Text, ForeignKey("sessions.id", ondelete="CASCADE"))
    request_id: Mapped[str] = mapped_column(Text, unique=True)
    # Made by the middleware, unique across processes and restarts: how a replayed record is known.
    capture_id: Mapped[str | None] = mapped_column(Text, unique=True)
    timestamp: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    method: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    openai_request: Mapped[Any] = mapped_column(json_type(nullable=False))
    qwen_request: Mapped[Any | None] = mapped_column(json_type(nullable=True))
    model: Mapped[str | None] = mapped_column(Text)
    stream: Mapped[bool] = mapped_column(Boolean)
    user: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[Any | None] = mapped_column("metadata", json_type(nullable=True))
    provider: Mapped[str | None] = mapped_column(Text)


class Response(Base):
    """The outcome of one request: exactly one per request, whatever happened."""

    __tablename__ = "responses"
    __table_args__ = (
        Index(None, "session_id", "timestamp"),
        Index(None, "status_code", "timestamp"),
        Index(None, "finish_reason", "timestamp"),
        # The failures, a small part of the table, without reading the successes: in time order (the
        # responses list), and by request (the requests list's has_error and error statuses).
        Index("ix_responses_failed", "timestamp", sqlite_where=text(FAILED), postgresql_where=text(FAILED)),
        Index(
            "ix_responses_failed_request_id",
            "request_id",
            sqlite_where=text(FAILED),
            postgresql_where=text(FAILED),
        ),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("requests.id", ondelete="CASCADE"), unique=True
    )
    session_id: Mapped[str] = mapped_column(Text, ForeignKey("sessions.id", ondelete="CASCADE"))
    response_id: Mapped[str] = mapped_column(Text, unique=True)
    upstream_id: Mapped[str | None] = mapped_column(Text, index=True)
    timestamp: Mapped[int] = mapped_column(BigInteger, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    status_code: Mapped[int | None] = mapped_column(Integer)
    openai_response: Mapped[Any | None] = mapped_column(json_type(nullable=True))
    qwen_response: Mapped[Any | None] = mapped_column(json_type(nullable=True))
    parent_id: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    first_byte_ms: Mapped[int | None] = mapped_column(Integer)
    # The allow-listed response headers (the middleware's response_headers option), by lower-case name.
    headers: Mapped[Any | None] = mapped_column(json_type(nullable=True))


metadata = Base.metadata
# Core handles for the writer and the read side, which work with rows rather than ORM objects.
sessions_table = cast(Table, Session.__table__)
requests_table = cast(Table, Request.__table__)
responses_table = cast(Table, Response.__table__)
