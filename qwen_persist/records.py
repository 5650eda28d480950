"""What the request path captures, and how the writer turns it into ops (pure, no I/O).

The request path only copies bytes into these records; parsing JSON, rebuilding streams, deriving
sessions and redacting all happen here, on the writer's thread.
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .bodies import decode_json_body
from .completion import StreamReconstructor, StreamResult, reconstruct_stream
from .config import Redactor
from .gil import yield_gil
from .repository import Op
from .sessions import message_count, resolve_session_id, session_row

REDACTED: dict[str, Any] = {"$qwen_persist_redacted": True}


class StreamHandoff:
    """A stream too large to keep whole (over max_body_bytes), rebuilt while it passes, but by the writer.

    The request path only appends chunks and now and then queues the handoff so the writer thread feeds
    them to a reconstructor; the lock keeps the feeding in order whoever does it. If the writer falls far
    behind, the request path feeds the backlog itself, so memory stays bounded either way.
    """

    __slots__ = ("_lock", "_pending", "_reconstructor", "added", "fed")

    def __init__(self) -> None:
        self._reconstructor = StreamReconstructor()
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque()
        # Each counter has one writer (the request path adds, the feeder feeds), so both stay exact.
        self.added = 0
        self.fed = 0

    @property
    def backlog(self) -> int:
        """Bytes handed over and not rebuilt yet."""
        return self.added - self.fed

    def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self.added += len(chunk)

    def drain(self, *, wait: bool = True) -> None:
        """Rebuild what is pending. With ``wait=False``, return at once if another thread is at it."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            while self._pending:
                yield_gil()  # other requests' turns on the event loop (see gil.py)
                chunk = self._pending.popleft()
                self._reconstructor.feed(chunk)
                self.fed += len(chunk)
        finally:
            self._lock.release()

    def finish(self) -> StreamResult:
        self.drain()
        with self._lock:
            return self._reconstructor.finish()


@dataclass(slots=True)
class CapturedRequest:
    request_id: str
    arrived_ms: int
    method: str
    path: str
    body: bytes
    body_size: int
    body_truncated: bool
    session_header: str | None
    key_fingerprint: str | None
    session_id: str | None = None  # set when the app asked for it on the request path
    body_complete: bool = True


@dataclass(slots=True)
class Reports:
    """What the proxy app reported through the exchange handle."""

    provider_request: Any = None
    provider_response: Any = None
    parent_id: str | None = None
    chat_id: str | None = None
    provider: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CapturedResponse:
    request_id: str
    status_code: int | None
    streamed: bool  # the response was an SSE stream
    body: bytes
    body_size: int
    body_truncated: bool
    ended_ms: int
    duration_ms: int
    first_byte_ms: int | None
    error: str | None = None  # exception text, client_disconnected, ...
    stream: StreamHandoff | None = None  # a stream over max_body_bytes, rebuilt as it passed
    reports: Reports | None = None
    request: RequestFacts | None = None  # filled in by the writer


def _redact(redact: Redactor | None, body: Any, kind: str) -> Any:
    if redact is None:
        return body
    result = redact(body, kind)
    return REDACTED if result is None else result


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the response op needs to know of its request (kept by the writer between the two)."""

    messages: int
    problem: str | None


def request_op(record: CapturedRequest, *, ttl_ms: int, redact: Redactor | None) -> tuple[Op, RequestFacts]:
    """The op for a captured request, and the facts its response will need."""
    body, problem = decode_json_body(record.body, truncated=record.body_truncated, size=record.body_size)
    session_id, first = resolve_session_id(
        body,
        header_value=record.session_header,
        key_fingerprint=record.key_fingerprint,
        request_id=record.request_id,
    )
    if record.session_id is not None:
        session_id = record.session_id
    fields = body if isinstance(body, dict) else {}
    model, user, metadata = fields.get("model"), fields.get("user"), fields.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else None
    messages = message_count(body)
    if not record.body_complete and problem is None:
        problem = "body_incomplete"
    if problem:
        metadata = {**(metadata or {}), "capture_problem": problem}
    op: Op = {
        "op": "request",
        "session": session_row(session_id, first, messages, record.arrived_ms, ttl_ms),
        "request": {
            "session_id": session_id,
            "request_id": record.request_id,
            "timestamp": record.arrived_ms,
            "created_at": record.arrived_ms,
            "method": record.method,
            "path": record.path,
            "openai_request": _redact(redact, body, "request"),
            "model": model if isinstance(model, str) else None,
            "stream": fields.get("stream") is True,
            "user": user if isinstance(user, str) else None,
            "metadata": metadata,
        },
    }
    return op, RequestFacts(messages, problem)


def response_op(record: CapturedResponse, *, redact: Redactor | None) -> Op:
    errors: list[str] = []
    usage: Mapping[str, Any] | None = None
    finish_reason: str | None = None
    upstream_id: str | None = None
    body: Any
    if record.streamed:
        result = record.stream.finish() if record.stream is not None else reconstruct_stream([record.body])
        body = result.completion
        if result.error is not None:
            body = {**(body or {}), "error": result.error} if body else {"error": result.error}
            errors.append(_error_message(result.error))
        usage, finish_reason, upstream_id = result.usage, result.finish_reason, result.upstream_id
        if record.body_truncated and record.stream is None:
            errors.append("response_body_too_large")
        elif not result.complete and record.error is None and result.error is None:
            errors.append("truncated")
    elif record.body_size == 0:
        body = None
    else:
        body, problem = decode_json_body(record.body, truncated=record.body_truncated, size=record.body_size)
        if problem:
            errors.append("response_" + problem)
        if isinstance(body, dict):
            usage, finish_reason, upstream_id = _summary(body)
            if "error" in body and (record.status_code or 200) >= 400:
                errors.append(_error_message(body["error"]))
    if record.error:
        errors.insert(0, record.error)
    request = record.request
    if request is not None and request.problem:
        errors.insert(0, "request_" + request.problem)
    reports = record.reports or Reports()
    tokens = _tokens(usage)
    op: Op = {
        "op": "response",
        "request_id": record.request_id,
        "response": {
            "response_id": f"resp-{uuid.uuid4()}",
            "upstream_id": upstream_id,
            "timestamp": record.ended_ms,
            "created_at": record.ended_ms,
            "status_code": record.status_code,
            "openai_response": _redact(redact, body, "response") if body is not None else None,
            "qwen_response": reports.provider_response,
            "parent_id": reports.parent_id,
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "total_tokens": tokens[2],
            "finish_reason": finish_reason,
            "error": "; ".join(errors) if errors else None,
            "duration_ms": record.duration_ms,
            "first_byte_ms": record.first_byte_ms,
        },
        "session_update": {
            # The reply counts as a message of the conversation once it has finished.
            "message_count": None
            if request is None
            else request.messages + (1 if finish_reason is not None else 0),
            "parent_id": reports.parent_id,
            "chat_id": reports.chat_id,
        },
    }
    request_update: dict[str, Any] = {}
    if reports.provider_request is not None:
        request_update["qwen_request"] = reports.provider_request
    if reports.provider is not None:
        request_update["provider"] = reports.provider
    if reports.metadata:
        request_update["metadata"] = reports.metadata
    if request_update:
        op["request_update"] = request_update
    return op


def _summary(body: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, str | None, str | None]:
    usage = body.get("usage")
    choices = body.get("choices")
    finish_reason = None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        finish_reason = reason if isinstance(reason, str) else None
    upstream_id = body.get("id")
    return (
        usage if isinstance(usage, dict) else None,
        finish_reason,
        upstream_id if isinstance(upstream_id, str) else None,
    )


def _tokens(usage: Mapping[str, Any] | None) -> tuple[int | None, int | None, int | None]:
    if not usage:
        return None, None, None

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    prompt = count("prompt_tokens", "input_tokens")
    completion = count("completion_tokens", "output_tokens")
    total = count("total_tokens")
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return prompt, completion, total


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    return str(error) if not isinstance(error, dict) else repr(dict(error))
