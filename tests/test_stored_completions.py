"""The OpenAI Stored Completions API, driven by the official openai SDK against real uvicorn servers, on
SQLite and PostgreSQL: the standalone API app (`create_app`) over recorded traffic for the reads, and the
proxy wrapped in `PersistenceMiddleware` (``api_token=``) for everything that writes, so the same client
creates completions through the proxy and reads them back from it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fake_upstream
import httpx
import openai
import openai_proxy
import pytest
from openai.types.chat import ChatCompletion
from support import serve
from traffic import Traffic, record_traffic

from qwen_persist.api import create_app
from qwen_persist.migrate import upgrade
from qwen_persist.repositories import (
    LIBRARY_METADATA_KEYS,
    CompletionFilter,
    History,
    InvalidParameter,
    Pagination,
    StoredCompletion,
)
from qwen_persist.repositories.writes import write_ops
from qwen_persist.sessions import session_row

TOKEN = "test-api-token"
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """``probe()`` once it is not None: the writer stores rows shortly after the response, not with it."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------ reads: recorded traffic, standalone


@dataclass
class Recorded:
    client: openai.OpenAI
    traffic: Traffic
    history: History
    url: str


@pytest.fixture(scope="module")
def recorded(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    """Three rounds of traffic through the real middleware (24 successes, 12 of them streamed, and 6
    errors), served by the standalone API app under uvicorn; read-only for the tests that use it."""
    upgrade(module_database_url)
    traffic = record_traffic(module_database_url, tmp_path_factory.mktemp("traffic"), rounds=3)
    history = History(module_database_url)
    answered = [
        exchange.response is not None
        for seen in traffic.seen
        if (exchange := history.requests.exchange_by_request_id(seen.request_id)) is not None
    ]
    # Every test below counts on the whole recording; say so plainly when the recording itself fell short.
    assert len(traffic.seen) == 30 and answered == [True] * 30, "the recorded traffic is incomplete"
    with serve(create_app(module_database_url, api_token=TOKEN)) as api:
        client = openai.OpenAI(base_url=f"{api}/v1", api_key=TOKEN, max_retries=0)
        yield Recorded(client, traffic, history, module_database_url)
        client.close()
    history.close()


def ok_ids(traffic: Traffic, keep: Callable[[Any], bool] = lambda seen: True) -> list[str]:
    """The completion ids the client received, in the order the exchanges ended."""
    return [seen.completion_id for seen in traffic.ok() if keep(seen)]


def test_auto_pagination_lists_every_successful_exchange_once_in_order(recorded: Recorded) -> None:
    expected = ok_ids(recorded.traffic)
    assert len(expected) == 24 == len(set(expected))
    first = recorded.client.chat.completions.list(limit=2)
    pages = list(first.iter_pages())
    assert [len(page.data) for page in pages] == [2] * 12
    assert [page.has_more for page in pages] == [True] * 11 + [False]
    assert [c.id for page in pages for c in page.data] == expected
    # The SDK's own auto-pagination, item by item, gives the same.
    assert [c.id for c in recorded.client.chat.completions.list(limit=2)] == expected
    # The default page is OpenAI's 20; the next one starts after it.
    default = recorded.client.chat.completions.list()
    assert [c.id for c in default.data] == expected[:20] and default.has_more


def test_cursor_page_shape(recorded: Recorded) -> None:
    response = httpx.get(
        f"{recorded.client.base_url}chat/completions",
        params={"limit": 3, "after": ok_ids(recorded.traffic)[0]},
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    body = response.json()
    expected = ok_ids(recorded.traffic)[1:4]
    assert response.status_code == 200
    assert body["object"] == "list" and body["has_more"] is True
    assert [item["id"] for item in body["data"]] == expected
    assert (body["first_id"], body["last_id"]) == (expected[0], expected[-1])
    assert all(item["object"] == "chat.completion" for item in body["data"])


def test_errors_are_not_listed(recorded: Recorded) -> None:
    listed = {c.id for c in recorded.client.chat.completions.list(limit=100)}
    errors = recorded.traffic.errors()
    assert len(errors) == 6 and {seen.status for seen in errors} == {429, 500}
    for seen in errors:  # recorded, with a response, and still not a stored completion
        exchange = recorded.history.requests.exchange_by_request_id(seen.request_id)
        assert exchange is not None and exchange.response is not None
        assert exchange.response.status_code == seen.status
        assert exchange.response.response_id not in listed
        assert recorded.history.completions.get(exchange.response.response_id) is None
    assert listed == set(ok_ids(recorded.traffic))


def test_order(recorded: Recorded) -> None:
    expected = ok_ids(recorded.traffic)
    descending = recorded.client.chat.completions.list(limit=5, order="desc")
    assert [c.id for c in descending] == expected[::-1]
    ascending = recorded.client.chat.completions.list(limit=5, order="asc")
    assert [c.id for c in ascending] == expected
    after = recorded.client.chat.completions.list(limit=3, order="desc", after=expected[10])
    assert [c.id for c in after.data] == expected[9:6:-1]


@pytest.mark.parametrize("model", ["fake-text", "fake-tool", "fake-length", "fake-error-429", "nope"])
def test_filter_by_model(recorded: Recorded, model: str) -> None:
    expected = ok_ids(recorded.traffic, lambda seen: seen.model == model)
    listed = recorded.client.chat.completions.list(model=model, limit=2)
    assert [c.id for c in listed] == expected
    assert all(c.model == model for c in listed)
    assert len(expected) == (6 if model.startswith("fake-") and "error" not in model else 0)


@pytest.mark.parametrize(
    "metadata",
    [
        {"team": "red"},
        {"team": "blue", "round": "1"},
        {"round": "2"},
        {"team": "green"},
        {"nobody": "has this"},
    ],
)
def test_filter_by_metadata(recorded: Recorded, metadata: dict[str, str]) -> None:
    def matches(seen: Any) -> bool:
        return seen.metadata is not None and all(seen.metadata.get(k) == v for k, v in metadata.items())

    expected = ok_ids(recorded.traffic, matches)
    listed = list(recorded.client.chat.completions.list(metadata=metadata, limit=2))
    assert [c.id for c in listed] == expected
    assert all(c.metadata is not None and metadata.items() <= c.metadata.items() for c in listed)
    if metadata.get("team") in ("red", "blue"):
        assert expected  # the filter is exercised, not vacuous


def test_filters_combine(recorded: Recorded) -> None:
    expected = ok_ids(
        recorded.traffic,
        lambda seen: seen.model == "fake-reasoning" and (seen.metadata or {}).get("team") == "blue",
    )
    assert len(expected) == 3
    listed = recorded.client.chat.completions.list(
        model="fake-reasoning", metadata={"team": "blue"}, order="desc"
    )
    assert [c.id for c in listed] == expected[::-1]


def test_retrieve_gives_what_the_client_received(recorded: Recorded) -> None:
    for seen in recorded.traffic.ok():
        completion = recorded.client.chat.completions.retrieve(seen.completion_id)
        assert isinstance(completion, ChatCompletion)
        assert (completion.id, completion.model, completion.object) == (
            seen.completion_id,
            seen.model,
            "chat.completion",
        )
        message = completion.choices[0].message
        if seen.model == "fake-tool":
            assert message.tool_calls and message.tool_calls[0].function.name == "get_weather"
        else:
            assert message.content == seen.content
        assert completion.metadata == (seen.metadata or {})
        assert completion.usage is not None and completion.usage.total_tokens > 0
        # A stream's completion is the one rebuilt from its chunks: the same object either way.
        exchange = recorded.history.requests.exchange_by_request_id(seen.request_id)
        assert exchange is not None and exchange.request.stream is seen.stream


def test_messages_of_recorded_exchanges(recorded: Recorded) -> None:
    seen = recorded.traffic.ok()[3]
    messages = list(recorded.client.chat.completions.messages.list(seen.completion_id))
    assert [(m.id, m.role, m.content, m.content_parts) for m in messages] == [
        (f"{seen.completion_id}-0", "user", "stream 0.1", None)
    ]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"after": "chatcmpl-unknown"}, "after"),
        ({"modle": "fake-text"}, "modle"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_list_parameters_are_400s(recorded: Recorded, params: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        recorded.client.chat.completions.list(extra_query=params)
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_message_parameters_are_400s(recorded: Recorded) -> None:
    completion_id = ok_ids(recorded.traffic)[0]
    messages = recorded.client.chat.completions.messages
    for params in ({"limit": 0}, {"limit": 101}, {"order": "sideways"}, {"after": "chatcmpl-x-0"}):
        with pytest.raises(openai.BadRequestError):
            messages.list(completion_id, extra_query=params)
    assert messages.list(completion_id, limit=100, order="desc").data  # the bounds themselves are fine


def test_unknown_ids_are_404s(recorded: Recorded) -> None:
    completions = recorded.client.chat.completions
    calls: list[Callable[[], Any]] = [
        lambda: completions.retrieve("chatcmpl-nothing"),
        lambda: completions.update("chatcmpl-nothing", metadata={"a": "b"}),
        lambda: completions.delete("chatcmpl-nothing"),
        lambda: completions.messages.list("chatcmpl-nothing"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        body = caught.value.body
        assert (
            isinstance(body, dict)
            and body["type"] == "not_found_error"
            and "chatcmpl-nothing" in body["message"]
        )
    # An error exchange is recorded but is no stored completion: its ids are unknown here too.
    error = recorded.history.requests.exchange_by_request_id(recorded.traffic.errors()[0].request_id)
    assert error is not None and error.response is not None
    with pytest.raises(openai.NotFoundError):
        completions.retrieve(error.response.response_id)


def test_the_api_needs_the_token(recorded: Recorded) -> None:
    anonymous = recorded.client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.list()
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.retrieve(ok_ids(recorded.traffic)[0])


def test_repository_pages_and_async_twins(recorded: Recorded) -> None:
    history = recorded.history
    expected = ok_ids(recorded.traffic)
    seen: list[str] = []
    after: str | None = None
    while True:
        page = history.completions.list(page=Pagination(limit=7, after=after, descending=False))
        seen += [c.id for c in page.items]
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == expected
    # Offset pages and the total count work too, in the same order.
    offset = history.completions.list(page=Pagination(limit=5, offset=20, descending=False, count_total=True))
    assert [c.id for c in offset.items] == expected[20:] and offset.total == 24

    async def twins() -> tuple[Any, ...]:
        return await asyncio.gather(
            history.completions.alist(CompletionFilter(model="fake-text")),
            history.completions.aget(expected[0]),
            history.completions.amessages(expected[0]),
        )

    listed, one, messages = asyncio.run(twins())
    assert listed == history.completions.list(CompletionFilter(model="fake-text"))
    assert one == history.completions.get(expected[0])
    assert messages == history.completions.messages(expected[0])
    with pytest.raises(InvalidParameter):
        history.completions.list(page=Pagination(order_by="duration_ms"))


# ------------------------------------------------------------------ writes: the proxy serves the API


@dataclass
class Proxy:
    client: openai.OpenAI
    history: History
    url: str
    base: str
    upstream: str


@pytest.fixture
def proxy(migrated_url: str, tmp_path: Path) -> Iterator[Proxy]:
    """The example proxy in PersistenceMiddleware with ``api_token=``, in front of the fake upstream: one
    SDK client creates chat completions through it and uses the Stored Completions API on it."""
    history = History(migrated_url)
    with serve(fake_upstream.create_app()) as upstream:
        app = openai_proxy.create_app(
            f"{upstream}/v1",
            "",
            database_url=migrated_url,
            spill_dir=str(tmp_path / "spill"),
            api_token=TOKEN,
        )
        with serve(app) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
            yield Proxy(client, history, migrated_url, base, upstream)
            client.close()
    history.close()


def stored(proxy: Proxy, completion_id: str) -> StoredCompletion:
    return eventually(lambda: proxy.history.completions.get(completion_id), f"{completion_id} to be stored")


def accumulate(stream: Any) -> tuple[str, str, str, Any]:
    """A stream as the client saw it: id, model, content, usage (from the last chunk)."""
    ids, models, parts, usage = set(), set(), [], None
    for chunk in stream:
        ids.add(chunk.id)
        models.add(chunk.model)
        parts.extend(choice.delta.content or "" for choice in chunk.choices)
        usage = chunk.usage or usage
    (completion_id,), (model,) = ids, models
    return completion_id, model, "".join(parts), usage


def test_sdk_objects_equal_what_the_client_received(proxy: Proxy) -> None:
    """JSON answers and streams (rebuilt from their chunks) read back as the client received them."""
    client = proxy.client
    received: list[ChatCompletion] = [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hello {model}"}], metadata={"k": model}
        )
        for model in ("fake-text", "fake-reasoning", "fake-tool", "fake-length")
    ]
    streamed = [
        accumulate(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"stream {model}"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        for model in ("fake-text", "fake-reasoning")
    ]
    for original in received:
        stored(proxy, original.id)
        completion = client.chat.completions.retrieve(original.id)
        assert completion.model_dump(exclude={"metadata"}) == original.model_dump(exclude={"metadata"})
        assert completion.metadata == {"k": original.model}
    for completion_id, model, content, usage in streamed:
        stored(proxy, completion_id)
        completion = client.chat.completions.retrieve(completion_id)
        assert (completion.id, completion.model, completion.object) == (
            completion_id,
            model,
            "chat.completion",
        )
        assert completion.choices[0].message.content == content and content
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage == usage and usage is not None
        assert completion.metadata == {}
    listed = [c.id for c in client.chat.completions.list()]
    assert listed == [c.id for c in received] + [s[0] for s in streamed]


def test_a_stream_in_flight_is_not_listed_until_it_ends(proxy: Proxy) -> None:
    client = proxy.client
    done = stored(
        proxy,
        client.chat.completions.create(model="fake-text", messages=[{"role": "user", "content": "a"}]).id,
    )
    raw = client.chat.completions.with_raw_response.create(
        model="fake-slow",
        messages=[{"role": "user", "content": "slow"}],
        stream=True,
        extra_headers={"x-fake-chunks": "100", "x-fake-delay-ms": "50"},  # about 5 s
    )
    request_id = raw.headers["x-request-id"]
    stream = raw.parse()
    chunks = iter(stream)
    first = next(chunks)
    in_flight = eventually(
        lambda: proxy.history.requests.exchange_by_request_id(request_id), "the request row of the stream"
    )
    assert in_flight.response is None
    assert [c.id for c in client.chat.completions.list()] == [done.id]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(first.id)
    still = proxy.history.requests.exchange_by_request_id(request_id)
    assert still is not None and still.response is None, "the stream ended before the check: no conclusion"
    content = (first.choices[0].delta.content or "") + "".join(
        choice.delta.content or "" for chunk in chunks for choice in chunk.choices
    )
    stored(proxy, first.id)
    assert [c.id for c in client.chat.completions.list()] == [done.id, first.id]
    assert client.chat.completions.retrieve(first.id).choices[0].message.content == content
    assert content.count("tick") == 100


def test_messages_with_pagination(proxy: Proxy) -> None:
    client = proxy.client
    sent: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is"},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
                {"type": "text", "text": "this?"},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "thanks", "name": "alice"},
    ]
    completion = client.chat.completions.create(model="fake-text", messages=sent)
    stored(proxy, completion.id)
    pages = list(client.chat.completions.messages.list(completion.id, limit=2).iter_pages())
    assert [len(page.data) for page in pages] == [2, 2, 2]
    messages = [m for page in pages for m in page.data]
    assert [m.id for m in messages] == [f"{completion.id}-{i}" for i in range(6)]
    assert [m.role for m in messages] == [m["role"] for m in sent]
    assert [m.content for m in messages] == [
        "Be brief.",
        "one",
        "Echo: one",
        "what is\nthis?",
        "A cat.",
        "thanks",
    ]
    parts = messages[3].content_parts
    assert parts is not None and [p.type for p in parts] == ["text", "image_url", "text"]
    assert parts[1].image_url.url == "https://example.invalid/cat.png"  # type: ignore[union-attr]
    assert [m.content_parts for i, m in enumerate(messages) if i != 3] == [None] * 5
    assert messages[5].model_extra == {"name": "alice"}
    backwards = list(client.chat.completions.messages.list(completion.id, limit=4, order="desc"))
    assert [m.id for m in backwards] == [m.id for m in messages][::-1]
    after = client.chat.completions.messages.list(completion.id, after=f"{completion.id}-3")
    assert [m.id for m in after.data] == [f"{completion.id}-4", f"{completion.id}-5"] and not after.has_more
    assert (after.model_extra or {}).get("first_id") == f"{completion.id}-4"


def test_update_replaces_client_metadata_and_keeps_the_librarys(proxy: Proxy, tmp_path: Path) -> None:
    client = proxy.client
    ask = {"model": "fake-text", "messages": [{"role": "user", "content": "hi"}]}
    # A second proxy process on the same database already stored a request under X-Request-Id dup-1: the
    # request sent with it here is stored under a fresh id, the client's kept as client_request_id (one
    # of the library's own metadata keys).
    other = openai_proxy.create_app(
        f"{proxy.upstream}/v1", "", database_url=proxy.url, spill_dir=str(tmp_path / "other")
    )
    with serve(other) as base, openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0) as elsewhere:
        first = elsewhere.chat.completions.create(
            **ask, extra_headers={"x-request-id": "dup-1"}, metadata={"a": "1"}
        )
    assert proxy.history.requests.get_by_request_id("dup-1") is not None
    second = client.chat.completions.create(
        **ask, extra_headers={"x-request-id": "dup-1"}, metadata={"a": "2", "b": "x"}
    )
    stored(proxy, first.id)
    row = stored(proxy, second.id).request
    assert row.metadata == {"a": "2", "b": "x", "client_request_id": "dup-1"}
    assert client.chat.completions.retrieve(second.id).metadata == {"a": "2", "b": "x"}
    assert [c.id for c in client.chat.completions.list(metadata={"client_request_id": "dup-1"})] == []

    updated = client.chat.completions.update(second.id, metadata={"c": "new", "a": "3"})
    assert updated.id == second.id and updated.metadata == {"c": "new", "a": "3"}
    assert updated.choices[0].message.content == second.choices[0].message.content
    assert client.chat.completions.retrieve(second.id).metadata == {"c": "new", "a": "3"}
    request = proxy.history.requests.get(row.id)
    assert request is not None
    assert request.metadata == {"c": "new", "a": "3", "client_request_id": "dup-1"}
    assert request.openai_request["metadata"] == {"a": "2", "b": "x"}  # the body stays as sent
    assert [c.id for c in client.chat.completions.list(metadata={"c": "new"})] == [second.id]
    assert [c.id for c in client.chat.completions.list(metadata={"b": "x"})] == []
    assert [c.id for c in client.chat.completions.list(metadata={"a": "1"})] == [first.id]

    cleared = client.chat.completions.update(second.id, metadata=None)
    assert cleared.metadata == {}
    request = proxy.history.requests.get(row.id)
    assert request is not None and request.metadata == {"client_request_id": "dup-1"}
    assert client.chat.completions.update(first.id, metadata={}).metadata == {}
    request = proxy.history.requests.get(stored(proxy, first.id).request.id)
    assert request is not None and request.metadata is None


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"k": "v" * 513},
        {"k": 1},
        {"client_request_id": "mine"},
        "not an object",
    ],
)
def test_update_refuses_what_openai_refuses(proxy: Proxy, metadata: Any) -> None:
    client = proxy.client
    completion = client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "hi"}], metadata={"keep": "me"}
    )
    stored(proxy, completion.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.update(completion.id, metadata=metadata)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "metadata"
    assert client.chat.completions.retrieve(completion.id).metadata == {"keep": "me"}
    # The limits themselves are fine.
    limits = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert client.chat.completions.update(completion.id, metadata=limits).metadata == limits


def test_update_needs_a_metadata_object(proxy: Proxy) -> None:
    completion = proxy.client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "x"}]
    )
    stored(proxy, completion.id)
    url = f"{proxy.base}/v1/chat/completions/{completion.id}"
    headers = {"authorization": f"Bearer {TOKEN}"}
    for body in (b"{}", b"[]", b"not json", b'{"metadata": {"a": "b"}' + b" " * 70_000 + b"}"):
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code in (400, 413), body[:20]
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}


def test_delete(proxy: Proxy) -> None:
    client = proxy.client
    kept, gone = (
        client.chat.completions.create(model="fake-text", messages=[{"role": "user", "content": text}])
        for text in ("keep", "drop")
    )
    row = stored(proxy, gone.id)
    stored(proxy, kept.id)
    deleted = client.chat.completions.delete(gone.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (gone.id, True, "chat.completion.deleted")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(gone.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.messages.list(gone.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(gone.id)
    assert [c.id for c in client.chat.completions.list()] == [kept.id]
    # The exchange is gone (request and response rows); its session stays.
    assert proxy.history.requests.get(row.request.id) is None
    assert proxy.history.responses.get(row.response.id) is None
    assert proxy.history.sessions.get(row.request.session_id) is not None


def test_the_proxy_still_answers_chat_completions_and_other_paths(proxy: Proxy) -> None:
    """POST /v1/chat/completions is the proxy's, even with the API on; the API's paths need the token."""
    no_token = openai.OpenAI(base_url=f"{proxy.base}/v1", api_key="not-the-token", max_retries=0)
    completion = no_token.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Echo: hi (fake reply)"
    assert no_token.models.list().data  # GET /v1/models: the proxy's too
    with pytest.raises(openai.AuthenticationError):
        no_token.chat.completions.list()
    stored(proxy, completion.id)
    assert proxy.client.chat.completions.retrieve(completion.id).id == completion.id
    no_token.close()


def test_newest_exchange_wins_a_repeated_upstream_id(migrated_url: str, tmp_path: Path) -> None:
    """Two upstreams that both number their completions from 1: the id belongs to the newest exchange;
    the older one stays listed, under its response id."""
    contents = []
    for turn in ("older", "newer"):
        with serve(fake_upstream.create_app()) as upstream:
            app = openai_proxy.create_app(
                f"{upstream}/v1",
                "",
                database_url=migrated_url,
                spill_dir=str(tmp_path / turn),
                api_token=TOKEN,
            )
            with serve(app) as base:
                client = openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, max_retries=0)
                created = client.chat.completions.create(
                    model="fake-text", messages=[{"role": "user", "content": turn}], metadata={"turn": turn}
                )
                contents.append(created)
    older, newer = contents
    assert older.id == newer.id == "chatcmpl-fake000001"
    with serve(create_app(migrated_url, api_token=TOKEN)) as api:
        client = openai.OpenAI(base_url=f"{api}/v1", api_key=TOKEN, max_retries=0)
        listed = list(client.chat.completions.list(limit=1))
        assert len(listed) == 2 and listed[1].id == newer.id and listed[0].id.startswith("resp-")
        assert listed[0].choices[0].message.content == older.choices[0].message.content
        assert client.chat.completions.retrieve(newer.id).metadata == {"turn": "newer"}
        # The older one is found by its response id, as listed.
        assert client.chat.completions.retrieve(listed[0].id).metadata == {"turn": "older"}
        assert [c.id for c in client.chat.completions.list(metadata={"turn": "older"})] == [listed[0].id]
        # Update and delete act on the newest; then the id falls to the older exchange.
        assert client.chat.completions.update(newer.id, metadata={"turn": "updated"}).metadata == {
            "turn": "updated"
        }
        assert client.chat.completions.retrieve(listed[0].id).metadata == {"turn": "older"}
        assert client.chat.completions.delete(newer.id).id == newer.id
        survivor = client.chat.completions.retrieve(newer.id)
        assert survivor.metadata == {"turn": "older"} and survivor.id == newer.id
        assert [c.id for c in client.chat.completions.list()] == [newer.id]
        client.close()


# ------------------------------------------------------------------ hand-made rows: the edge cases


def exchange_ops(
    n: int,
    *,
    timestamp: int = 1_000,
    status: int | None = 200,
    body: Any = "completion",
    upstream_id: str | None = "auto",
    error: str | None = None,
    metadata: Any = None,
    model: str = "m",
) -> list[dict[str, Any]]:
    """The writer's ops for one exchange, as the middleware would hand them over."""
    key = f"hand-{n}"
    if upstream_id == "auto":
        upstream_id = f"chatcmpl-{key}"
    if body == "completion":
        body = {
            "id": upstream_id,
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"reply {n}"},
                    "finish_reason": "stop",
                }
            ],
        }
    request = {
        "op": "request",
        "capture_id": key,
        "session": session_row("s-hand", "hi", 1, timestamp, 60_000),
        "request": {
            "request_id": key,
            "capture_id": key,
            "session_id": "s-hand",
            "timestamp": timestamp,
            "created_at": timestamp,
            "method": "POST",
            "path": "/v1/chat/completions",
            "openai_request": {"model": model, "messages": [{"role": "user", "content": f"hi {n}"}]},
            "qwen_request": None,
            "model": model,
            "stream": False,
            "user": None,
            "metadata": metadata,
            "provider": None,
        },
    }
    response = {
        "op": "response",
        "request_id": key,
        "capture_id": key,
        "response": {
            "response_id": f"resp-{key}",
            "upstream_id": upstream_id,
            "timestamp": timestamp,
            "created_at": timestamp,
            "status_code": status,
            "openai_response": body,
            "qwen_response": None,
            "parent_id": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "finish_reason": "stop",
            "error": error,
            "duration_ms": 1,
            "first_byte_ms": 1,
            "headers": None,
        },
    }
    return [request, response]


@pytest.fixture
def store(migrated_url: str) -> Iterator[History]:
    history = History(migrated_url)
    yield history
    history.close()


def write(history: History, *exchanges: list[dict[str, Any]]) -> None:
    with history.engine.begin() as conn:
        write_ops(conn, [op for ops in exchanges for op in ops])


def test_only_complete_chat_completions_are_stored_completions(store: History) -> None:
    write(
        store,
        exchange_ops(1),
        exchange_ops(2, status=200, error="truncated"),  # a stream cut short
        exchange_ops(3, status=200, body={"object": "text_completion", "choices": []}),  # another API
        exchange_ops(4, status=200, body=None),
        exchange_ops(5, status=400, body={"error": {"message": "no"}}),
        exchange_ops(6, upstream_id=None),  # no id from the upstream: the response id stands in
        exchange_ops(7, status=None, error="client_disconnected"),
        exchange_ops(8, status=302),
    )
    write(store, exchange_ops(9)[:1])  # in flight: no response yet
    listed = [c.id for c in store.completions.list().items]
    assert listed == ["chatcmpl-hand-1", "resp-hand-6", "chatcmpl-hand-8"]
    for n in (2, 3, 4, 5, 7, 9):
        assert store.completions.get(f"chatcmpl-hand-{n}") is None
        assert store.completions.get(f"resp-hand-{n}") is None
    six = store.completions.get("resp-hand-6")
    assert six is not None and six.to_openai()["id"] == "resp-hand-6"
    one = store.completions.get("resp-hand-1")  # by response id: under the id the client saw
    assert one is not None and one.id == "chatcmpl-hand-1"


def test_ties_in_time_page_in_one_total_order(store: History) -> None:
    write(store, *(exchange_ops(n, timestamp=5_000) for n in range(9)))
    write(store, *(exchange_ops(n, timestamp=5_000, upstream_id="chatcmpl-same") for n in range(9, 12)))
    every = [c.id for c in store.completions.list(page=Pagination(limit=100, descending=False)).items]
    assert len(every) == len(set(every)) == 12
    # Among equal times the highest row id is the newest: it owns the repeated id.
    assert every[-1] == "chatcmpl-same" and every[-3:-1] == ["resp-hand-9", "resp-hand-10"]
    owner = store.completions.get("chatcmpl-same")
    assert owner is not None and owner.response.response_id == "resp-hand-11"
    for descending in (False, True):
        seen: list[str] = []
        after: str | None = None
        while True:
            page = store.completions.list(page=Pagination(limit=5, after=after, descending=descending))
            seen += [c.id for c in page.items]
            if not page.has_more:
                break
            after = page.items[-1].id
        assert seen == (every[::-1] if descending else every)


def test_library_keys_are_never_client_metadata(store: History) -> None:
    library = {
        "capture_problem": "body_truncated",
        "qwen_persist_original_text": {"openai_request": "{ }"},
        "assigned_request_id": "a-1",
        "sent_request_id": "s-1",
        "client_request_id": "c-1",
    }
    assert set(library) == LIBRARY_METADATA_KEYS
    write(store, exchange_ops(1, metadata={**library, "team": "red"}), exchange_ops(2, metadata=library))
    one, two = (store.completions.get(f"chatcmpl-hand-{n}") for n in (1, 2))
    assert one is not None and two is not None
    assert (one.metadata, two.metadata) == ({"team": "red"}, {})
    assert one.to_openai()["metadata"] == {"team": "red"}
    for key, value in library.items():
        if isinstance(value, str):
            assert store.completions.list(CompletionFilter(metadata={key: value})).items == []
    assert [c.id for c in store.completions.list(CompletionFilter(metadata={"team": "red"})).items] == [
        one.id
    ]
    updated = store.completions.update_metadata(one.id, {"team": "blue"})
    assert updated is not None and updated.metadata == {"team": "blue"}
    request = store.requests.get(one.request.id)
    assert request is not None and request.metadata == {**library, "team": "blue"}
    with pytest.raises(InvalidParameter):
        store.completions.update_metadata(one.id, {"capture_problem": "mine"})


def test_metadata_keys_and_values_of_any_spelling(store: History) -> None:
    """Keys a JSON path cannot spell, non-ASCII, and NUL (stored escaped) all filter and read back."""
    odd = {
        'we"ird': "q",
        "back\\slash": "b",
        "dot.key": "d",
        "ü": "ö",
        "[0]": "z",
        "a b": "c d",
        "nul\x00": "x\x00y",
    }
    write(store, exchange_ops(1, metadata={"n": "1"}))
    assert store.completions.update_metadata("chatcmpl-hand-1", odd) is not None
    write(store, exchange_ops(2, metadata={"dot": {"key": "d"}, "n": 1}))
    completion = store.completions.get("chatcmpl-hand-1")
    assert completion is not None and completion.metadata == odd
    for key, value in odd.items():
        found = store.completions.list(CompletionFilter(metadata={key: value})).items
        assert [c.id for c in found] == ["chatcmpl-hand-1"], key
        assert store.completions.list(CompletionFilter(metadata={key: value + "!"})).items == []
    # Only string values match: a number is not its digits.
    assert store.completions.list(CompletionFilter(metadata={"n": "1"})).items == []


def test_filters_reject_what_is_not_text() -> None:
    with pytest.raises(InvalidParameter):
        CompletionFilter(model=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter):
        CompletionFilter(metadata={"a": 1})  # type: ignore[dict-item]


def test_a_nul_in_the_exchange_reads_back(proxy: Proxy) -> None:
    """A request and reply holding NUL are stored escaped (PostgreSQL cannot hold NUL) and read back as
    they were sent and received: content, messages and metadata, which also filters as sent."""
    client = proxy.client
    sent = {"tag": "a\x00b", "sign": "\u2400 and \u2400\u2400", "plain": "p"}
    completion = client.chat.completions.create(
        model="fake-text", messages=[{"role": "user", "content": "nul\x00here"}], metadata=sent
    )
    assert completion.choices[0].message.content == "Echo: nul\x00here (fake reply)"
    stored(proxy, completion.id)
    again = client.chat.completions.retrieve(completion.id)
    assert again.choices[0].message.content == completion.choices[0].message.content
    assert again.metadata == sent
    assert [m.content for m in client.chat.completions.messages.list(completion.id)] == ["nul\x00here"]
    for key, value in sent.items():
        assert [c.id for c in client.chat.completions.list(metadata={key: value})] == [completion.id]
    updated = client.chat.completions.update(completion.id, metadata={"tag": "c\x00d", "sign": "\u2400"})
    assert updated.metadata == {"tag": "c\x00d", "sign": "\u2400"}
    assert client.chat.completions.retrieve(completion.id).metadata == updated.metadata
    for key, value in updated.metadata.items():
        assert [c.id for c in client.chat.completions.list(metadata={key: value})] == [completion.id]
    assert [c.id for c in client.chat.completions.list(metadata={"tag": "a\x00b"})] == []


# ------------------------------------------------------------------ index backing


def test_reads_go_through_indexes(sqlite_url: str) -> None:
    """SQLite's plans: every table is searched or walked through an index, never scanned row by row, and
    a list page (plain, by model, by metadata, after a cursor) is read in index order, so the scan stops
    after it instead of sorting every stored completion first."""
    from sqlalchemy import event

    upgrade(sqlite_url)
    history = History(sqlite_url)
    write(history, exchange_ops(1))
    calls: list[Callable[[], Any]] = [
        lambda: history.completions.list(),
        lambda: history.completions.list(page=Pagination(limit=5, descending=True)),
        lambda: history.completions.list(
            CompletionFilter(model="m"), Pagination(limit=5, after="chatcmpl-hand-1")
        ),
        lambda: history.completions.list(CompletionFilter(metadata={"team": "red"})),
        lambda: history.completions.get("chatcmpl-hand-1"),
    ]
    for number, call in enumerate(calls):
        statements: list[tuple[str, Any]] = []

        def record(*args: Any, into: list[tuple[str, Any]] = statements) -> None:
            into.append((args[2], args[3]))

        event.listen(history.engine, "before_cursor_execute", record)
        call()
        event.remove(history.engine, "before_cursor_execute", record)
        assert statements
        with history.engine.connect() as conn:
            for statement, parameters in statements:
                plan = [
                    row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
                ]
                for step in plan:
                    if step.startswith("SCAN") and "VIRTUAL TABLE" not in step:  # json_each: one row's pairs
                        assert "USING" in step and "INDEX" in step, plan
                if number < 4 and statement is statements[-1][0]:  # a list's page
                    assert not any("TEMP B-TREE" in step for step in plan), plan
    history.close()


def test_concurrent_updates_lose_no_library_key(store: History) -> None:
    """Updates of one completion from several threads: each replaces the client's metadata whole, and
    the library's key is there after every one of them."""
    write(store, exchange_ops(1, metadata={"client_request_id": "c-1"}))
    errors: list[BaseException] = []

    def update(i: int) -> None:
        try:
            for j in range(10):
                store.completions.update_metadata("chatcmpl-hand-1", {"writer": str(i), "round": str(j)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=update, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    completion = store.completions.get("chatcmpl-hand-1")
    assert completion is not None
    assert completion.request.metadata == {"client_request_id": "c-1", **completion.metadata}
    assert completion.metadata["round"] == "9" and set(completion.metadata) == {"writer", "round"}
