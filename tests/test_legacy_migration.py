"""Upgrading real legacy data: the Node.js original's v1 ``request_logs``, and its own v2 split."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, select, text

from qwen_persist import migrate
from qwen_persist.engine import make_engine
from qwen_persist.models import requests_table, responses_table, sessions_table

ORIGINAL_TEXT_KEY = "qwen_persist_original_text"
RAW_MARKER = "$qwen_persist_raw_body"

# The fixture's request_logs as a PostgreSQL user would translate it by hand.
PG_REQUEST_LOGS = """CREATE TABLE request_logs (
    id SERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    request_body TEXT,
    response_body TEXT,
    status_code INTEGER,
    duration_ms INTEGER,
    error TEXT,
    created_at BIGINT NOT NULL DEFAULT (EXTRACT(EPOCH FROM now())::bigint)
)"""
PG_SETTINGS = "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at BIGINT NOT NULL)"


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def rows_of(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def by_id(url: str, table: Any) -> dict[Any, dict[str, Any]]:
    """Rows through the models' types, so JSON columns come back decoded on both backends."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {row["id"]: dict(row) for row in connection.execute(select(table)).mappings()}
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def original(legacy_fixture: Path) -> dict[str, list[tuple[Any, ...]]]:
    connection = read_only(legacy_fixture)
    try:
        return {
            "request_logs": connection.execute("SELECT * FROM request_logs ORDER BY id").fetchall(),
            "settings": connection.execute("SELECT * FROM settings ORDER BY key").fetchall(),
        }
    finally:
        connection.close()


@pytest.fixture
def legacy_url(
    database_url: str, legacy_fixture: Path, original: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> str:
    """The legacy database: a copy of the fixture on SQLite, its rows loaded into PostgreSQL."""
    if database_url.startswith("sqlite"):
        copy = tmp_path / "legacy.db"
        shutil.copyfile(legacy_fixture, copy)
        return f"sqlite:///{copy}"
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(PG_REQUEST_LOGS))
            connection.execute(text(PG_SETTINGS))
            columns = ", ".join(f":c{index}" for index in range(11))
            for row in original["request_logs"]:
                values = {f"c{index}": value for index, value in enumerate(row)}
                connection.execute(text(f"INSERT INTO request_logs VALUES ({columns})"), values)
            for key, value, updated_at in original["settings"]:
                connection.execute(
                    text("INSERT INTO settings VALUES (:k, :v, :u)"), {"k": key, "v": value, "u": updated_at}
                )
            connection.execute(text("SELECT setval('request_logs_id_seq', 5)"))
    finally:
        engine.dispose()
    return database_url


def test_legacy_rows_are_converted(legacy_url: str, original: dict[str, list[tuple[Any, ...]]]) -> None:
    migrate.upgrade(legacy_url)
    assert migrate.current(legacy_url) == migrate.head()
    command.check(migrate.make_config(legacy_url))
    assert "request_logs" not in table_names(legacy_url)
    assert rows_of(legacy_url, "SELECT * FROM settings ORDER BY key") == original["settings"]

    sessions = by_id(legacy_url, sessions_table)
    requests = by_id(legacy_url, requests_table)
    responses = {row["request_id"]: row for row in by_id(legacy_url, responses_table).values()}
    assert len(sessions) == len(requests) == len(responses) == len(original["request_logs"]) == 5
    now_ms = time.time() * 1000
    for (
        log_id,
        request_id,
        provider,
        endpoint,
        method,
        request_body,
        response_body,
        status,
        duration,
        error,
        ts,
    ) in original["request_logs"]:
        request, response = requests[log_id], responses[log_id]
        session = sessions[request["session_id"]]
        assert request["request_id"] == request_id
        assert (request["method"], request["path"], request["provider"]) == (method, endpoint, provider)
        assert request["timestamp"] == request["created_at"] == ts * 1000
        assert request["openai_request"] == json.loads(request_body)
        assert (response["status_code"], response["duration_ms"], response["error"]) == (
            status,
            duration,
            error,
        )
        assert response["openai_response"] == json.loads(response_body)
        assert response["session_id"] == request["session_id"] == f"legacy-session-{log_id}"
        assert response["timestamp"] == ts * 1000
        assert session["created_at"] == session["last_accessed"] == ts * 1000
        assert session["expires_at"] <= now_ms  # history kept, never continued

    chat = requests[2]
    assert (chat["model"], chat["stream"], chat["user"]) == ("qwen3-coder", False, None)
    assert sessions["legacy-session-2"]["first_user_message"] == "Say hello in 3 words"
    assert sessions["legacy-session-2"]["message_count"] == 2  # the user's message and the reply
    assert sessions["legacy-session-1"]["first_user_message"] == ""  # GET /v1/models has no messages
    answer = responses[2]
    assert (answer["prompt_tokens"], answer["completion_tokens"], answer["total_tokens"]) == (14, 50, 64)
    assert answer["finish_reason"] == "length"
    assert answer["upstream_id"] == "chatcmpl-zgmbg7rqirp97fqgoawrb"
    assert answer["response_id"] == "legacy-response-2"
    assert responses[1]["status_code"] == 200 and requests[1]["provider"] == "lm-studio"
    assert requests[4]["provider"] == "qwen-proxy"
    assert (responses[5]["prompt_tokens"], responses[5]["total_tokens"], responses[5]["finish_reason"]) == (
        10,
        20,
        "length",
    )
    # Bodies without usage or an id: unknown stays NULL.
    assert (responses[3]["total_tokens"], responses[3]["upstream_id"], responses[3]["finish_reason"]) == (
        None,
        None,
        None,
    )


def test_legacy_downgrade_restores_request_logs_exactly(
    legacy_url: str, legacy_fixture: Path, original: dict[str, list[tuple[Any, ...]]]
) -> None:
    migrate.upgrade(legacy_url)
    migrate.downgrade(legacy_url, "0001_v1_baseline")
    assert table_names(legacy_url) & {"sessions", "requests", "responses"} == set()
    assert rows_of(legacy_url, "SELECT * FROM request_logs ORDER BY id") == original["request_logs"]
    assert rows_of(legacy_url, "SELECT * FROM settings ORDER BY key") == original["settings"]
    if legacy_url.startswith("sqlite"):
        schema = "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'request_logs' ORDER BY name"
        fixture = read_only(legacy_fixture)
        try:
            assert rows_of(legacy_url, schema) == fixture.execute(schema).fetchall()
        finally:
            fixture.close()
        assert rows_of(legacy_url, "SELECT seq FROM sqlite_sequence WHERE name = 'request_logs'") == [(5,)]
    else:
        assert rows_of(legacy_url, "SELECT nextval(pg_get_serial_sequence('request_logs', 'id'))") == [(6,)]

    # The baseline keeps a table holding rows; upgrading adopts it again, as on the first run.
    migrate.downgrade(legacy_url, "base")
    assert rows_of(legacy_url, "SELECT * FROM request_logs ORDER BY id") == original["request_logs"]
    migrate.upgrade(legacy_url)
    assert len(by_id(legacy_url, requests_table)) == 5


# ------------------------------------------------------------------------------------ Node.js v2 split


def node_v2_ddl(postgres: bool, *, with_route: bool) -> list[str]:
    """The Node.js tool's schema version 2 (seeds: phase 1 and phase 4 reports), optionally without the
    ``method``/``path`` columns some of its versions lacked."""
    pk = "BIGSERIAL PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    ts = "BIGINT" if postgres else "INTEGER"
    false = "FALSE" if postgres else "0"
    route = "method TEXT NOT NULL DEFAULT 'POST', path TEXT NOT NULL," if with_route else ""
    return [
        f"CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {ts} NOT NULL)",
        f"CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {ts} NOT NULL)",
        f"""CREATE TABLE sessions (
            id TEXT PRIMARY KEY, chat_id TEXT, parent_id TEXT, first_user_message TEXT NOT NULL,
            message_count INTEGER DEFAULT 0, created_at {ts} NOT NULL, updated_at {ts} NOT NULL,
            last_accessed {ts} NOT NULL, expires_at {ts} NOT NULL)""",
        f"""CREATE TABLE requests (
            id {pk}, session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            request_id TEXT NOT NULL UNIQUE, timestamp {ts} NOT NULL, {route}
            openai_request TEXT NOT NULL, qwen_request TEXT, model TEXT, stream BOOLEAN DEFAULT {false},
            created_at {ts} NOT NULL)""",
        f"""CREATE TABLE responses (
            id {pk}, request_id INTEGER NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            response_id TEXT NOT NULL UNIQUE, timestamp {ts} NOT NULL, qwen_response TEXT,
            openai_response TEXT, parent_id TEXT, completion_tokens INTEGER, prompt_tokens INTEGER,
            total_tokens INTEGER, finish_reason TEXT, error TEXT, duration_ms INTEGER,
            created_at {ts} NOT NULL)""",
        "CREATE INDEX idx_sessions_expires_at ON sessions(expires_at)",
        "CREATE INDEX idx_sessions_chat_id ON sessions(chat_id)",
        "CREATE INDEX idx_sessions_created_at ON sessions(created_at)",
        "CREATE INDEX idx_requests_session_id ON requests(session_id)",
        "CREATE INDEX idx_requests_timestamp ON requests(timestamp)",
        "CREATE INDEX idx_requests_request_id ON requests(request_id)",
        "CREATE INDEX idx_requests_created_at ON requests(created_at)",
        "CREATE INDEX idx_responses_request_id ON responses(request_id)",
        "CREATE INDEX idx_responses_session_id ON responses(session_id)",
        "CREATE INDEX idx_responses_response_id ON responses(response_id)",
        "CREATE INDEX idx_responses_timestamp ON responses(timestamp)",
        "CREATE INDEX idx_responses_created_at ON responses(created_at)",
    ]


MD5_HELLO = "5d41402abc4b2a76b9719d911017c592"
NODE_SESSIONS = [
    (MD5_HELLO, "chat-1", "parent-9", "hello", 4, 1761869500000, 1761869600000, 1761869600000, 4102444800000),
    (
        "migrated-session-3",
        None,
        None,
        "Hello",
        1,
        1761869504000,
        1761869504000,
        1761869504000,
        1761871304000,
    ),
]
NODE_REQUESTS = [
    # id, session_id, request_id, timestamp, method, path, openai_request, qwen_request, model, stream,
    # created_at
    (
        7,
        MD5_HELLO,
        "req-a",
        1761869500100,
        "POST",
        "/v1/chat/completions",
        '{"model":"qwen3-max","messages":[{"role":"user","content":"hello"}],"stream":true,"user":"alice"}',
        '{"chat_id":"chat-1","parent_id":null,"incremental_output":true}',
        "qwen3-max",
        True,
        1761869500100,
    ),
    (8, MD5_HELLO, "req-b", 1761869600000, "POST", "/v1/chat/completions",
     '{"model": "qwen3-max", "messages": []}', None, None, False, 1761869600000),
    (12, "migrated-session-3", "test-req-001", 1761869504000, "GET", "/v1/models", "{}", None, None, False,
     1761869504000),
]  # fmt: skip
NODE_RESPONSES = [
    # id, request_id, session_id, response_id, timestamp, qwen_response, openai_response, parent_id,
    # completion_tokens, prompt_tokens, total_tokens, finish_reason, error, duration_ms, created_at
    (
        3,
        7,
        MD5_HELLO,
        "resp-uuid-1",
        1761869501500,
        "data: not json",
        '{"id":"chatcmpl-9","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
        '"content":"Hi!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        '"total_tokens":7}}',
        "parent-10",
        2,
        5,
        7,
        "stop",
        None,
        1400,
        1761869501500,
    ),
    (4, 8, MD5_HELLO, "resp-uuid-2", 1761869600030, None, None, None, None, None, None, None,
     "upstream 500", 30, 1761869600030),
]  # fmt: skip
REQUEST_COLUMNS = [
    "id",
    "session_id",
    "request_id",
    "timestamp",
    "method",
    "path",
    "openai_request",
    "qwen_request",
    "model",
    "stream",
    "created_at",
]
RESPONSE_COLUMNS = [
    "id",
    "request_id",
    "session_id",
    "response_id",
    "timestamp",
    "qwen_response",
    "openai_response",
    "parent_id",
    "completion_tokens",
    "prompt_tokens",
    "total_tokens",
    "finish_reason",
    "error",
    "duration_ms",
    "created_at",
]


# The Node tool's sessions table: ours as of its schema version 2, before qwen_persist's own additions.
NODE_SESSION_COLUMNS = [
    "id",
    "chat_id",
    "parent_id",
    "first_user_message",
    "message_count",
    "created_at",
    "updated_at",
    "last_accessed",
    "expires_at",
]


def insert(connection: Any, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    names = ", ".join(columns)
    marks = ", ".join(f":{column}" for column in columns)
    statement = text(f"INSERT INTO {table} ({names}) VALUES ({marks})")
    connection.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])


@pytest.fixture(params=[True, False], ids=["with-route", "without-route"])
def node_url(request: pytest.FixtureRequest, database_url: str) -> Iterator[tuple[str, bool]]:
    with_route = bool(request.param)
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for statement in node_v2_ddl(engine.dialect.name == "postgresql", with_route=with_route):
                connection.execute(text(statement))
            connection.execute(text("INSERT INTO metadata VALUES ('schema_version', '2', 1761869400000)"))
            connection.execute(text("INSERT INTO settings VALUES ('active_provider', 'qwen', 1761869400)"))
            insert(connection, "sessions", NODE_SESSION_COLUMNS, NODE_SESSIONS)
            columns = [c for c in REQUEST_COLUMNS if with_route or c not in ("method", "path")]
            rows = [
                tuple(v for c, v in zip(REQUEST_COLUMNS, row, strict=True) if c in columns)
                for row in NODE_REQUESTS
            ]
            insert(connection, "requests", columns, rows)
            insert(connection, "responses", RESPONSE_COLUMNS, NODE_RESPONSES)
    finally:
        engine.dispose()
    yield database_url, with_route


def compact(value: Any) -> str | None:
    """How the migrations write a stored body back as text (see 0002_split_tables.render_json)."""
    if value is None:
        return None
    if isinstance(value, dict) and value.get(RAW_MARKER) is True:
        raw: str | None = value["text"]
        return raw
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_node_v2_database_is_adopted_without_loss(node_url: tuple[str, bool]) -> None:
    url, with_route = node_url
    migrate.upgrade(url)
    command.check(migrate.make_config(url))
    assert not any(name.startswith("qwen_persist_node_v2_") for name in table_names(url))
    assert rows_of(url, "SELECT key, value FROM metadata") == [("schema_version", "2")]
    assert rows_of(url, "SELECT key, value FROM settings") == [("active_provider", "qwen")]

    sessions = by_id(url, sessions_table)
    assert [
        tuple(sessions[row[0]][c] for c in NODE_SESSION_COLUMNS) for row in NODE_SESSIONS
    ] == NODE_SESSIONS
    assert all(session["ids_updated_at"] is None for session in sessions.values())  # unknown, not invented

    requests = by_id(url, requests_table)
    assert sorted(requests) == [7, 8, 12]
    for row in NODE_REQUESTS:
        node = dict(zip(REQUEST_COLUMNS, row, strict=True))
        ours = requests[node["id"]]
        for column in ("session_id", "request_id", "timestamp", "created_at", "stream"):
            assert ours[column] == node[column], column
        if with_route:
            assert (ours["method"], ours["path"]) == (node["method"], node["path"])
        else:  # the only route the Node.js tool logged
            assert (ours["method"], ours["path"]) == ("POST", "/v1/chat/completions")
        assert ours["openai_request"] == json.loads(node["openai_request"])
        assert ours["qwen_request"] == (node["qwen_request"] and json.loads(node["qwen_request"]))
        assert ours["provider"] is None
        # Every original text is recoverable: rendered back, or kept where rendering would differ.
        kept = (ours["metadata"] or {}).get(ORIGINAL_TEXT_KEY, {})
        for column in ("openai_request", "qwen_request"):
            assert kept.get(column, compact(ours[column])) == node[column]
    assert requests[7]["user"] == "alice" and requests[7]["model"] == "qwen3-max"
    assert requests[8]["model"] == "qwen3-max"  # NULL in Node's column, read from the body
    assert ORIGINAL_TEXT_KEY in requests[8]["metadata"]  # '{"model": ...' has spaces compact JSON lacks

    responses = by_id(url, responses_table)
    assert sorted(responses) == [3, 4]
    for row in NODE_RESPONSES:
        node = dict(zip(RESPONSE_COLUMNS, row, strict=True))
        ours = responses[node["id"]]
        for column in RESPONSE_COLUMNS:
            if column not in ("qwen_response", "openai_response"):
                assert ours[column] == node[column], column
        assert ours["status_code"] is None  # Node's schema lost it: unknown, not invented
        kept = (requests[node["request_id"]]["metadata"] or {}).get(ORIGINAL_TEXT_KEY, {})
        for column in ("openai_response", "qwen_response"):
            assert kept.get(column, compact(ours[column])) == node[column]
    assert responses[3]["upstream_id"] == "chatcmpl-9"
    assert responses[3]["qwen_response"][RAW_MARKER] is True
    assert responses[3]["qwen_response"]["reason"] == "not_json"

    # New rows continue after the adopted ids.
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            new_id = connection.execute(
                requests_table.insert()
                .values(
                    session_id=MD5_HELLO,
                    request_id="req-new",
                    timestamp=1,
                    created_at=1,
                    method="POST",
                    path="/v1/chat/completions",
                    openai_request={},
                    stream=False,
                )
                .returning(requests_table.c.id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert new_id == 13

    # Down to the v1 layout: every request becomes a request_logs row, original texts preferred.
    migrate.downgrade(url, "0001_v1_baseline")
    logs = {row[0]: row for row in rows_of(url, "SELECT id, request_body, response_body FROM request_logs")}
    assert sorted(logs) == [7, 8, 12, 13]
    assert logs[8][1] == '{"model": "qwen3-max", "messages": []}'
    assert logs[7][2] == NODE_RESPONSES[0][6]
