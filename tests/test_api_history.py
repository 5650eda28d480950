"""The history HTTP API (SPEC §8, issue #10 §2): every endpoint and error path, on SQLite and PostgreSQL,
over exchanges written through the real middleware (`traffic.record_traffic`), served by the middleware
itself under real uvicorn and read with httpx.

The answers are checked against the tables as SQLAlchemy's ORM reads them (`support.stored_exchanges`),
not against the repositories the API is built on. Also here: bearer auth (missing, wrong, rotated tokens;
no token from the query string; nothing but the API's own routes affected), SQL injection attempts on
every filter with the row counts compared before and after, the API answering while a long stream is
proxied (and, on PostgreSQL, a read stuck on a table lock holding up no stream), the standalone app
(`create_app`, `uvicorn --factory`, mounted in an admin app) and the middleware's API options.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fake_upstream
import httpx
import openai
import openai_proxy
import pytest
from sqlalchemy import func, select, text, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from support import ROOT, serve, stored_exchanges, stored_sessions
from traffic import Traffic, record_traffic

from qwen_persist import ConfigurationError, PersistenceMiddleware
from qwen_persist.api import create_app
from qwen_persist.config import build_settings
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.repositories import History

TOKENS = ("tok-current", "tok-next")  # two accepted at once: a rotation in progress
SLASH_SESSION = "team/alpha"  # a client's X-Session-Id may hold a slash


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll until ``condition()`` is truthy; generous, since the machine may be busy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def table_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (sessions_table, requests_table, responses_table)
            }
    finally:
        engine.dispose()


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


def arrival(rows: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Exchanges in the requests lists' order, oldest first: by arrival time, then id."""
    return sorted(rows, key=lambda row: (row[0].timestamp, row[0].id))


def failed(response: Any) -> bool:
    return response is not None and (
        response.error is not None or (response.status_code is not None and response.status_code >= 400)
    )


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve(fake_upstream.create_app()) as url:
        yield url


@dataclass
class Live:
    url: str  # the database
    base: str  # the proxy, with the API on
    api: httpx.Client  # to the proxy, with the first token
    traffic: Traffic  # what the clients saw
    slash_ids: list[str]  # X-Request-Ids of the exchanges in SLASH_SESSION, sent with the API on


def proxy(upstream: str, url: str, spill: Path, **options: Any) -> Starlette:
    app: Starlette = openai_proxy.create_app(
        f"{upstream}/v1", "", database_url=url, spill_dir=str(spill), **options
    )
    return app


def stored(api: httpx.Client, request_id: str) -> bool:
    """Whether the exchange is stored with its response."""
    answer = api.get(f"/v1/requests/by-request-id/{request_id}")
    return answer.status_code == 200 and answer.json()["response"] is not None


@pytest.fixture(scope="module")
def live(module_database_url: str, upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Two rounds of recorded traffic, then the proxy served again with the API on (both tokens), and
    a conversation sent through it in a session whose id holds a slash: read-only for the tests."""
    url = module_database_url
    tmp = tmp_path_factory.mktemp("live")
    upgrade(url)
    traffic = record_traffic(url, tmp, rounds=2)
    app = proxy(upstream, url, tmp / "spill-api", api_token=list(TOKENS))
    with serve(app) as base, httpx.Client(base_url=base, headers=bearer(TOKENS[0]), timeout=30) as api:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0)
        slash_ids = []
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="fake-text",
                messages=[{"role": "user", "content": f"slash {stream}"}],
                stream=stream,
                extra_headers={"x-session-id": SLASH_SESSION},
            )
            parsed: Any = raw.parse()
            if stream:
                assert [chunk.id for chunk in parsed]
            slash_ids.append(raw.headers["x-request-id"])
        for request_id in slash_ids:
            wait_for(lambda request_id=request_id: stored(api, request_id), "the exchange to be stored")
        yield Live(url, base, api, traffic, slash_ids)


def every(api: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a list, page by page through its cursor."""
    items: list[dict[str, Any]] = []
    after = None
    while True:
        query = {**params, **({"after": after} if after is not None else {})}
        answer = api.get(path, params=query)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        items += body["data"]
        if not body["has_more"]:
            return items
        after = body["last_id"]


def assert_error(answer: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
        assert error["type"] == "invalid_request_error"
    return error


# ------------------------------------------------------------------------------------------- auth

# Every route, with a path that exists in the live data where it matters.
ROUTES = [
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/s-alpha"),
    ("GET", "/v1/sessions/s-alpha/requests"),
    ("GET", "/v1/sessions/s-alpha/stats"),
    ("DELETE", "/v1/sessions/s-alpha"),
    ("POST", "/v1/sessions/purge-expired"),
    ("GET", "/v1/requests"),
    ("GET", "/v1/requests/1"),
    ("GET", "/v1/requests/by-request-id/x"),
    ("DELETE", "/v1/requests/1"),
    ("GET", "/v1/responses"),
    ("GET", "/v1/responses/1"),
    ("GET", "/v1/responses/stats"),
    ("GET", "/v1/stats"),
]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, "Missing", id="missing"),
        pytest.param(bearer("tok-wrong"), "Invalid", id="wrong"),
        pytest.param(bearer(TOKENS[0] + "x"), "Invalid", id="longer"),
        pytest.param(bearer(TOKENS[0][:-1]), "Invalid", id="prefix"),
        pytest.param({"Authorization": TOKENS[0]}, "Missing", id="no-scheme"),
        pytest.param({"Authorization": f"Basic {TOKENS[0]}"}, "Missing", id="basic-scheme"),
        pytest.param({"X-Api-Key": TOKENS[0]}, "Missing", id="other-header"),
    ],
)
def test_every_route_refuses_a_missing_or_wrong_token(
    live: Live, headers: dict[str, str], message: str
) -> None:
    before = table_counts(live.url)
    with httpx.Client(base_url=live.base, headers=headers) as client:
        for method, path in ROUTES:
            answer = client.request(method, path)
            error = assert_error(answer, 401)
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
            assert message in error["message"]
            assert answer.headers["www-authenticate"] == "Bearer"
    assert table_counts(live.url) == before  # the DELETE and the purge did nothing


def test_both_tokens_of_a_rotation_are_accepted(live: Live) -> None:
    for token in TOKENS:
        answer = httpx.get(f"{live.base}/v1/requests", headers=bearer(token), params={"limit": 1})
        assert answer.status_code == 200 and len(answer.json()["data"]) == 1
    # The scheme is case-insensitive (RFC 7235); the token is not.
    assert (
        httpx.get(f"{live.base}/v1/stats", headers={"Authorization": f"bearer {TOKENS[1]}"}).status_code
        == 200
    )
    assert httpx.get(f"{live.base}/v1/stats", headers=bearer(TOKENS[1].upper())).status_code == 401


@pytest.mark.parametrize("name", ["access_token", "token", "api_key", "authorization", "bearer"])
def test_a_token_in_the_query_string_is_not_accepted(live: Live, name: str) -> None:
    answer = httpx.get(f"{live.base}/v1/sessions", params={name: TOKENS[0]})
    assert_error(answer, 401)
    # With a good header the token-looking parameter is still a mistake, not silently ignored.
    answer = httpx.get(f"{live.base}/v1/sessions", params={name: TOKENS[0]}, headers=bearer(TOKENS[0]))
    assert_error(answer, 400, name)


def test_the_proxied_traffic_is_not_affected_by_the_api(live: Live) -> None:
    # The conversation the fixture sent through the API-enabled proxy, with the SDK's own bearer key
    # (not an API token), was answered and stored.
    records = [live.api.get(f"/v1/requests/by-request-id/{rid}").json() for rid in live.slash_ids]
    assert [record["response"]["status_code"] for record in records] == [200, 200]
    assert {record["session_id"] for record in records} == {SLASH_SESSION}
    # A non-API path under the prefix goes to the app, whatever token comes with it.
    for headers in ({}, bearer("tok-wrong"), bearer(TOKENS[0])):
        answer = httpx.get(f"{live.base}/v1/models", headers=headers)
        assert answer.status_code == 200
        assert {model["id"] for model in answer.json()["data"]} >= {"fake-text", "fake-slow"}
    # The API's paths with a method it does not serve go to the app too (which has no such route).
    answer = httpx.put(f"{live.base}/v1/sessions", headers=bearer(TOKENS[0]))
    assert answer.status_code in (404, 405) and "error" not in answer.text
    answer = httpx.post(f"{live.base}/v1/requests", headers={})
    assert answer.status_code in (404, 405) and "error" not in answer.text


# ------------------------------------------------------------------------------------------- shapes

LISTS = ["/v1/sessions", "/v1/requests", "/v1/responses", "/v1/sessions/s-alpha/requests"]


@pytest.mark.parametrize("path", LISTS)
def test_lists_share_one_shape(live: Live, path: str) -> None:
    first = live.api.get(path, params={"limit": 2}).json()
    assert set(first) == {"object", "data", "first_id", "last_id", "has_more", "limit", "offset"}
    assert first["object"] == "list" and first["limit"] == 2 and first["offset"] == 0
    assert first["has_more"] is True and len(first["data"]) == 2
    key = "id"
    assert first["first_id"] == first["data"][0][key] and first["last_id"] == first["data"][-1][key]

    counted = live.api.get(path, params={"limit": 2, "offset": 1, "total": "true"}).json()
    assert counted["offset"] == 1 and counted["data"][0] == first["data"][1]
    assert counted["total"] == len(every(live.api, path, limit=1000))

    following = live.api.get(path, params={"limit": 2, "after": first["last_id"]}).json()
    assert set(following) == {"object", "data", "first_id", "last_id", "has_more", "limit", "after"}
    assert following["after"] == first["last_id"]
    assert following["data"][0] == counted["data"][1]  # the row after the cursor is the third one


def test_dates_and_ids_are_the_stored_values(live: Live) -> None:
    rows = stored_exchanges(live.url)
    request, response = rows[0]
    assert response is not None
    body = live.api.get(f"/v1/requests/{request.id}").json()
    assert body["id"] == request.id and body["request_id"] == request.request_id
    assert body["timestamp"] == request.timestamp and isinstance(body["timestamp"], int)
    assert body["created_at"] == request.created_at
    assert body["openai_request"] == request.openai_request
    assert body["response"]["id"] == response.id and body["response"]["request_id"] == request.id
    assert body["response"]["timestamp"] == response.timestamp
    assert body["response"]["openai_response"] == response.openai_response
    session = live.api.get(f"/v1/sessions/{request.session_id}").json()
    row = stored_sessions(live.url)[request.session_id]
    assert (session["created_at"], session["expires_at"]) == (row.created_at, row.expires_at)


# ------------------------------------------------------------------------------------------- sessions


def test_list_sessions_in_every_order_and_page_size(live: Live) -> None:
    sessions = stored_sessions(live.url)
    newest = sorted(sessions.values(), key=lambda s: (s.last_accessed, s.id), reverse=True)
    assert [s["id"] for s in every(live.api, "/v1/sessions", limit=1000)] == [s.id for s in newest]
    assert [s["id"] for s in every(live.api, "/v1/sessions", limit=3)] == [s.id for s in newest]
    assert [s["id"] for s in every(live.api, "/v1/sessions", limit=3, order="asc")] == [
        s.id for s in reversed(newest)
    ]
    by_created = sorted(sessions.values(), key=lambda s: (s.created_at, s.id))
    assert [
        s["id"] for s in every(live.api, "/v1/sessions", limit=4, order_by="created_at", order="asc")
    ] == [s.id for s in by_created]
    offsets = []
    for offset in range(0, len(sessions), 4):
        offsets += live.api.get("/v1/sessions", params={"limit": 4, "offset": offset}).json()["data"]
    assert [s["id"] for s in offsets] == [s.id for s in newest]
    assert {SLASH_SESSION, "s-alpha", "s-beta"} <= set(sessions)


def test_list_sessions_filters(live: Live) -> None:
    sessions = stored_sessions(live.url)
    assert len(every(live.api, "/v1/sessions", active="true")) == len(sessions)  # none has expired
    assert every(live.api, "/v1/sessions", active="false") == []
    created = sorted(s.created_at for s in sessions.values())
    middle = created[len(created) // 2]
    since = {s["id"] for s in every(live.api, "/v1/sessions", since=middle)}
    assert since == {s.id for s in sessions.values() if s.created_at >= middle}
    until = {s["id"] for s in every(live.api, "/v1/sessions", until=middle)}
    assert until == {s.id for s in sessions.values() if s.created_at <= middle}
    assert since & until and since | until == set(sessions)
    assert {s["id"] for s in every(live.api, "/v1/sessions", since=iso(middle))} == since


def test_get_session_with_its_request_count(live: Live) -> None:
    rows = stored_exchanges(live.url)
    for session_id in ("s-alpha", "s-beta", SLASH_SESSION):
        body = live.api.get(f"/v1/sessions/{session_id}").json()
        assert body["id"] == session_id
        assert body["request_count"] == sum(1 for request, _ in rows if request.session_id == session_id)
        assert body["request_count"] > 0
        assert body["first_user_message"] == stored_sessions(live.url)[session_id].first_user_message
    error = assert_error(live.api.get("/v1/sessions/no-such-session"), 404)
    assert error["code"] == "not_found" and "no-such-session" in error["message"]


def test_session_requests_oldest_first(live: Live) -> None:
    rows = arrival([(q, r) for q, r in stored_exchanges(live.url) if q.session_id == "s-alpha"])
    listed = every(live.api, "/v1/sessions/s-alpha/requests", limit=3)
    assert [item["id"] for item in listed] == [request.id for request, _ in rows]
    assert all(item["session_id"] == "s-alpha" for item in listed)
    assert [item["response"]["id"] for item in listed] == [response.id for _, response in rows if response]
    newest = every(live.api, "/v1/sessions/s-alpha/requests", order="desc")
    assert [item["id"] for item in newest] == [request.id for request, _ in reversed(rows)]
    text_only = every(live.api, "/v1/sessions/s-alpha/requests", model="fake-text")
    assert [item["id"] for item in text_only] == [q.id for q, _ in rows if q.model == "fake-text"]
    slash = every(live.api, f"/v1/sessions/{SLASH_SESSION}/requests")
    assert [item["request_id"] for item in slash] == live.slash_ids
    assert_error(live.api.get("/v1/sessions/no-such-session/requests"), 404)


def test_session_stats(live: Live) -> None:
    rows = [(q, r) for q, r in stored_exchanges(live.url) if q.session_id == "s-beta"]
    body = live.api.get("/v1/sessions/s-beta/stats").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    (figures,) = body["data"]
    assert figures["count"] == len(rows) and figures["errors"] == len(rows)  # s-beta holds the errors
    assert figures["success_rate"] == 0.0
    grouped = live.api.get("/v1/sessions/s-alpha/stats", params={"group_by": "model"}).json()["data"]
    alpha = [q for q, _ in stored_exchanges(live.url) if q.session_id == "s-alpha"]
    assert {row["group"]["model"]: row["count"] for row in grouped} == {
        model: sum(1 for q in alpha if q.model == model) for model in {q.model for q in alpha}
    }
    assert_error(live.api.get("/v1/sessions/no-such-session/stats"), 404)


# ------------------------------------------------------------------------------------------- requests


REQUEST_FILTERS: list[tuple[dict[str, str], Callable[[Any, Any], bool]]] = [
    ({"session_id": "s-beta"}, lambda q, r: q.session_id == "s-beta"),
    ({"model": "fake-text"}, lambda q, r: q.model == "fake-text"),
    ({"stream": "true"}, lambda q, r: q.stream),
    ({"stream": "0"}, lambda q, r: not q.stream),
    ({"has_error": "true"}, lambda q, r: failed(r)),
    ({"has_error": "false"}, lambda q, r: not failed(r)),
    ({"status_code": "429"}, lambda q, r: r is not None and r.status_code == 429),
    ({"model": "fake-text", "stream": "true"}, lambda q, r: q.model == "fake-text" and q.stream),
    (
        {"session_id": "s-alpha", "model": "fake-tool"},
        lambda q, r: q.session_id == "s-alpha" and q.model == "fake-tool",
    ),
    ({"model": "no-such-model"}, lambda q, r: False),
]


@pytest.mark.parametrize(
    ("params", "expected"), REQUEST_FILTERS, ids=lambda v: str(v) if isinstance(v, dict) else None
)
def test_list_requests_filters(
    live: Live, params: dict[str, str], expected: Callable[[Any, Any], bool]
) -> None:
    rows = arrival(stored_exchanges(live.url))
    listed = every(live.api, "/v1/requests", limit=5, **params)
    assert [item["id"] for item in listed] == [q.id for q, r in reversed(rows) if expected(q, r)]
    if params != {"model": "no-such-model"}:
        assert listed


def test_list_requests_time_range(live: Live) -> None:
    rows = stored_exchanges(live.url)
    stamps = sorted(q.timestamp for q, _ in rows)
    low, high = stamps[len(stamps) // 4], stamps[3 * len(stamps) // 4]
    zulu = (iso(low).replace("+00:00", "Z"), iso(high).replace("+00:00", "z"))
    for since, until in ((low, high), (iso(low), iso(high)), zulu):
        listed = every(live.api, "/v1/requests", since=since, until=until)
        assert sorted(item["id"] for item in listed) == sorted(
            q.id for q, _ in rows if low <= q.timestamp <= high
        )
    assert every(live.api, "/v1/requests", since=stamps[-1] + 1) == []
    assert len(every(live.api, "/v1/requests", until=stamps[-1])) == len(rows)


def test_list_requests_pages_cover_every_row_once(live: Live) -> None:
    ids = [q.id for q, _ in arrival(stored_exchanges(live.url))]
    assert [item["id"] for item in every(live.api, "/v1/requests", limit=7)] == ids[::-1]
    assert [item["id"] for item in every(live.api, "/v1/requests", limit=7, order="asc")] == ids
    by_id = sorted(ids)
    assert [
        item["id"] for item in every(live.api, "/v1/requests", limit=3, order_by="id", order="asc")
    ] == by_id
    by_offset = []
    for offset in range(0, len(ids) + 7, 7):
        page = live.api.get("/v1/requests", params={"limit": 7, "offset": offset}).json()
        by_offset += page["data"]
        assert page["has_more"] == (offset + 7 < len(ids))
    assert [item["id"] for item in by_offset] == ids[::-1]
    assert live.api.get("/v1/requests", params={"total": "1", "limit": 1}).json()["total"] == len(ids)


def test_every_exchange_by_id_and_by_request_id(live: Live) -> None:
    rows = {q.request_id: (q, r) for q, r in stored_exchanges(live.url)}
    assert len(live.traffic.seen) == 20
    for seen in live.traffic.seen:
        by_request_id = live.api.get(f"/v1/requests/by-request-id/{seen.request_id}")
        assert by_request_id.status_code == 200
        body = by_request_id.json()
        request, _ = rows[seen.request_id]
        assert (body["id"], body["model"], body["stream"]) == (request.id, seen.model, seen.stream)
        assert body["response"]["status_code"] == seen.status
        if seen.completion_id is not None:
            assert body["response"]["upstream_id"] == seen.completion_id
        if seen.metadata:
            assert body["metadata"] == seen.metadata
        assert live.api.get(f"/v1/requests/{request.id}").json() == body


def test_request_ids_are_never_read_as_numbers(live: Live) -> None:
    seen = live.traffic.seen[0]
    error = assert_error(live.api.get(f"/v1/requests/{seen.request_id}"), 400, "id")
    assert f"/v1/requests/by-request-id/{seen.request_id}" in error["message"]
    assert_error(live.api.get("/v1/requests/1e3"), 400, "id")
    assert_error(live.api.get("/v1/requests/0"), 400, "id")
    assert_error(live.api.get("/v1/requests/-1"), 400, "id")
    assert_error(live.api.get("/v1/requests/999999"), 404)
    assert_error(live.api.get("/v1/requests/by-request-id/999999"), 404)
    assert_error(live.api.get("/v1/requests/by-request-id/no-such-id"), 404)


# ------------------------------------------------------------------------------------------- responses


RESPONSE_FILTERS: list[tuple[dict[str, str], Callable[[Any, Any], bool]]] = [
    ({"session_id": "s-alpha"}, lambda q, r: r.session_id == "s-alpha"),
    ({"finish_reason": "length"}, lambda q, r: r.finish_reason == "length"),
    ({"finish_reason": "tool_calls"}, lambda q, r: r.finish_reason == "tool_calls"),
    ({"has_error": "true"}, lambda q, r: failed(r)),
    ({"has_error": "false"}, lambda q, r: not failed(r)),
    ({"session_id": "s-beta", "has_error": "false"}, lambda q, r: False),
]


@pytest.mark.parametrize(
    ("params", "expected"), RESPONSE_FILTERS, ids=lambda v: str(v) if isinstance(v, dict) else None
)
def test_list_responses_filters(
    live: Live, params: dict[str, str], expected: Callable[[Any, Any], bool]
) -> None:
    rows = [(q, r) for q, r in stored_exchanges(live.url) if r is not None]
    listed = every(live.api, "/v1/responses", limit=4, **params)
    want = sorted(((r.timestamp, r.id) for q, r in rows if expected(q, r)), reverse=True)
    assert [item["id"] for item in listed] == [id for _, id in want]


def test_list_responses_by_request_and_time(live: Live) -> None:
    rows = [(q, r) for q, r in stored_exchanges(live.url) if r is not None]
    request, response = rows[3]
    (only,) = every(live.api, "/v1/responses", request_id=request.id)
    assert only["id"] == response.id and only["request_id"] == request.id
    stamps = sorted(r.timestamp for _, r in rows)
    low, high = stamps[5], stamps[-5]
    listed = every(live.api, "/v1/responses", since=low, until=high, order="asc")
    assert [item["id"] for item in listed] == [
        r.id
        for r in sorted((r for _, r in rows if low <= r.timestamp <= high), key=lambda r: (r.timestamp, r.id))
    ]


def test_get_response(live: Live) -> None:
    for request, response in stored_exchanges(live.url)[:4]:
        assert response is not None
        body = live.api.get(f"/v1/responses/{response.id}").json()
        assert (body["id"], body["request_id"], body["status_code"]) == (
            response.id,
            request.id,
            response.status_code,
        )
        assert body["openai_response"] == response.openai_response
    assert_error(live.api.get("/v1/responses/999999"), 404)
    assert_error(live.api.get("/v1/responses/resp-abc"), 400, "id")


# ------------------------------------------------------------------------------------------- stats


def test_stats_over_everything_and_grouped(live: Live) -> None:
    rows = stored_exchanges(live.url)
    (overall,) = live.api.get("/v1/stats").json()["data"]
    errors = sum(1 for _, r in rows if failed(r))
    assert overall["group"] == {} and overall["count"] == len(rows)
    assert overall["errors"] == errors and overall["succeeded"] == len(rows) - errors
    assert overall["pending"] == 0
    assert overall["success_rate"] == pytest.approx((len(rows) - errors) / len(rows))
    assert overall["total_tokens"] == sum(r.total_tokens or 0 for _, r in rows if r is not None)
    assert set(overall["duration_ms"]) == {"p50", "p95", "p99"}

    by_model = live.api.get("/v1/stats", params={"group_by": "model"}).json()["data"]
    models = sorted({q.model for q, _ in rows})
    assert [row["group"] for row in by_model] == [{"model": model} for model in models]
    assert {row["group"]["model"]: row["count"] for row in by_model} == {
        model: sum(1 for q, _ in rows if q.model == model) for model in models
    }
    assert {row["group"]["model"]: row["success_rate"] for row in by_model}["fake-error-429"] == 0.0

    days = {datetime.fromtimestamp(q.timestamp / 1000, timezone.utc).date().isoformat() for q, _ in rows}
    by_day = live.api.get("/v1/stats", params={"group_by": "model,day"}).json()["data"]
    assert {row["group"]["day"] for row in by_day} == days
    assert sum(row["count"] for row in by_day) == len(rows)
    by_hour = live.api.get("/v1/stats", params={"group_by": "hour"}).json()["data"]
    assert sum(row["count"] for row in by_hour) == len(rows)
    assert all(row["group"]["hour"].endswith(":00Z") for row in by_hour)


def test_stats_take_the_request_filters(live: Live) -> None:
    rows = stored_exchanges(live.url)
    params = {"model": "fake-text", "stream": "true", "group_by": "model"}
    (row,) = live.api.get("/v1/stats", params=params).json()["data"]
    assert row["count"] == sum(1 for q, _ in rows if q.model == "fake-text" and q.stream)
    assert (
        live.api.get("/v1/responses/stats", params=params).json()
        == live.api.get("/v1/stats", params=params).json()
    )
    (errors,) = live.api.get("/v1/stats", params={"has_error": "true"}).json()["data"]
    assert errors["count"] == errors["errors"] == sum(1 for _, r in rows if failed(r))
    (nothing,) = live.api.get("/v1/stats", params={"model": "no-such-model"}).json()["data"]
    assert nothing["count"] == 0 and nothing["success_rate"] is None
    assert (
        live.api.get("/v1/stats", params={"model": "no-such-model", "group_by": "model"}).json()["data"] == []
    )


# ------------------------------------------------------------------------------------------- bad parameters

BAD = [
    # (path, query, the parameter the 400 names)
    *[
        (path, query, param)
        for path in ("/v1/requests", "/v1/sessions", "/v1/responses", "/v1/sessions/s-alpha/requests")
        for query, param in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=x", "limit"),
            ("limit=1.5", "limit"),
            ("offset=-1", "offset"),
            ("offset=x", "offset"),
            ("since=yesterday", "since"),
            ("until=2026-13-45", "until"),
            ("since=-5", "since"),
            ("since=2026-11-25&until=2026-11-24", "until"),
            ("since=1795500000000&until=1795400000000", "until"),
            ("order_by=model", "order_by"),
            ("order_by=timestamp%20desc", "order_by"),
            ("order=up", "order"),
            ("total=perhaps", "total"),
            ("after=1&offset=2", "after"),
            ("modle=x", "modle"),
            ("limit=5&limit=6", "limit"),
            ("since=", "since"),
        ]
    ],
    ("/v1/requests", "after=abc", "after"),
    ("/v1/requests", "after=999999", "after"),
    ("/v1/requests", "stream=maybe", "stream"),
    ("/v1/requests", "has_error=2", "has_error"),
    ("/v1/requests", "status_code=99", "status_code"),
    ("/v1/requests", "status_code=600", "status_code"),
    ("/v1/requests", "status_code=abc", "status_code"),
    ("/v1/requests", "model=", "model"),
    ("/v1/requests", "include=response", "include"),
    ("/v1/sessions", "active=x", "active"),
    ("/v1/sessions", "after=no-such-session", "after"),
    ("/v1/sessions", "order_by=id", "order_by"),
    ("/v1/sessions", "model=fake-text", "model"),
    ("/v1/responses", "request_id=abc", "request_id"),
    ("/v1/responses", "request_id=0", "request_id"),
    ("/v1/responses", "has_error=yes%20please", "has_error"),
    ("/v1/responses", "status_code=200", "status_code"),
    ("/v1/responses", "after=abc", "after"),
    ("/v1/sessions/s-alpha/requests", "session_id=s-beta", "session_id"),
    ("/v1/stats", "group_by=week", "group_by"),
    ("/v1/stats", "group_by=day,hour", "group_by"),
    ("/v1/stats", "group_by=model,", "group_by"),
    ("/v1/stats", "limit=10", "limit"),
    ("/v1/stats", "since=soon", "since"),
    ("/v1/stats", "since=2026-11-25&until=2026-11-24", "until"),
    ("/v1/stats", "stream=2", "stream"),
    ("/v1/responses/stats", "group_by=user", "group_by"),
    ("/v1/sessions/s-alpha/stats", "group_by=session", "group_by"),
    ("/v1/sessions/s-alpha/stats", "session_id=s-beta", "session_id"),
    ("/v1/sessions/s-alpha", "limit=1", "limit"),
    ("/v1/requests/1", "include=response", "include"),
    ("/v1/requests/abc", "", "id"),
    ("/v1/responses/abc", "", "id"),
    ("/v1/responses/1", "x=1", "x"),
]


@pytest.mark.parametrize(("path", "query", "param"), BAD, ids=[f"{p}?{q}" for p, q, _ in BAD])
def test_bad_parameters_are_400s_naming_them(live: Live, path: str, query: str, param: str) -> None:
    answer = live.api.get(f"{path}?{query}" if query else path)
    error = assert_error(answer, 400, param)
    assert error["code"] == "invalid_parameter"


def test_bad_parameters_on_deletes_and_the_purge_change_nothing(live: Live) -> None:
    before = table_counts(live.url)
    assert_error(live.api.delete("/v1/requests/abc"), 400, "id")
    assert_error(live.api.delete(f"/v1/requests/{live.traffic.seen[0].request_id}"), 400, "id")
    assert_error(live.api.delete("/v1/requests/1?cascade=true"), 400, "cascade")
    assert_error(live.api.delete("/v1/sessions/s-alpha?force=1"), 400, "force")
    assert_error(live.api.post("/v1/sessions/purge-expired?older_than=1d"), 400, "older_than")
    assert_error(live.api.delete("/v1/requests/999999"), 404)
    assert_error(live.api.delete("/v1/sessions/no-such-session"), 404)
    assert table_counts(live.url) == before


def test_the_hint_for_a_non_numeric_id_fits_the_method(live: Live) -> None:
    """The by-request-id route only reads: a DELETE is told how to find the numeric id, not sent there."""
    request_id = live.traffic.seen[0].request_id
    lookup = f"/v1/requests/by-request-id/{request_id}"
    got = assert_error(live.api.get(f"/v1/requests/{request_id}"), 400, "id")
    assert f"look up an X-Request-Id at {lookup}" in got["message"]
    deleting = assert_error(live.api.delete(f"/v1/requests/{request_id}"), 400, "id")
    assert f"GET {lookup} gives its numeric id" in deleting["message"], deleting
    assert live.api.delete(lookup).status_code in (404, 405)  # where the GET hint would have sent it
    numeric = live.api.get(lookup).json()["id"]  # and the hint, followed, gives the id DELETE takes
    assert isinstance(numeric, int) and live.api.get(f"/v1/requests/{numeric}").status_code == 200


# ------------------------------------------------------------------------------------------- injection

INJECTIONS = [
    ("GET", "/v1/requests", {"model": "x' OR '1'='1"}),
    ("GET", "/v1/requests", {"session_id": "'; DROP TABLE requests; --"}),
    ("GET", "/v1/requests", {"session_id": 's-alpha" OR 1=1 --'}),
    ("GET", "/v1/requests", {"order_by": "timestamp; DROP TABLE requests"}),
    ("GET", "/v1/requests", {"order_by": "(SELECT 1)"}),
    ("GET", "/v1/requests", {"order": "desc; DROP TABLE requests"}),
    ("GET", "/v1/requests", {"since": "0; DROP TABLE requests"}),
    ("GET", "/v1/requests", {"until": "1 OR 1=1"}),
    ("GET", "/v1/requests", {"status_code": "200 OR 1=1"}),
    ("GET", "/v1/requests", {"stream": "true OR 1=1"}),
    ("GET", "/v1/requests", {"after": "1 OR 1=1"}),
    ("GET", "/v1/requests", {"limit": "1; DROP TABLE requests"}),
    ("GET", "/v1/requests", {"offset": "0 UNION SELECT * FROM sessions"}),
    ("GET", "/v1/sessions", {"order_by": "created_at; DROP TABLE sessions"}),
    ("GET", "/v1/sessions", {"after": "' OR 1=1 --"}),
    ("GET", "/v1/sessions", {"active": "1 OR 1=1"}),
    ("GET", "/v1/responses", {"finish_reason": "stop' OR '1'='1"}),
    ("GET", "/v1/responses", {"session_id": "x' UNION SELECT id FROM requests --"}),
    ("GET", "/v1/responses", {"request_id": "1 OR 1=1"}),
    ("GET", "/v1/responses", {"has_error": "true; DELETE FROM responses"}),
    ("GET", "/v1/stats", {"group_by": "model; DROP TABLE requests"}),
    ("GET", "/v1/stats", {"model": "' OR ''='"}),
    ("GET", "/v1/sessions/x' OR '1'='1/requests", {}),
    ("GET", "/v1/sessions/'; DROP TABLE sessions; --", {}),
    ("GET", "/v1/requests/1 OR 1=1", {}),
    ("GET", "/v1/requests/by-request-id/' OR '1'='1", {}),
    ("GET", "/v1/responses/1; DELETE FROM responses", {}),
    ("DELETE", "/v1/sessions/' OR '1'='1", {}),
    ("DELETE", "/v1/sessions/s-alpha' OR '1'='1", {}),
    ("DELETE", "/v1/requests/1 OR 1=1", {}),
    ("DELETE", "/v1/requests/1; DELETE FROM requests", {}),
]


@pytest.mark.parametrize(
    ("method", "path", "params"), INJECTIONS, ids=[f"{m} {p} {q}" for m, p, q in INJECTIONS]
)
def test_sql_injection_finds_nothing_and_changes_nothing(
    live: Live, method: str, path: str, params: dict[str, str]
) -> None:
    before = table_counts(live.url)
    answer = live.api.request(method, path, params=params)
    assert answer.status_code in (200, 400, 404), answer.text
    if answer.status_code == 200:
        data = answer.json()["data"]
        # An empty answer: no row, or stats over no row.
        assert data == [] or [row["count"] for row in data] == [0]
    assert table_counts(live.url) == before


# Every text a route reads, with a NUL in it: (method, path, query, the parameter the 400 names).
NULS = [
    ("GET", "/v1/sessions", "after=s-alpha%00", "after"),
    ("GET", "/v1/sessions", "order_by=created_at%00", "order_by"),
    ("GET", "/v1/sessions/s-alpha%00", "", "session_id"),
    ("GET", "/v1/sessions/s-alpha%00/requests", "", "session_id"),
    ("GET", "/v1/sessions/s-alpha/requests", "model=fake-text%00", "model"),
    ("GET", "/v1/sessions/s-alpha%00/stats", "", "session_id"),
    ("GET", "/v1/sessions/s-alpha/stats", "group_by=model%00", "group_by"),
    ("DELETE", "/v1/sessions/s-alpha%00", "", "session_id"),
    ("GET", "/v1/requests", "session_id=s-alpha%00", "session_id"),
    ("GET", "/v1/requests", "model=fake-text%00", "model"),
    ("GET", "/v1/requests/1%00", "", "id"),
    ("DELETE", "/v1/requests/1%00", "", "id"),
    ("GET", "/v1/requests/by-request-id/x%00", "", "request_id"),
    ("GET", "/v1/responses", "session_id=s-alpha%00", "session_id"),
    ("GET", "/v1/responses", "finish_reason=stop%00", "finish_reason"),
    ("GET", "/v1/responses/1%00", "", "id"),
    ("GET", "/v1/responses/stats", "model=fake-text%00", "model"),
    ("GET", "/v1/stats", "session_id=s-alpha%00", "session_id"),
    ("GET", "/v1/chat/completions", "model=fake-text%00", "model"),
    ("GET", "/v1/chat/completions", "after=chatcmpl-x%00", "after"),
    ("GET", "/v1/chat/completions/chatcmpl-x%00", "", "completion_id"),
    ("POST", "/v1/chat/completions/chatcmpl-x%00", "", "completion_id"),
    ("DELETE", "/v1/chat/completions/chatcmpl-x%00", "", "completion_id"),
    ("GET", "/v1/chat/completions/chatcmpl-x%00/messages", "", "completion_id"),
    ("GET", "/v1/chat/completions/chatcmpl-x/messages", "after=x%00", "after"),
    ("GET", "/v1/stats", "api-version=1&model=%00", "model"),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "param"), NULS, ids=[f"{m} {p} {q}" for m, p, q, _ in NULS]
)
def test_a_nul_in_any_parameter_is_a_400_naming_it(
    live: Live, caplog: pytest.LogCaptureFixture, method: str, path: str, query: str, param: str
) -> None:
    """The same answer on both databases (PostgreSQL cannot compare text with NUL: it was a 503 and an
    ERROR line there), and nothing changed."""
    before = table_counts(live.url)
    body = {"metadata": {}} if method == "POST" else None
    answer = live.api.request(method, f"{path}?{query}" if query else path, json=body)
    error = assert_error(answer, 400, param)
    assert "NUL" in error["message"]
    assert "could not answer" not in caplog.text
    assert table_counts(live.url) == before


def test_a_nul_in_a_metadata_filter_is_matched_as_sent(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    """Metadata may hold NUL (stored escaped); its filter looks for it rather than refusing it."""
    for query in ("metadata[tag%00]=x", "metadata[tag]=x%00"):
        answer = live.api.get(f"/v1/chat/completions?{query}")
        assert answer.status_code == 200 and answer.json()["data"] == [], answer.text
    assert "could not answer" not in caplog.text


# ------------------------------------------------------------------------------------------- mutations


@dataclass
class Fresh:
    url: str
    api: httpx.Client
    base: str
    traffic: Traffic


@pytest.fixture
def fresh(migrated_url: str, upstream: str, tmp_path: Path) -> Iterator[Fresh]:
    """One round of recorded traffic in a database of the test's own, and the proxy with the API on;
    its sessions expire after one second (only those it records itself, the recorded ones live on)."""
    traffic = record_traffic(migrated_url, tmp_path, rounds=1)
    app = proxy(upstream, migrated_url, tmp_path / "spill-api", api_token=TOKENS[1], session_ttl=1)
    with serve(app) as base, httpx.Client(base_url=base, headers=bearer(TOKENS[1]), timeout=30) as api:
        yield Fresh(migrated_url, api, base, traffic)


def test_delete_session_cascades_to_its_exchanges(fresh: Fresh) -> None:
    rows = stored_exchanges(fresh.url)
    alpha = [(q, r) for q, r in rows if q.session_id == "s-alpha"]
    assert alpha
    before = table_counts(fresh.url)
    answer = fresh.api.delete("/v1/sessions/s-alpha")
    assert answer.status_code == 200
    assert answer.json() == {"id": "s-alpha", "object": "session.deleted", "deleted": True}
    assert table_counts(fresh.url) == {
        "sessions": before["sessions"] - 1,
        "requests": before["requests"] - len(alpha),
        "responses": before["responses"] - len(alpha),
    }
    assert "s-alpha" not in stored_sessions(fresh.url)
    assert [q.id for q, _ in stored_exchanges(fresh.url)] == [
        q.id for q, _ in rows if q.session_id != "s-alpha"
    ]
    assert_error(fresh.api.get("/v1/sessions/s-alpha"), 404)
    assert_error(fresh.api.get(f"/v1/requests/{alpha[0][0].id}"), 404)
    assert_error(fresh.api.delete("/v1/sessions/s-alpha"), 404)


def test_a_session_id_ending_in_a_route_suffix_as_the_readme_says(fresh: Fresh) -> None:
    """``team/stats``: its GET routes need the suffix spelled out, its detail is out of reach by path (the
    path reads as session ``team``'s stats), the filters and DELETE reach it."""
    client = openai.OpenAI(base_url=f"{fresh.base}/v1", api_key="sk-client", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-text",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-session-id": "team/stats"},
    )
    request_id = raw.headers["x-request-id"]
    wait_for(lambda: stored(fresh.api, request_id), "the exchange to be stored")
    assert_error(fresh.api.get("/v1/sessions/team/stats"), 404)  # session "team"'s stats: no such session
    (figures,) = fresh.api.get("/v1/sessions/team/stats/stats").json()["data"]
    assert figures["count"] == 1
    assert [r["request_id"] for r in fresh.api.get("/v1/sessions/team/stats/requests").json()["data"]] == [
        request_id
    ]
    listed = fresh.api.get("/v1/requests", params={"session_id": "team/stats", "order": "asc"}).json()["data"]
    assert [r["request_id"] for r in listed] == [request_id]
    (figures,) = fresh.api.get("/v1/stats", params={"session_id": "team/stats"}).json()["data"]
    assert figures["count"] == 1
    answer = fresh.api.delete("/v1/sessions/team/stats")
    assert answer.json() == {"id": "team/stats", "object": "session.deleted", "deleted": True}
    assert "team/stats" not in stored_sessions(fresh.url)


def test_delete_request_with_its_response(fresh: Fresh) -> None:
    rows = stored_exchanges(fresh.url)
    request, response = rows[2]
    assert response is not None
    before = table_counts(fresh.url)
    answer = fresh.api.delete(f"/v1/requests/{request.id}")
    assert answer.json() == {"id": request.id, "object": "request.deleted", "deleted": True}
    assert table_counts(fresh.url) == {
        **before,
        "requests": before["requests"] - 1,
        "responses": before["responses"] - 1,
    }
    assert request.session_id in stored_sessions(fresh.url)  # the session stays
    assert_error(fresh.api.get(f"/v1/requests/{request.id}"), 404)
    assert_error(fresh.api.get(f"/v1/requests/by-request-id/{request.request_id}"), 404)
    assert_error(fresh.api.get(f"/v1/responses/{response.id}"), 404)
    assert_error(fresh.api.delete(f"/v1/requests/{request.id}"), 404)
    assert [q.id for q, _ in stored_exchanges(fresh.url)] == [q.id for q, _ in rows if q.id != request.id]


def test_purge_expired_deletes_only_expired_sessions(fresh: Fresh) -> None:
    client = openai.OpenAI(base_url=f"{fresh.base}/v1", api_key="sk-client", max_retries=0)
    for name in ("brief-1", "brief-2"):
        raw = client.chat.completions.with_raw_response.create(
            model="fake-text",
            messages=[{"role": "user", "content": name}],
            extra_headers={"x-session-id": name},
        )
        request_id = raw.headers["x-request-id"]
        wait_for(lambda request_id=request_id: stored(fresh.api, request_id), "the exchange to be stored")
    wait_for(lambda: len(every(fresh.api, "/v1/sessions", active="false")) == 2, "the sessions to expire")
    expired = sorted(s["id"] for s in every(fresh.api, "/v1/sessions", active="false"))
    assert expired == ["brief-1", "brief-2"]
    live_sessions = set(stored_sessions(fresh.url)) - set(expired)
    kept = [q.id for q, _ in stored_exchanges(fresh.url) if q.session_id not in expired]

    answer = fresh.api.post("/v1/sessions/purge-expired")
    assert answer.status_code == 200 and answer.json() == {"object": "sessions.purged", "deleted": 2}
    assert set(stored_sessions(fresh.url)) == live_sessions
    assert [q.id for q, _ in stored_exchanges(fresh.url)] == kept
    assert fresh.api.post("/v1/sessions/purge-expired").json()["deleted"] == 0


def test_an_expired_session_is_not_active(fresh: Fresh) -> None:
    engine = make_engine(fresh.url)
    with engine.begin() as conn:
        conn.execute(update(sessions_table).where(sessions_table.c.id == "s-beta").values(expires_at=1))
    engine.dispose()
    assert [s["id"] for s in every(fresh.api, "/v1/sessions", active="false")] == ["s-beta"]
    assert "s-beta" not in {s["id"] for s in every(fresh.api, "/v1/sessions", active="true")}


# ------------------------------------------------------------------------------------------- the event loop


def slow_stream(base: str, chunks: int, received: list[float]) -> threading.Thread:
    """Stream ``fake-slow`` (``chunks`` events 50 ms apart) through the proxy in a thread, noting when each
    event arrives."""

    def run() -> None:
        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json={"model": "fake-slow", "stream": True, "messages": [{"role": "user", "content": "slow"}]},
            headers={"x-fake-chunks": str(chunks), "x-session-id": "slow"},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_api_answers_while_a_long_stream_is_proxied(
    migrated_url: str, upstream: str, tmp_path: Path
) -> None:
    app = proxy(upstream, migrated_url, tmp_path / "spill", api_token=TOKENS[0])
    with serve(app) as base, httpx.Client(base_url=base, headers=bearer(TOKENS[0]), timeout=30) as api:
        received: list[float] = []
        stream = slow_stream(base, 200, received)  # about 10 s
        wait_for(lambda: received, "the stream to start")
        # The request row is stored as soon as its body is complete; its response only when the stream
        # ends: an answer showing the one without the other came while the stream was running.
        (in_flight,) = wait_for(lambda: every(api, "/v1/requests"), "the request row")
        assert in_flight["model"] == "fake-slow" and in_flight["response"] is None
        (figures,) = api.get("/v1/stats").json()["data"]
        assert figures["pending"] == 1
        assert api.get("/v1/sessions/slow").json()["request_count"] == 1
        assert stream.is_alive()
        stream.join(timeout=60)
        assert not stream.is_alive() and len(received) >= 200
        done = wait_for(lambda: every(api, "/v1/requests")[0]["response"], "the response row")
        assert done["status_code"] == 200 and done["error"] is None


def test_a_read_waiting_on_a_lock_holds_up_no_stream(
    migrated_url: str, upstream: str, tmp_path: Path
) -> None:
    """A read stuck in the database (here: behind PostgreSQL's ACCESS EXCLUSIVE table lock) waits in a
    read thread, and the proxy's stream keeps flowing meanwhile. Were the query run on the event loop,
    no event would arrive until the lock is released, and the stream's read would time out first."""
    if not migrated_url.startswith("postgresql"):
        pytest.skip("a read blocked on demand needs PostgreSQL's table locks")
    app = proxy(upstream, migrated_url, tmp_path / "spill", api_token=TOKENS[0])
    engine = make_engine(migrated_url)
    with serve(app) as base, httpx.Client(base_url=base, headers=bearer(TOKENS[0]), timeout=60) as api:
        received: list[float] = []
        stream = slow_stream(base, 200, received)
        wait_for(lambda: every(api, "/v1/requests"), "the request row")
        with engine.connect() as locker, ThreadPoolExecutor(1) as pool:
            locker.execute(text("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE"))
            pending: Future[httpx.Response] = pool.submit(api.get, "/v1/requests")

            def waiting() -> bool:
                with engine.connect() as conn:
                    query = (
                        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
                        "WHERE NOT l.granted AND l.relation = 'requests'::regclass "
                        "AND a.query LIKE 'SELECT requests.%'"
                    )
                    return bool(conn.execute(text(query)).scalar_one())

            wait_for(waiting, "the API's read to wait on the lock")
            seen = len(received)
            wait_for(lambda: len(received) >= seen + 10, "the stream to go on while the read waits")
            assert not pending.done()  # it still waits: the events came meanwhile
            locker.rollback()  # releases the lock
            answer = pending.result(timeout=60)
        assert answer.status_code == 200 and answer.json()["data"][0]["model"] == "fake-slow"
        stream.join(timeout=60)
        assert len(received) >= 200
    engine.dispose()


# ------------------------------------------------------------------------------------------- standalone


def test_standalone_app_under_uvicorn(migrated_url: str) -> None:
    with History(migrated_url) as store:
        store.sessions.create("hand-made", "hello", 60_000)
    with serve(create_app(migrated_url, api_token=list(TOKENS), environ={})) as base:
        assert_error(httpx.get(f"{base}/v1/sessions"), 401)
        for token in TOKENS:
            (session,) = httpx.get(f"{base}/v1/sessions", headers=bearer(token)).json()["data"]
            assert session["id"] == "hand-made"
        detail = httpx.get(f"{base}/v1/sessions/hand-made", headers=bearer(TOKENS[0])).json()
        assert detail["request_count"] == 0 and detail["first_user_message"] == "hello"
        # Outside the API's routes the standalone app has nothing: its own 404 and 405, in its shape.
        assert_error(httpx.get(f"{base}/v1/models", headers=bearer(TOKENS[0])), 404)
        assert_error(httpx.put(f"{base}/v1/sessions", headers=bearer(TOKENS[0])), 405)


def test_create_app_needs_a_token_or_anonymous(sqlite_url: str) -> None:
    with pytest.raises(ConfigurationError, match="api_token"):
        create_app(sqlite_url, environ={})
    with pytest.raises(ConfigurationError, match="contradict"):
        create_app(sqlite_url, api_token="t", api_anonymous=True, environ={})
    upgrade(sqlite_url)
    with serve(create_app(sqlite_url, api_anonymous=True, environ={})) as base:
        assert httpx.get(f"{base}/v1/sessions").json()["data"] == []


def test_create_app_from_the_environment(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    environ = {
        "QWEN_PERSIST_DATABASE_URL": sqlite_url,
        "QWEN_PERSIST_API_TOKEN": "env-a, env-b",
        "QWEN_PERSIST_API_PREFIX": "/admin/",
    }
    with serve(create_app(environ=environ)) as base:
        assert httpx.get(f"{base}/admin/sessions", headers=bearer("env-b")).status_code == 200
        assert_error(httpx.get(f"{base}/admin/sessions", headers=bearer("env-a, env-b")), 401)
        assert_error(httpx.get(f"{base}/v1/sessions", headers=bearer("env-a")), 404)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_uvicorn_factory_with_environment_variables(migrated_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "QWEN_PERSIST_DATABASE_URL": migrated_url,
        "QWEN_PERSIST_API_TOKEN": "factory-token",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "qwen_persist.api:create_app",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            try:
                return httpx.get(f"{base}/v1/stats").status_code == 401
            except httpx.TransportError:
                return False

        wait_for(up, "uvicorn to serve the API")
        (figures,) = httpx.get(f"{base}/v1/stats", headers=bearer("factory-token")).json()["data"]
        assert figures["count"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mounted_in_an_admin_app(migrated_url: str) -> None:
    with History(migrated_url) as store:
        store.sessions.create("mounted", "hi", 60_000)
        admin = Starlette(
            routes=[Mount("/admin", app=create_app(store, api_token="admin-token", environ={}))]
        )
        with serve(admin) as base:
            answer = httpx.get(f"{base}/admin/v1/sessions/mounted", headers=bearer("admin-token"))
            assert answer.json()["id"] == "mounted"
            error = assert_error(
                httpx.get(f"{base}/admin/v1/requests/abc", headers=bearer("admin-token")), 400, "id"
            )
            assert "/admin/v1/requests/by-request-id/abc" in error["message"]
            assert_error(httpx.get(f"{base}/admin/v1/sessions"), 401)


def lifespans(app: Starlette, path: str, headers: dict[str, str]) -> list[int]:
    """The status of ``GET path`` in each of four lifespans of the same app object: two under
    Starlette's TestClient, two under uvicorn."""
    statuses = []
    for _ in range(2):
        with TestClient(app, headers=headers) as client:
            statuses.append(client.get(path).status_code)
    for _ in range(2):
        with serve(app) as base:
            statuses.append(httpx.get(f"{base}{path}", headers=headers).status_code)
    return statuses


def test_the_standalone_app_serves_again_after_its_lifespan_ends(migrated_url: str) -> None:
    """The app's History is closed at each shutdown; the next startup of the same app reads again."""
    app = create_app(migrated_url, api_token="t", environ={})
    assert lifespans(app, "/v1/sessions", bearer("t")) == [200] * 4


def test_the_middleware_api_serves_again_after_its_lifespan_ends(migrated_url: str, tmp_path: Path) -> None:
    app = wrapped_app(migrated_url, tmp_path, api_token="t")
    assert lifespans(app, "/v1/stats", bearer("t")) == [200] * 4


def test_a_closed_history_reads_again(migrated_url: str) -> None:
    history = History(migrated_url)
    history.close()
    history.close()  # idempotent
    assert asyncio.run(history.sessions.alist()).items == []
    history.close()


def test_a_missing_sqlite_file_is_refused_not_created(tmp_path: Path) -> None:
    """Reading never creates a database: an empty file would answer "no such table" forever."""
    missing = tmp_path / "missing.db"
    url = f"sqlite:///{missing}"
    for make in (lambda: History(url), lambda: create_app(url, api_anonymous=True, environ={})):
        with pytest.raises(
            ConfigurationError, match=r"no database at .*missing\.db.*qwen-persist db upgrade"
        ):
            make()
    with pytest.raises(ConfigurationError, match="no database at"):
        create_app(api_anonymous=True, environ={"QWEN_PERSIST_DATABASE_URL": url})
    assert not missing.exists()


def test_an_unmigrated_database_says_to_migrate(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Not "try again later" forever: the answer names the command that fixes it, logged once."""
    engine = make_engine(database_url)
    with engine.connect():
        pass  # the SQLite file exists now, without any table
    engine.dispose()
    with serve(create_app(database_url, api_anonymous=True, environ={})) as base:
        for path in ("/v1/requests", "/v1/sessions", "/v1/stats", "/v1/chat/completions"):
            error = assert_error(httpx.get(f"{base}{path}"), 503)
            assert error["code"] == "database_not_migrated" and error["type"] == "api_error"
            assert "qwen-persist db upgrade" in error["message"], error
    logged = [record for record in caplog.records if "qwen_persist schema" in record.getMessage()]
    assert len(logged) == 1 and "qwen-persist db upgrade" in logged[0].getMessage()
    assert "could not answer" not in caplog.text


# ------------------------------------------------------------------------------------ middleware options


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"wrapped": request.url.path, "method": request.method})


def wrapped_app(url: str, tmp_path: Path, **options: Any) -> Starlette:
    """An app that answers every path itself, wrapped in the middleware: what it answers shows which
    requests the API left to it."""
    app = Starlette(routes=[Route("/{path:path}", _echo, methods=["GET", "POST", "PUT", "DELETE"])])
    app.add_middleware(PersistenceMiddleware, database_url=url, spill_dir=str(tmp_path / "spill"), **options)
    return app


@pytest.fixture
def migrated_sqlite(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    return sqlite_url


def test_the_api_is_off_by_default(
    migrated_sqlite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("API_TOKEN", "API_ANONYMOUS", "API_PREFIX"):
        monkeypatch.delenv(f"QWEN_PERSIST_{name}", raising=False)
    with serve(wrapped_app(migrated_sqlite, tmp_path)) as base:
        for method, path in ROUTES:
            answer = httpx.request(method, f"{base}{path}", headers=bearer(TOKENS[0]))
            assert answer.json() == {"wrapped": path, "method": method}


def test_the_environment_turns_it_on(
    migrated_sqlite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_PERSIST_API_TOKEN", "env-token")
    with serve(wrapped_app(migrated_sqlite, tmp_path)) as base:
        assert httpx.get(f"{base}/v1/sessions", headers=bearer("env-token")).json()["object"] == "list"
        assert_error(httpx.get(f"{base}/v1/sessions"), 401)
        assert httpx.get(f"{base}/v1/models").json() == {"wrapped": "/v1/models", "method": "GET"}


def test_api_prefix_moves_it(migrated_sqlite: str, tmp_path: Path) -> None:
    with serve(wrapped_app(migrated_sqlite, tmp_path, api_token="t", api_prefix="/admin")) as base:
        assert httpx.get(f"{base}/admin/sessions", headers=bearer("t")).json()["object"] == "list"
        assert_error(httpx.get(f"{base}/admin/stats"), 401)
        assert httpx.get(f"{base}/v1/sessions").json() == {"wrapped": "/v1/sessions", "method": "GET"}
        assert httpx.get(f"{base}/admin/other").json() == {"wrapped": "/admin/other", "method": "GET"}


def test_api_anonymous_serves_it_without_a_token(migrated_sqlite: str, tmp_path: Path) -> None:
    with serve(wrapped_app(migrated_sqlite, tmp_path, api_anonymous=True)) as base:
        assert httpx.get(f"{base}/v1/stats").json()["object"] == "list"
        assert httpx.get(f"{base}/v1/stats", headers=bearer("anything")).status_code == 200


def test_only_the_apis_own_routes_see_the_token(migrated_sqlite: str, tmp_path: Path) -> None:
    with serve(wrapped_app(migrated_sqlite, tmp_path, api_token="t")) as base:
        for headers in ({}, bearer("wrong"), bearer("t")):
            for method, path in [
                ("GET", "/v1/models"),
                ("GET", "/v1/sessionsx"),
                ("PUT", "/v1/sessions"),
                ("POST", "/v1/requests"),
                ("POST", "/v1/sessions/s-alpha"),
                ("GET", "/v1/requests/1/extra"),
                ("GET", "/sessions"),
            ]:
                answer = httpx.request(method, f"{base}{path}", headers=headers)
                assert answer.json() == {"wrapped": path, "method": method}
        # The captured POST goes to the app (and is recorded) with or without the API's token.
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body)
        assert answer.json() == {"wrapped": "/v1/chat/completions", "method": "POST"}
        request_id = answer.headers["x-request-id"]
        record = wait_for(
            lambda: (
                httpx.get(f"{base}/v1/requests/by-request-id/{request_id}", headers=bearer("t"))
                .json()
                .get("id")
            ),
            "the captured POST to be stored",
        )
        assert record >= 1


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"api_token": ""}, "api_token is empty"),
        ({"api_token": "  "}, "api_token is empty"),
        ({"api_token": []}, "api_token is empty"),
        ({"api_token": ["", " "]}, "api_token is empty"),
        ({"api_token": "two words"}, "api_token"),
        ({"api_token": ["ok", "not\tok"]}, "api_token"),
        ({"api_token": "tökén"}, "api_token"),
        ({"api_token": 12345}, "api_token"),
        ({"api_token": ["ok", 5]}, "api_token"),
        ({"api_anonymous": "yes"}, "api_anonymous"),
        ({"api_anonymous": 1}, "api_anonymous"),
        ({"api_token": "t", "api_anonymous": True}, "contradict"),
        ({"api_prefix": "v1"}, "api_prefix"),
        ({"api_prefix": "/{version}"}, "api_prefix"),
        ({"api_prefix": 1}, "api_prefix"),
        ({"environ": {"QWEN_PERSIST_API_ANONYMOUS": "maybe"}}, "QWEN_PERSIST_API_ANONYMOUS"),
        ({"environ": {"QWEN_PERSIST_API_TOKEN": "a b"}}, "api_token"),
        ({"environ": {"QWEN_PERSIST_API_PREFIX": "admin"}}, "api_prefix"),
        ({"environ": {"QWEN_PERSIST_API_TOKEN": "t", "QWEN_PERSIST_API_ANONYMOUS": "1"}}, "contradict"),
    ],
)
def test_bad_api_options_are_refused(options: dict[str, Any], message: str) -> None:
    options.setdefault("environ", {})
    with pytest.raises(ConfigurationError, match=message):
        build_settings(**options)


@pytest.mark.parametrize(
    ("options", "tokens", "anonymous", "prefix"),
    [
        ({}, (), False, "/v1"),
        ({"api_token": "t"}, ("t",), False, "/v1"),
        ({"api_token": ["a", "b", "a"]}, ("a", "b"), False, "/v1"),
        ({"environ": {"QWEN_PERSIST_API_TOKEN": " a , b ,"}}, ("a", "b"), False, "/v1"),
        ({"api_token": "arg", "environ": {"QWEN_PERSIST_API_TOKEN": "env"}}, ("arg",), False, "/v1"),
        ({"api_anonymous": True}, (), True, "/v1"),
        ({"environ": {"QWEN_PERSIST_API_ANONYMOUS": "true"}}, (), True, "/v1"),
        ({"api_token": "t", "api_prefix": "/admin/"}, ("t",), False, "/admin"),
        ({"api_token": "t", "api_prefix": "/"}, ("t",), False, ""),
        ({"api_token": "t", "environ": {"QWEN_PERSIST_API_PREFIX": "/ops/api"}}, ("t",), False, "/ops/api"),
    ],
)
def test_api_options(options: dict[str, Any], tokens: tuple[str, ...], anonymous: bool, prefix: str) -> None:
    options.setdefault("environ", {})
    settings = build_settings(**options)
    assert (settings.api_tokens, settings.api_anonymous, settings.api_prefix) == (tokens, anonymous, prefix)
    assert settings.api_enabled == bool(tokens or anonymous)


def test_answers_carry_a_lone_surrogate_as_its_escape() -> None:
    """No stored text holds one today (the writer refuses them), but an answer must never fail on one."""
    from qwen_persist.api.responses import JSON

    assert JSON({"text": "x\ud800y", "ok": "é"}).body == b'{"text":"x\\ud800y","ok":"\\u00e9"}'
    assert JSON({"ok": "é"}).body == '{"ok":"é"}'.encode()
