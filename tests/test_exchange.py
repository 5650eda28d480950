"""The exchange handle (SPEC §4, §6): finding it from a request or scope, the ids it exposes, what the app
reports landing in the right columns, late reports refused, odd values stored, and read-your-writes
through the writer barrier. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support import serve, stored_exchanges, stored_sessions

from qwen_persist import Exchange, PersistenceMiddleware, current_exchange
from qwen_persist.migrate import upgrade

HI = [{"role": "user", "content": "hi"}]


def completion(**extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        **extra,
    }


class Probe:
    """What the app saw, for the test to compare with what was stored."""

    def __init__(self) -> None:
        self.late_report_done = threading.Event()
        self.seen: list[dict[str, Any]] = []


def make_app(probe: Probe) -> Starlette:
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        exchange = current_exchange(request)
        assert isinstance(exchange, Exchange)
        assert current_exchange(request.scope) is exchange
        action = body.get("action")
        seen: dict[str, Any] = {"request_id": exchange.request_id, "session_id": exchange.session_id}
        if action == "report":
            exchange.report(**body["report"])
        elif action == "odd":
            exchange.report(
                provider_request={"sent_at": datetime.datetime(2024, 5, 1, 12, 0), "tags": {"a"}},
                provider_response={"raw": b"bytes", "obj": Path("/x/y")},
                metadata={"when": datetime.date(2024, 5, 1)},
                parent_id="p-odd",
            )
        elif action == "session":
            info = await exchange.session()
            seen["session"] = None if info is None else (info.id, info.parent_id, info.chat_id)
        probe.seen.append(seen)
        if action == "late":

            def late() -> None:
                exchange.report(provider_response={"too": "late"}, parent_id="late-parent")
                probe.late_report_done.set()

            return JSONResponse(completion(), background=BackgroundTask(late))
        return JSONResponse(completion())

    async def other(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"exchange": current_exchange(request) is not None})

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"exchange": current_exchange(request) is not None})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", listing, methods=["GET"]),
            Route("/other", other, methods=["POST"]),
        ]
    )


def wrap(app: Any, database_url: str, tmp_path: Path, **options: Any) -> PersistenceMiddleware:
    return PersistenceMiddleware(app, database_url=database_url, spill_dir=str(tmp_path / "spill"), **options)


def test_current_exchange_lookup_and_garbage() -> None:
    assert current_exchange({"type": "http"}) is None
    for garbage in (42, "scope", None, ["type", "http"]):
        with pytest.raises(TypeError):
            current_exchange(garbage)


def test_ids_and_reports_land_in_their_columns(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    probe = Probe()
    middleware = wrap(make_app(probe), database_url, tmp_path)
    report = {
        "provider_request": {"chat_id": "chat-9", "messages": [{"content": "hi"}]},
        "provider_response": {"output": "ok", "usage": {"in": 1}},
        "parent_id": "parent-9",
        "chat_id": "chat-9",
        "provider": "qwen",
        "metadata": {"route": "fast", "tier": 2},
    }
    with serve(middleware) as base, httpx.Client(base_url=base) as http:
        reported = http.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": HI,
                "metadata": {"team": "a"},
                "action": "report",
                "report": report,
            },
        )
        chosen = http.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": HI},
            headers={"x-request-id": "client-rid-1", "x-session-id": "sess-h"},
        )
        other = http.post("/other", json={"model": "m", "messages": HI})
        get = http.get("/v1/chat/completions")
    assert reported.status_code == chosen.status_code == other.status_code == get.status_code == 200
    assert other.json() == get.json() == {"exchange": False}  # not a captured path or method
    assert "x-request-id" not in other.headers and "x-request-id" not in get.headers
    first, second = probe.seen[0], probe.seen[1]
    assert first["request_id"] == reported.headers["x-request-id"]
    assert second["request_id"] == chosen.headers["x-request-id"] == "client-rid-1"
    assert first["session_id"] == hashlib.md5(b"hi").hexdigest() and second["session_id"] == "sess-h"

    (req1, resp1), (req2, resp2) = stored_exchanges(database_url)  # GET and /other recorded nothing
    assert resp1 is not None and resp2 is not None
    assert (req1.request_id, req1.session_id) == (first["request_id"], first["session_id"])
    assert (req2.request_id, req2.session_id) == ("client-rid-1", "sess-h")
    assert req1.qwen_request == report["provider_request"]
    assert resp1.qwen_response == report["provider_response"]
    assert resp1.parent_id == "parent-9" and req1.provider == "qwen"
    assert req1.metadata_ == {"team": "a", "route": "fast", "tier": 2}
    assert (req2.qwen_request, resp2.qwen_response, resp2.parent_id, req2.provider) == (
        None,
        None,
        None,
        None,
    )
    sessions = stored_sessions(database_url)
    assert (sessions[first["session_id"]].parent_id, sessions[first["session_id"]].chat_id) == (
        "parent-9",
        "chat-9",
    )
    assert (sessions["sess-h"].parent_id, sessions["sess-h"].chat_id) == (None, None)


def test_report_after_the_response_ended_is_logged_not_stored(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upgrade(database_url)
    probe = Probe()

    async def run() -> str:
        middleware = wrap(make_app(probe), database_url, tmp_path)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/v1/chat/completions", json={"messages": HI, "action": "late"})
        assert probe.late_report_done.is_set()
        await middleware.aclose()
        return response.headers["x-request-id"]

    with caplog.at_level(logging.WARNING, logger="qwen_persist"):
        request_id = asyncio.run(run())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "report()" in r.getMessage()]
    assert len(warnings) == 1 and request_id in warnings[0].getMessage()
    [(request, response)] = stored_exchanges(database_url)
    assert response is not None and response.status_code == 200
    assert response.qwen_response is None and response.parent_id is None
    assert stored_sessions(database_url)[request.session_id].parent_id is None


def test_values_that_are_not_json_are_stored_as_text(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    probe = Probe()

    async def run() -> PersistenceMiddleware:
        middleware = wrap(make_app(probe), database_url, tmp_path)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            odd = await client.post("/v1/chat/completions", json={"messages": HI, "action": "odd"})
            after = await client.post("/v1/chat/completions", json={"messages": HI})
        assert odd.status_code == after.status_code == 200
        await middleware.aclose()
        return middleware

    middleware = asyncio.run(run())
    stats = middleware.stats()
    assert (stats.written, stats.failed, stats.spilled) == (4, 0, 0)
    (req1, resp1), (_, resp2) = stored_exchanges(database_url)
    assert req1.qwen_request == {"sent_at": "2024-05-01 12:00:00", "tags": "{'a'}"}
    assert resp1 is not None and resp1.qwen_response == {"raw": "b'bytes'", "obj": str(Path("/x/y"))}
    assert req1.metadata_ == {"when": "2024-05-01"}
    assert resp1.parent_id == "p-odd"
    assert resp2 is not None and resp2.status_code == 200  # the writer kept going


def test_follow_up_sees_the_reported_parent_despite_a_long_flush_interval(
    database_url: str, tmp_path: Path
) -> None:
    upgrade(database_url)
    probe = Probe()
    middleware = wrap(make_app(probe), database_url, tmp_path, flush_interval=1.0)
    with serve(middleware) as base, httpx.Client(base_url=base) as http:
        first = http.post("/v1/chat/completions", json={"messages": HI, "action": "session"})
        report = {"parent_id": "parent-1", "chat_id": "chat-1"}
        http.post("/v1/chat/completions", json={"messages": HI, "action": "report", "report": report})
        follow = [*HI, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
        http.post("/v1/chat/completions", json={"messages": follow, "action": "session"})
        report2 = {"parent_id": "parent-2"}
        http.post("/v1/chat/completions", json={"messages": follow, "action": "report", "report": report2})
        http.post("/v1/chat/completions", json={"messages": follow, "action": "session"})
    assert first.status_code == 200
    sid = hashlib.md5(b"hi").hexdigest()
    sessions = [seen["session"] for seen in probe.seen if "session" in seen]
    # The first exchange sees its own (new) session, stored before the app asked.
    assert sessions == [(sid, None, None), (sid, "parent-1", "chat-1"), (sid, "parent-2", "chat-1")]


def test_session_id_read_before_the_body_does_not_pin_a_wrong_session(
    database_url: str, tmp_path: Path
) -> None:
    upgrade(database_url)

    async def early(request: Request) -> JSONResponse:
        exchange = current_exchange(request)
        assert exchange is not None
        _ = exchange.session_id  # asked before the body was read
        await request.body()
        return JSONResponse(completion(session=exchange.session_id))

    app = Starlette(routes=[Route("/v1/chat/completions", early, methods=["POST"])])

    async def run() -> dict[str, Any]:
        middleware = wrap(app, database_url, tmp_path)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/v1/chat/completions", json={"messages": HI})
        await middleware.aclose()
        return response.json()  # type: ignore[no-any-return]

    body = asyncio.run(run())
    sid = hashlib.md5(b"hi").hexdigest()
    [(request, _)] = stored_exchanges(database_url)
    assert request.session_id == body["session"] == sid
