"""The Alembic history on an empty database, next to a host application, and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text

from qwen_persist import migrate
from qwen_persist.cli import main
from qwen_persist.engine import DATABASE_URL_ENV, make_engine
from qwen_persist.models import TABLE_NAMES

REVISIONS = [
    "0001_v1_baseline",
    "0002_split_tables",
    "0003_adopt_node_v2",
    "0004_response_headers",
    "0005_capture_identity",
    "0006_read_indexes",
    "0007_drop_unused_indexes",
]


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def check(url: str) -> None:
    """`alembic check`: raises when the migrated schema and the models differ."""
    command.check(migrate.make_config(url))


def query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())
    finally:
        engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def test_history_is_linear_and_known() -> None:
    assert [script.revision for script in migrate.history()] == REVISIONS
    assert migrate.head() == REVISIONS[-1]
    assert (Path(migrate.script_location()) / "env.py").is_file()


def test_upgrade_check_downgrade_upgrade(database_url: str) -> None:
    assert migrate.current(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.current(database_url) == REVISIONS[-1]
    assert set(TABLE_NAMES) <= tables(database_url)
    assert "request_logs" not in tables(database_url)
    check(database_url)

    migrate.downgrade(database_url, "base")
    assert migrate.current(database_url) is None
    assert tables(database_url) & {*TABLE_NAMES, "request_logs"} == set()

    migrate.upgrade(database_url)
    check(database_url)


def test_each_step_downgrades(database_url: str) -> None:
    for revision in REVISIONS:
        migrate.upgrade(database_url, revision)
        assert migrate.current(database_url) == revision
    for revision in reversed(REVISIONS[:-1]):
        migrate.downgrade(database_url, revision)
        assert migrate.current(database_url) == revision
    assert tables(database_url) & {*TABLE_NAMES, "request_logs"} == {"request_logs"}


def indexes(url: str, table: str) -> dict[str, list[str]]:
    """The table's indexes that are not constraints, by name: their columns."""
    engine = make_engine(url)
    try:
        return {
            str(ix["name"]): [str(c) for c in ix["column_names"]] for ix in inspect(engine).get_indexes(table)
        }
    finally:
        engine.dispose()


def test_unused_index_is_dropped_and_its_downgrade_restores_it(database_url: str) -> None:
    migrate.upgrade(database_url, "0006_read_indexes")
    before = {table: indexes(database_url, table) for table in TABLE_NAMES}
    assert before["sessions"]["ix_sessions_chat_id"] == ["chat_id"]
    # Rows in the table, so the downgrade builds the index over data, as it would in production.
    execute(
        database_url,
        "INSERT INTO sessions (id, chat_id, first_user_message, message_count, created_at, updated_at,"
        " last_accessed, expires_at) VALUES ('s-1', 'chat-1', 'hi', 1, 1, 1, 1, 2)",
    )

    migrate.upgrade(database_url)
    after = {table: indexes(database_url, table) for table in TABLE_NAMES}
    assert "ix_sessions_chat_id" not in after["sessions"]
    # Nothing else moved.
    assert {**after["sessions"], "ix_sessions_chat_id": ["chat_id"]} == before["sessions"]
    assert after["requests"] == before["requests"] and after["responses"] == before["responses"]
    check(database_url)

    migrate.downgrade(database_url, "0006_read_indexes")
    assert {table: indexes(database_url, table) for table in TABLE_NAMES} == before
    assert query(database_url, "SELECT id FROM sessions WHERE chat_id = 'chat-1'") == [("s-1",)]


def test_host_database_tables_are_left_alone(database_url: str) -> None:
    # A host application with its own tables and its own Alembic history in the same database.
    execute(
        database_url,
        "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        "INSERT INTO widgets (id, name) VALUES (1, 'sprocket')",
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
        "INSERT INTO alembic_version (version_num) VALUES ('hostrev42')",
    )
    migrate.upgrade(database_url)
    check(database_url)  # the host's tables are not drift
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("hostrev42",)]
    assert query(database_url, f"SELECT version_num FROM {migrate.VERSION_TABLE}") == [(REVISIONS[-1],)]

    migrate.downgrade(database_url, "base")
    assert query(database_url, "SELECT id, name FROM widgets") == [(1, "sprocket")]
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("hostrev42",)]


def test_a_foreign_sessions_table_stops_the_upgrade_and_nothing_changes(database_url: str) -> None:
    execute(database_url, "CREATE TABLE sessions (token TEXT PRIMARY KEY)")
    with pytest.raises(RuntimeError, match="neither qwen_persist's nor a Node"):
        migrate.upgrade(database_url)
    # One transaction for the whole run, on SQLite too: not even the baseline's table is left behind.
    assert migrate.current(database_url) is None
    assert tables(database_url) - {migrate.VERSION_TABLE} == {"sessions"}


def test_concurrent_upgrades_are_serialized(database_url: str) -> None:
    # Several processes (replicas with auto_upgrade) and several threads of one process at once.
    script = "import sys; from qwen_persist.migrate import upgrade; upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, database_url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate.upgrade(database_url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcomes = [
        (process.wait(timeout=60), process.stderr.read() if process.stderr else "") for process in processes
    ]
    assert errors == []
    assert outcomes == [(0, "")] * 3
    assert migrate.current(database_url) == REVISIONS[-1]
    check(database_url)


EDGE_BODIES: list[tuple[str | None, str | None]] = [
    (None, None),  # nothing recorded at all
    ("not json {", "<html>502 Bad Gateway</html>"),
    ("null", "null"),  # the JSON text null, not SQL NULL
    ('{ "model" : "m",\n  "messages": [] }', '{"b":1,"a":2}'),  # spacing; key order JSONB would change
    ('{"content":"caf\\u00e9 \\ud83d\\ude00"}', '{"n":1e5,"f":1.0,"g":-0.0}'),  # escapes, number spellings
    ('{"a":1,"a":2}', '{"x":NaN}'),  # duplicate keys; NaN is not JSON
    ('{"nul":"\\u0000","lone":"\\ud800"}', "[1,2,3]"),  # valid JSON that JSONB cannot hold
    ('{"$qwen_persist_raw_body":true,"text":"impostor"}', '"just a string"'),  # looks like a raw body
    ('{"model":"m","messages":[{"role":"user","content":"é ☃"}]}', ""),  # plain non-ASCII; empty text
]


def test_legacy_bodies_survive_the_round_trip_byte_for_byte(database_url: str) -> None:
    migrate.upgrade(database_url, "0001_v1_baseline")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for index, (request_body, response_body) in enumerate(EDGE_BODIES, start=10):
                connection.execute(
                    text(
                        "INSERT INTO request_logs (id, request_id, provider, endpoint, method, request_body,"
                        " response_body, status_code, duration_ms, error, created_at) VALUES (:id, :rid,"
                        " 'p', '/v1/chat/completions', 'POST', :req, :resp, 500, 7, 'boom', 1700000000)"
                    ),
                    {"id": index, "rid": f"r{index}", "req": request_body, "resp": response_body},
                )
    finally:
        engine.dispose()
    before = query(database_url, "SELECT * FROM request_logs ORDER BY id")

    migrate.upgrade(database_url)
    check(database_url)
    stored = {
        row[0]: row[1:]
        for row in query(
            database_url,
            "SELECT r.id, r.openai_request, s.openai_response FROM requests r JOIN responses s"
            " ON s.request_id = r.id",
        )
    }

    def loaded(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    missing, _ = stored[10]
    assert loaded(missing)["$qwen_persist_raw_body"] is True
    assert loaded(missing)["reason"] == "missing"
    not_json, bad_gateway = stored[11]
    assert loaded(not_json)["text"] == "not json {"
    assert loaded(bad_gateway)["reason"] == "not_json"
    assert loaded(stored[16][0])["reason"] == "not_storable"

    migrate.downgrade(database_url, "0001_v1_baseline")
    assert query(database_url, "SELECT * FROM request_logs ORDER BY id") == before


def test_rows_captured_after_the_split_downgrade_to_a_faithful_mapping(database_url: str) -> None:
    migrate.upgrade(database_url)
    body = {"model": "qwen3-max", "messages": [{"role": "user", "content": "héllo"}], "stream": True}
    answer = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "stop"}]}
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO sessions (id, first_user_message, message_count, created_at, updated_at,"
                    " last_accessed, expires_at) VALUES ('s1', 'héllo', 1, 1700000000123, 1700000000123,"
                    " 1700000000123, 1700001800123)"
                )
            )
            for request_id in (1, 2):
                connection.execute(
                    text(
                        "INSERT INTO requests (id, session_id, request_id, timestamp, created_at, method,"
                        " path, openai_request, stream) VALUES (:id, 's1', :rid, 1700000000123,"
                        " 1700000000123, 'POST', '/v1/chat/completions', :body, true)"
                    ),
                    {"id": request_id, "rid": f"req-{request_id}", "body": json.dumps(body)},
                )
            # Request 2 is still streaming: it has no response yet.
            connection.execute(
                text(
                    "INSERT INTO responses (request_id, session_id, response_id, timestamp, created_at,"
                    " status_code, openai_response, duration_ms) VALUES (1, 's1', 'resp-1', 1700000002999,"
                    " 1700000002999, 200, :answer, 2876)"
                ),
                {"answer": json.dumps(answer)},
            )
    finally:
        engine.dispose()

    migrate.downgrade(database_url, "0001_v1_baseline")
    rows = query(database_url, "SELECT * FROM request_logs ORDER BY id")
    # Compact JSON text, as the original wrote it (key order is the database's: JSONB sorts keys).
    for row in rows:
        for column in (row.request_body, row.response_body):
            if column is not None:
                assert json.dumps(json.loads(column), separators=(",", ":"), ensure_ascii=False) == column
    parsed = [(*row[:5], json.loads(row[5]), row[6] and json.loads(row[6]), *row[7:]) for row in rows]
    path = "/v1/chat/completions"
    assert parsed == [
        (1, "req-1", "unknown", path, "POST", body, answer, 200, 2876, None, 1700000002),
        (2, "req-2", "unknown", path, "POST", body, None, None, None, None, 1700000000),
    ]
    # The id counter continues after the restored rows.
    execute(
        database_url,
        "INSERT INTO request_logs (request_id, provider, endpoint, method) VALUES ('next', 'p', '/', 'GET')",
    )
    assert query(database_url, "SELECT id FROM request_logs WHERE request_id = 'next'") == [(3,)]
    # Downgrading the baseline keeps a table that holds rows: they are user data.
    migrate.downgrade(database_url, "base")
    assert len(query(database_url, "SELECT id FROM request_logs")) == 3


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_db_commands(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "db", "current", "--database-url", database_url)
    assert (status, out.strip()) == (0, "none (not migrated)")

    status, out, _ = run_cli(capsys, "db", "upgrade", "0002_split_tables", "--database-url", database_url)
    assert status == 0 and "to 0002_split_tables" in out
    status, out, _ = run_cli(capsys, "db", "upgrade", "--database-url", database_url)
    assert status == 0 and f"to {REVISIONS[-1]}" in out
    status, out, _ = run_cli(capsys, "db", "upgrade", "--database-url", database_url)
    assert status == 0 and f"already at {REVISIONS[-1]}" in out

    status, out, _ = run_cli(capsys, "db", "current", "--database-url", database_url)
    assert (status, out.strip()) == (0, f"{REVISIONS[-1]} (head)")

    status, out, _ = run_cli(capsys, "db", "history", "--database-url", database_url)
    lines = out.strip().splitlines()
    assert status == 0 and len(lines) == len(REVISIONS)
    assert lines[0].startswith("<base> -> 0001_v1_baseline")
    assert "(head) (current)" in lines[-1]

    status, out, _ = run_cli(capsys, "db", "downgrade", "base", "--database-url", database_url)
    assert status == 0 and "to base" in out
    assert migrate.current(database_url) is None


def test_cli_takes_the_url_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv(DATABASE_URL_ENV, url)
    assert run_cli(capsys, "db", "upgrade")[0] == 0
    assert migrate.current(url) == REVISIONS[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["db", "current", "--database-url", "not a url"], "invalid database URL"),
        (["db", "upgrade", "--database-url", "sqlite:////nonexistent-dir/x/y.db"], "unable to open database"),
        (
            ["db", "upgrade", "--database-url", "postgresql://nobody@127.0.0.1:1/x"],
            "postgresql+psycopg://nobody@",
        ),
        (["db", "downgrade", "nosuchrev", "--database-url", "sqlite://"], "nosuchrev"),
    ],
)
def test_cli_errors_are_one_line_messages(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(capsys, *argv)
    assert status == 1
    assert err.startswith("qwen-persist: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
