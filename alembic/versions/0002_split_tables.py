"""Split ``request_logs`` into ``sessions`` / ``requests`` / ``responses``, converting every row.

Revision ID: 0002_split_tables
Revises: 0001_v1_baseline
Create Date: 2025-11-23

The Node.js original made the same move and lost ``status_code``, hard-coded ``finish_reason`` and had a
rollback that restored nothing. Here, in the one transaction env.py opens:

* each ``request_logs`` row becomes one session (``legacy-session-<id>``, already expired so it is never
  continued), one request (same ``id`` and ``request_id``; ``endpoint`` becomes ``path``; model, stream,
  user and metadata read from the body) and one response (``id`` and ``response_id``
  ``legacy-response-<id>``; status, duration, error and provider kept; tokens, finish_reason and the
  upstream id parsed from the stored body); seconds become milliseconds;
* a body that cannot be stored as JSON is stored as the middleware's raw body object
  ``{"$qwen_persist_raw_body": true, "reason": ..., "encoding": "utf-8", "text": ..., "truncated": false,
  "size": ...}`` with reason ``not_json`` (invalid JSON, NaN), ``not_storable`` (NUL characters or lone
  surrogates, which JSONB refuses) or ``missing`` (a NULL request body; ``text`` null);
* losslessness is checked, not assumed: after the rows are written they are read back and rendered the
  way the downgrade renders them (compact JSON as JS ``JSON.stringify`` writes it, or the raw body's text).
  Wherever that differs from the stored text (other spacing, escapes, number spellings, duplicate keys,
  JSONB's key order on PostgreSQL, the JSON text ``null``) the original text is kept in the request's
  ``metadata`` under ``qwen_persist_original_text`` (``{"openai_request": ..., "openai_response": ...}``),
  and the downgrade prefers it.

Downgrade recreates ``request_logs`` with the original DDL and indexes from the three tables: legacy rows
come back byte for byte with their ids and ``created_at`` seconds; rows captured later get the closest
mapping (``provider`` 'unknown' when missing, ``created_at`` from the response's timestamp, else the
request's, in seconds; bodies as compact JSON). The AUTOINCREMENT counter continues after the largest id.

A database already migrated by the Node tool has its own ``sessions``/``requests``/``responses``: they are
renamed aside here (``qwen_persist_node_v2_*``) so ours can be created, and 0003 adopts their rows.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0002_split_tables"
down_revision: str | Sequence[str] | None = "0001_v1_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The middleware's marker for bodies stored as text (qwen_persist.bodies when this revision was written).
RAW_MARKER = "$qwen_persist_raw_body"
ORIGINAL_TEXT_KEY = "qwen_persist_original_text"
NODE_TABLES = ("sessions", "requests", "responses")
NODE_ASIDE_PREFIX = "qwen_persist_node_v2_"
BATCH_SIZE = 500

LEGACY_COLUMNS = (
    "id",
    "request_id",
    "provider",
    "endpoint",
    "method",
    "request_body",
    "response_body",
    "status_code",
    "duration_ms",
    "error",
    "created_at",
)

INDEXES = {
    "sessions": (
        ("ix_sessions_chat_id", ["chat_id"]),
        ("ix_sessions_created_at", ["created_at"]),
        ("ix_sessions_expires_at", ["expires_at"]),
    ),
    "requests": (
        ("ix_requests_created_at", ["created_at"]),
        ("ix_requests_model", ["model"]),
        ("ix_requests_session_id_timestamp", ["session_id", "timestamp"]),
        ("ix_requests_timestamp", ["timestamp"]),
    ),
    "responses": (
        ("ix_responses_created_at", ["created_at"]),
        ("ix_responses_session_id", ["session_id"]),
        ("ix_responses_timestamp", ["timestamp"]),
        ("ix_responses_upstream_id", ["upstream_id"]),
    ),
}


def revision_module(name: str) -> ModuleType:
    """Another (equally frozen) revision's module, to share its helpers instead of copying them."""
    script = context.script.get_revision(name)
    if script is None:
        raise RuntimeError(f"revision {name} not found")
    return script.module


# ---------------------------------------------------------------------------------------------- schema


def json_type(*, nullable: bool) -> sa.types.TypeEngine[Any]:
    # NULL stays SQL NULL in nullable columns instead of becoming the JSON literal null.
    return sa.JSON(none_as_null=nullable).with_variant(postgresql.JSONB(none_as_null=nullable), "postgresql")


def id_type() -> sa.types.TypeEngine[int]:
    # On SQLite only the spelling INTEGER makes the key an alias of the rowid.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def sessions_schema() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("chat_id", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.Text(), nullable=True),
        sa.Column("first_user_message", sa.Text(), nullable=False),
        sa.Column("message_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("last_accessed", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    ]


def requests_schema() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("id", id_type(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("openai_request", json_type(nullable=False), nullable=False),
        sa.Column("qwen_request", json_type(nullable=True), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("metadata", json_type(nullable=True), nullable=True),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_requests_session_id_sessions", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
        sa.UniqueConstraint("request_id", name="uq_requests_request_id"),
    ]


def responses_schema() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("id", id_type(), autoincrement=True, nullable=False),
        sa.Column("request_id", id_type(), nullable=False),
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("response_id", sa.Text(), nullable=False),
        sa.Column("upstream_id", sa.Text(), nullable=True),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("openai_response", json_type(nullable=True), nullable=True),
        sa.Column("qwen_response", json_type(nullable=True), nullable=True),
        sa.Column("parent_id", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=True),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("first_byte_ms", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name="fk_responses_request_id_requests", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_responses_session_id_sessions", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
        sa.UniqueConstraint("request_id", name="uq_responses_request_id"),
        sa.UniqueConstraint("response_id", name="uq_responses_response_id"),
    ]


SCHEMAS = {"sessions": sessions_schema, "requests": requests_schema, "responses": responses_schema}


def new_tables() -> tuple[sa.Table, sa.Table, sa.Table]:
    """The three tables as this revision creates them, for reading and writing rows."""
    metadata = sa.MetaData()
    sessions, requests, responses = (sa.Table(name, metadata, *schema()) for name, schema in SCHEMAS.items())
    return sessions, requests, responses


def create_indexes() -> None:
    for table, indexes in INDEXES.items():
        for name, columns in indexes:
            op.create_index(name, table, columns)


def sync_sequence(bind: sa.Connection, table: str) -> None:
    """Make PostgreSQL's id sequence continue after rows inserted with explicit ids."""
    if bind.dialect.name != "postgresql":
        return
    bind.execute(
        sa.text(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
            f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
        )
    )


# --------------------------------------------------------------------------------------- pure helpers


def raw_body(text: str | None, reason: str) -> dict[str, Any]:
    return {
        RAW_MARKER: True,
        "reason": reason,
        "encoding": "utf-8",
        "text": text,
        "truncated": False,
        "size": None if text is None else len(text.encode("utf-8")),
    }


def is_raw_body(value: Any) -> bool:
    return isinstance(value, dict) and value.get(RAW_MARKER) is True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _storable(value: Any) -> bool:
    """Whether JSON (JSONB on PostgreSQL) can hold ``value``: no NUL, no lone surrogate, finite numbers."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, float) and not math.isfinite(item):
            return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def parse_json(text: str) -> Any:
    """The JSON value of ``text``, or a raw body holding ``text`` when it cannot be stored as JSON."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return raw_body(text, "not_json")
    return value if _storable(value) else raw_body(text, "not_storable")


def render_json(value: Any) -> str | None:
    """The text a body is written back as: the raw body's text, or JSON as JS ``JSON.stringify`` writes it."""
    if value is None:
        return None
    if is_raw_body(value):
        text = value.get("text")
        if not isinstance(text, str):
            return None
        if value.get("encoding") == "base64":
            # Captured bytes that were not UTF-8: the closest a TEXT column can come.
            return base64.b64decode(text).decode("utf-8", errors="replace")
        return text
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def content_text(content: Any) -> str:
    """A message's text: string content as is; parts: texts and image URLs, one per line."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    lines = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            lines.append(part["text"])
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                lines.append(url)
    return "\n".join(lines)


def request_fields(body: Any) -> dict[str, Any]:
    """What the request row and its session read from an OpenAI chat completion request body."""
    fields: dict[str, Any] = {
        "model": None,
        "stream": False,
        "user": None,
        "metadata": None,
        "first_user_message": "",
        "message_count": 0,
    }
    if not isinstance(body, dict) or is_raw_body(body):
        return fields
    fields["model"] = _text(body.get("model"))
    fields["stream"] = body.get("stream") is True
    fields["user"] = _text(body.get("user"))
    if isinstance(body.get("metadata"), dict):
        fields["metadata"] = dict(body["metadata"])
    messages = body.get("messages")
    if isinstance(messages, list):
        fields["message_count"] = len(messages)
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user":
                fields["first_user_message"] = content_text(message.get("content"))
                break
    return fields


def response_fields(body: Any) -> dict[str, Any]:
    """What the response row reads from a stored ``chat.completion`` (or error) body."""
    fields: dict[str, Any] = {
        "upstream_id": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "finish_reason": None,
        "has_reply": False,
    }
    if not isinstance(body, dict) or is_raw_body(body):
        return fields
    fields["upstream_id"] = _text(body.get("id"))
    usage = body.get("usage")
    if isinstance(usage, dict):
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            fields[name] = _count(usage.get(name))
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        fields["finish_reason"] = _text(choices[0].get("finish_reason"))
        fields["has_reply"] = isinstance(choices[0].get("message"), dict)
    return fields


def convert_legacy_row(row: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One ``request_logs`` row as a (session, request, response) row triple."""
    log_id = int(row["id"])
    millis = int(row["created_at"]) * 1000
    body = raw_body(None, "missing") if row["request_body"] is None else parse_json(row["request_body"])
    answer = None if row["response_body"] is None else parse_json(row["response_body"])
    asked = request_fields(body)
    answered = response_fields(answer)
    session_id = f"legacy-session-{log_id}"
    session = {
        "id": session_id,
        "chat_id": None,
        "parent_id": None,
        "first_user_message": asked["first_user_message"],
        "message_count": asked["message_count"] + (1 if answered["has_reply"] else 0),
        "created_at": millis,
        "updated_at": millis,
        "last_accessed": millis,
        # Expired at its last access: the history stays, the conversation is never continued.
        "expires_at": millis,
    }
    request = {
        "id": log_id,
        "session_id": session_id,
        "request_id": row["request_id"],
        "timestamp": millis,
        "created_at": millis,
        "method": row["method"],
        "path": row["endpoint"],
        "openai_request": body,
        "qwen_request": None,
        "model": asked["model"],
        "stream": asked["stream"],
        "user": asked["user"],
        "metadata": asked["metadata"],
        "provider": row["provider"],
    }
    response = {
        "id": log_id,
        "request_id": log_id,
        "session_id": session_id,
        "response_id": f"legacy-response-{log_id}",
        "upstream_id": answered["upstream_id"],
        "timestamp": millis,
        "created_at": millis,
        "status_code": row["status_code"],
        "openai_response": answer,
        "qwen_response": None,
        "parent_id": None,
        "prompt_tokens": answered["prompt_tokens"],
        "completion_tokens": answered["completion_tokens"],
        "total_tokens": answered["total_tokens"],
        "finish_reason": answered["finish_reason"],
        "error": row["error"],
        "duration_ms": row["duration_ms"],
        "first_byte_ms": None,
    }
    return session, request, response


def original_texts(metadata: Any) -> dict[str, Any]:
    kept = metadata.get(ORIGINAL_TEXT_KEY) if isinstance(metadata, dict) else None
    return kept if isinstance(kept, dict) else {}


def legacy_row(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A ``request_logs`` row from a request joined with its response (columns prefixed ``response_``)."""
    kept = original_texts(row["metadata"])
    request_body = kept["openai_request"] if "openai_request" in kept else render_json(row["openai_request"])
    response_body = (
        kept["openai_response"] if "openai_response" in kept else render_json(row["response_openai_response"])
    )
    # The original stamped a row when its response was logged.
    ended = row["response_timestamp"]
    return {
        "id": row["id"],
        "request_id": row["request_id"],
        "provider": row["provider"] if row["provider"] is not None else "unknown",
        "endpoint": row["path"],
        "method": row["method"],
        "request_body": request_body,
        "response_body": response_body,
        "status_code": row["response_status_code"],
        "duration_ms": row["response_duration_ms"],
        "error": row["response_error"],
        "created_at": (ended if ended is not None else row["timestamp"]) // 1000,
    }


# ------------------------------------------------------------------------------------- database steps


def keep_original_texts(
    bind: sa.Connection,
    requests: sa.Table,
    responses: sa.Table,
    originals: Mapping[int, Mapping[str, str | None]],
) -> None:
    """Read rows back as stored; keep each original text the downgrade's rendering would not reproduce.

    ``originals`` maps a request id to original texts by column name (``openai_request``,
    ``qwen_request``, ``openai_response``, ``qwen_response``).
    """
    stored = bind.execute(
        sa.select(
            requests.c.id,
            requests.c.metadata,
            requests.c.openai_request,
            requests.c.qwen_request,
            responses.c.openai_response,
            responses.c.qwen_response,
        )
        .select_from(requests.outerjoin(responses, responses.c.request_id == requests.c.id))
        .where(requests.c.id.in_(list(originals)))
    ).mappings()
    for row in stored:
        originals_of_row = originals[row["id"]]
        differing = {
            column: text for column, text in originals_of_row.items() if render_json(row[column]) != text
        }
        if differing:
            metadata = dict(row["metadata"]) if isinstance(row["metadata"], dict) else {}
            metadata[ORIGINAL_TEXT_KEY] = differing
            bind.execute(requests.update().where(requests.c.id == row["id"]).values(metadata=metadata))


def _is_node_v2(bind: sa.Connection, inspector: sa.Inspector) -> bool:
    if not inspector.has_table("metadata"):
        return False
    version = bind.execute(sa.text("SELECT value FROM metadata WHERE key = 'schema_version'")).scalar()
    return str(version) == "2"


def move_node_tables_aside(bind: sa.Connection) -> None:
    inspector = sa.inspect(bind)
    present = [name for name in NODE_TABLES if inspector.has_table(name)]
    if not present:
        return
    if len(present) != len(NODE_TABLES) or not _is_node_v2(bind, inspector):
        raise RuntimeError(
            f"the database already has table(s) {present} that are neither qwen_persist's nor a Node.js "
            "proxy's schema version 2 (metadata.schema_version = '2'); qwen_persist needs those names"
        )
    for name in NODE_TABLES:
        op.rename_table(name, NODE_ASIDE_PREFIX + name)


def move_node_tables_back(bind: sa.Connection) -> None:
    inspector = sa.inspect(bind)
    for name in NODE_TABLES:
        if inspector.has_table(NODE_ASIDE_PREFIX + name):
            op.rename_table(NODE_ASIDE_PREFIX + name, name)


def convert_request_logs(
    bind: sa.Connection, sessions: sa.Table, requests: sa.Table, responses: sa.Table
) -> None:
    logs = sa.table("request_logs", *(sa.column(name) for name in LEGACY_COLUMNS))
    query = sa.select(logs).order_by(logs.c.id).limit(BATCH_SIZE)
    last_id: int | None = None
    while True:
        rows = bind.execute(query if last_id is None else query.where(logs.c.id > last_id)).mappings().all()
        if not rows:
            return
        triples = [convert_legacy_row(row) for row in rows]
        bind.execute(sessions.insert(), [session for session, _, _ in triples])
        bind.execute(requests.insert(), [request for _, request, _ in triples])
        bind.execute(responses.insert(), [response for _, _, response in triples])
        keep_original_texts(
            bind,
            requests,
            responses,
            {
                row["id"]: {"openai_request": row["request_body"], "openai_response": row["response_body"]}
                for row in rows
            },
        )
        last_id = rows[-1]["id"]


def upgrade() -> None:
    bind = op.get_bind()
    move_node_tables_aside(bind)
    for name, schema in SCHEMAS.items():
        op.create_table(name, *schema())
    sessions, requests, responses = new_tables()
    convert_request_logs(bind, sessions, requests, responses)
    # Built after the bulk load: cheaper than maintaining them row by row.
    create_indexes()
    op.drop_table("request_logs")
    sync_sequence(bind, "requests")
    sync_sequence(bind, "responses")


def downgrade() -> None:
    bind = op.get_bind()
    revision_module("0001_v1_baseline").create_request_logs(bind)
    _, requests, responses = new_tables()
    logs = sa.table("request_logs", *(sa.column(name) for name in LEGACY_COLUMNS))
    answer_columns = [column.label(f"response_{column.name}") for column in responses.c]
    query = (
        sa.select(requests, *answer_columns)
        .select_from(requests.outerjoin(responses, responses.c.request_id == requests.c.id))
        .order_by(requests.c.id)
        .limit(BATCH_SIZE)
    )
    last_id: int | None = None
    while True:
        rows = (
            bind.execute(query if last_id is None else query.where(requests.c.id > last_id)).mappings().all()
        )
        if not rows:
            break
        # Explicit ids also advance SQLite's AUTOINCREMENT counter (sqlite_sequence) to the largest one.
        bind.execute(logs.insert(), [legacy_row(row) for row in rows])
        last_id = rows[-1]["id"]
    sync_sequence(bind, "request_logs")
    for name in reversed(NODE_TABLES):
        op.drop_table(name)
    move_node_tables_back(bind)
