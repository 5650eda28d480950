"""A deterministic fake OpenAI-compatible upstream, for trying proxies and testing without an API key.

Run it from this folder with ``uvicorn fake_upstream:app --port 9000``. The request's ``model`` picks the
scenario (anything else behaves like ``fake-text``):

==================  ==========================================================================
fake-text           ``Echo: <last user message>`` plus a few fixed words; honours ``n`` and streams
                    one word per chunk (``stream_options.include_usage`` adds a usage chunk)
fake-tool           calls ``get_weather`` (arguments streamed in fragments); after a ``tool``
                    message it answers in text
fake-reasoning      Qwen-style ``reasoning_content`` deltas first, then the answer
fake-length         stops early with ``finish_reason: "length"``
fake-error-<code>   HTTP ``<code>`` with an OpenAI error body, JSON even when a stream was asked for
fake-slow           many chunks with a pause between them (headers ``x-fake-chunks``,
                    ``x-fake-delay-ms``)
fake-truncate       the body ends in the middle of an event, without ``[DONE]``
fake-qwen-native    the Qwen chat web API's own SSE (also served at ``POST /api/v2/chat/completions``)
==================  ==========================================================================

Token counts are words, ids come from a per-app counter, and ``created`` from an injectable clock, so two
apps made by :func:`create_app` answer the same requests with the same bytes.
Set ``FAKE_UPSTREAM_API_KEY`` to require ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODELS = (
    "fake-text",
    "fake-tool",
    "fake-reasoning",
    "fake-length",
    "fake-error-429",
    "fake-error-500",
    "fake-slow",
    "fake-truncate",
    "fake-qwen-native",
)
SYSTEM_FINGERPRINT = "fp_fake_upstream"
TOOL_ARGUMENTS = ('{"city": ', '"Paris", ', '"unit": ', '"celsius"}')

# Status -> (type, code) as OpenAI spells them, so clients raise their usual exception classes.
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "service_unavailable"),
}


@dataclass
class ToolCall:
    id: str
    name: str
    argument_fragments: tuple[str, ...]


@dataclass
class Reply:
    """What one choice says, as the fragments a stream sends; the JSON answer joins them."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"

    def tokens(self) -> int:
        return (
            len(self.content) + len(self.reasoning) + sum(len(t.argument_fragments) for t in self.tool_calls)
        )

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) if self.content or not self.tool_calls else None,
            "refusal": None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": "".join(call.argument_fragments)},
                }
                for call in self.tool_calls
            ]
        return message

    def deltas(self) -> list[dict[str, Any]]:
        """The stream's deltas: the role first, then reasoning, content and tool-call fragments."""
        first: dict[str, Any] = {"role": "assistant", "content": None if self.tool_calls else ""}
        deltas = [first]
        deltas += [{"reasoning_content": piece} for piece in self.reasoning]
        deltas += [{"content": piece} for piece in self.content]
        for index, call in enumerate(self.tool_calls):
            head = {"index": index, "id": call.id, "type": "function"}
            deltas.append({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                for piece in call.argument_fragments
            ]
        return deltas


def words(text: str) -> list[str]:
    """Split into word-sized pieces that join back to ``text`` (each keeps its leading whitespace)."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    if tail:
        pieces.append(tail)
    return pieces


def message_text(message: dict[str, Any]) -> str:
    """The text of a message: a string, or the text parts of a content array."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return max(1, sum(len(message_text(m).split()) for m in messages))


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind, default_code = ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}
    return JSONResponse(body, status_code=status)


def create_app(*, api_key: str | None = None, clock: Callable[[], float] = time.time) -> Starlette:
    """A fresh fake upstream; ``api_key`` defaults to ``$FAKE_UPSTREAM_API_KEY`` (unset: no check)."""
    required_key = api_key if api_key is not None else os.environ.get("FAKE_UPSTREAM_API_KEY") or None
    counter = itertools.count(1)
    qwen_turns: dict[str, int] = {}  # chat_id -> answers given, so a continued chat shows it

    def authorized(request: Request) -> bool:
        return required_key is None or request.headers.get("authorization") == f"Bearer {required_key}"

    async def read_json(request: Request) -> dict[str, Any] | Response:
        if not authorized(request):
            return error_response(401, "Incorrect API key provided.")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "The request body is not valid JSON.")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return error_response(400, "'messages' is a required property.")
        return body

    def script(
        model: str, body: dict[str, Any], index: int, number: int, headers: Mapping[str, str]
    ) -> Reply:
        """The reply of choice ``index`` for ``model``; ``number`` makes tool-call ids unique."""
        messages: list[dict[str, Any]] = body["messages"]
        text = f"Echo: {last_user_text(messages)} (fake reply)"
        if index:  # with n > 1 every choice says something slightly different
            text += f" [choice {index}]"
        if model == "fake-tool":
            last = messages[-1] if messages else {}
            if last.get("role") == "tool":
                return Reply(content=words(f"The tool says: {message_text(last)}"))
            call = ToolCall(f"call_fake_{number}_{index}", "get_weather", TOOL_ARGUMENTS)
            return Reply(tool_calls=[call], finish_reason="tool_calls")
        if model == "fake-reasoning":
            thought = "The user wants an echo, so I will repeat their words."
            return Reply(reasoning=words(thought), content=words(text))
        if model == "fake-length":
            limit = body.get("max_completion_tokens") or body.get("max_tokens") or 3
            return Reply(content=words(text)[: int(limit)], finish_reason="length")
        if model == "fake-slow":
            chunks = int(headers.get("x-fake-chunks", 50))
            return Reply(content=words(" ".join(f"tick{i}" for i in range(1, chunks + 1))))
        return Reply(content=words(text))

    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        model = str(body.get("model") or "fake-text")
        if model.startswith("fake-error-"):
            code = model.removeprefix("fake-error-")
            status = int(code) if code.isdigit() else 0
            if not 400 <= status <= 599:
                return error_response(400, f"Unknown fake error status in model {model!r}.")
            return error_response(status, f"Fake upstream error {status} for model {model}.")
        if model == "fake-qwen-native":
            return qwen_native(body)

        number = next(counter)
        completion_id = f"chatcmpl-fake{number:06d}"
        created = int(clock())
        replies = [script(model, body, i, number, request.headers) for i in range(int(body.get("n") or 1))]
        completion_tokens = sum(reply.tokens() for reply in replies)
        prompt = prompt_tokens(body["messages"])
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

        def head(kind: str) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": kind,
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }

        if not body.get("stream"):
            if model == "fake-truncate":
                # A body cut short mid-JSON, as when a connection drops under a buffered reply.
                return Response(
                    json.dumps(head("chat.completion"), separators=(",", ":"))[:-20],
                    media_type="application/json",
                )
            choices = [
                {
                    "index": i,
                    "message": reply.message(),
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
                for i, reply in enumerate(replies)
            ]
            return JSONResponse({**head("chat.completion"), "choices": choices, "usage": usage})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        delay = int(request.headers.get("x-fake-delay-ms", 50 if model == "fake-slow" else 0)) / 1000

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = {**head("chat.completion.chunk"), "choices": choices}
            if include_usage:  # like OpenAI: every chunk says usage null, the last one carries it
                payload["usage"] = None
            return sse({**payload, **extra})

        async def events() -> AsyncIterator[bytes]:
            # Choices interleave step by step, one choice per chunk, as OpenAI does for n > 1.
            deltas = [reply.deltas() for reply in replies]
            for step in range(max(len(d) for d in deltas)):
                for index, choice_deltas in enumerate(deltas):
                    if step < len(choice_deltas):
                        if step and delay:
                            await asyncio.sleep(delay)
                        delta = choice_deltas[step]
                        yield chunk(
                            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
                        )
            if model == "fake-truncate":
                yield b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk","choi'
                return
            for index, reply in enumerate(replies):
                yield chunk(
                    [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason}]
                )
            if include_usage:
                yield chunk([], usage=usage)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def qwen_native(body: dict[str, Any]) -> Response:
        """Qwen's web API stream: ids first, cumulative usage, ``status: finished`` and no ``[DONE]``."""
        number = next(counter)
        chat_id = str(body.get("chat_id") or f"chat-fake{number:06d}")
        turn = qwen_turns[chat_id] = qwen_turns.get(chat_id, 0) + 1
        user_message: dict[str, Any] = next(
            (m for m in reversed(body["messages"]) if m.get("role") == "user"), {}
        )
        created = {
            "chat_id": chat_id,
            "parent_id": str(user_message.get("fid") or f"msg-user-fake{number:06d}"),
            "response_id": f"msg-fake{number:06d}",
        }
        pieces = words(f"Echo: {message_text(user_message)} (turn {turn} of {chat_id})")
        input_tokens = prompt_tokens(body["messages"])

        def delta(content: str, status: str, output_tokens: int) -> bytes:
            choice = {"delta": {"role": "assistant", "content": content, "phase": "answer", "status": status}}
            usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
            return sse({"choices": [choice], "usage": usage})

        async def events() -> AsyncIterator[bytes]:
            yield sse({"response.created": created})
            for count, piece in enumerate(pieces, start=1):
                yield delta(piece, "typing", count)
            yield delta("", "finished", len(pieces))

        return StreamingResponse(events(), media_type="text/event-stream")

    async def qwen_web_api(request: Request) -> Response:
        body = await read_json(request)
        return body if isinstance(body, Response) else qwen_native(body)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error_response(401, "Incorrect API key provided.")
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "fake-upstream"} for name in MODELS]
        return JSONResponse({"object": "list", "data": data})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/api/v2/chat/completions", qwen_web_api, methods=["POST"]),
        ]
    )


app = create_app()
