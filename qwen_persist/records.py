"""What the request path captures, and how the writer turns it into ops (pure, no I/O).

The request path only copies bytes into these records; parsing JSON, rebuilding streams, deriving
sessions and redacting all happen here, on the writer's thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import jsonlib
from .bodies import (
    MAX_DEPTH,
    NUL_MARKER,
    decode_json_body,
    escape_nul,
    escape_text,
    holds_nul,
    raw_body,
    too_deep,
)
from .completion import StreamReconstructor, StreamResult, reconstruct_stream
from .config import DEFAULT_MAX_BODY_BYTES
from .encodings import ContentDecoder, ContentDecodingError
from .gil import yield_gil
from .redaction import DEFAULT_REDACT_FIELDS, REDACTED_DOCUMENT, Redaction
from .repositories.writes import Op
from .sessions import CaptureIds, message_count, resolve_session_id, session_row

log = logging.getLogger("qwen_persist")
MAX_TOKENS = 2**31 - 1
CLIENT_DISCONNECTED = "client_disconnected"  # the error of an exchange whose client left first
# Response ids: "resp-", then a per-process random token and a counter. Unique across processes, forks
# and restarts like the uuid4 they replaced (never the same shape, so no clash with stored ones either),
# at a fraction of its cost: uuid4 reads the OS's random source for every response.
_response_ids = CaptureIds()


class StreamHandoff:
    """A stream too large to keep whole (over max_body_bytes), rebuilt while it passes, but by the writer.

    The request path only appends chunks and now and then queues the handoff so the writer thread feeds
    them to a reconstructor; the lock keeps the feeding in order whoever does it. If the writer falls far
    behind, the request path feeds the backlog itself, so memory stays bounded either way. Nothing here
    raises: a body that cannot be decoded or rebuilt stops the rebuilding and is reported by `finish`.
    """

    __slots__ = ("_decoder", "_lock", "_pending", "_reconstructor", "added", "fed", "problem")

    def __init__(self, codings: list[str] | None = None) -> None:
        self._reconstructor = StreamReconstructor()
        self._decoder: ContentDecoder | None = None
        self.problem: str | None = None
        if codings:
            try:
                self._decoder = ContentDecoder(codings)
            except ValueError as exc:
                self.problem = f"response_body_encoding_invalid: {exc}"
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
                self.fed += len(chunk)
                if self.problem is None:
                    self._feed(chunk)
        finally:
            self._lock.release()

    def _feed(self, chunk: bytes) -> None:
        try:
            if self._decoder is None:
                self._reconstructor.feed(chunk)
            else:
                for piece in self._decoder.feed(chunk):
                    self._reconstructor.feed(piece)
        except Exception as exc:  # this may run on the request path: never let it reach the client
            self.problem = f"response_stream_unprocessable: {type(exc).__name__}: {exc}"

    def finish(self) -> StreamResult:
        self.drain()
        with self._lock:
            return self._reconstructor.finish()


@dataclass(frozen=True, slots=True)
class RebuiltStream:
    """A large stream already rebuilt where it passed (by the process that captured it): what travels to
    a writer process instead of the stream's bytes. The face of `StreamHandoff` that `response_op` uses."""

    result: StreamResult
    problem: str | None

    def finish(self) -> StreamResult:
        return self.result


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
    codings: list[str] | None = None  # the body's Content-Encoding
    capture_id: str | None = None  # unique across processes and restarts (sessions.CaptureIds)


@dataclass(slots=True)
class Reports:
    """What the proxy app reported through the exchange handle."""

    provider_request: Any = None
    provider_response: Any = None
    parent_id: str | None = None
    chat_id: str | None = None
    provider: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


_NO_REPORTS = Reports()  # read only: what response_op sees when the app reported nothing


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
    error: str | None = None  # exception text, CLIENT_DISCONNECTED, ...
    stream: StreamHandoff | RebuiltStream | None = None  # a stream over max_body_bytes, rebuilt as it passed
    reports: Reports | None = None
    request: RequestFacts | None = None  # filled in by the writer
    codings: list[str] | None = None  # the body's Content-Encoding
    headers: dict[str, str] | None = None  # the allow-listed response headers
    sent_request_id: str | None = None  # the app's own X-Request-Id, when it set one
    capture_id: str | None = None  # its request's


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the response op needs to know of its request (kept by the writer between the two)."""

    messages: int
    problem: str | None


# What ops are built with when no middleware says otherwise (tools and tests): the default credential
# fields stripped, no hook.
DEFAULT_REDACTION = Redaction(DEFAULT_REDACT_FIELDS, None)


def request_op(
    record: CapturedRequest,
    *,
    ttl_ms: int,
    redaction: Redaction = DEFAULT_REDACTION,
    limit: int = DEFAULT_MAX_BODY_BYTES,
) -> tuple[Op, RequestFacts]:
    """The op for a captured request, and the facts its response will need."""
    body, problem = decode_json_body(
        record.body,
        truncated=record.body_truncated,
        size=record.body_size,
        codings=record.codings,
        limit=limit,
    )
    session_id, first = resolve_session_id(
        body,
        header_value=record.session_header,
        key_fingerprint=record.key_fingerprint,
        request_id=record.request_id,
    )
    if record.session_id is not None:
        session_id = record.session_id
    fields = body if isinstance(body, dict) else {}
    model = fields.get("model")
    stored = redaction.document(body, "request", text=None if record.codings else record.body)
    # Protocol facts (model, stream) come from the body as sent; what may be personal (user, metadata,
    # the first message) from the body as it is stored, so the hook's redaction holds for them too.
    kept = stored if isinstance(stored, dict) else {}
    user, metadata = kept.get("user"), kept.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else None
    if metadata is not None and kept.get(NUL_MARKER) is True:
        # Taken from a body stored NUL-escaped: marked as escaped too, so reads restore it (restore_nul).
        metadata[NUL_MARKER] = True
    messages = message_count(body)
    if not record.body_complete and problem is None:
        problem = "body_incomplete"
    if problem:
        metadata = {**(metadata or {}), "capture_problem": problem}
    first_text = _text(redaction.text(first, "first_user_message")) or ""
    op = _request_op(
        record,
        session_row(session_id, first_text, messages, record.arrived_ms, ttl_ms),
        openai_request=stored,
        model=model if isinstance(model, str) else None,
        stream=fields.get("stream") is True,
        user=user if isinstance(user, str) else None,
        metadata=metadata,
    )
    return op, RequestFacts(messages, problem)


def _request_op(record: CapturedRequest, session: dict[str, Any], **content: Any) -> Op:
    return {
        "op": "request",
        "session": session,
        "request": {
            "session_id": session["id"],
            "request_id": record.request_id,
            "capture_id": record.capture_id,
            "timestamp": record.arrived_ms,
            "created_at": record.arrived_ms,
            "method": record.method,
            "path": _text(record.path),
            **content,
        },
    }


def response_op(
    record: CapturedResponse, *, redaction: Redaction = DEFAULT_REDACTION, limit: int = DEFAULT_MAX_BODY_BYTES
) -> Op:
    errors: list[str] = []
    usage: Mapping[str, Any] | None = None
    finish_reason: str | None = None
    upstream_id: str | None = None
    body: Any = None
    data = record.body
    handoff = record.stream
    # An upstream that labels everything text/event-stream still answers errors (a 429) in plain JSON;
    # an SSE stream never starts with a bracket, so such a body is read as the JSON it is.
    streamed = record.streamed and (handoff is not None or not _starts_json(data, record.codings))
    ended = False  # the stream's own end marker passed ([DONE], the usage chunk, Qwen's finished)
    if streamed:
        if handoff is None and record.codings:
            # Decoded while it is rebuilt: an encoded stream is never held decoded in memory.
            handoff = StreamHandoff(record.codings)
            handoff.add(data)
        body, usage, finish_reason, upstream_id, ended = _stream_body(record, handoff, errors)
    elif data:
        body, problem = decode_json_body(
            data,
            truncated=record.body_truncated,
            size=record.body_size,
            codings=record.codings,
            limit=limit,
        )
        if problem:
            errors.append("response_" + problem)
        if isinstance(body, dict):
            usage, finish_reason, upstream_id = _summary(body)
            if "error" in body and (record.status_code or 200) >= 400:
                errors.append(_error_message(body["error"]))
    if record.error and not (ended and record.error == CLIENT_DISCONNECTED):
        # A client that leaves once the stream's end marker has reached it (the openai SDK closes at
        # [DONE], while an upstream may hold the body open a moment longer) got the whole answer.
        errors.insert(0, record.error)
    request = record.request
    if request is not None and request.problem:
        errors.insert(0, "request_" + request.problem)
    reports = record.reports or _NO_REPORTS
    tokens = _tokens(usage)
    error = _text(redaction.text("; ".join(errors), "error")) if errors else None
    op: Op = {
        "op": "response",
        "request_id": record.request_id,
        "capture_id": record.capture_id,
        "response": {
            "response_id": f"resp-{_response_ids()}",
            "upstream_id": _text(upstream_id),
            "timestamp": record.ended_ms,
            "created_at": record.ended_ms,
            "status_code": record.status_code,
            "openai_response": None
            if body is None
            else redaction.document(body, "response", text=None if streamed or record.codings else data),
            "qwen_response": _reported(reports.provider_response, "provider_response", redaction),
            "parent_id": _text(reports.parent_id),
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "total_tokens": tokens[2],
            "finish_reason": _text(finish_reason),
            "error": error,
            "duration_ms": record.duration_ms,
            "first_byte_ms": record.first_byte_ms,
            "headers": record.headers,
        },
        "session_update": {
            # The reply counts as a message of the conversation once it has finished.
            "message_count": None
            if request is None
            else request.messages + (1 if finish_reason is not None else 0),
            "parent_id": _text(reports.parent_id),
            "chat_id": _text(reports.chat_id),
            # The exchange's place in the conversation: its request's arrival.
            "ids_at": record.ended_ms - record.duration_ms,
        },
    }
    if record.sent_request_id is not None:
        op["sent_request_id"] = record.sent_request_id
    request_update: dict[str, Any] = {}
    if reports.provider_request is not None:
        request_update["qwen_request"] = _reported(reports.provider_request, "provider_request", redaction)
    if reports.provider is not None:
        request_update["provider"] = _text(reports.provider)
    if reports.metadata:
        request_update["metadata"] = _reported(reports.metadata, "metadata", redaction)
    if request_update:
        op["request_update"] = request_update
    return op


def _starts_json(data: bytes, codings: list[str] | None) -> bool:
    if codings:
        try:
            data = next(iter(ContentDecoder(codings).feed(data[:4096])), b"")
        except ContentDecodingError:
            return False
    return data.lstrip()[:1] in (b"{", b"[")


def _stream_body(
    record: CapturedResponse, handoff: StreamHandoff | RebuiltStream | None, errors: list[str]
) -> tuple[Any, Mapping[str, Any] | None, str | None, str | None, bool]:
    """The rebuilt completion of a streamed response (or the raw stream when it cannot be rebuilt),
    with its usage, finish_reason, upstream id and whether the stream ended properly; problems are added
    to ``errors``."""
    data = record.body
    kept = record.stream is None  # a stream over max_body_bytes was rebuilt as it passed, not kept
    result = handoff.finish() if handoff is not None else reconstruct_stream([data])
    problem = (handoff.problem if handoff is not None else None) or result.problem
    body: Any = result.completion
    plain = handoff is None  # the bytes in `data` are the stream's own text
    if body is not None and too_deep(body, hint=data if plain else None):
        problem = problem or f"response_stream_too_deep: a chunk nests more than {MAX_DEPTH} levels"
    if problem is not None:
        errors.append(problem)
        if not kept:
            # What was rebuilt before the problem, if it can be stored.
            return (None if body is None or too_deep(body) else escape_nul(body)), None, None, None, False
        raw = raw_body(
            data, reason="stream_unprocessable", truncated=record.body_truncated, size=record.body_size
        )
        return raw, None, None, None, False
    if body is not None and (not plain or b"\\u0000" in data):
        body = escape_nul(body)
    if result.error is not None:
        body = {**(body or {}), "error": result.error} if body else {"error": result.error}
        errors.append(_error_message(result.error))
    if record.body_truncated and kept:
        errors.append("response_body_too_large")
    elif not result.complete and record.error is None and result.error is None:
        errors.append("truncated")
    ended = result.complete and result.error is None and not (record.body_truncated and kept)
    return body, result.usage, result.finish_reason, result.upstream_id, ended


def _text(value: str | None) -> str | None:
    """A text column's value, storable on PostgreSQL (see bodies.py for the NUL escape)."""
    return escape_text(value) if value is not None and "\x00" in value else value


def _reported(value: Any, kind: str, redaction: Redaction | None) -> Any:
    """A value the app reported, as plain JSON that both databases store (or a note saying why not)."""
    if value is None:
        return None
    try:
        plain = jsonlib.loads(json.dumps(value, default=str, ensure_ascii=False))
    except (TypeError, ValueError, RecursionError) as exc:
        return {"$qwen_persist_unstorable": f"{type(exc).__name__}: {exc}"[:500]}
    if too_deep(plain):
        return {"$qwen_persist_unstorable": f"nested more than {MAX_DEPTH} levels"}
    if redaction is not None:
        plain = redaction.document(plain, kind)
    if isinstance(plain, dict):
        return escape_nul(plain)
    if isinstance(plain, str):
        return _text(plain)
    return plain if not holds_nul(plain) else {"$qwen_persist_unstorable": "NUL characters outside an object"}


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
            # The columns are 32-bit INTEGERs; a count beyond them is not a real count.
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
                return value
        return None

    prompt = count("prompt_tokens", "input_tokens")
    completion = count("completion_tokens", "output_tokens")
    total = count("total_tokens")
    if total is None and prompt is not None and completion is not None and prompt + completion <= MAX_TOKENS:
        total = prompt + completion
    return prompt, completion, total


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str) and message:
            return message
    if isinstance(error, str):
        return error
    try:
        return jsonlib.dumps(error)[:2000]
    except (TypeError, ValueError):
        return f"unreadable {type(error).__name__} error"


def fallback_op(record: CapturedRequest | CapturedResponse, exc: BaseException, *, ttl_ms: int) -> Op:
    """The op of a record whose normal op could not be built (a redaction hook that raised, say): the
    exchange is still recorded, with its content withheld and the reason in ``metadata``/``error``."""
    reason = _text(f"not_stored: {type(exc).__name__}"[:200])
    if isinstance(record, CapturedRequest):
        session_id = record.session_id or f"request-{record.request_id}"
        return _request_op(
            record,
            session_row(session_id, "", 0, record.arrived_ms, ttl_ms),
            openai_request=REDACTED_DOCUMENT,
            model=None,
            stream=False,
            user=None,
            metadata={"capture_problem": reason},
        )
    return {
        "op": "response",
        "request_id": record.request_id,
        "capture_id": record.capture_id,
        "response": {
            "response_id": f"resp-{_response_ids()}",
            "upstream_id": None,
            "timestamp": record.ended_ms,
            "created_at": record.ended_ms,
            "status_code": record.status_code,
            "openai_response": None,
            "qwen_response": None,
            "parent_id": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "finish_reason": None,
            "error": reason,
            "duration_ms": record.duration_ms,
            "first_byte_ms": record.first_byte_ms,
            "headers": record.headers,
        },
        "session_update": {"message_count": None, "parent_id": None, "chat_id": None},
    }
