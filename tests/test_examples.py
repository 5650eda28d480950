"""The examples: the fake upstream's scenarios byte by byte, and the proxies in front of it.

The fake upstream is exercised in-process (httpx's ASGI transport). The proxies run under a real uvicorn
on 127.0.0.1 so that streaming, connection handling and the official SDK are the real thing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import fake_upstream
import httpx
import pytest
from support import serve, stored_exchanges

CLOCK = 1_700_000_000
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def upstream() -> AsyncIterator[httpx.AsyncClient]:
    app = fake_upstream.create_app(clock=lambda: CLOCK)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://upstream") as client:
        yield client


def events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of a complete SSE body (``[DONE]`` kept as the string)."""
    assert body.endswith(b"\n\n"), body[-80:]
    out: list[Any] = []
    for block in body.decode().split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(model: str, messages: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages or USER, **extra}


# --- the fake upstream --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_text_json(upstream: httpx.AsyncClient) -> None:
    response = await upstream.post("/v1/chat/completions", json=chat("fake-text"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert (body["created"], body["model"]) == (CLOCK, "fake-text")
    assert body["system_fingerprint"]
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Echo: hello there (fake reply)", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


@pytest.mark.anyio
async def test_ids_unique_per_request_and_unknown_models_echo(upstream: httpx.AsyncClient) -> None:
    first = (await upstream.post("/v1/chat/completions", json=chat("gpt-4o"))).json()
    second = (await upstream.post("/v1/chat/completions", json=chat("gpt-4o"))).json()
    assert first["id"] != second["id"]
    assert first["model"] == "gpt-4o"
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


@pytest.mark.anyio
async def test_text_stream_exact_sequence(upstream: httpx.AsyncClient) -> None:
    response = await upstream.post("/v1/chat/completions", json=chat("fake-text", stream=True))
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.content)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Echo:"},
        {"content": " hello"},
        {"content": " there"},
        {"content": " (fake"},
        {"content": " reply)"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 6 + ["stop"]


@pytest.mark.anyio
async def test_stream_n_choices_interleaved_with_usage_chunk(upstream: httpx.AsyncClient) -> None:
    body = chat("fake-text", n=2, stream=True, stream_options={"include_usage": True})
    chunks = events((await upstream.post("/v1/chat/completions", json=body)).content)
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
    content_chunks = chunks[:-2]
    assert all(c["usage"] is None for c in content_chunks)
    indexes = [c["choices"][0]["index"] for c in content_chunks]
    assert indexes[:4] == [0, 1, 0, 1]
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    for c in content_chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        finish[choice["index"]] = choice["finish_reason"]
    assert texts == ["Echo: hello there (fake reply)", "Echo: hello there (fake reply) [choice 1]"]
    assert finish == ["stop", "stop"]

    json_body = (await upstream.post("/v1/chat/completions", json=chat("fake-text", n=2))).json()
    assert [c["message"]["content"] for c in json_body["choices"]] == texts


@pytest.mark.anyio
async def test_tool_call_round_trip(upstream: httpx.AsyncClient) -> None:
    chunks = events(
        (await upstream.post("/v1/chat/completions", json=chat("fake-tool", stream=True))).content
    )
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": None}
    head = deltas[1]["tool_calls"][0]
    assert head["id"].startswith("call_") and head["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[2:-1]]
    assert len(fragments) > 2
    assert json.loads("".join(fragments)) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"

    answer = (await upstream.post("/v1/chat/completions", json=chat("fake-tool"))).json()
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    call = message["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}

    follow_up = [
        *USER,
        message,
        {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"},
    ]
    final = (await upstream.post("/v1/chat/completions", json=chat("fake-tool", follow_up))).json()
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["message"]["content"] == "The tool says: 18 degrees and sunny"


@pytest.mark.anyio
async def test_reasoning_comes_before_content(upstream: httpx.AsyncClient) -> None:
    chunks = events(
        (await upstream.post("/v1/chat/completions", json=chat("fake-reasoning", stream=True))).content
    )
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in chunks[1:-2]]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")
    assert kinds[0] == "reasoning_content" and kinds[-1] == "content"
    message = (await upstream.post("/v1/chat/completions", json=chat("fake-reasoning"))).json()["choices"][0]
    assert message["message"]["reasoning_content"].startswith("The user wants an echo")
    assert message["message"]["content"] == "Echo: hello there (fake reply)"


@pytest.mark.anyio
async def test_length(upstream: httpx.AsyncClient) -> None:
    body = (await upstream.post("/v1/chat/completions", json=chat("fake-length", max_tokens=2))).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Echo: hello"
    assert body["usage"]["completion_tokens"] == 2
    chunks = events(
        (await upstream.post("/v1/chat/completions", json=chat("fake-length", stream=True))).content
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_error_statuses(upstream: httpx.AsyncClient, status: int, stream: bool) -> None:
    response = await upstream.post("/v1/chat/completions", json=chat(f"fake-error-{status}", stream=stream))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert str(status) in error["message"]


@pytest.mark.anyio
async def test_bad_requests(upstream: httpx.AsyncClient) -> None:
    assert (await upstream.post("/v1/chat/completions", json=chat("fake-error-abc"))).status_code == 400
    assert (await upstream.post("/v1/chat/completions", content=b"{not json")).status_code == 400
    assert (await upstream.post("/v1/chat/completions", json={"model": "fake-text"})).status_code == 400


@pytest.mark.anyio
async def test_slow_stream_honours_headers(upstream: httpx.AsyncClient) -> None:
    started = time.perf_counter()
    response = await upstream.post(
        "/v1/chat/completions",
        json=chat("fake-slow", stream=True),
        headers={"x-fake-chunks": "5", "x-fake-delay-ms": "20"},
    )
    elapsed = time.perf_counter() - started
    chunks = events(response.content)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == "tick1 tick2 tick3 tick4 tick5"
    assert elapsed >= 5 * 0.02 * 0.9


@pytest.mark.anyio
async def test_default_slow_stream_has_many_chunks() -> None:
    app = fake_upstream.create_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://u") as client:
        response = await client.post(
            "/v1/chat/completions", json=chat("fake-slow", stream=True), headers={"x-fake-delay-ms": "0"}
        )
    assert len(events(response.content)) == 1 + 50 + 1 + 1  # role, ticks, finish, [DONE]


@pytest.mark.anyio
async def test_truncated_stream_ends_mid_event(upstream: httpx.AsyncClient) -> None:
    body = (await upstream.post("/v1/chat/completions", json=chat("fake-truncate", stream=True))).content
    complete, _, tail = body.rpartition(b"\n\n")
    assert b"[DONE]" not in body
    assert tail.startswith(b"data: {") and not tail.endswith(b"}")
    with pytest.raises(ValueError):
        json.loads(tail.removeprefix(b"data: "))
    assert events(complete + b"\n\n")[-1]["choices"][0]["delta"] == {"content": " reply)"}

    cut = (await upstream.post("/v1/chat/completions", json=chat("fake-truncate"))).content
    with pytest.raises(ValueError):
        json.loads(cut)


@pytest.mark.anyio
async def test_qwen_native_stream(upstream: httpx.AsyncClient) -> None:
    response = await upstream.post("/v1/chat/completions", json=chat("fake-qwen-native", stream=True))
    chunks = events(response.content)
    assert "[DONE]" not in chunks
    created = chunks[0]["response.created"]
    assert set(created) == {"chat_id", "parent_id", "response_id"}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    assert all(d["role"] == "assistant" and d["phase"] == "answer" for d in deltas)
    assert [d["status"] for d in deltas] == ["typing"] * (len(deltas) - 1) + ["finished"]
    assert "".join(d["content"] for d in deltas) == f"Echo: hello there (turn 1 of {created['chat_id']})"
    outputs = [c["usage"]["output_tokens"] for c in chunks[1:]]
    assert outputs == sorted(outputs) and outputs[-1] == len(deltas) - 1  # cumulative
    assert {c["usage"]["input_tokens"] for c in chunks[1:]} == {2}

    # The web API route continues a chat by id, like the real service.
    again = {"chat_id": created["chat_id"], "parent_id": created["response_id"], "messages": USER}
    chunks = events((await upstream.post("/api/v2/chat/completions", json=again)).content)
    assert chunks[0]["response.created"]["chat_id"] == created["chat_id"]
    assert "(turn 2 of" in "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:])


@pytest.mark.anyio
async def test_models_and_optional_api_key(upstream: httpx.AsyncClient) -> None:
    listed = (await upstream.get("/v1/models")).json()
    assert {m["id"] for m in listed["data"]} >= {"fake-text", "fake-tool", "fake-qwen-native"}

    app = fake_upstream.create_app(api_key="sk-test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://u") as client:
        denied = await client.post("/v1/chat/completions", json=chat("fake-text"))
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/v1/models")).status_code == 401
        allowed = await client.post(
            "/v1/chat/completions", json=chat("fake-text"), headers={"authorization": "Bearer sk-test"}
        )
        assert allowed.status_code == 200


@pytest.mark.anyio
async def test_same_requests_same_bytes_across_apps() -> None:
    bodies = [chat("fake-text"), chat("fake-tool", stream=True), chat("fake-text", stream=True, n=3)]
    outputs: list[list[bytes]] = []
    for _ in range(2):
        app = fake_upstream.create_app(clock=lambda: CLOCK)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://u") as client:
            outputs.append([(await client.post("/v1/chat/completions", json=b)).content for b in bodies])
    assert outputs[0] == outputs[1]


# --- the proxies, under a real uvicorn ----------------------------------------------------------------


def load_proxy(name: str) -> ModuleType:
    # Imported lazily: the proxies import the middleware, the fake upstream tests above do not need it.
    return __import__(name)


PROXIES = ["openai_proxy", "fastapi_proxy"]


@pytest.mark.parametrize("proxy_name", PROXIES)
def test_proxy_passes_bytes_through_unchanged(proxy_name: str) -> None:
    proxy_module = load_proxy(proxy_name)
    # Two identical upstreams: one behind the proxy, one asked directly; ids and clocks then match.
    behind, direct = (fake_upstream.create_app(clock=lambda: CLOCK) for _ in range(2))
    bodies = [
        chat("fake-text"),
        chat("fake-text", stream=True, n=2, stream_options={"include_usage": True}),
        chat("fake-tool", stream=True),
        chat("fake-error-429", stream=True),
        chat("fake-truncate", stream=True),
        chat("fake-qwen-native"),
    ]
    with serve(behind) as behind_url, serve(direct) as direct_url:
        proxy = proxy_module.create_app(f"{behind_url}/v1", "sk-upstream", persistence=False)
        with serve(proxy) as proxy_url, httpx.Client() as client:
            for body in bodies:
                via_proxy = client.post(f"{proxy_url}/v1/chat/completions", json=body)
                straight = client.post(f"{direct_url}/v1/chat/completions", json=body)
                assert via_proxy.status_code == straight.status_code
                assert via_proxy.headers["content-type"] == straight.headers["content-type"]
                assert via_proxy.content == straight.content, body["model"]
                # The server writes its own Date/Server; the upstream's are not duplicated.
                assert len(via_proxy.headers.get_list("date")) == 1
                assert len(via_proxy.headers.get_list("server")) == 1
            assert client.get(f"{proxy_url}/v1/models").json() == client.get(f"{direct_url}/v1/models").json()


@pytest.mark.parametrize("proxy_name", PROXIES)
def test_proxy_sends_its_own_key_upstream(proxy_name: str) -> None:
    proxy_module = load_proxy(proxy_name)
    with serve(fake_upstream.create_app(api_key="sk-upstream")) as upstream_url:
        good = proxy_module.create_app(f"{upstream_url}/v1", "sk-upstream", persistence=False)
        bad = proxy_module.create_app(f"{upstream_url}/v1", "sk-wrong", persistence=False)
        with serve(good) as good_url, serve(bad) as bad_url:
            headers = {"authorization": "Bearer client-key-not-for-upstream"}
            ok = httpx.post(f"{good_url}/v1/chat/completions", json=chat("fake-text"), headers=headers)
            denied = httpx.post(f"{bad_url}/v1/chat/completions", json=chat("fake-text"))
    assert ok.status_code == 200
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("proxy_name", PROXIES)
def test_proxy_unreachable_upstream_is_502(proxy_name: str) -> None:
    proxy_module = load_proxy(proxy_name)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with serve(proxy_module.create_app(dead, "", persistence=False)) as proxy_url:
        response = httpx.post(f"{proxy_url}/v1/chat/completions", json=chat("fake-text"))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


def openai_client(base_url: str) -> Any:
    openai = pytest.importorskip("openai")
    # No retries: a 429 must surface at once, not be retried with backoff.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-client", max_retries=0, timeout=30)


@pytest.mark.parametrize("proxy_name", PROXIES)
def test_openai_sdk_through_proxy_without_persistence(proxy_name: str) -> None:
    proxy_module = load_proxy(proxy_name)
    with serve(fake_upstream.create_app()) as upstream_url:
        proxy = proxy_module.create_app(f"{upstream_url}/v1", "", persistence=False)
        with serve(proxy) as proxy_url:
            client = openai_client(proxy_url)
            completion = client.chat.completions.create(model="fake-text", messages=USER)
            stream = client.chat.completions.create(
                model="fake-text", messages=USER, stream=True, stream_options={"include_usage": True}
            )
            chunks = list(stream)
    assert completion.choices[0].message.content == "Echo: hello there (fake reply)"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "Echo: hello there (fake reply)"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


@pytest.mark.parametrize("proxy_name", PROXIES)
def test_openai_sdk_through_recorded_proxy(proxy_name: str, tmp_path: Path) -> None:
    proxy_module = load_proxy(proxy_name)
    database_url = f"sqlite:///{tmp_path / 'proxy.db'}"
    with serve(fake_upstream.create_app()) as upstream_url:
        proxy = proxy_module.create_app(
            f"{upstream_url}/v1", "", database_url=database_url, auto_upgrade=True, flush_interval=0.05
        )
        with serve(proxy) as proxy_url:
            client = openai_client(proxy_url)
            raw = client.chat.completions.with_raw_response.create(model="fake-text", messages=USER)
            assert raw.headers.get("x-request-id")
            completion = raw.parse()
            stream = client.chat.completions.create(
                model="fake-tool", messages=USER, stream=True, stream_options={"include_usage": True}
            )
            arguments = "".join(
                c.choices[0].delta.tool_calls[0].function.arguments or ""
                for c in stream
                if c.choices and c.choices[0].delta.tool_calls
            )
        # Leaving `serve` ran the lifespan shutdown, which flushes everything queued.
    stored = stored_exchanges(database_url)
    assert [(req.model, req.stream) for req, _ in stored] == [("fake-text", False), ("fake-tool", True)]
    first, second = (resp for _, resp in stored)
    assert first is not None and second is not None
    assert stored[0][0].request_id == raw.headers["x-request-id"]
    assert first.upstream_id == completion.id
    assert first.openai_response["choices"][0]["message"]["content"] == completion.choices[0].message.content
    assert (first.status_code, first.finish_reason, first.total_tokens) == (200, "stop", 7)
    assert second.finish_reason == "tool_calls"
    tool_call = second.openai_response["choices"][0]["message"]["tool_calls"][0]
    assert tool_call["function"]["arguments"] == arguments


def test_qwen_proxy_continues_the_upstream_chat(tmp_path: Path) -> None:
    qwen_proxy = load_proxy("qwen_proxy")
    database_url = f"sqlite:///{tmp_path / 'qwen.db'}"
    history: list[dict[str, Any]] = [{"role": "user", "content": "first question"}]
    replies: list[str] = []
    with serve(fake_upstream.create_app()) as upstream_url:
        proxy = qwen_proxy.create_app(
            upstream_url, database_url=database_url, auto_upgrade=True, flush_interval=0.05
        )
        with serve(proxy) as proxy_url:
            client = openai_client(proxy_url)
            for turn, question in enumerate(["", "second question", "third question"]):
                if question:
                    history += [
                        {"role": "assistant", "content": replies[-1]},
                        {"role": "user", "content": question},
                    ]
                if turn == 1:  # one streamed turn, translated from the native stream into OpenAI chunks
                    stream = client.chat.completions.create(model="qwen-max", messages=history, stream=True)
                    replies.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
                else:
                    completion = client.chat.completions.create(model="qwen-max", messages=history)
                    replies.append(completion.choices[0].message.content or "")
    chat_id = replies[0].rsplit(" of ", 1)[1].rstrip(")")
    assert replies == [
        f"Echo: first question (turn 1 of {chat_id})",
        f"Echo: second question (turn 2 of {chat_id})",
        f"Echo: third question (turn 3 of {chat_id})",
    ]
    stored = stored_exchanges(database_url)
    assert len(stored) == 3
    assert len({req.session_id for req, _ in stored}) == 1
    for req, resp in stored:
        assert req.provider == "qwen"
        assert req.qwen_request["messages"][0]["role"] == "user"
        assert len(req.qwen_request["messages"]) == 1  # only the new message goes upstream
        assert resp is not None and resp.qwen_response["status"] == "finished"
        assert resp.parent_id == resp.qwen_response["response.created"]["response_id"]
    assert stored[1][0].qwen_request["parent_id"] == stored[0][1].parent_id  # type: ignore[union-attr]
