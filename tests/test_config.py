"""Configuration (SPEC §4): every option validated at construction, environment-variable defaults, explicit
arguments beating the environment; and what the middleware leaves alone (other scopes, methods, paths)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send
from support import stored_exchanges

from qwen_persist import ConfigurationError, PersistenceMiddleware
from qwen_persist.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PATHS,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_RESPONSE_HEADERS,
    DEFAULT_SESSION_TTL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    build_settings,
)
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.paths import PathMatcher, route_path
from qwen_persist.redaction import DEFAULT_REDACT_FIELDS


async def noop_app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover - never called
    raise AssertionError("not called")


def make(tmp_path: Path, **options: Any) -> PersistenceMiddleware:
    options.setdefault("database_url", f"sqlite:///{tmp_path / 'c.db'}")
    options.setdefault("spill_dir", str(tmp_path / "spill"))
    return PersistenceMiddleware(noop_app, **options)


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"session_ttl": 0}, "session_ttl"),
        ({"session_ttl": 0.5}, "session_ttl"),
        ({"session_ttl": -5}, "session_ttl"),
        ({"session_ttl": "soon"}, "session_ttl"),
        ({"session_ttl": "60"}, "session_ttl"),
        ({"session_ttl": float("nan")}, "session_ttl"),
        ({"session_ttl": float("inf")}, "session_ttl"),
        ({"session_ttl": True}, "session_ttl"),
        ({"session_ttl": [60]}, "session_ttl"),
        ({"max_body_bytes": 1023}, "max_body_bytes"),
        ({"max_body_bytes": 4096.5}, "max_body_bytes"),
        ({"max_body_bytes": "big"}, "max_body_bytes"),
        ({"queue_size": 0}, "queue_size"),
        ({"queue_size": 1.5}, "queue_size"),
        ({"queue_size": False}, "queue_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": object()}, "batch_size"),
        ({"flush_interval": -0.1}, "flush_interval"),
        ({"flush_interval": float("nan")}, "flush_interval"),
        ({"flush_interval": "fast"}, "flush_interval"),
        ({"paths": []}, "paths"),
        ({"paths": ["", "  "]}, "paths"),
        ({"paths": "/v1/chat/completions"}, "single string"),
        ({"paths": ["v1/chat/completions"]}, "paths"),
        ({"paths": ["/ok", "relative"]}, "paths"),
        ({"paths": [123]}, "paths"),
        ({"paths": 5}, "paths"),
        ({"session_header": ""}, "session_header"),
        ({"session_header": "x session"}, "session_header"),
        ({"session_header": "x-session:"}, "session_header"),
        ({"session_header": "x/session"}, "session_header"),
        ({"session_header": "sessi\u00f3n"}, "session_header"),
        ({"session_header": 7}, "session_header"),
        ({"redact": "strip"}, "redact"),
        ({"redact": 1}, "redact"),
        ({"auto_upgrade": 1}, "auto_upgrade"),
        ({"auto_upgrade": "true"}, "auto_upgrade"),
        ({"database_url": "mysql://user@127.0.0.1/db"}, "SQLite and PostgreSQL"),
        ({"spill_dir": 3}, "spill_dir"),
        ({"database_url": "garbage"}, "garbage"),
        ({"database_url": ""}, "database_url"),
        ({"database_url": "nosuchdb://host/db"}, "nosuchdb"),
        ({"database_url": "sqlite://"}, "in-memory"),
        ({"database_url": "sqlite:///:memory:"}, "in-memory"),
        ({"database_url": "sqlite:///file::memory:?cache=shared&uri=true"}, "in-memory"),
        ({"database_url": "sqlite:///no/such/dir/x.db"}, "does not exist"),
        ({"paths": ["/openai/deployments/{bad-name}/chat/completions"]}, "parameter"),
        ({"paths": ["/v1/{unclosed"]}, "parameter"),
        ({"response_headers": ["authorization"]}, "credentials"),
        ({"response_headers": ["Set-Cookie", "x-ok"]}, "credentials"),
        ({"response_headers": ["bad header"]}, "header name"),
        ({"response_headers": "x-request-id"}, "single string"),
        ({"redact_fields": "api_key"}, "single string"),
        ({"redact_fields": [1]}, "redact_fields"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"shutdown_timeout": "soon"}, "shutdown_timeout"),
    ],
)
def test_invalid_options_fail_at_construction(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(tmp_path, **options)


def test_valid_options_are_kept(tmp_path: Path) -> None:
    def redact(body: Any, kind: str) -> Any:
        return body

    middleware = make(
        tmp_path,
        session_ttl=1,
        max_body_bytes=1024,
        queue_size=1,
        batch_size=1,
        flush_interval=0,
        paths=["/custom ", "/v1/chat/completions"],
        session_header=" X-Conversation-Id ",
        redact=redact,
        auto_upgrade=False,
    )
    settings = middleware.settings
    assert (settings.session_ttl, settings.session_ttl_ms, settings.max_body_bytes) == (1.0, 1000, 1024)
    assert (settings.queue_size, settings.batch_size, settings.flush_interval) == (1, 1, 0.0)
    assert settings.paths == frozenset({"/custom", "/v1/chat/completions"})
    assert settings.session_header == "x-conversation-id"
    assert settings.redact is redact and settings.auto_upgrade is False
    assert settings.spill_dir == tmp_path / "spill"


def test_postgresql_url_is_accepted_and_uses_psycopg(tmp_path: Path) -> None:
    for url in ("postgresql://user:pw@127.0.0.1:1/db", "postgres://user@127.0.0.1:1/db"):
        middleware = make(tmp_path, database_url=url)  # no connection is made at construction
        assert middleware.engine.dialect.name == "postgresql"
        assert middleware.engine.dialect.driver == "psycopg"
        middleware.engine.dispose()


ENV_CASES: list[tuple[dict[str, str], dict[str, Any]]] = [
    (
        {},
        {
            "database_url": "sqlite:///qwen_persist.db",
            "paths": frozenset(DEFAULT_PATHS),
            "session_header": "x-session-id",
            "session_ttl": DEFAULT_SESSION_TTL,
            "max_body_bytes": DEFAULT_MAX_BODY_BYTES,
            "queue_size": DEFAULT_QUEUE_SIZE,
            "batch_size": DEFAULT_BATCH_SIZE,
            "flush_interval": DEFAULT_FLUSH_INTERVAL,
            "auto_upgrade": False,
            "redact_fields": frozenset(DEFAULT_REDACT_FIELDS),
            "response_headers": frozenset(DEFAULT_RESPONSE_HEADERS),
            "shutdown_timeout": DEFAULT_SHUTDOWN_TIMEOUT,
        },
    ),
    ({"QWEN_PERSIST_DATABASE_URL": "sqlite:///from-env.db"}, {"database_url": "sqlite:///from-env.db"}),
    ({"QWEN_PERSIST_DATABASE_URL": ""}, {"database_url": "sqlite:///qwen_persist.db"}),
    ({"QWEN_PERSIST_SESSION_TTL": "90"}, {"session_ttl": 90.0}),
    ({"QWEN_PERSIST_SESSION_TTL": "2.5"}, {"session_ttl": 2.5}),
    ({"QWEN_PERSIST_QUEUE_SIZE": "7"}, {"queue_size": 7}),
    ({"QWEN_PERSIST_QUEUE_SIZE": " 12 "}, {"queue_size": 12}),
    ({"QWEN_PERSIST_BATCH_SIZE": "3"}, {"batch_size": 3}),
    ({"QWEN_PERSIST_MAX_BODY_BYTES": "2048"}, {"max_body_bytes": 2048}),
    ({"QWEN_PERSIST_FLUSH_INTERVAL": "0.25"}, {"flush_interval": 0.25}),
    ({"QWEN_PERSIST_PATHS": "/a, /b ,,/c"}, {"paths": frozenset({"/a", "/b", "/c"})}),
    ({"QWEN_PERSIST_PATHS": "/only"}, {"paths": frozenset({"/only"})}),
    ({"QWEN_PERSIST_REDACT_FIELDS": "a, b"}, {"redact_fields": frozenset({"a", "b"})}),
    ({"QWEN_PERSIST_RESPONSE_HEADERS": "X-A"}, {"response_headers": frozenset({"x-a"})}),
    ({"QWEN_PERSIST_SHUTDOWN_TIMEOUT": "2.5"}, {"shutdown_timeout": 2.5}),
    ({"QWEN_PERSIST_SESSION_HEADER": "X-Conv"}, {"session_header": "x-conv"}),
    ({"QWEN_PERSIST_SPILL_DIR": "/tmp/spill-here"}, {"spill_dir": Path("/tmp/spill-here")}),
    *(
        ({"QWEN_PERSIST_AUTO_UPGRADE": v}, {"auto_upgrade": True})
        for v in ("1", "true", "TRUE", "yes", " on ")
    ),
    *(({"QWEN_PERSIST_AUTO_UPGRADE": v}, {"auto_upgrade": False}) for v in ("0", "false", "no", "Off")),
]


@pytest.mark.parametrize(("environ", "expected"), ENV_CASES)
def test_environment_defaults(environ: dict[str, str], expected: dict[str, Any]) -> None:
    settings = build_settings(environ=environ)
    for name, value in expected.items():
        assert getattr(settings, name) == value, name


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"QWEN_PERSIST_AUTO_UPGRADE": "maybe"}, "QWEN_PERSIST_AUTO_UPGRADE"),
        ({"QWEN_PERSIST_SESSION_TTL": "abc"}, "QWEN_PERSIST_SESSION_TTL"),
        ({"QWEN_PERSIST_SESSION_TTL": "0"}, "QWEN_PERSIST_SESSION_TTL"),
        ({"QWEN_PERSIST_SESSION_TTL": "nan"}, "QWEN_PERSIST_SESSION_TTL"),
        ({"QWEN_PERSIST_QUEUE_SIZE": "1.5"}, "QWEN_PERSIST_QUEUE_SIZE"),
        ({"QWEN_PERSIST_QUEUE_SIZE": "-3"}, "QWEN_PERSIST_QUEUE_SIZE"),
        ({"QWEN_PERSIST_MAX_BODY_BYTES": "100"}, "QWEN_PERSIST_MAX_BODY_BYTES"),
        ({"QWEN_PERSIST_FLUSH_INTERVAL": "later"}, "QWEN_PERSIST_FLUSH_INTERVAL"),
        ({"QWEN_PERSIST_PATHS": "relative/path"}, "paths"),
        ({"QWEN_PERSIST_PATHS": " , "}, "paths"),
        ({"QWEN_PERSIST_SESSION_HEADER": "bad header"}, "session_header"),
        ({"QWEN_PERSIST_DATABASE_URL": "not a url"}, "not a url"),
        ({"QWEN_PERSIST_DATABASE_URL": "sqlite://"}, "in-memory"),
        ({"QWEN_PERSIST_RESPONSE_HEADERS": "x-a,cookie"}, "credentials"),
        ({"QWEN_PERSIST_SHUTDOWN_TIMEOUT": "-2"}, "QWEN_PERSIST_SHUTDOWN_TIMEOUT"),
    ],
)
def test_bad_environment_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_settings(environ=environ)


def test_explicit_arguments_beat_the_environment() -> None:
    environ = {
        "QWEN_PERSIST_DATABASE_URL": "sqlite:///env.db",
        "QWEN_PERSIST_SESSION_TTL": "not even a number",
        "QWEN_PERSIST_QUEUE_SIZE": "7",
        "QWEN_PERSIST_PATHS": "/env",
        "QWEN_PERSIST_AUTO_UPGRADE": "garbage",
        "QWEN_PERSIST_SESSION_HEADER": "x-env",
    }
    settings = build_settings(
        environ=environ,
        database_url="sqlite:///arg.db",
        session_ttl=5,
        queue_size=9,
        paths=["/arg"],
        auto_upgrade=True,
        session_header="x-arg",
    )
    assert settings.database_url == "sqlite:///arg.db"
    assert (settings.session_ttl, settings.queue_size, settings.auto_upgrade) == (5.0, 9, True)
    assert settings.paths == frozenset({"/arg"}) and settings.session_header == "x-arg"


def test_explicit_environ_is_not_mixed_with_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_PERSIST_DATABASE_URL", "sqlite:///process.db")
    monkeypatch.setenv("QWEN_PERSIST_QUEUE_SIZE", "3")
    settings = build_settings(environ={})
    assert settings.database_url == "sqlite:///qwen_persist.db" and settings.queue_size == DEFAULT_QUEUE_SIZE
    assert build_settings().database_url == "sqlite:///process.db"


def test_middleware_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("QWEN_PERSIST_DATABASE_URL", url)
    monkeypatch.setenv("QWEN_PERSIST_SESSION_TTL", "90")
    monkeypatch.setenv("QWEN_PERSIST_QUEUE_SIZE", "7")
    monkeypatch.setenv("QWEN_PERSIST_PATHS", "/a,/b")
    monkeypatch.setenv("QWEN_PERSIST_AUTO_UPGRADE", "true")
    monkeypatch.setenv("QWEN_PERSIST_SPILL_DIR", str(tmp_path / "env-spill"))
    middleware = PersistenceMiddleware(noop_app)
    settings = middleware.settings
    assert settings.database_url == url and str(middleware.engine.url) == url
    assert (settings.session_ttl, settings.queue_size, settings.auto_upgrade) == (90.0, 7, True)
    assert settings.paths == frozenset({"/a", "/b"}) and settings.spill_dir == tmp_path / "env-spill"
    assert middleware.sessions.ttl_ms == 90_000

    explicit = PersistenceMiddleware(noop_app, session_ttl=30, queue_size=2, paths=["/c"], auto_upgrade=False)
    assert (explicit.settings.session_ttl, explicit.settings.queue_size) == (30.0, 2)
    assert explicit.settings.paths == frozenset({"/c"}) and explicit.settings.auto_upgrade is False

    monkeypatch.setenv("QWEN_PERSIST_AUTO_UPGRADE", "perhaps")
    with pytest.raises(ConfigurationError, match="QWEN_PERSIST_AUTO_UPGRADE"):
        PersistenceMiddleware(noop_app)


# -- what the middleware leaves alone ---------------------------------------------------------------


class RecordingApp:
    """A raw ASGI app that records the scope, receive and messages it got, and answers each scope type."""

    def __init__(self) -> None:
        self.calls: list[tuple[Scope, Receive, list[Message]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received: list[Message] = []
        self.calls.append((scope, receive, received))
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                received.append(message)
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "websocket":
            received.append(await receive())
            await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
            await send({"type": "websocket.close", "code": 1000, "reason": ""})
        else:
            received.append(await receive())
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
            await send({"type": "http.response.body", "body": b"plain", "more_body": False})


def http_scope(method: str, path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"client-id")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


def table_counts(database_url: str) -> list[int]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return [
                int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (sessions_table, requests_table, responses_table)
            ]
    finally:
        engine.dispose()


def test_other_scopes_methods_and_paths_pass_through_untouched(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    app = RecordingApp()
    middleware = PersistenceMiddleware(app, database_url=database_url, spill_dir=str(tmp_path / "spill"))
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'

    async def drive(scope: Scope, incoming: list[Message]) -> tuple[list[Message], Receive]:
        queue = list(incoming)
        sent: list[Message] = []

        async def receive() -> Message:
            return queue.pop(0)

        async def send(message: Message) -> None:
            sent.append(message)

        await middleware(scope, receive, send)
        return sent, receive

    async def run() -> None:
        lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        startup = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent, receive = await drive(lifespan, startup)
        assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
        assert app.calls[-1][0] is lifespan and app.calls[-1][1] is receive and app.calls[-1][2] == startup

        websocket: Scope = {**http_scope("GET", "/v1/chat/completions"), "type": "websocket"}
        del websocket["method"]
        sent, receive = await drive(websocket, [{"type": "websocket.connect"}])
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert app.calls[-1][0] is websocket and app.calls[-1][1] is receive

        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("PUT", "/other")):
            scope = http_scope(method, path)
            snapshot = dict(scope)
            message = {"type": "http.request", "body": body, "more_body": False}
            sent, receive = await drive(scope, [message])
            assert app.calls[-1][0] is scope and scope == snapshot  # same object, nothing added
            assert app.calls[-1][1] is receive and app.calls[-1][2] == [message]
            assert sent == [
                {"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]},
                {"type": "http.response.body", "body": b"plain", "more_body": False},
            ]
        await middleware.aclose()

    asyncio.run(run())
    assert middleware.stats().accepted == 0
    assert table_counts(database_url) == [0, 0, 0]


def test_configured_paths_are_captured_and_the_default_is_not(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)

    async def answer(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"choices": [], "path": request.url.path})

    app = Starlette(
        routes=[
            Route("/custom", answer, methods=["POST"]),
            Route("/v1/chat/completions", answer, methods=["POST"]),
        ]
    )
    middleware = PersistenceMiddleware(
        app, database_url=database_url, spill_dir=str(tmp_path / "spill"), paths=["/custom"]
    )

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            responses = [await client.post(path, json=body) for path in ("/custom", "/v1/chat/completions")]
        await middleware.aclose()
        return responses

    custom, default = asyncio.run(run())
    assert custom.status_code == default.status_code == 200
    assert "x-request-id" in custom.headers and "x-request-id" not in default.headers
    [(request, response)] = stored_exchanges(database_url)
    assert (request.path, request.request_id) == ("/custom", custom.headers["x-request-id"])
    assert response is not None and response.status_code == 200


def test_path_matching() -> None:
    match = PathMatcher(["/v1/chat/completions", "/openai/deployments/{deployment}/chat/completions", "/x/"])
    assert match("/v1/chat/completions") and match("/v1/chat/completions/") and match("/x")
    assert match("/openai/deployments/gpt-4o/chat/completions")
    assert not match("/openai/deployments/a/b/chat/completions") and not match(
        "/openai/deployments//chat/completions"
    )
    assert not match("/v1/chat/completions/extra") and not match("/v1/chat") and not match("/")
    assert not PathMatcher(["/a.b"])("/aXb")  # pattern text is literal, not a regular expression
    assert route_path({"path": "/api/v1/chat/completions", "root_path": "/api"}) == "/v1/chat/completions"
    assert route_path({"path": "/v1/chat/completions", "root_path": "/api"}) == "/v1/chat/completions"
    assert route_path({"path": "/apiv1/chat/completions", "root_path": "/api"}) == "/apiv1/chat/completions"
    assert route_path({"path": "/api", "root_path": "/api"}) == "/"
