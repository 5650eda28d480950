"""Engine creation: one place that knows URL spellings and per-backend connection settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from . import jsonlib

DATABASE_URL_ENV = "QWEN_PERSIST_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///qwen_persist.db"
SQLITE_BUSY_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 5  # seconds; libpq's own default is to wait forever
WRITER_LOCK_TIMEOUT = 10.0  # seconds; the writer's batches take milliseconds


def resolve_database_url(database_url: str | None = None) -> str:
    """The explicit URL, else ``QWEN_PERSIST_DATABASE_URL``, else the embedded SQLite default."""
    return database_url or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def normalize_url(database_url: str | URL) -> URL:
    """Parse a URL, choosing psycopg 3 for PostgreSQL when no driver is named.

    SQLAlchemy's default PostgreSQL driver is psycopg2; ours is psycopg 3 (the ``postgres`` extra), so a
    plain ``postgresql://`` URL, the spelling users copy from their provider, works as is.
    """
    try:
        url = make_url(database_url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with a terse message
        raise ValueError(f"invalid database URL {str(database_url)!r}: {exc}") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def missing_sqlite_file(database_url: str | URL) -> Path | None:
    """The file a SQLite URL names, when it does not exist; None for an existing file, an in-memory
    database and other backends. Reads check this first: SQLite would create an empty file, in which
    every query then fails for want of tables."""
    url = normalize_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in str(url.query):
        return None
    path = Path(database.removeprefix("file:").split("?", 1)[0])
    return None if path.exists() else path


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (the history API, the CLI) run beside the writer; NORMAL is durable under WAL
    # except for the last transactions on power loss; the busy timeout rides out short lock contention.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def make_engine(
    database_url: str | URL | None = None, *, lock_timeout: float | None = None, **kwargs: Any
) -> Engine:
    """Create an engine for ``database_url`` (resolved as :func:`resolve_database_url` says).

    On PostgreSQL a connection attempt gives up after `CONNECT_TIMEOUT` seconds (unless the URL sets
    ``connect_timeout``), so a server that accepts TCP and never answers cannot hold a caller for
    minutes; ``lock_timeout`` (seconds) bounds how long a statement waits for another session's lock. (A
    lock timeout rather than a statement timeout, so a database's own ``statement_timeout`` still holds.)
    """
    url = normalize_url(database_url if database_url is not None else resolve_database_url())
    kwargs.setdefault("json_serializer", jsonlib.dumps)
    kwargs.setdefault("json_deserializer", jsonlib.loads)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    connect_args = dict(kwargs.pop("connect_args", {}))
    if "connect_timeout" not in url.query:
        connect_args.setdefault("connect_timeout", CONNECT_TIMEOUT)
    if lock_timeout is not None:
        connect_args.setdefault("options", f"-c lock_timeout={int(lock_timeout * 1000)}")
    return create_engine(url, connect_args=connect_args, **kwargs)
