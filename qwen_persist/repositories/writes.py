"""Writing exchanges: the SQL behind the writer and `qwen-persist replay`.

The writer hands over *ops*: plain JSON-ready dicts made from captured exchanges (see `records.py`).
The same ops go to the journal when the database cannot take them, so loading the journal is just
``write_ops`` again; it is idempotent (a request or response already stored is skipped).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, bindparam, case, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ..gil import yield_gil
from ..models import requests_table, responses_table, sessions_table

Op = dict[str, Any]
# Rows per executemany: SQLAlchemy prepares the parameters holding the GIL (see gil.py).
SLICE = 128


def _executemany(conn: Connection, statement: Any, rows: Sequence[dict[str, Any]]) -> None:
    for start in range(0, len(rows), SLICE):
        yield_gil()
        conn.execute(statement, list(rows[start : start + SLICE]))


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
    dialect = conn.dialect.name
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

    stmt = stmt.on_conflict_do_update(
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
    _executemany(conn, stmt, rows)


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
    stored_captures = set(
        conn.execute(
            select(requests_table.c.capture_id).where(requests_table.c.capture_id.in_(captured))
        ).scalars()
    )
    wanted_ids = [row["request_id"] for row in rows] + list(sent.values())
    taken = dict(  # request ids already stored -> their timestamp (old ops: how a replay was known)
        conn.execute(
            select(requests_table.c.request_id, requests_table.c.timestamp).where(
                requests_table.c.request_id.in_(wanted_ids)
            )
        ).all()
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
        _executemany(conn, insert(requests_table), new_rows)
    outcome.written += len(new_rows)
    return folded


def _write_responses(
    conn: Connection, ops: list[Op], folded: set[str], renames: dict[str, str], outcome: BatchOutcome
) -> None:
    if not ops:
        return
    columns = (
        requests_table.c.id,
        requests_table.c.request_id,
        requests_table.c.capture_id,
        requests_table.c.session_id,
    )
    captures = [op["capture_id"] for op in ops if op.get("capture_id")]
    legacy = [renames.get(op["request_id"], op["request_id"]) for op in ops if not op.get("capture_id")]
    by_capture = {
        row.capture_id: row
        for row in conn.execute(select(*columns).where(requests_table.c.capture_id.in_(captures)))
    }
    by_request_id = {
        row.request_id: row
        for row in conn.execute(select(*columns).where(requests_table.c.request_id.in_(legacy)))
    }
    answered = set(
        conn.execute(
            select(responses_table.c.request_id).where(
                responses_table.c.request_id.in_(
                    [row.id for row in (*by_capture.values(), *by_request_id.values())]
                )
            )
        ).scalars()
    )
    rows: list[dict[str, Any]] = []
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
        if request.id in answered:
            outcome.duplicates += 1
            continue
        answered.add(request.id)
        rows.append({**op["response"], "request_id": request.id, "session_id": request.session_id})
        if _answer_key(op) not in folded:
            session = op.get("session_update") or {}
            session_updates.append(
                {
                    "sid": request.session_id,
                    "n": session.get("message_count"),
                    "p": session.get("parent_id"),
                    "c": session.get("chat_id"),
                    "at": session.get("ids_at") or op["response"]["timestamp"],
                    "now": op["response"]["timestamp"],
                }
            )
        request_update = dict(op.get("request_update") or {})
        sent = op.get("sent_request_id")
        if sent is not None and sent != request.request_id:
            # The request was stored in an earlier batch, before the app set its own id.
            request_update.update(_take_sent_id(conn, request.request_id, sent, request_update))
        if request_update:
            _apply_request_update(conn, request.id, request_update)
    if rows:
        _executemany(conn, insert(responses_table), rows)
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
    table = sessions_table.c
    count = bindparam("n", type_=table.message_count.type)
    parent = bindparam("p", type_=table.parent_id.type)
    chat = bindparam("c", type_=table.chat_id.type)
    at = bindparam("at", type_=table.ids_updated_at.type)
    reported = or_(parent.is_not(None), chat.is_not(None))
    # Only a newer exchange's ids replace the stored ones (a late response from an older turn does not).
    newer = and_(reported, or_(table.ids_updated_at.is_(None), at >= table.ids_updated_at))
    stmt = (
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
    _executemany(conn, stmt, updates)
