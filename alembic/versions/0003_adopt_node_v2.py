"""Adopt a database the Node.js proxy already migrated to its schema version 2.

Revision ID: 0003_adopt_node_v2
Revises: 0002_split_tables
Create Date: 2025-11-23

Such a database has ``metadata`` (``schema_version`` = '2') and its own ``sessions``/``requests``/
``responses``: timestamps already in milliseconds, JSON kept as TEXT, no ``status_code``, and depending
on the Node version no ``method``/``path``. 0002 renamed those tables aside (``qwen_persist_node_v2_*``);
here every row is copied into ours and the copies are dropped. ``metadata`` and ``settings`` stay
untouched. Columns are read by name from what the table really has, so a missing column only means a
default: ``method`` 'POST' and ``path`` '/v1/chat/completions' (the only route the Node tool logged),
``status_code`` NULL (unknown), ``updated_at``/``last_accessed``/``expires_at`` from the nearest other
timestamp. Ids, request ids, response ids, session ids and the Node-recorded tokens, finish_reason,
parent_id, error and duration are kept; values the Node table lacks are parsed from the bodies. TEXT JSON
goes through 0002's parser (raw body fallback) and 0002's read-back check, so any body text that
compact JSON would not reproduce is kept under ``metadata.qwen_persist_original_text``.

Downgrade leaves the rows where they are, in our tables: putting them back into a foreign schema would
only be a second copy of the same data, and downgrading further (0002) turns them into ``request_logs``
rows like any other, so nothing is lost on the way down either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003_adopt_node_v2"
down_revision: str | Sequence[str] | None = "0002_split_tables"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _flag(value: Any) -> bool:
    # better-sqlite3 binds booleans as 0/1; tolerate the spellings other writers may have used.
    return str(value).lower() in ("1", "true")


def convert_session(row: Mapping[Any, Any]) -> dict[str, Any]:
    created = int(row["created_at"])
    updated = int(_first(row.get("updated_at"), row.get("last_accessed"), created))
    accessed = int(_first(row.get("last_accessed"), updated))
    return {
        "id": row["id"],
        "chat_id": row.get("chat_id"),
        "parent_id": row.get("parent_id"),
        "first_user_message": row.get("first_user_message") or "",
        "message_count": int(row.get("message_count") or 0),
        "created_at": created,
        "updated_at": updated,
        "last_accessed": accessed,
        "expires_at": int(_first(row.get("expires_at"), accessed)),
    }


def convert_request(split: Any, row: Mapping[Any, Any]) -> dict[str, Any]:
    text = row.get("openai_request")
    body = split.raw_body(None, "missing") if text is None else split.parse_json(text)
    asked = split.request_fields(body)
    qwen = row.get("qwen_request")
    timestamp = int(row["timestamp"])
    stream = row.get("stream")
    return {
        "id": row["id"],
        "session_id": row["session_id"],
        "request_id": row["request_id"],
        "timestamp": timestamp,
        "created_at": int(_first(row.get("created_at"), timestamp)),
        "method": row.get("method") or "POST",
        "path": row.get("path") or "/v1/chat/completions",
        "openai_request": body,
        "qwen_request": None if qwen is None else split.parse_json(qwen),
        "model": _first(row.get("model"), asked["model"]),
        "stream": asked["stream"] if stream is None else _flag(stream),
        "user": _first(row.get("user"), asked["user"]),
        "metadata": asked["metadata"],
        "provider": row.get("provider"),
    }


def convert_response(split: Any, row: Mapping[Any, Any]) -> dict[str, Any]:
    text = row.get("openai_response")
    answer = None if text is None else split.parse_json(text)
    answered = split.response_fields(answer)
    qwen = row.get("qwen_response")
    timestamp = int(row["timestamp"])
    return {
        "id": row["id"],
        "request_id": row["request_id"],
        "session_id": row["session_id"],
        "response_id": row["response_id"],
        "upstream_id": answered["upstream_id"],
        "timestamp": timestamp,
        "created_at": int(_first(row.get("created_at"), timestamp)),
        "status_code": row.get("status_code"),
        "openai_response": answer,
        "qwen_response": None if qwen is None else split.parse_json(qwen),
        "parent_id": row.get("parent_id"),
        "prompt_tokens": _first(row.get("prompt_tokens"), answered["prompt_tokens"]),
        "completion_tokens": _first(row.get("completion_tokens"), answered["completion_tokens"]),
        "total_tokens": _first(row.get("total_tokens"), answered["total_tokens"]),
        "finish_reason": _first(row.get("finish_reason"), answered["finish_reason"]),
        "error": row.get("error"),
        "duration_ms": row.get("duration_ms"),
        "first_byte_ms": row.get("first_byte_ms"),
    }


def _node_table(bind: sa.Connection, name: str) -> sa.TableClause:
    # Untyped columns: values arrive exactly as stored, whatever the Node tool declared.
    columns = [column["name"] for column in sa.inspect(bind).get_columns(name)]
    return sa.table(name, *(sa.column(column) for column in columns))


def _refuse_unadoptable_responses(
    bind: sa.Connection, requests: sa.TableClause, responses: sa.TableClause
) -> None:
    # Ours holds exactly one response per request; rather than drop rows, stop and say why.
    duplicated = bind.execute(
        sa.select(responses.c.request_id)
        .group_by(responses.c.request_id)
        .having(sa.func.count() > 1)
        .limit(5)
    ).scalars()
    orphaned = bind.execute(
        sa.select(responses.c.id).where(~sa.exists().where(requests.c.id == responses.c.request_id)).limit(5)
    ).scalars()
    problems = []
    if duplicated_ids := list(duplicated):
        problems.append(f"requests with several responses (ids {duplicated_ids})")
    if orphaned_ids := list(orphaned):
        problems.append(f"responses without a request (ids {orphaned_ids})")
    if problems:
        raise RuntimeError("cannot adopt the Node.js tables without losing rows: " + "; ".join(problems))


def upgrade() -> None:
    bind = op.get_bind()
    split_script = context.script.get_revision("0002_split_tables")
    if split_script is None:
        raise RuntimeError("revision 0002_split_tables not found")
    # Shares 0002's (equally frozen) parser, field extraction and read-back check.
    split: Any = split_script.module
    aside = {name: split.NODE_ASIDE_PREFIX + name for name in split.NODE_TABLES}
    inspector = sa.inspect(bind)
    if not all(inspector.has_table(table) for table in aside.values()):
        return
    node_sessions, node_requests, node_responses = (_node_table(bind, table) for table in aside.values())
    _refuse_unadoptable_responses(bind, node_requests, node_responses)
    sessions, requests, responses = split.new_tables()

    session_query = sa.select(node_sessions).order_by(node_sessions.c.id).limit(split.BATCH_SIZE)
    last_session: str | None = None
    while (
        rows := bind.execute(
            session_query if last_session is None else session_query.where(node_sessions.c.id > last_session)
        )
        .mappings()
        .all()
    ):
        bind.execute(sessions.insert(), [convert_session(row) for row in rows])
        last_session = rows[-1]["id"]

    request_query = sa.select(node_requests).order_by(node_requests.c.id).limit(split.BATCH_SIZE)
    last_request: int | None = None
    while (
        rows := bind.execute(
            request_query if last_request is None else request_query.where(node_requests.c.id > last_request)
        )
        .mappings()
        .all()
    ):
        ids = [row["id"] for row in rows]
        answers = (
            bind.execute(sa.select(node_responses).where(node_responses.c.request_id.in_(ids)))
            .mappings()
            .all()
        )
        bind.execute(requests.insert(), [convert_request(split, row) for row in rows])
        if answers:
            bind.execute(responses.insert(), [convert_response(split, row) for row in answers])
        originals: dict[int, dict[str, str | None]] = {
            row["id"]: {"openai_request": row.get("openai_request"), "qwen_request": row.get("qwen_request")}
            for row in rows
        }
        for answer in answers:
            originals[answer["request_id"]].update(
                openai_response=answer.get("openai_response"), qwen_response=answer.get("qwen_response")
            )
        split.keep_original_texts(bind, requests, responses, originals)
        last_request = ids[-1]

    for table in reversed(aside.values()):
        op.drop_table(table)
    split.sync_sequence(bind, "requests")
    split.sync_sequence(bind, "responses")


def downgrade() -> None:
    # See the module docstring: the adopted rows stay in our tables, and 0002's downgrade carries them on.
    return
