"""Capture fidelity behind the shapes users run: other middleware around and inside ours (gzip), apps that
label JSON as a stream, set their own request ids, mount under prefixes, clients that give up early.
Each test drives a real uvicorn server and checks the stored rows against what the client received, on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import sqlite3
import stat
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli  # type: ignore[import-untyped]
import fake_upstream
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send
from support import serve, stored_exchanges, stored_sessions

from qwen_persist import PersistenceMiddleware, current_exchange
from qwen_persist.bodies import NUL_MARKER, RAW_MARKER, restore_nul
from qwen_persist.migrate import upgrade

USER = [{"role": "user", "content": "hello there"}]
BODY = {"model": "m", "messages": USER}


def recorded(app: Any, database_url: str, tmp_path: Path, **options: Any) -> PersistenceMiddleware:
    options.setdefault("spill_dir", str(tmp_path / "spill"))
    return PersistenceMiddleware(app, database_url=database_url, **options)


def completion(content: str = "Hi there. " * 80, **extra: Any) -> dict[str, Any]:
    """A chat.completion comfortably over GZipMiddleware's 500-byte minimum."""
    return {
        "id": "chatcmpl-fidelity",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 160, "total_tokens": 163},
        **extra,
    }


def answering(
    body: bytes,
    *,
    status: int = 200,
    headers: list[tuple[bytes, bytes]] | None = None,
    delay: float = 0.0,
) -> Callable[[Scope, Receive, Send], Any]:
    """A raw ASGI app that reads the request, waits ``delay`` seconds and answers ``body``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await asyncio.sleep(delay)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": headers or [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def client_for(base: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, **options)


# -- 1. Content-Encoding ---------------------------------------------------------------------------


def test_gzip_inside_the_middleware_is_decoded_for_storage(migrated_url: str, tmp_path: Path) -> None:
    # Starlette's GZipMiddleware inside ours, and a client that accepts gzip (the SDK always does).
    app = recorded(GZipMiddleware(fake_upstream.create_app(), minimum_size=10), migrated_url, tmp_path)
    with serve(app) as base:
        client = client_for(base)
        raw = client.chat.completions.with_raw_response.create(
            model="fake-tool", messages=USER, extra_headers={"accept-encoding": "gzip"}
        )
        parsed = raw.parse()
        with httpx.Client() as http:
            wire = http.post(f"{base}/v1/chat/completions", json=BODY, headers={"accept-encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip" and wire.headers["content-encoding"] == "gzip"
    (_, first), (_, second) = stored_exchanges(migrated_url)
    assert first is not None and second is not None
    assert first.error is None and first.openai_response == parsed.model_dump(exclude_unset=True)
    assert first.finish_reason == "tool_calls" and first.total_tokens == parsed.usage.total_tokens  # type: ignore[union-attr]
    assert (
        first.openai_response["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    )
    assert second.openai_response == wire.json() and second.error is None
    assert first.headers is not None and first.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize("coding", ["br", "deflate", "gzip, br"])
def test_other_codings_and_the_bytes_the_client_gets(coding: str, migrated_url: str, tmp_path: Path) -> None:
    plain = json.dumps(completion()).encode()
    encoded = plain
    for name in coding.split(", "):
        encoded = (
            brotli.compress(encoded)
            if name == "br"
            else zlib.compress(encoded)
            if name == "deflate"
            else gzip.compress(encoded)
        )
    headers = [(b"content-type", b"application/json"), (b"content-encoding", coding.encode())]
    app = recorded(answering(encoded, headers=headers), migrated_url, tmp_path)
    with (
        serve(app) as base,
        httpx.Client() as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=BODY) as response,
    ):
        received = b"".join(response.iter_raw())
    assert received == encoded  # the client's bytes are never changed
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.openai_response == json.loads(plain) and row.error is None
    assert (row.finish_reason, row.total_tokens) == ("stop", 163)


def test_encoded_request_bodies_and_streams(migrated_url: str, tmp_path: Path) -> None:
    events = [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": f"part{i} "}, "finish_reason": None}
            ],
        }
        for i in range(60)
    ]
    events.append(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        sent = json.loads(gzip.decompress(await request.body()))
        assert sent["model"] == "m"
        exchange = current_exchange(scope)
        assert exchange is not None
        sessions.append(exchange.session_id)  # what the app sees is what is stored
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")],
            }
        )
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            # Flushed per event, as a streaming gzip encoder must be.
            piece = compressor.compress(f"data: {event}\n\n".encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": compressor.flush(), "more_body": False})

    sessions: list[str] = []
    body = gzip.compress(json.dumps({**BODY, "stream": True}).encode())
    # The stream is over max_body_bytes (compressed), so it is rebuilt as it passes, through the decoder.
    for limit in (1 << 20, 1024):
        middleware = recorded(app, migrated_url, tmp_path, max_body_bytes=limit)
        with serve(middleware) as base, httpx.Client() as http:
            response = http.post(
                f"{base}/v1/chat/completions",
                content=body,
                headers={"content-encoding": "gzip", "content-type": "application/json"},
            )
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    for (request, row), session_id in zip(stored_exchanges(migrated_url), sessions, strict=True):
        assert request.openai_request == {**BODY, "stream": True} and request.model == "m" and request.stream
        assert request.session_id == session_id and not session_id.startswith("request-")
        assert row is not None and row.error is None and row.finish_reason == "stop"
        assert row.openai_response["choices"][0]["message"]["content"] == "".join(
            f"part{i} " for i in range(60)
        )


def test_a_compression_bomb_is_kept_bounded(migrated_url: str, tmp_path: Path) -> None:
    bomb = gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces in ~64 KiB
    headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    app = recorded(answering(bomb, headers=headers), migrated_url, tmp_path, max_body_bytes=1 << 20)
    with serve(app) as base, httpx.Client() as http:
        assert http.post(f"{base}/v1/chat/completions", json=BODY).status_code == 200
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.openai_response[RAW_MARKER] is True
    assert row.openai_response["truncated"] is True and len(row.openai_response["text"]) == 1 << 20
    assert row.error == "response_body_too_large"
    # Not valid gzip: kept as the bytes it was, and said so.
    app = recorded(answering(b"not gzip at all", headers=headers), migrated_url, tmp_path)
    with (
        serve(app) as base,
        httpx.Client() as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=BODY) as response,
    ):
        assert b"".join(response.iter_raw()) == b"not gzip at all"
    _, (_, broken) = stored_exchanges(migrated_url)
    assert broken is not None and broken.error == "response_body_encoding_invalid"
    assert broken.openai_response["text"] == "not gzip at all"


# -- 2. JSON under an SSE label --------------------------------------------------------------------


def test_a_json_error_labelled_as_a_stream_is_stored_as_json(migrated_url: str, tmp_path: Path) -> None:
    error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": "rate_limit"}}
    headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
    app = recorded(answering(json.dumps(error).encode(), status=429, headers=headers), migrated_url, tmp_path)
    with serve(app) as base, pytest.raises(openai.RateLimitError):
        client_for(base).chat.completions.create(model="m", messages=USER, stream=True)
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.status_code == 429
    assert row.openai_response == error and row.error == "Rate limit reached"


# -- 4. NUL characters -----------------------------------------------------------------------------


def test_nul_characters_are_stored_parsed_and_reversibly(migrated_url: str, tmp_path: Path) -> None:
    chunks = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "a\u0000b \u2400 "},
                    "finish_reason": None,
                }
            ],
        },
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "c"}, "finish_reason": "stop"}],
        },
    ]
    stream = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    app = recorded(
        answering(stream, headers=[(b"content-type", b"text/event-stream")]), migrated_url, tmp_path
    )
    mentions = {**BODY, "messages": [{"role": "user", "content": "what does \\u0000 mean?"}], "user": "u1"}
    holds = {
        **BODY,
        "messages": [{"role": "user", "content": "nul\u0000here"}],
        "user": "u\u00002",
        "stream": True,
    }
    with serve(app) as base, httpx.Client() as http:
        for body in (mentions, holds):
            assert http.post(f"{base}/v1/chat/completions", json=body).status_code == 200
    (req1, resp1), (req2, resp2) = stored_exchanges(migrated_url)
    # Merely mentioning the text \u0000 is nothing special: stored as sent.
    assert req1.openai_request == mentions and (req1.model, req1.user) == ("m", "u1")
    # Real NUL: parsed, escaped, marked, and every parsed field kept.
    assert req2.openai_request[NUL_MARKER] is True and restore_nul(req2.openai_request) == holds
    assert (req2.model, req2.stream, req2.user) == ("m", True, "u\u24000" + "2")
    session = stored_sessions(migrated_url)[req2.session_id]
    assert session.first_user_message == "nul\u24000here" and not session.id.startswith("request-")
    # The rebuilt stream holds NUL too: it has its response row, on PostgreSQL as well.
    assert resp2 is not None and resp2.error is None and resp2.finish_reason == "stop"
    assert restore_nul(resp2.openai_response)["choices"][0]["message"]["content"] == "a\u0000b \u2400 c"
    assert resp1 is not None and resp1.error is None


# -- 6. Disconnects before any response ------------------------------------------------------------


def test_a_client_that_gives_up_before_a_json_response(migrated_url: str, tmp_path: Path) -> None:
    app = recorded(answering(json.dumps(completion()).encode(), delay=1.0), migrated_url, tmp_path)
    with serve(app) as base:
        with pytest.raises(openai.APITimeoutError):
            client_for(base, timeout=0.3).chat.completions.create(model="m", messages=USER)
        deadline = time.monotonic() + 10
        while not stored_exchanges(migrated_url)[0][1] and time.monotonic() < deadline:
            time.sleep(0.1)
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error == "client_disconnected"
    assert row.openai_response is None and row.first_byte_ms is None  # nothing reached the client


# -- 7. The app's own X-Request-Id -----------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_the_request_id_the_client_sees_finds_its_row(
    delay: float, migrated_url: str, tmp_path: Path
) -> None:
    # A passthrough proxy forwards the upstream's id. With a delay the request row is written before
    # the response starts, and is then renamed.
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"req_upstream_1")]
    app = recorded(
        answering(json.dumps(completion()).encode(), headers=headers, delay=delay), migrated_url, tmp_path
    )
    with serve(app) as base:
        raw = client_for(base).chat.completions.with_raw_response.create(
            model="m", messages=USER, extra_headers={"x-request-id": "client-chosen"}
        )
    assert raw.headers.get_list("x-request-id") == ["req_upstream_1"]
    [(request, response)] = stored_exchanges(migrated_url)
    assert request.request_id == "req_upstream_1" and response is not None
    assert request.metadata_ == {"assigned_request_id": "client-chosen"}
    assert response.headers == {"x-request-id": "req_upstream_1"}


# -- 8, 10. Paths: query strings, mounts, root_path, patterns --------------------------------------


def test_routes_under_prefixes_patterns_and_query_strings(migrated_url: str, tmp_path: Path) -> None:
    upstream = fake_upstream.create_app()

    async def any_path(scope: Scope, receive: Receive, send: Send) -> None:
        # Every spelling reaches the fake upstream's one route.
        await upstream({**scope, "path": "/v1/chat/completions", "root_path": ""}, receive, send)

    mounted = Starlette(routes=[Mount("/api", app=recorded(any_path, migrated_url, tmp_path))])
    with serve(mounted) as base, httpx.Client() as http:
        for path in (
            "/api/v1/chat/completions",
            "/api/chat/completions",
            "/api/v1/chat/completions/",
            "/api/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
            "/api/v1/embeddings",
        ):
            assert http.post(base + path, json=BODY).status_code == 200
    with (
        serve(recorded(any_path, migrated_url, tmp_path), root_path="/proxy") as base,
        httpx.Client() as http,
    ):
        assert http.post(f"{base}/v1/chat/completions?x=1", json=BODY).status_code == 200
    paths = [request.path for request, _ in stored_exchanges(migrated_url)]
    assert paths == [
        "/api/v1/chat/completions",
        "/api/chat/completions",
        "/api/v1/chat/completions/",
        "/api/openai/deployments/gpt-4o/chat/completions?api-version=2024-02-01",
        "/proxy/v1/chat/completions?x=1",
    ]


# -- 9. The SQLite file alone holds every row after a graceful stop ---------------------------------


def test_sqlite_file_alone_holds_the_rows_after_shutdown(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    with serve(recorded(fake_upstream.create_app(), sqlite_url, tmp_path)) as base:
        client = client_for(base)
        for _ in range(5):
            client.chat.completions.create(model="fake-text", messages=USER)
    database = Path(sqlite_url.removeprefix("sqlite:///"))
    wal = database.with_name(database.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    backup = tmp_path / "backup.db"
    shutil.copyfile(database, backup)  # the .db file alone, as a naive backup takes it
    with sqlite3.connect(backup) as conn:
        assert conn.execute("select count(*) from responses").fetchone() == (5,)


# -- 11, 12. Redaction everywhere, credential fields, owner-only spill files ------------------------


def scrub(value: Any, kind: str) -> Any:
    if isinstance(value, str):
        return value.replace("SECRET", "[x]")
    if isinstance(value, dict):
        return {k: scrub(v, kind) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, kind) for v in value]
    return value


def reporting_app() -> Starlette:
    async def endpoint(request: Request) -> Response:
        body = await request.json()
        exchange = current_exchange(request)
        assert exchange is not None
        exchange.report(
            provider_request={"prompt": "SECRET prompt", "api_key": "sk-upstream"},
            provider_response={"raw": "SECRET answer"},
            metadata={"note": "fine SECRET"},
        )
        if body.get("model") == "fail":
            return JSONResponse({"error": {"message": "bad SECRET in request"}}, status_code=400)
        return JSONResponse(completion("SECRET reply"))

    return Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])


def test_redaction_reaches_every_stored_text(migrated_url: str, tmp_path: Path) -> None:
    app = recorded(reporting_app(), migrated_url, tmp_path, redact=scrub)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "my SECRET question"}],
        "api_key": "sk-litellm-body-key",
        "extra": {"aws_secret_access_key": "aws-secret", "keep": "this"},
    }
    with serve(app) as base, httpx.Client() as http:
        http.post(f"{base}/v1/chat/completions", json=body)
        http.post(f"{base}/v1/chat/completions", json={**body, "model": "fail"})
    rows = stored_exchanges(migrated_url)
    dump = repr([(vars(q), vars(r)) for q, r in rows]) + repr(
        [vars(s) for s in stored_sessions(migrated_url).values()]
    )
    for secret in ("SECRET", "sk-litellm-body-key", "aws-secret", "sk-upstream"):
        assert secret not in dump
    (request, response), (_, failed) = rows
    assert (
        request.openai_request["api_key"] == "[redacted]"
        and request.openai_request["extra"]["keep"] == "this"
    )
    assert request.qwen_request == {"prompt": "[x] prompt", "api_key": "[redacted]"}
    assert request.metadata_ == {"note": "fine [x]"}
    assert response is not None and response.qwen_response == {"raw": "[x] answer"}
    assert failed is not None and failed.error == "bad [x] in request"
    assert stored_sessions(migrated_url)[request.session_id].first_user_message == "my [x] question"


def test_credential_fields_are_an_option(migrated_url: str, tmp_path: Path) -> None:
    app = recorded(fake_upstream.create_app(), migrated_url, tmp_path, redact_fields=["my_token"])
    with serve(app) as base, httpx.Client() as http:
        http.post(f"{base}/v1/chat/completions", json={**BODY, "my_token": "t0k", "api_key": "kept"})
    [(request, _)] = stored_exchanges(migrated_url)
    assert (request.openai_request["my_token"], request.openai_request["api_key"]) == ("[redacted]", "kept")


def test_spill_files_are_redacted_and_owner_only(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    spill = tmp_path / "spill"
    app = recorded(
        reporting_app(), f"sqlite:///{gone / 'x.db'}", tmp_path, redact=scrub, spill_dir=str(spill)
    )
    gone.rmdir()  # the database cannot be opened: everything spills

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            body = {**BODY, "messages": [{"role": "user", "content": "SECRET"}], "api_key": "sk-body"}
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        stats = await app.aclose(timeout=0.5)
        assert stats.spilled == 2

    asyncio.run(run())
    [file] = spill.iterdir()
    text = file.read_text()
    assert "SECRET" not in text and "sk-body" not in text and "[x]" in text
    assert stat.S_IMODE(spill.stat().st_mode) == 0o700 and stat.S_IMODE(file.stat().st_mode) == 0o600


# -- 14, 15. Reaching the instance, and bad options given through add_middleware --------------------


def test_the_instance_is_reachable_with_add_middleware(database_url: str, tmp_path: Path) -> None:
    from qwen_persist import middleware_of

    upgrade(database_url)
    seen: list[Any] = []

    async def endpoint(request: Request) -> Response:
        seen.append(middleware_of(request))
        seen.append(request.app.state.qwen_persist)
        return JSONResponse(completion())

    app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])])
    app.add_middleware(
        PersistenceMiddleware, database_url=database_url, spill_dir=str(tmp_path / "s"), shutdown_timeout=2
    )
    found = middleware_of(app)  # before the app has served anything
    assert isinstance(found, PersistenceMiddleware) and found.settings.shutdown_timeout == 2
    with serve(app) as base, httpx.Client() as http:
        http.post(f"{base}/v1/chat/completions", json=BODY)
    assert seen == [found, found] and found.stats().written == 2


def test_a_bad_option_fails_at_startup_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from qwen_persist import ConfigurationError, middleware_of

    app = Starlette()
    app.add_middleware(PersistenceMiddleware, database_url=f"sqlite:///{tmp_path}/missing/x.db")
    with pytest.raises(ConfigurationError, match="does not exist"):
        middleware_of(app)
    assert "PersistenceMiddleware cannot start" in caplog.text


# -- 16. Allow-listed response headers -------------------------------------------------------------


def test_allow_listed_response_headers_are_stored(migrated_url: str, tmp_path: Path) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"x-litellm-call-id", b"call-1"),
        (b"openai-processing-ms", b"42"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"set-cookie", b"session=secret"),
        (b"x-other", b"not listed"),
    ]
    app = recorded(answering(json.dumps(completion()).encode(), headers=headers), migrated_url, tmp_path)
    with serve(app) as base, httpx.Client() as http:
        http.post(f"{base}/v1/chat/completions", json=BODY)
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.headers == {
        "x-litellm-call-id": "call-1",
        "openai-processing-ms": "42",
        "x-ratelimit-remaining-requests": "99",
    }
    app = recorded(answering(b"{}", headers=headers), migrated_url, tmp_path, response_headers=["X-Other"])
    with serve(app) as base, httpx.Client() as http:
        http.post(f"{base}/v1/chat/completions", json=BODY)
    assert stored_exchanges(migrated_url)[1][1].headers == {"x-other": "not listed"}  # type: ignore[union-attr]


# -- 3, 5. Streams that end oddly, and pathological nesting ----------------------------------------


def sse_app(events: list[Any], *, pad: int = 0) -> Callable[[Scope, Receive, Send], Any]:
    """An app that streams ``events`` (dicts as JSON, strings as they are), each padded by an SSE comment
    of ``pad`` bytes."""
    payload = b"".join(
        (b": " + b"p" * pad + b"\n" if pad else b"")
        + f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
        for event in events
    )
    return answering(payload, headers=[(b"content-type", b"text/event-stream")])


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        **extra,
    }


def test_n2_stream_with_one_finish_reason_is_complete(migrated_url: str, tmp_path: Path) -> None:
    # LiteLLM sends finish_reason for one choice only; [DONE] still ends the stream properly.
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}]),
        chunk([{"index": 1, "delta": {"role": "assistant", "content": "b"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        "[DONE]",
    ]
    with serve(recorded(sse_app(events), migrated_url, tmp_path)) as base:
        list(client_for(base).chat.completions.create(model="m", messages=USER, stream=True, n=2))
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error is None and row.finish_reason == "stop"
    assert [c["message"]["content"] for c in row.openai_response["choices"]] == ["a", "b"]


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize("limit", [1 << 20, 4096])
def test_deeply_nested_chunks_are_kept_raw_and_harm_nothing(
    limit: int, migrated_url: str, tmp_path: Path
) -> None:
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "fine"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "!", "extra": nested(600)}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        "[DONE]",
    ]
    app = recorded(sse_app(events, pad=3000), migrated_url, tmp_path, max_body_bytes=limit)
    with serve(app) as base, httpx.Client() as http:
        streamed = http.post(f"{base}/v1/chat/completions", json={**BODY, "stream": True})
        deep_json = http.post(f"{base}/v1/chat/completions", content=json.dumps({**BODY, "x": nested(250)}))
        after = client_for(base).chat.completions.create(model="m", messages=USER, stream=True)
        list(after)  # the writer is still alive and the next exchange is stored
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert deep_json.status_code == 200
    (_, stream_row), (deep_request, _), (_, next_row) = stored_exchanges(migrated_url)
    assert stream_row is not None and stream_row.error is not None
    assert "too_deep" in stream_row.error or "unprocessable" in stream_row.error
    if limit > len(streamed.content):
        assert stream_row.openai_response[RAW_MARKER] is True
        assert stream_row.openai_response["text"] == streamed.text  # kept faithfully
    assert deep_request.openai_request["reason"] == "too_deep" and deep_request.metadata_ == {
        "capture_problem": "body_too_deep"
    }
    assert next_row is not None and next_row.error == stream_row.error  # the writer lived on


def test_a_client_that_leaves_after_done_got_the_whole_stream(migrated_url: str, tmp_path: Path) -> None:
    """The openai SDK closes its connection as soon as it reads ``[DONE]``; an upstream may hold the body
    open a moment longer. The exchange is complete, not ``client_disconnected``: its stats count it as a
    success and the Stored Completions API lists it. A client gone before the end marker still is."""
    from starlette.responses import StreamingResponse

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {
            "id": "chatcmpl-lingers",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def lingering(request: Request) -> StreamingResponse:
        cut = (await request.json()).get("user") == "cut"

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": "Hello"})
            if cut:
                await asyncio.sleep(0.8)  # the client gives up before the end
            yield chunk({"content": " world"}, "stop")
            yield b"data: [DONE]\n\n"
            await asyncio.sleep(0.8)  # the body stays open after [DONE]

        return StreamingResponse(events(), media_type="text/event-stream")

    app = recorded(
        Starlette(routes=[Route("/v1/chat/completions", lingering, methods=["POST"])]), migrated_url, tmp_path
    )
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        with client.chat.completions.create(model="m", messages=USER, stream=True) as stream:
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello world"
        with pytest.raises(openai.APITimeoutError):
            cut = client.with_options(timeout=0.4).chat.completions.create(
                model="m", messages=USER, stream=True, user="cut"
            )
            for _ in cut:
                pass
        time.sleep(1.0)  # both responses end on the server side
    (_, whole_response), (cut_request, cut_response) = stored_exchanges(migrated_url)
    assert whole_response is not None and cut_response is not None
    assert (whole_response.status_code, whole_response.error, whole_response.finish_reason) == (
        200,
        None,
        "stop",
    )
    assert whole_response.openai_response["choices"][0]["message"]["content"] == "Hello world"
    assert cut_request.user == "cut" and cut_response.error == "client_disconnected"
