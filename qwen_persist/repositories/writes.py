"""Writing exchanges: the SQL behind the writer and `qwen-persist replay`.

The writer hands over *ops*: plain JSON-ready dicts made from captured exchanges (see `records.py`).
The same ops go to the journal when the database cannot take them, so loading the journal is just
``write_ops`` again; it is idempotent (a request or response already stored is skipped).
"""

from __future__ import annotations

import re
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Connection, Table, and_, bindparam, case, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

from .. import jsonlib
from ..gil import yield_gil
from ..models import requests_table, responses_table, sessions_table

Op = dict[str, Any]
Row = tuple[Any, ...]
# Rows per executemany: the driver binds a slice's parameters holding the GIL (see gil.py).
SLICE = 128


@dataclass(frozen=True, slots=True)
class _Statement:
    """One statement compiled for one dialect: the driver's SQL and the parameter names in the order
    its placeholders take them (a name may repeat)."""

    sql: str
    names: tuple[str, ...]
    positional: bool  # False: the driver takes a mapping per row (a named paramstyle we do not rewrite)


_PYFORMAT = re.compile(r"%\((\w+)\)s")


def _compile(dialect: Dialect, statement: ClauseElement, column_keys: list[str] | None = None) -> _Statement:
    """Compile once; executing the driver SQL skips SQLAlchemy's per-row parameter processing, which is
    a no-op for these columns anyway (text, integers, booleans; JSON is serialized by `_json`)."""
    compiled = statement.compile(dialect=dialect, column_keys=column_keys)
    positions = getattr(compiled, "positiontup", None)
    if dialect.positional and positions is not None and dialect.paramstyle in ("qmark", "format"):
        return _Statement(compiled.string, tuple(positions), True)
    if dialect.paramstyle == "pyformat":
        # psycopg takes "%s" as well as "%(name)s": tuples are cheaper to build than a dict per row.
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            names.append(match.group(1))
            return "%s"

        return _Statement(_PYFORMAT.sub(positional, compiled.string), tuple(names), True)
    return _Statement(compiled.string, tuple(compiled.params), False)  # pragma: no cover - other drivers


def _json(value: Any) -> str | None:
    """A nullable JSON column's value as the engine's serializer (engine.py) would have written it: the
    same text on SQLite, the same document on PostgreSQL (JSONB parses it). None is SQL NULL."""
    return None if value is None else jsonlib.dumps(value)


def _json_required(value: Any) -> str:
    """A NOT NULL JSON column's value: None is the JSON literal null, as SQLAlchemy's JSON type has it."""
    return jsonlib.dumps(value)


# The parameter tuples, built straight from op dicts (an absent key is NULL: ops from older journals
# lack later columns). Each builder lists its table's columns in table order, which is the order the
# compiled INSERT takes them in; `_check_columns` holds the two together.
REQUEST_COLUMNS = (
    "session_id",
    "request_id",
    "capture_id",
    "timestamp",
    "created_at",
    "method",
    "path",
    "openai_request",
    "qwen_request",
    "model",
    "stream",
    "user",
    "metadata",
    "provider",
)


def _request_row(row: dict[str, Any]) -> Row:
    get = row.get
    return (
        get("session_id"),
        get("request_id"),
        get("capture_id"),
        get("timestamp"),
        get("created_at"),
        get("method"),
        get("path"),
        _json_required(get("openai_request")),
        _json(get("qwen_request")),
        get("model"),
        get("stream"),
        get("user"),
        _json(get("metadata")),
        get("provider"),
    )


RESPONSE_COLUMNS = (
    "request_id",
    "session_id",
    "response_id",
    "upstream_id",
    "timestamp",
    "created_at",
    "status_code",
    "openai_response",
    "qwen_response",
    "parent_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "finish_reason",
    "error",
    "duration_ms",
    "first_byte_ms",
    "headers",
)


def _response_row(row: dict[str, Any], request_key: int, session_id: str) -> Row:
    """``row``: a response op's "response"; its request's row id and session come from the database."""
    get = row.get
    return (
        request_key,
        session_id,
        get("response_id"),
        get("upstream_id"),
        get("timestamp"),
        get("created_at"),
        get("status_code"),
        _json(get("openai_response")),
        _json(get("qwen_response")),
        get("parent_id"),
        get("prompt_tokens"),
        get("completion_tokens"),
        get("total_tokens"),
        get("finish_reason"),
        get("error"),
        get("duration_ms"),
        get("first_byte_ms"),
        _json(get("headers")),
    )


SESSION_COLUMNS = (
    "id",
    "chat_id",
    "parent_id",
    "first_user_message",
    "message_count",
    "created_at",
    "updated_at",
    "last_accessed",
    "expires_at",
    "ids_updated_at",
)


def _session_row(row: dict[str, Any]) -> Row:
    get = row.get
    return (
        get("id"),
        get("chat_id"),
        get("parent_id"),
        get("first_user_message"),
        get("message_count"),
        get("created_at"),
        get("updated_at"),
        get("last_accessed"),
        get("expires_at"),
        get("ids_updated_at"),
    )


# Which JSON columns the builders write, and whether None is SQL NULL there (the models' none_as_null).
_JSON_COLUMNS = {
    "requests": {"openai_request": False, "qwen_request": True, "metadata": True},
    "responses": {"openai_response": True, "qwen_response": True, "headers": True},
    "sessions": {},
}


def _check_columns(table: Table, columns: tuple[str, ...], compiled: _Statement) -> None:
    """Fail loudly, on first use, if the models and the builders ever disagree (a column added to one)."""
    stored = [column for column in table.c if column is not table.autoincrement_column]
    if tuple(column.name for column in stored) != columns or compiled.names != columns:
        raise RuntimeError(f"writes.py's {table.name} columns {columns} differ from the model or the SQL")
    json_columns = {
        column.name: bool(column.type.none_as_null) for column in stored if isinstance(column.type, JSON)
    }
    if json_columns != _JSON_COLUMNS[table.name]:
        raise RuntimeError(f"writes.py's {table.name} JSON columns differ from the model's")


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_requests: _Statement
    insert_responses: _Statement
    upsert_sessions: _Statement
    update_sessions: _Statement
    # psycopg: COPY ... FROM STDIN for the two inserts (no ON CONFLICT needed: every row was checked as
    # new in this transaction, and a replica's row in the way fails the whole COPY as an IntegrityError,
    # as it fails an INSERT). None elsewhere.
    copy_requests: str | None = None
    copy_responses: str | None = None
    # PostgreSQL: the sessions upsert over unnest() of one array per column, a single statement for the
    # whole batch (rows in id order, so the lock order holds), instead of one statement per row.
    upsert_sessions_unnest: str | None = None


# Per dialect object (an engine's), so compiled text always matches that engine's paramstyle.
_COMPILED: weakref.WeakKeyDictionary[Dialect, _Statements] = weakref.WeakKeyDictionary()


def _statements(conn: Connection) -> _Statements:
    dialect = conn.dialect
    found = _COMPILED.get(dialect)
    if found is None:
        found = _COMPILED[dialect] = _compile_all(dialect)
    return found


def _compile_all(dialect: Dialect) -> _Statements:
    requests = _compile(dialect, insert(requests_table).inline(), list(REQUEST_COLUMNS))
    responses = _compile(dialect, insert(responses_table).inline(), list(RESPONSE_COLUMNS))
    upsert = _compile(dialect, _upsert_statement(dialect.name), list(SESSION_COLUMNS))
    _check_columns(requests_table, REQUEST_COLUMNS, requests)
    _check_columns(responses_table, RESPONSE_COLUMNS, responses)
    _check_columns(sessions_table, SESSION_COLUMNS, upsert)
    update = _compile(dialect, _update_statement())
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return _Statements(requests, responses, upsert, update)
    quote = dialect.identifier_preparer.quote
    copy = "COPY {} ({}) FROM STDIN"
    return _Statements(
        requests,
        responses,
        upsert,
        update,
        copy.format("requests", ", ".join(map(quote, REQUEST_COLUMNS))),
        copy.format("responses", ", ".join(map(quote, RESPONSE_COLUMNS))),
        _over_unnest(upsert.sql),
    )


def _over_unnest(sql: str) -> str:
    """``INSERT ... VALUES (%s::T, ...) ON CONFLICT ...`` as ``INSERT ... SELECT * FROM unnest(%b::T[],
    ...) ON CONFLICT ...``: the same statement, fed one array per column."""
    head, rest = sql.split(" VALUES (", 1)
    values, tail = rest.split(") ON CONFLICT ", 1)
    placeholders = values.split(", ")
    if not all(mark.startswith("%s::") for mark in placeholders):
        raise RuntimeError(f"unexpected sessions upsert placeholders: {values}")
    # Binary parameters (%b): psycopg dumps text arrays in Python, quoting every element, at twice the
    # CPU of the binary form (measured: 5.2 vs 2.7 µs per session row; executemany 9).
    arrays = ", ".join("%b" + mark.removeprefix("%s") + "[]" for mark in placeholders)
    return f"{head} SELECT * FROM unnest({arrays}) ON CONFLICT {tail}"


def _insert(conn: Connection, statement: _Statement, copy: str | None, rows: Sequence[Row]) -> None:
    if copy is None:
        _executemany(conn, statement, rows)
    else:
        _copy(conn, copy, rows)


def _copy(conn: Connection, sql: str, rows: Sequence[Row]) -> None:
    """COPY ``rows`` in with psycopg, on the connection's own transaction: a third of executemany's
    client CPU (benchmarks/README.md). Driver errors are raised as SQLAlchemy's, as `exec_driver_sql`
    would raise them, so the writer's IntegrityError retry and transient classification still hold."""
    dialect = conn.dialect
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        with cursor.copy(sql) as copy:
            for start in range(0, len(rows), SLICE):
                yield_gil()
                for row in rows[start : start + SLICE]:
                    copy.write_row(row)
    except dialect.loaded_dbapi.Error as exc:
        disconnect = dialect.is_disconnect(exc, dbapi_connection, cursor)
        raise DBAPIError.instance(
            sql,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            dialect=dialect,
            connection_invalidated=disconnect,
        ) from exc
    finally:
        cursor.close()


def _select_in(conn: Connection, columns: str, table: str, key: str, values: Sequence[Any]) -> Sequence[Row]:
    """``SELECT columns FROM table WHERE key IN values`` as driver SQL (names are ours, never input);
    nothing to ask, no query."""
    if not values:
        return []
    if conn.dialect.name == "postgresql":
        # One array parameter: the same statement text whatever the count, and no per-value binding.
        cast = "bigint" if key == "request_id" and table == "responses" else "text"
        sql = f"SELECT {columns} FROM {table} WHERE {key} = ANY(%s::{cast}[])"
        return conn.exec_driver_sql(sql, (list(values),)).all()
    marks = ", ".join("?" * len(values))
    return conn.exec_driver_sql(
        f"SELECT {columns} FROM {table} WHERE {key} IN ({marks})", tuple(values)
    ).all()


def _executemany(conn: Connection, statement: _Statement, rows: Sequence[Row]) -> None:
    """Run ``statement`` once per row with the DBAPI cursor's executemany, in the caller's transaction.
    Through ``exec_driver_sql``, so driver errors still come as SQLAlchemy's (IntegrityError,
    OperationalError, a lost connection invalidated) for the writer's retry and outage rules."""
    for start in range(0, len(rows), SLICE):
        yield_gil()
        part = rows[start : start + SLICE]
        if statement.positional:
            conn.exec_driver_sql(statement.sql, list(part))
        else:  # pragma: no cover - other drivers
            conn.exec_driver_sql(
                statement.sql, [dict(zip(statement.names, row, strict=True)) for row in part]
            )


@dataclass(slots=True)
class BatchOutcome:
    written: int = 0  # ops stored by this batch
    duplicates: int = 0  # ops already in the database (a replay, or a retry after an unclear commit)
    orphans: list[Op] = field(default_factory=list)  # responses whose request row is not there (yet)


def upsert_sessions(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert sessions, or renew existing ones; atomic, so concurrent writers lose nothing.

    A renewal slides the expiry and never lowers message_count. If the stored session had already
    expired, it is a new conversation under the same id: chat_id and parent_id are cleared. chat_id and
    parent_id only ever move to the values of a newer exchange (``ids_updated_at``), whatever order
    replicas or a replayed journal deliver them in.
    """
    if not rows:
        return
    statements = _statements(conn)
    made = [_session_row(row) for row in rows]
    if statements.upsert_sessions_unnest is not None and len({row[0] for row in made}) == len(made):
        # (One statement cannot upsert the same id twice: a batch with repeats takes the other path.)
        for start in range(0, len(made), SLICE):
            yield_gil()
            columns = tuple(list(column) for column in zip(*made[start : start + SLICE], strict=True))
            conn.exec_driver_sql(statements.upsert_sessions_unnest, columns)
        return
    _executemany(conn, statements.upsert_sessions, made)


def _upsert_statement(dialect: str) -> Any:
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(sessions_table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(sessions_table)
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(f"sessions upsert is not implemented for {dialect}")
    table, new = sessions_table.c, stmt.excluded
    was_expired = table.expires_at <= new.last_accessed
    newer = and_(
        new.ids_updated_at.is_not(None),
        or_(table.ids_updated_at.is_(None), new.ids_updated_at >= table.ids_updated_at),
    )

    def latest(name: str) -> Any:
        # Timestamps only move forward: an older op (a replayed spill file, a slower replica) must not
        # pull a live session's expiry back into the past.
        return case((new[name] > table[name], new[name]), else_=table[name])

    def upstream_id(name: str) -> Any:
        # A newer exchange's id wins; else an expired session starts over without the old ids.
        return case((and_(newer, new[name].is_not(None)), new[name]), (was_expired, None), else_=table[name])

    return stmt.on_conflict_do_update(
        index_elements=[table.id],
        set_={
            "updated_at": latest("updated_at"),
            "last_accessed": latest("last_accessed"),
            "expires_at": latest("expires_at"),
            "message_count": case(
                (new.message_count > table.message_count, new.message_count), else_=table.message_count
            ),
            "chat_id": upstream_id("chat_id"),
            "parent_id": upstream_id("parent_id"),
            "ids_updated_at": case(
                (newer, new.ids_updated_at), (was_expired, new.last_accessed), else_=table.ids_updated_at
            ),
        },
    )


def _merge_sessions(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    # One row per id per statement: PostgreSQL refuses to upsert the same row twice in one command.
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = merged.get(row["id"])
        if seen is None:
            merged[row["id"]] = dict(row)
            continue
        for key in ("updated_at", "last_accessed", "expires_at", "message_count"):
            seen[key] = max(seen[key], row[key])
        if row["ids_updated_at"] is not None and (
            seen["ids_updated_at"] is None or row["ids_updated_at"] >= seen["ids_updated_at"]
        ):
            for key in ("chat_id", "parent_id"):
                if row[key] is not None:
                    seen[key] = row[key]
            seen["ids_updated_at"] = row["ids_updated_at"]
    # Always in id order: two writers that lock the same sessions in the same order cannot deadlock.
    return [merged[key] for key in sorted(merged)]


def _fold_answer(session: dict[str, Any], answer: Op) -> dict[str, Any]:
    """The session row as it stands once the response in the same batch is in: one upsert instead of
    an upsert and an update."""
    update = answer.get("session_update") or {}
    folded = dict(session)
    count = update.get("message_count")
    if count is not None and count > folded["message_count"]:
        folded["message_count"] = count
    if update.get("chat_id") is not None or update.get("parent_id") is not None:
        folded["chat_id"] = update.get("chat_id")
        folded["parent_id"] = update.get("parent_id")
        folded["ids_updated_at"] = update.get("ids_at", folded["created_at"])
    folded["updated_at"] = max(folded["updated_at"], answer["response"]["timestamp"])
    return folded


def _answer_key(op: Op) -> str:
    """What links a response op to its request op: the capture id (ops from before capture ids: the
    request id)."""
    key: str = op.get("capture_id") or op["request_id"]
    return key


def write_ops(conn: Connection, ops: Sequence[Op], renamed: dict[str, str] | None = None) -> BatchOutcome:
    """Store a batch of ops in the caller's transaction; idempotent.

    A request op already stored (same capture id) is a duplicate, never a new row; a response finds its
    request by capture id. ``renamed`` carries request-id renames across batches for ops written before
    capture ids existed (an old spill file), whose responses still find their request by request id.
    """
    outcome = BatchOutcome()
    renames = renamed if renamed is not None else {}
    request_ops = [op for op in ops if op["op"] == "request"]
    response_ops = [op for op in ops if op["op"] == "response"]
    answers = {_answer_key(op): op for op in response_ops}
    folded = _write_requests(conn, request_ops, answers, renames, outcome)
    _write_responses(conn, response_ops, folded, renames, outcome)
    return outcome


def _write_requests(
    conn: Connection, ops: list[Op], answers: dict[str, Op], renames: dict[str, str], outcome: BatchOutcome
) -> set[str]:
    """Write the requests; returns the answer keys whose response's session update was folded in."""
    folded: set[str] = set()
    if not ops:
        return folded
    rows = [dict(op["request"]) for op in ops]
    keys = [row.get("capture_id") or row["request_id"] for row in rows]
    sent = {key: answers[key]["sent_request_id"] for key in keys if "sent_request_id" in answers.get(key, ())}
    captured = [row["capture_id"] for row in rows if row.get("capture_id")]
    stored_captures = {
        found for (found,) in _select_in(conn, "capture_id", "requests", "capture_id", captured)
    }
    wanted_ids = [row["request_id"] for row in rows] + list(sent.values())
    # Request ids already stored -> their timestamp (old ops: how a replay was known).
    taken: dict[str, int] = dict(
        _select_in(conn, "request_id, timestamp", "requests", "request_id", wanted_ids)
    )
    new_rows: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for op, row, key in zip(ops, rows, keys, strict=True):
        rid = row["request_id"]
        capture = row.get("capture_id")
        if capture in stored_captures or (capture is None and taken.get(rid) == row["timestamp"]):
            outcome.duplicates += 1  # the same request, replayed
            continue
        wanted = sent.get(key)
        if wanted is not None and wanted not in taken:
            # The app set its own X-Request-Id: the client saw that one, so the row is filed under it.
            row.update(
                request_id=wanted, metadata={**(row.get("metadata") or {}), "assigned_request_id": rid}
            )
            if capture is None:
                renames[rid] = wanted
        elif rid in taken:
            # A client reused an X-Request-Id that is already stored: keep both, under a fresh id.
            fresh = str(uuid.uuid4())
            if capture is None:
                renames[rid] = fresh
            metadata = {**(row.get("metadata") or {}), "client_request_id": rid}
            if wanted is not None:
                metadata["sent_request_id"] = wanted  # another request holds that id already
            row.update(request_id=fresh, metadata=metadata)
        elif wanted is not None:
            row["metadata"] = {**(row.get("metadata") or {}), "sent_request_id": wanted}
        taken[row["request_id"]] = row["timestamp"]
        if capture is not None:
            stored_captures.add(capture)
        new_rows.append(row)
        answer = answers.get(key)
        if answer is None:
            sessions.append(op["session"])
        else:
            sessions.append(_fold_answer(op["session"], answer))
            folded.add(key)
    upsert_sessions(conn, _merge_sessions(sessions))
    if new_rows:
        statements = _statements(conn)
        made = [_request_row(row) for row in new_rows]
        _insert(conn, statements.insert_requests, statements.copy_requests, made)
    outcome.written += len(new_rows)
    return folded


def _write_responses(
    conn: Connection, ops: list[Op], folded: set[str], renames: dict[str, str], outcome: BatchOutcome
) -> None:
    if not ops:
        return
    columns = "id, request_id, capture_id, session_id"
    captures = [op["capture_id"] for op in ops if op.get("capture_id")]
    legacy = [renames.get(op["request_id"], op["request_id"]) for op in ops if not op.get("capture_id")]
    by_capture = {row[2]: row for row in _select_in(conn, columns, "requests", "capture_id", captures)}
    by_request_id = {row[1]: row for row in _select_in(conn, columns, "requests", "request_id", legacy)}
    found = [row[0] for row in (*by_capture.values(), *by_request_id.values())]
    answered = {row[0] for row in _select_in(conn, "request_id", "responses", "request_id", found)}
    rows: list[Row] = []
    session_updates: list[dict[str, Any]] = []
    for op in ops:
        capture = op.get("capture_id")
        request = (
            by_capture.get(capture)
            if capture
            else by_request_id.get(renames.get(op["request_id"], op["request_id"]))
        )
        if request is None:
            outcome.orphans.append(op)
            continue
        key, request_id, session_id = request[0], request[1], request[3]
        if key in answered:
            outcome.duplicates += 1
            continue
        answered.add(key)
        response = op["response"]
        rows.append(_response_row(response, key, session_id))
        if _answer_key(op) not in folded:
            session = op.get("session_update") or {}
            session_updates.append(
                {
                    "sid": session_id,
                    "n": session.get("message_count"),
                    "p": session.get("parent_id"),
                    "c": session.get("chat_id"),
                    "at": session.get("ids_at") or response["timestamp"],
                    "now": response["timestamp"],
                }
            )
        request_update = dict(op.get("request_update") or {})
        sent = op.get("sent_request_id")
        if sent is not None and sent != request_id:
            # The request was stored in an earlier batch, before the app set its own id.
            request_update.update(_take_sent_id(conn, request_id, sent, request_update))
        if request_update:
            _apply_request_update(conn, key, request_update)
    if rows:
        statements = _statements(conn)
        _insert(conn, statements.insert_responses, statements.copy_responses, rows)
    if session_updates:
        session_updates.sort(key=lambda update: str(update["sid"]))  # lock order, as in upserts
        _update_sessions_after_response(conn, session_updates)
    outcome.written += len(rows)


def _take_sent_id(
    conn: Connection, assigned: str, sent: str, request_update: dict[str, Any]
) -> dict[str, Any]:
    metadata = dict(request_update.get("metadata") or {})
    if conn.execute(select(requests_table.c.id).where(requests_table.c.request_id == sent)).first() is None:
        metadata["assigned_request_id"] = assigned
        return {"request_id": sent, "metadata": metadata}
    metadata["sent_request_id"] = sent  # another request holds that id already
    return {"metadata": metadata}


def _apply_request_update(conn: Connection, request_id: int, update_values: dict[str, Any]) -> None:
    """What the app reported about its request (provider payload, provider, metadata)."""
    values = dict(update_values)
    if isinstance(values.get("metadata"), dict):
        # Reported metadata is merged into what the request carried, never replaces it.
        stored = conn.execute(
            select(requests_table.c.metadata).where(requests_table.c.id == request_id)
        ).scalar_one()
        if isinstance(stored, dict):
            values["metadata"] = {**stored, **values["metadata"]}
    conn.execute(update(requests_table).where(requests_table.c.id == request_id).values(**values))


def _update_sessions_after_response(conn: Connection, updates: list[dict[str, Any]]) -> None:
    statement = _statements(conn).update_sessions
    names = statement.names
    _executemany(conn, statement, [tuple(values[name] for name in names) for values in updates])


def _update_statement() -> Any:
    table = sessions_table.c
    count = bindparam("n", type_=table.message_count.type)
    parent = bindparam("p", type_=table.parent_id.type)
    chat = bindparam("c", type_=table.chat_id.type)
    at = bindparam("at", type_=table.ids_updated_at.type)
    reported = or_(parent.is_not(None), chat.is_not(None))
    # Only a newer exchange's ids replace the stored ones (a late response from an older turn does not).
    newer = and_(reported, or_(table.ids_updated_at.is_(None), at >= table.ids_updated_at))
    return (
        update(sessions_table)
        .where(table.id == bindparam("sid"))
        .values(
            message_count=case((count > table.message_count, count), else_=table.message_count),
            parent_id=case((and_(newer, parent.is_not(None)), parent), else_=table.parent_id),
            chat_id=case((and_(newer, chat.is_not(None)), chat), else_=table.chat_id),
            ids_updated_at=case((newer, at), else_=table.ids_updated_at),
            updated_at=case((bindparam("now") > table.updated_at, bindparam("now")), else_=table.updated_at),
        )
    )
