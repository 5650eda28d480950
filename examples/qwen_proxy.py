"""A Qwen-style proxy: OpenAI chat completions in, Qwen chat web API out, conversations continued upstream.

Qwen's web API keeps the conversation on its side: each request carries only the new user message plus
the ``chat_id`` and the ``parent_id`` (the id of the previous answer) to continue from. An OpenAI client
instead resends the whole history every time. This proxy bridges the two with qwen_persist:

- ``current_exchange(request).session()`` finds the recorded conversation this request continues (by
  ``X-Session-Id`` or by its first user message) with the ``chat_id``/``parent_id`` stored last time;
- ``exchange.report(...)`` stores the provider payloads and the new ``parent_id`` for the next turn.

Run it from this folder against the fake upstream (which serves the Qwen web API at ``/api/v2``)::

    uvicorn fake_upstream:app --port 9000 &
    QWEN_BASE_URL=http://127.0.0.1:9000 uvicorn qwen_proxy:app --port 8000

Without persistence every request simply opens a new upstream chat. (The real service also wants a chat
created with ``/api/v2/chats/new`` first and a browser session token; the fake creates chats on demand.)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_persist import PersistenceMiddleware, current_exchange

TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "proxy_error", "code": code}}, status_code=status
    )


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def qwen_payload(body: dict[str, Any], chat_id: str | None, parent_id: str | None) -> dict[str, Any]:
    """The provider request: only the new user message, placed after ``parent_id`` in chat ``chat_id``."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    if chat_id is not None:
        text = next((text_of(m) for m in reversed(messages) if m.get("role") == "user"), "")
    elif len(messages) == 1:
        text = text_of(messages[0])
    else:
        # A new upstream chat knows nothing yet, so its first message carries the history the client sent.
        text = "\n\n".join(f"{m.get('role')}: {text_of(m)}" for m in messages)
    model = str(body.get("model") or "qwen-max")
    now = int(time.time())
    return {
        "stream": True,
        "incremental_output": True,  # each event carries new text only, like OpenAI deltas
        "chat_id": chat_id,
        "chat_mode": "normal",
        "model": model,
        "parent_id": parent_id,
        "messages": [
            {
                "fid": str(uuid.uuid4()),
                "parentId": parent_id,
                "childrenIds": [],
                "role": "user",
                "content": text,
                "user_action": "chat",
                "files": [],
                "timestamp": now,
                "models": [model],
                "chat_type": "t2t",
                "feature_config": {"thinking_enabled": False, "output_schema": "phase"},
            }
        ],
        "timestamp": now,
    }


@dataclass
class QwenTurn:
    """What the native stream said so far: its ids, the answer text and the (cumulative) usage."""

    created: dict[str, Any] = field(default_factory=dict)
    content: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    finished: bool = False

    def feed(self, event: dict[str, Any]) -> str | None:
        """Take one native event; return the answer text it adds, if any."""
        if "response.created" in event:
            self.created = event["response.created"]
            return None
        self.usage = event.get("usage") or self.usage  # cumulative: the latest is the total
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("status") == "finished":
                self.finished = True
            if delta.get("phase", "answer") == "answer" and delta.get("content"):
                self.content.append(delta["content"])
                return str(delta["content"])
        return None

    def openai_usage(self) -> dict[str, int] | None:
        if not self.usage:
            return None
        prompt, completion = self.usage.get("input_tokens", 0), self.usage.get("output_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def provider_response(self) -> dict[str, Any]:
        return {
            "response.created": self.created,
            "content": "".join(self.content),
            "usage": self.usage,
            "status": "finished" if self.finished else "incomplete",
        }


async def native_events(upstream: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON ``data:`` events of an SSE body (comments and other fields are not used by Qwen)."""
    data: list[str] = []
    async for line in upstream.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []
    if data:  # the last event may end without its blank line
        yield json.loads("\n".join(data))


def create_app(
    qwen_base_url: str | None = None,
    token: str | None = None,
    *,
    persistence: bool = True,
    **persistence_options: Any,
) -> Starlette:
    base_url = (qwen_base_url or os.environ.get("QWEN_BASE_URL", "http://127.0.0.1:9000")).rstrip("/")
    auth = token if token is not None else os.environ.get("QWEN_TOKEN", "")
    client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            yield

    async def chat_completions(request: Request) -> Response:
        assert client is not None, "the app's lifespan has not run"
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "The request body is not valid JSON.", "invalid_json")

        # Continue the upstream chat this conversation already has, if the recorded session is still live.
        exchange = current_exchange(request)
        state = await exchange.session() if exchange is not None else None
        chat_id = state.chat_id if state is not None else None
        payload = qwen_payload(body, chat_id, state.parent_id if state is not None and chat_id else None)
        turn = QwenTurn()

        def report(error_body: Any = None) -> None:
            if exchange is None:
                return
            exchange.report(
                provider="qwen",
                provider_request=payload,
                provider_response=error_body if error_body is not None else turn.provider_response(),
            )
            if turn.created.get("chat_id"):
                exchange.report(chat_id=turn.created["chat_id"])
            if turn.finished and turn.created.get("response_id"):
                # Only a finished answer is a safe parent for the next message.
                exchange.report(parent_id=turn.created["response_id"])

        headers = {"authorization": f"Bearer {auth}"} if auth else {}
        upstream_request = client.build_request(
            "POST",
            f"{base_url}/api/v2/chat/completions",
            params={"chat_id": payload["chat_id"]} if payload["chat_id"] else None,
            json=payload,
            headers=headers,
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return error_response(502, f"upstream request failed: {exc!r}", "upstream_unavailable")
        if upstream.status_code != 200:
            raw = await upstream.aread()
            await upstream.aclose()
            try:
                error_body = json.loads(raw)
            except ValueError:
                error_body = {"error": {"message": raw.decode(errors="replace"), "type": "upstream_error"}}
            report(error_body)
            return JSONResponse(error_body, status_code=upstream.status_code)

        model = str(body.get("model") or "qwen-max")
        created_at = int(time.time())

        def completion_id() -> str:
            return f"chatcmpl-{turn.created.get('response_id') or 'qwen'}"

        if not body.get("stream"):
            try:
                async for event in native_events(upstream):
                    turn.feed(event)
            finally:
                await upstream.aclose()
                report()
            if not turn.finished:
                return error_response(
                    502, "the upstream stream ended before the answer finished", "truncated"
                )
            message = {"role": "assistant", "content": "".join(turn.content)}
            completion = {
                "id": completion_id(),
                "object": "chat.completion",
                "created": created_at,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": turn.openai_usage(),
            }
            return JSONResponse(completion)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            data = {
                "id": completion_id(),
                "object": "chat.completion.chunk",
                "created": created_at,
                "model": model,
                "choices": [choice] if delta or finish_reason else [],
                **extra,
            }
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

        async def openai_stream() -> AsyncIterator[bytes]:
            role_sent = False
            try:
                async for event in native_events(upstream):
                    piece = turn.feed(event)
                    if piece is not None:
                        yield chunk(
                            {"role": "assistant", "content": piece} if not role_sent else {"content": piece}
                        )
                        role_sent = True
            finally:
                with anyio.CancelScope(shield=True):  # also when the client went away mid-stream
                    await upstream.aclose()
                report()  # before the last bytes, so it belongs to this exchange
            if not turn.finished:
                # Cut off upstream: end without finish_reason and [DONE] so the client sees it was cut.
                return
            yield chunk({}, "stop")
            if include_usage:
                yield chunk({}, usage=turn.openai_usage())
            yield b"data: [DONE]\n\n"

        return StreamingResponse(openai_stream(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])], lifespan=lifespan
    )
    if persistence:
        app.add_middleware(PersistenceMiddleware, **persistence_options)
    return app


# `uvicorn qwen_proxy:app`; auto_upgrade creates the tables for this example (production: run
# `qwen-persist db upgrade` as a deploy step).
app = create_app(auto_upgrade=True)
