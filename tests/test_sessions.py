"""Sessions (SPEC §5): identity rules, identity through the real middleware, sliding expiry that never
deletes history, every `SessionManager` method, the event loop never blocked, and atomic updates under
concurrency. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_upstream
import httpx
import openai
import openai_proxy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support import serve, stored_exchanges, stored_sessions

from qwen_persist import PersistenceMiddleware, current_exchange
from qwen_persist.engine import make_engine
from qwen_persist.migrate import upgrade
from qwen_persist.models import requests_table, responses_table, sessions_table
from qwen_persist.records import CapturedRequest, CapturedResponse, Reports, request_op, response_op
from qwen_persist.repositories.writes import Op, write_ops
from qwen_persist.sessions import (
    SessionManager,
    api_key_fingerprint,
    canonical_text,
    first_user_message,
    is_valid_client_id,
    now_ms,
    resolve_session_id,
)

TTL = 60.0
TTL_MS = int(TTL * 1000)
HI: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def resolve(
    body: Any, header: str | None = None, key: str | None = None, request_id: str = "rid-1"
) -> tuple[str, str]:
    return resolve_session_id(body, header_value=header, key_fingerprint=key, request_id=request_id)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- identity rules ---------------------------------------------------------------------------------

DATA_URL = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ" * 3
META = {**HI, "metadata": {"session_id": "meta-1"}}


@pytest.mark.parametrize(
    ("body", "header", "expected_id", "expected_first"),
    [
        pytest.param(META, "hdr-1", "hdr-1", "hi", id="header-beats-metadata"),
        pytest.param(META, None, "meta-1", "hi", id="metadata-without-header"),
        pytest.param(META, "x" * 129, "meta-1", "hi", id="too-long-header-ignored"),
        pytest.param(HI, "x" * 128, "x" * 128, "hi", id="128-chars-accepted"),
        pytest.param(HI, "bad\x07id", md5("hi"), "hi", id="control-char-header-ignored"),
        pytest.param(HI, "bad\tid", md5("hi"), "hi", id="tab-header-ignored"),
        pytest.param(HI, "sessi\u00f3n", md5("hi"), "hi", id="non-ascii-header-ignored"),
        pytest.param(HI, "", md5("hi"), "hi", id="empty-header-ignored"),
        pytest.param({**HI, "metadata": {"session_id": 42}}, None, md5("hi"), "hi", id="metadata-not-str"),
        pytest.param(
            {**HI, "metadata": {"session_id": "m" * 129}}, None, md5("hi"), "hi", id="meta-too-long"
        ),
        pytest.param({**HI, "metadata": {"session_id": "a\nb"}}, None, md5("hi"), "hi", id="meta-newline"),
        pytest.param({**HI, "metadata": "session_id"}, None, md5("hi"), "hi", id="metadata-not-object"),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "first"},
                    {"role": "assistant", "content": "answer"},
                    {"role": "user", "content": "second"},
                ]
            },
            None,
            md5("first"),
            "first",
            id="first-user-message-only",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, "at this"]}]},
            None,
            md5("look\nat this"),
            "look\nat this",
            id="array-text-parts-joined-by-newline",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is"},
                            {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}},
                        ],
                    }
                ]
            },
            None,
            md5("what is\nhttps://img.example/cat.png"),
            "what is\nhttps://img.example/cat.png",
            id="image-by-url",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is"},
                            {"type": "image_url", "image_url": {"url": DATA_URL}},
                        ],
                    }
                ]
            },
            None,
            md5("what is\nimage:sha256:" + sha256(DATA_URL)),
            "what is\nimage:sha256:" + sha256(DATA_URL),
            id="data-url-by-hash",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "h\u00e9llo \u2603"}]},
            None,
            hashlib.md5("h\u00e9llo \u2603".encode()).hexdigest(),
            "h\u00e9llo \u2603",
            id="unicode-utf8",
        ),
    ],
)
def test_identity_rules(body: Any, header: str | None, expected_id: str, expected_first: str) -> None:
    assert resolve(body, header) == (expected_id, expected_first)


def test_unscoped_id_is_the_plain_md5_of_the_first_user_message() -> None:
    for text in ("hi", "", "a longer opening line\nwith two lines"):
        body = {"messages": [{"role": "user", "content": text}]}
        assert resolve(body)[0] == hashlib.md5(text.encode()).hexdigest()


def test_sessions_are_scoped_by_api_key_and_user() -> None:
    alice, bob = api_key_fingerprint("sk-alice"), api_key_fingerprint("sk-bob")
    assert alice != bob and "sk-alice" not in alice and alice == api_key_fingerprint("sk-alice")
    unscoped = resolve(HI)[0]
    ids = {
        "alice": resolve(HI, key=alice)[0],
        "bob": resolve(HI, key=bob)[0],
        "alice-u1": resolve({**HI, "user": "u1"}, key=alice)[0],
        "alice-u2": resolve({**HI, "user": "u2"}, key=alice)[0],
        "anon-u1": resolve({**HI, "user": "u1"})[0],
        "anon-u2": resolve({**HI, "user": "u2"})[0],
    }
    assert unscoped not in ids.values()
    assert len(set(ids.values())) == len(ids), ids
    # The same caller twice gets the same session, whatever the request id.
    assert resolve(HI, key=alice, request_id="other")[0] == ids["alice"]
    assert resolve({**HI, "user": "u1"}, key=alice, request_id="x")[0] == ids["alice-u1"]
    # Explicit ids are not scoped: the caller chose them.
    assert resolve(HI, "shared", key=alice)[0] == resolve(HI, "shared", key=bob)[0] == "shared"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "system", "content": "hi"}]},
        {"model": "m", "messages": []},
        {"model": "m"},
        {"model": "m", "messages": "hi"},
        ["not", "an", "object"],
        None,
        {"$qwen_persist_raw_body": True, "text": "{not json"},
    ],
)
def test_request_without_user_message_gets_a_session_of_its_own(body: Any) -> None:
    first = resolve(body, request_id="rid-1")
    second = resolve(body, request_id="rid-2")
    assert first == ("request-rid-1", "") and second == ("request-rid-2", "")
    assert first_user_message(body) is None


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (None, False),
        ("", False),
        ("a", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("with space", True),
        ("tab\there", False),
        ("nul\x00", False),
        ("del\x7f", False),
        ("caf\u00e9", False),
    ],
)
def test_is_valid_client_id(value: str | None, valid: bool) -> None:
    assert is_valid_client_id(value) is valid


def test_canonical_text() -> None:
    assert canonical_text(None) == ""
    assert canonical_text("as is \n") == "as is \n"
    assert canonical_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    assert canonical_text([{"type": "image_url", "image_url": "https://x/y.png"}]) == "https://x/y.png"
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    hashed = canonical_text([audio])
    assert hashed.startswith("input_audio:sha256:") and "AAAA" not in hashed
    assert hashed == canonical_text([dict(reversed(audio.items()))])  # key order does not matter
    other_image = "data:image/png;base64,AAAA"
    assert canonical_text([{"type": "image_url", "image_url": {"url": other_image}}]) != canonical_text(
        [{"type": "image_url", "image_url": {"url": DATA_URL}}]
    )
    assert canonical_text({"b": 1, "a": 2}) == json.dumps({"a": 2, "b": 1})


def _previous_session_id(body: Any, header: str | None, key: str | None, request_id: str) -> tuple[str, str]:
    """resolve_session_id as it was before the scope lost its json.dumps: the reference every stored
    session id was derived with."""
    first = first_user_message(body)
    if is_valid_client_id(header):
        return str(header), first or ""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    from_metadata = metadata.get("session_id") if isinstance(metadata, dict) else None
    if isinstance(from_metadata, str) and is_valid_client_id(from_metadata):
        return from_metadata, first or ""
    if first is None:
        return f"request-{request_id}", ""
    user = body.get("user") if isinstance(body, dict) else None
    scope = ""
    if key or isinstance(user, str):
        scope = json.dumps([key or "", user if isinstance(user, str) else ""])
    return hashlib.md5((scope + first).encode("utf-8", "surrogateescape")).hexdigest(), first


# Any text, lone surrogates, quotes, backslashes, control and non-ASCII characters included.
_texts = st.one_of(st.text(), st.sampled_from(["", '"', "\\", "\x00", "\ud800", "caf\u00e9", "\U0001f600"]))
_content = st.one_of(
    st.none(),
    _texts,
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": _texts}),
            st.fixed_dictionaries(
                {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _texts})}
            ),
            st.dictionaries(_texts, st.one_of(_texts, st.integers()), max_size=3),
        ),
        max_size=3,
    ),
    st.dictionaries(_texts, st.integers(), max_size=3),
)


@settings(max_examples=500)
@given(
    content=_content,
    user=st.one_of(st.none(), _texts, st.integers()),
    key=st.one_of(st.none(), st.just(""), st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)),
    header=st.one_of(st.none(), st.just("sess-1"), _texts),
    metadata=st.one_of(st.none(), st.fixed_dictionaries({"session_id": st.one_of(_texts, st.integers())})),
    role=st.sampled_from(["user", "system"]),
)
def test_session_ids_are_derived_as_before(
    content: Any, user: Any, key: str | None, header: str | None, metadata: Any, role: str
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": role, "content": content}]}
    if user is not None:
        body["user"] = user
    if metadata is not None:
        body["metadata"] = metadata
    assert _outcome(resolve, body, header, key) == _outcome(_previous_session_id, body, header, key, "rid-1")


def _outcome(derive: Any, *args: Any) -> Any:
    # A lone surrogate the md5's surrogateescape cannot encode raised before too: the same error is kept.
    try:
        return derive(*args)
    except UnicodeEncodeError as exc:
        return type(exc)


# -- identity through the real middleware -------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve(fake_upstream.create_app()) as url:
        yield f"{url}/v1"


def test_session_identity_end_to_end(upstream_url: str, database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)
    app = openai_proxy.create_app(
        upstream_url, "", database_url=database_url, spill_dir=str(tmp_path / "spill"), session_ttl=TTL
    )
    hi = [{"role": "user", "content": "hi"}]
    sent: dict[str, str] = {}  # label -> request id
    with serve(app) as base:

        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

        alice, bob = client("sk-alice"), client("sk-bob")

        def ask(label: str, who: openai.OpenAI, messages: list[dict[str, Any]], **options: Any) -> str:
            raw = who.chat.completions.with_raw_response.create(
                model="fake-text", messages=messages, **options
            )
            sent[label] = raw.headers["x-request-id"]
            return raw.parse().choices[0].message.content or ""

        answer = ask("alice-1", alice, hi)
        ask("bob-1", bob, hi)
        ask("alice-again", alice, hi)
        follow = [*hi, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
        ask("alice-follow", alice, follow)
        ask("alice-u1", alice, hi, user="u1")
        ask("alice-u2", alice, hi, user="u2")
        ask("header-alice", alice, hi, extra_headers={"x-session-id": "chosen-session"})
        ask("header-bob", bob, follow, extra_headers={"x-session-id": "chosen-session"})
        ask("header-short", bob, hi, extra_headers={"x-session-id": "chosen-session"})
        ask("bad-header", alice, hi, extra_headers={"x-session-id": "y" * 129})
        ask("metadata", alice, hi, metadata={"session_id": "meta-session"})
        ask("no-user-1", alice, [{"role": "system", "content": "hi"}])
        ask("no-user-2", alice, [{"role": "system", "content": "hi"}])

    by_request = {req.request_id: req.session_id for req, _ in stored_exchanges(database_url)}
    sid = {label: by_request[rid] for label, rid in sent.items()}
    alice_fp, bob_fp = api_key_fingerprint("sk-alice"), api_key_fingerprint("sk-bob")
    assert sid["alice-1"] == resolve({"messages": hi}, key=alice_fp)[0] != md5("hi")
    assert sid["bob-1"] == resolve({"messages": hi}, key=bob_fp)[0] != sid["alice-1"]
    assert sid["alice-again"] == sid["alice-follow"] == sid["alice-1"]
    assert sid["alice-u1"] == resolve({"messages": hi, "user": "u1"}, key=alice_fp)[0]
    assert len({sid["alice-1"], sid["alice-u1"], sid["alice-u2"]}) == 3
    assert sid["header-alice"] == sid["header-bob"] == sid["header-short"] == "chosen-session"
    assert sid["bad-header"] == sid["alice-1"]
    assert sid["metadata"] == "meta-session"
    assert sid["no-user-1"] == f"request-{sent['no-user-1']}"
    assert sid["no-user-2"] == f"request-{sent['no-user-2']}"

    sessions = stored_sessions(database_url)
    assert set(sessions) == set(sid.values())
    # 3 messages + the finished reply; the shorter "alice-again" before it and the 1-message
    # "header-short" after "header-bob" never lower the count.
    assert sessions[sid["alice-1"]].message_count == 4
    assert sessions["chosen-session"].message_count == 4
    assert sessions[sid["bob-1"]].message_count == 2
    assert sessions[sid["alice-1"]].first_user_message == "hi"
    for row in sessions.values():
        assert row.expires_at == row.last_accessed + TTL_MS
        assert row.created_at <= row.last_accessed
        assert row.chat_id is None and row.parent_id is None


async def _post(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200
    return response


def reporting_app() -> Starlette:
    """A tiny chat app that reports the upstream ids the client asks for (via the body's ``report``)."""

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        exchange = current_exchange(request)
        assert exchange is not None
        if "report" in body:
            exchange.report(**body["report"])
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_custom_session_header_name(database_url: str, tmp_path: Path) -> None:
    upgrade(database_url)

    async def run() -> None:
        middleware = PersistenceMiddleware(
            reporting_app(),
            database_url=database_url,
            spill_dir=str(tmp_path),
            session_header="X-Conversation",
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as c:
            await _post(c, HI, **{"x-conversation": "conv-1"})
            await _post(
                c, {**HI, "messages": [{"role": "user", "content": "yo"}]}, **{"x-session-id": "ignored"}
            )
        await middleware.aclose()

    asyncio.run(run())
    assert set(stored_sessions(database_url)) == {"conv-1", md5("yo")}


# -- sliding expiry -----------------------------------------------------------------------------------


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def expire(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(sessions_table)
            .where(sessions_table.c.id == session_id)
            .values(last_accessed=now_ms() - 10_000, expires_at=now_ms() - 1)
        )


def count(engine: Engine, table: Any, session_id: str | None = None) -> int:
    query = select(func.count()).select_from(table)
    if session_id is not None:
        query = query.where(table.c.session_id == session_id)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@pytest.mark.anyio
async def test_expired_session_is_not_continued_and_renewal_clears_upstream_ids(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    middleware = PersistenceMiddleware(
        reporting_app(), database_url=database_url, spill_dir=str(tmp_path), session_ttl=TTL
    )
    manager = SessionManager(engine, ttl=TTL)
    body = {**HI, "report": {"parent_id": "parent-1", "chat_id": "chat-1"}}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://t"
    ) as client:
        await _post(client, body, **{"x-session-id": "s-exp"})
        assert await middleware.writer.barrier()
        live = await manager.get("s-exp")
        assert live is not None and (live.chat_id, live.parent_id) == ("chat-1", "parent-1")

        expire(engine, "s-exp")
        assert await manager.get("s-exp") is None
        assert await manager.get_parent_id("s-exp") is None
        assert await manager.is_new("s-exp") is True
        assert await manager.metrics() == {"active": 0, "total": 1}
        stale = await manager.peek("s-exp")  # not deleted, not touched, ids still there
        assert stale is not None and stale.expired and stale.chat_id == "chat-1"
        assert await manager.request_count("s-exp") == 1
        assert count(engine, responses_table, "s-exp") == 1

        # The same id again: a new conversation under the old id, with the history kept.
        await _post(client, HI, **{"x-session-id": "s-exp"})
        assert await middleware.writer.barrier()
    await middleware.aclose()
    renewed = await manager.peek("s-exp")
    assert renewed is not None and not renewed.expired
    assert (renewed.chat_id, renewed.parent_id) == (None, None)
    assert renewed.created_at == live.created_at
    assert renewed.expires_at == renewed.last_accessed + TTL_MS
    assert await manager.request_count("s-exp") == 2
    assert count(engine, responses_table, "s-exp") == 2


@pytest.mark.anyio
async def test_short_ttl_expires_by_itself_and_renewal_via_manager(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=0.2)
    info = await manager.create("short", "hi", chat_id="c1")
    assert await manager.update_parent_id("short", "p1")
    deadline = time.monotonic() + 5
    while (peeked := await manager.peek("short")) is not None and not peeked.expired:
        assert time.monotonic() < deadline, "session never expired"
        await asyncio.sleep(0.02)
    assert await manager.get("short") is None
    assert await manager.peek("short") is not None  # expiry deletes nothing
    renewed = await manager.create("short", "hi again")
    assert (renewed.chat_id, renewed.parent_id) == (None, None)
    assert renewed.created_at == info.created_at and renewed.first_user_message == "hi"
    assert await manager.get("short") is not None


@pytest.mark.anyio
async def test_setting_an_id_on_an_expired_session_does_not_revive_the_old_conversation(
    engine: Engine,
) -> None:
    manager = SessionManager(engine, ttl=TTL)
    await manager.create("old", "hi", chat_id="chat-old")
    assert await manager.update_parent_id("old", "parent-old")
    expire(engine, "old")
    # A new conversation under the old id: the new chat must not inherit the old chat's parent.
    assert await manager.set_chat_id("old", "chat-new")
    info = await manager.get("old")
    assert info is not None and (info.chat_id, info.parent_id) == ("chat-new", None)


# -- SessionManager, method by method -----------------------------------------------------------------


def exchange_ops(
    session_id: str,
    request_id: str,
    *,
    messages: int = 1,
    arrived: int | None = None,
    parent_id: str | None = None,
    ttl_ms: int = TTL_MS,
) -> tuple[Op, Op]:
    """A request op and its response op, made by the real record code as the writer makes them."""
    arrived = now_ms() if arrived is None else arrived
    body = {"model": "m", "messages": [{"role": "user", "content": f"m{i}"} for i in range(messages)]}
    request = CapturedRequest(
        request_id=request_id,
        arrived_ms=arrived,
        method="POST",
        path="/v1/chat/completions",
        body=json.dumps(body).encode(),
        body_size=0,
        body_truncated=False,
        session_header=session_id,
        key_fingerprint=None,
    )
    op, facts = request_op(request, ttl_ms=ttl_ms)
    response = CapturedResponse(
        request_id=request_id,
        status_code=200,
        streamed=False,
        body=b"",
        body_size=0,
        body_truncated=False,
        ended_ms=arrived + 1,
        duration_ms=1,
        first_byte_ms=1,
        request=facts,
    )
    if parent_id is not None:
        response.reports = Reports(parent_id=parent_id)
    return op, response_op(response)


def store(engine: Engine, ops: list[Op]) -> None:
    with engine.begin() as conn:
        outcome = write_ops(conn, ops)
    assert outcome.written == len(ops) and not outcome.orphans


@pytest.mark.anyio
async def test_session_manager_methods(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=TTL)

    assert SessionManager.generate_session_id(HI) == md5("hi")
    assert (
        SessionManager.generate_session_id(HI, api_key="sk-a")
        == resolve(HI, key=api_key_fingerprint("sk-a"))[0]
    )
    no_user = {"messages": [{"role": "system", "content": "x"}]}
    first, second = SessionManager.generate_session_id(no_user), SessionManager.generate_session_id(no_user)
    assert first.startswith("request-") and first != second

    before = now_ms()
    created = await manager.create("s1", "hello", chat_id="c1")
    assert (created.id, created.chat_id, created.parent_id, created.first_user_message) == (
        "s1",
        "c1",
        None,
        "hello",
    )
    assert created.message_count == 0 and created.created_at >= before
    assert created.created_at == created.updated_at == created.last_accessed
    assert created.expires_at == created.last_accessed + TTL_MS
    again = await manager.create("s1", "other text")  # renewing a live session keeps what it has
    assert (again.chat_id, again.first_user_message, again.created_at) == ("c1", "hello", created.created_at)

    # get touches: last_accessed and expires_at slide; peek does not.
    with engine.begin() as conn:
        conn.execute(update(sessions_table).values(last_accessed=before - 5000, expires_at=before + 1000))
    peeked = await manager.peek("s1")
    assert peeked is not None and (peeked.last_accessed, peeked.expires_at) == (before - 5000, before + 1000)
    touched = await manager.get("s1")
    assert touched is not None and touched.last_accessed >= before
    assert touched.expires_at == touched.last_accessed + TTL_MS
    assert await manager.get("missing") is None and await manager.peek("missing") is None

    assert await manager.update_parent_id("s1", "p1") is True
    assert await manager.update_parent_id("missing", "p1") is False
    assert await manager.get_parent_id("s1") == "p1"
    assert await manager.get_parent_id("missing") is None
    assert await manager.set_chat_id("s1", "c2") is True
    assert await manager.set_chat_id("missing", "c2") is False
    info = await manager.get("s1")
    assert info is not None and (info.chat_id, info.parent_id) == ("c2", "p1")
    assert await manager.update_parent_id("s1", None) is True
    assert await manager.get_parent_id("s1") is None

    assert await manager.is_new("s1") is False
    assert await manager.is_new("missing") is True

    # delete cascades to the session's requests and responses, and only to them.
    store(engine, [*exchange_ops("s1", "r1"), *exchange_ops("s1", "r2"), *exchange_ops("keep", "r3")])
    assert await manager.request_count("s1") == 2
    assert await manager.delete("s1") is True
    assert await manager.delete("s1") is False
    assert await manager.peek("s1") is None
    assert count(engine, requests_table, "s1") == count(engine, responses_table, "s1") == 0
    assert count(engine, requests_table, "keep") == count(engine, responses_table, "keep") == 1
    assert await manager.request_count("s1") == 0 and await manager.request_count("keep") == 1


@pytest.mark.anyio
async def test_cleanup_expired_in_batches_and_metrics(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=TTL)
    for i in range(7):
        store(engine, list(exchange_ops(f"s{i}", f"r{i}")))
    for i in range(5):
        expire(engine, f"s{i}")
    assert await manager.metrics() == {"active": 2, "total": 7}
    with pytest.raises(ValueError):
        await manager.cleanup_expired(batch_size=0)
    assert await manager.cleanup_expired(batch_size=2) == 5
    assert await manager.metrics() == {"active": 2, "total": 2}
    assert {s.id for s in await manager.list()} == {"s5", "s6"}
    assert count(engine, requests_table) == count(engine, responses_table) == 2
    assert await manager.cleanup_expired(batch_size=2) == 0
    assert await manager.cleanup_expired() == 0
    empty = await manager.metrics()
    assert empty == {"active": 2, "total": 2}


@pytest.mark.anyio
async def test_list_orders_pages_and_validates(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=TTL)
    base = now_ms()
    same = base + 500
    with engine.begin() as conn:
        for i in range(12):
            # Six sessions share one last_accessed (a batch written in the same millisecond).
            accessed = same if i >= 6 else base + i
            conn.execute(
                sessions_table.insert().values(
                    id=f"s{i:02d}",
                    first_user_message="x",
                    message_count=0,
                    created_at=base,
                    updated_at=base,
                    last_accessed=accessed,
                    expires_at=(accessed + TTL_MS) if i % 2 == 0 else base - 1,
                )
            )
    everything = await manager.list()
    assert len(everything) == 12
    assert [s.last_accessed for s in everything] == sorted(
        (s.last_accessed for s in everything), reverse=True
    )
    pages = [s.id for offset in range(0, 12, 4) for s in await manager.list(limit=4, offset=offset)]
    assert sorted(pages) == sorted(s.id for s in everything)  # every session once, none twice
    assert await manager.list(limit=5, offset=12) == []
    active = await manager.list(active_only=True)
    assert {s.id for s in active} == {f"s{i:02d}" for i in range(0, 12, 2)}
    assert all(not s.expired for s in active)
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": -1}, {"offset": -1}):
        with pytest.raises(ValueError):
            await manager.list(**bad)
    assert len(await manager.list(limit=1000)) == 12


# -- the event loop is never blocked -----------------------------------------------------------------


@pytest.mark.anyio
async def test_methods_do_not_block_the_event_loop(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=TTL)
    for i in range(20):
        await manager.create(f"c{i}", "hi")
    results = await asyncio.gather(*(manager.get(f"c{i}") for i in range(20)))
    assert [r.id if r else None for r in results] == [f"c{i}" for i in range(20)]

    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    # Another connection holds the row (PostgreSQL) or the write lock (SQLite): the update must wait
    # for it in a worker thread while the loop keeps running.
    holder = engine.connect()
    holder.execute(update(sessions_table).where(sessions_table.c.id == "c0").values(chat_id="holder"))
    tick_task = asyncio.create_task(ticker())
    pending = asyncio.create_task(manager.set_chat_id("c0", "manager"))
    started, ticks_at_start = time.monotonic(), ticks
    while time.monotonic() - started < 0.3:
        await asyncio.sleep(0)
        assert not pending.done(), "the update did not wait for the lock"
    assert ticks - ticks_at_start > 100  # the loop ran freely while the update was blocked
    holder.commit()
    holder.close()
    assert await asyncio.wait_for(pending, 10) is True
    stop.set()
    await tick_task
    info = await manager.peek("c0")
    assert info is not None and info.chat_id == "manager"


# -- atomic updates under concurrency ------------------------------------------------------------------


def test_concurrent_batches_keep_the_highest_message_count(engine: Engine) -> None:
    counts = [3, 17, 5, 11, 2, 16, 9, 1, 14, 7, 12, 4, 15, 8, 6, 10]
    start = threading.Barrier(len(counts))
    errors: list[BaseException] = []

    def writer(i: int, messages: int) -> None:
        ops = [exchange_ops("shared", f"req-{i}", messages=messages)[0]]
        start.wait()
        try:
            store(engine, ops)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i, n)) for i, n in enumerate(counts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with engine.connect() as conn:
        rows = conn.execute(select(sessions_table).where(sessions_table.c.id == "shared")).all()
    assert len(rows) == 1 and rows[0].message_count == max(counts)
    assert count(engine, requests_table, "shared") == len(counts)


def test_replaying_old_ops_never_moves_expiry_backwards(engine: Engine) -> None:
    now = now_ms()
    store(engine, [exchange_ops("s", "new", messages=4, arrived=now)[0]])
    # An old op (a spill file replayed later, or a slower replica) must not shorten the live session.
    store(engine, [exchange_ops("s", "old", messages=2, arrived=now - 30_000)[0]])
    with engine.connect() as conn:
        row = conn.execute(select(sessions_table)).one()
    assert (row.last_accessed, row.expires_at, row.message_count) == (now, now + TTL_MS, 4)


@pytest.mark.anyio
async def test_concurrent_parent_and_chat_updates_lose_nothing(engine: Engine) -> None:
    manager = SessionManager(engine, ttl=TTL)
    await manager.create("busy", "hi")
    parents = [f"p{i}" for i in range(25)]
    chats = [f"c{i}" for i in range(25)]
    calls = [manager.update_parent_id("busy", p) for p in parents] + [
        manager.set_chat_id("busy", c) for c in chats
    ]
    results = await asyncio.gather(*calls)
    assert all(results)
    info = await manager.peek("busy")
    assert info is not None and info.parent_id in parents and info.chat_id in chats
    assert count(engine, sessions_table) == 1

    # Response-side updates from many writer threads at once: the count rises to the max, ids survive.
    def respond(i: int) -> None:
        request, response = exchange_ops("busy", f"r{i}", messages=i + 1, parent_id=f"rp{i}")
        store(engine, [request])
        store(engine, [response])

    threads = [threading.Thread(target=respond, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = await manager.peek("busy")
    assert final is not None and final.message_count == 12  # no reply body: no finished message added
    assert final.parent_id in {f"rp{i}" for i in range(12)} and final.chat_id in chats
    assert count(engine, sessions_table) == 1 and count(engine, responses_table, "busy") == 12


def test_response_ids_are_unique_in_a_process_and_across_forks() -> None:
    made = [
        response_op(CapturedResponse("r", 200, False, b"{}", 2, False, 1, 1, 1))["response"] for _ in range(3)
    ]
    ids = [response["response_id"] for response in made]
    assert len(set(ids)) == 3 and all(value.startswith("resp-") for value in ids)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        op = response_op(CapturedResponse("r", 200, False, b"{}", 2, False, 1, 1, 1))
        os.write(writer, op["response"]["response_id"].encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    from_child = os.read(reader, 200).decode()
    os.close(reader)
    after = response_op(CapturedResponse("r", 200, False, b"{}", 2, False, 1, 1, 1))["response"][
        "response_id"
    ]
    assert from_child.startswith("resp-") and from_child not in {*ids, after}


def test_upserting_many_sessions_at_once_applies_each_rule_per_row(engine: Engine) -> None:
    """One upsert of a batch (on PostgreSQL a single statement over arrays) renews each stored session
    by the same rules as one at a time, and a batch naming an id twice is still taken."""
    from qwen_persist.repositories.writes import upsert_sessions
    from qwen_persist.sessions import session_row

    now = now_ms()
    with engine.begin() as conn:
        upsert_sessions(conn, [session_row(f"bulk-{i}", "first", 5, now, 60_000) for i in range(300)])
    expire(engine, "bulk-7")
    renewals = [session_row(f"bulk-{i}", "again", i % 10, now + 1, 60_000) for i in range(300)]
    renewals[3] = {**renewals[3], "chat_id": "chat-3", "ids_updated_at": now + 1}
    with engine.begin() as conn:
        upsert_sessions(conn, renewals)
        upsert_sessions(
            conn,
            [session_row("bulk-1", "x", 9, now + 2, 60_000), session_row("bulk-1", "y", 8, now + 3, 60_000)],
        )
    with engine.connect() as conn:
        stored = {row.id: row for row in conn.execute(select(sessions_table)).all()}
    assert len(stored) == 300
    assert [stored[f"bulk-{i}"].message_count for i in (0, 4, 6, 9)] == [5, 5, 6, 9]  # never lowered
    assert stored["bulk-3"].chat_id == "chat-3" and stored["bulk-3"].ids_updated_at == now + 1
    assert stored["bulk-3"].first_user_message == "first"  # kept from the first request
    assert stored["bulk-1"].message_count == 9 and stored["bulk-1"].last_accessed == now + 3
    assert stored["bulk-2"].expires_at == now + 1 + 60_000  # slid forward
