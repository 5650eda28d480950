"""End to end: the openai SDK → a real uvicorn → the example proxy wrapped in one line → the fake
upstream; then the stored rows are compared with what the client received. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_upstream
import httpx
import openai
import openai_proxy
import pytest
from support import serve, stored_exchanges, stored_sessions

from qwen_persist.bodies import NUL_MARKER, RAW_MARKER, restore_nul

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with serve(fake_upstream.create_app()) as url:
        yield f"{url}/v1"


def proxy_app(upstream_url: str, database_url: str, tmp_path: Path, **options: Any) -> Any:
    options.setdefault("spill_dir", str(tmp_path / "spill"))
    return openai_proxy.create_app(upstream_url, "", database_url=database_url, **options)


def client_for(base_url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-client-secret-123", max_retries=0, **options)


def test_json_and_stream_rows_match_what_the_client_received(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base:
        client = client_for(base)
        raw = client.chat.completions.with_raw_response.create(model="fake-text", messages=USER, user="u1")
        completion = raw.parse()
        chunks = list(
            client.chat.completions.create(
                model="fake-reasoning", messages=USER, stream=True, stream_options={"include_usage": True}
            )
        )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    usage = chunks[-1].usage
    assert usage is not None

    (req1, resp1), (req2, resp2) = stored_exchanges(migrated_url)
    assert resp1 is not None and resp2 is not None
    assert req1.request_id == raw.headers["x-request-id"]
    assert (req1.method, req1.path, req1.model, req1.stream, req1.user) == (
        "POST",
        "/v1/chat/completions",
        "fake-text",
        False,
        "u1",
    )
    assert req1.openai_request == {"messages": USER, "model": "fake-text", "user": "u1"}
    assert resp1.openai_response == completion.model_dump(exclude_unset=True)
    assert (resp1.status_code, resp1.finish_reason, resp1.upstream_id, resp1.error) == (
        200,
        "stop",
        completion.id,
        None,
    )
    assert completion.usage is not None
    assert (resp1.prompt_tokens, resp1.completion_tokens, resp1.total_tokens) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    )
    assert req2.stream is True and resp2.status_code == 200
    message = resp2.openai_response["choices"][0]["message"]
    assert message["content"] == streamed and streamed
    assert message["reasoning_content"] == reasoning and reasoning
    assert (resp2.prompt_tokens, resp2.completion_tokens, resp2.total_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert resp2.finish_reason == chunks[-2].choices[0].finish_reason == "stop"
    assert resp2.upstream_id == chunks[0].id
    for response in (resp1, resp2):
        assert response.duration_ms is not None and response.first_byte_ms is not None
        assert 0 <= response.first_byte_ms <= response.duration_ms
        assert response.timestamp >= req1.timestamp


def test_tool_calls_length_and_upstream_errors(upstream_url: str, migrated_url: str, tmp_path: Path) -> None:
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base:
        client = client_for(base)
        tool_json = client.chat.completions.create(model="fake-tool", messages=USER)
        tool_stream = list(client.chat.completions.create(model="fake-tool", messages=USER, stream=True))
        length = client.chat.completions.create(model="fake-length", messages=USER)
        errors = {}
        for status in (429, 500):
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(model=f"fake-error-{status}", messages=USER, stream=True)
            errors[status] = caught.value
    rows = [resp for _, resp in stored_exchanges(migrated_url)]
    assert all(r is not None for r in rows)
    tool_row, stream_row, length_row, e429, e500 = rows  # type: ignore[misc]
    assert tool_row.finish_reason == stream_row.finish_reason == "tool_calls"
    assert tool_json.choices[0].message.tool_calls is not None
    assert tool_row.openai_response["choices"][0]["message"]["tool_calls"] == [
        call.model_dump() for call in tool_json.choices[0].message.tool_calls
    ]
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in tool_stream
        if c.choices and c.choices[0].delta.tool_calls
    )
    stored_call = stream_row.openai_response["choices"][0]["message"]["tool_calls"][0]
    assert stored_call["function"] == {"name": "get_weather", "arguments": arguments}
    assert json.loads(arguments)
    assert length_row.finish_reason == length.choices[0].finish_reason == "length"
    for row, status in ((e429, 429), (e500, 500)):
        assert row.status_code == status
        assert row.openai_response == errors[status].body or row.openai_response == {
            "error": errors[status].body
        }
        assert (row.error and errors[status].message.endswith(row.error)) or row.error in errors[
            status
        ].message


def test_truncated_stream_keeps_the_partial_content(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base, httpx.Client() as http:
        response = http.post(
            f"{base}/v1/chat/completions", json={"model": "fake-truncate", "messages": USER, "stream": True}
        )
    received = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in response.text.split("\n\n")
        if line.startswith("data: {") and line.endswith("}")
    )
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error == "truncated"
    assert row.status_code == 200 and row.finish_reason is None
    assert row.openai_response["choices"][0]["message"]["content"] == received and received


def test_client_disconnect_mid_stream_keeps_what_the_client_received(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base:
        received = ""
        with (
            httpx.Client(timeout=10) as http,
            http.stream(
                "POST",
                f"{base}/v1/chat/completions",
                json={"model": "fake-slow", "messages": USER, "stream": True},
                headers={"x-fake-chunks": "200", "x-fake-delay-ms": "20"},
            ) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                if received.count(" ") >= 5:
                    break  # leaving the block closes the connection mid-stream
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error == "client_disconnected"
    stored = row.openai_response["choices"][0]["message"]["content"]
    # What was stored is what left the proxy before it saw the disconnect: everything the client read,
    # plus at most what was in flight on the socket; never the whole 200-chunk answer.
    assert stored.startswith(received) and len(stored.split(" ")) < 150
    assert row.finish_reason is None


def test_request_row_is_visible_while_the_stream_runs(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}
    with (
        serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base,
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json={"model": "fake-slow", "messages": USER, "stream": True},
            headers={"x-fake-chunks": "40", "x-fake-delay-ms": "25"},
        ) as response,
    ):
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        deadline = threading.Event()
        for _ in range(40):  # the writer commits within its flush interval
            seen["rows"] = stored_exchanges(migrated_url)
            if seen["rows"]:
                break
            deadline.wait(0.025)
        for _ in lines:
            pass
    [(request, response_row)] = seen["rows"]
    assert request.request_id == response.headers["x-request-id"] and response_row is None
    [(_, final)] = stored_exchanges(migrated_url)
    assert final is not None and final.finish_reason == "stop"


def test_concurrent_streams_are_all_stored_without_cross_talk(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    count = 40
    results: dict[str, str] = {}

    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base:
        client = client_for(base, http_client=httpx.Client(limits=httpx.Limits(max_connections=count)))

        def one(i: int) -> None:
            stream = client.chat.completions.with_raw_response.create(
                model="fake-text", messages=[{"role": "user", "content": f"question {i}"}], stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
            results[stream.headers["x-request-id"]] = text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    stored = stored_exchanges(migrated_url)
    assert len(stored) == len(results) == count
    for request, response in stored:
        assert response is not None
        asked = request.openai_request["messages"][0]["content"]
        content = response.openai_response["choices"][0]["message"]["content"]
        assert content == results[request.request_id]
        assert asked in content  # the fake upstream echoes the question: no answer stored on another's row
    assert len({request.session_id for request, _ in stored}) == count


def test_bodies_that_are_not_json_reach_the_app_and_are_recorded(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    oversized = json.dumps({"model": "fake-text", "messages": USER, "pad": "x" * 5000}).encode()
    with_nul = b'{"model": "fake-text", "messages": [{"role": "user", "content": "a\\u0000b"}]}'
    bodies = [b"{not json", b"\xff\xfe\x00garbage", oversized, with_nul, b"nul\x00byte"]
    with (
        serve(proxy_app(upstream_url, migrated_url, tmp_path, max_body_bytes=4096)) as base,
        httpx.Client() as http,
    ):
        statuses = [
            http.post(
                f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            for body in bodies
        ]
    # The fake upstream answers 400 to what it cannot parse and 200 to the big body: it got them whole.
    assert [r.status_code for r in statuses] == [400, 400, 200, 200, 400]
    stored = stored_exchanges(migrated_url)
    first, second, third, fourth, fifth = (req.openai_request for req, _ in stored)
    assert [first["reason"], second["reason"], third["reason"], fifth["reason"]] == [
        "not_json",
        "not_utf8",
        "too_large",
        "not_json",
    ]
    assert first[RAW_MARKER] is True and first["text"] == "{not json" and first["encoding"] == "utf-8"
    assert second["encoding"] == "base64" and second["truncated"] is False
    assert third["truncated"] is True and third["size"] == len(oversized) and len(third["text"]) == 4096
    # Raw bytes with NUL cannot be text on PostgreSQL: base64.
    assert fifth["encoding"] == "base64" and base64.b64decode(fifth["text"]) == b"nul\x00byte"
    # JSON holding an escaped NUL is stored parsed, with the reversible escape (bodies.py).
    assert fourth[NUL_MARKER] is True and fourth["messages"][0]["content"] == "a\u24000b"
    assert restore_nul(fourth) == json.loads(with_nul)
    assert stored[3][0].model == "fake-text" and stored[3][0].metadata_ is None
    assert [req.metadata_ and req.metadata_["capture_problem"] for req, _ in stored] == [
        "body_not_json",
        "body_not_utf8",
        "body_too_large",
        None,
        "body_not_json",
    ]
    # The response row says why too: its error names the request problem first.
    errors = [resp.error.split(";")[0] if resp is not None and resp.error else None for _, resp in stored]
    assert errors == [
        "request_body_not_json",
        "request_body_not_utf8",
        "request_body_too_large",
        None,
        "request_body_not_json",
    ]


def test_stream_over_max_body_bytes_is_rebuilt_whole(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    # 300 events of ~200 bytes against a 4 KiB limit: the stream is handed to the writer in parts.
    with serve(proxy_app(upstream_url, migrated_url, tmp_path, max_body_bytes=4096)) as base:
        client = client_for(base, default_headers={"x-fake-chunks": "300", "x-fake-delay-ms": "0"})
        chunks = list(client.chat.completions.create(model="fake-slow", messages=USER, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [(_, row)] = stored_exchanges(migrated_url)
    assert row is not None and row.error is None and row.finish_reason == "stop"
    assert row.openai_response["choices"][0]["message"]["content"] == streamed
    assert len(streamed.split()) >= 300


def test_secrets_never_reach_the_database(upstream_url: str, migrated_url: str, tmp_path: Path) -> None:
    secret = "sk-client-secret-123"
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base:
        client = client_for(
            base, default_headers={"x-api-key": "xk-other-secret", "cookie": "sid=cookie-secret"}
        )
        client.chat.completions.create(model="fake-text", messages=USER)
        list(client.chat.completions.create(model="fake-text", messages=USER, stream=True))
    dump = repr([(vars(req), vars(resp)) for req, resp in stored_exchanges(migrated_url)])
    dump += repr([vars(s) for s in stored_sessions(migrated_url).values()])
    for value in (secret, "xk-other-secret", "cookie-secret", "Bearer"):
        assert value not in dump


def test_redaction_hook_transforms_or_drops_content(
    upstream_url: str, migrated_url: str, tmp_path: Path
) -> None:
    def redact(value: Any, kind: str) -> Any:
        if kind == "response":
            return None
        if kind == "request":
            return {**value, "messages": [{**m, "content": "[redacted]"} for m in value["messages"]]}
        assert kind == "first_user_message", kind
        return value.replace("password", "[pw]")

    with serve(proxy_app(upstream_url, migrated_url, tmp_path, redact=redact)) as base:
        client = client_for(base)
        client.chat.completions.create(
            model="fake-text", messages=[{"role": "user", "content": "my password"}]
        )
    [(request, response)] = stored_exchanges(migrated_url)
    assert request.openai_request["messages"] == [{"role": "user", "content": "[redacted]"}]
    assert response is not None and response.openai_response == {"$qwen_persist_redacted": True}
    assert "password" not in repr(vars(request)) + repr(vars(response))
    assert stored_sessions(migrated_url)[request.session_id].first_user_message == "my [pw]"
    # Usage and finish_reason still come from the real response.
    assert response.finish_reason == "stop" and response.total_tokens


def test_request_ids_from_clients(upstream_url: str, migrated_url: str, tmp_path: Path) -> None:
    with serve(proxy_app(upstream_url, migrated_url, tmp_path)) as base, httpx.Client() as http:

        def post(request_id: str | None) -> str:
            headers = {"x-request-id": request_id} if request_id is not None else {}
            body = {"model": "fake-text", "messages": USER}
            return http.post(f"{base}/v1/chat/completions", json=body, headers=headers).headers[
                "x-request-id"
            ]

        echoed = [post("client-id-1"), post("client-id-1"), post("bad id\x7f"), post("x" * 129), post(None)]
    assert echoed[0] == "client-id-1"
    assert len(set(echoed)) == 5 and all(len(value) == 36 for value in echoed[1:])
    assert [req.request_id for req, _ in stored_exchanges(migrated_url)] == echoed
