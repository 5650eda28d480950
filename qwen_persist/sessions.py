"""Sessions: who a request belongs to, and the database-backed `SessionManager`.

Identity, in order: the session header, OpenAI ``metadata.session_id``, else the MD5 of the first user
message's canonical text scoped by the caller (API-key fingerprint and ``user``), so two callers who
both open with "hi" never share a session. Expiry governs continuation only; it never deletes history.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import Engine

MAX_ID_LENGTH = 128
# The string encoder json.dumps uses with its default ensure_ascii=True (the C one when available).
_json_string = json.encoder.encode_basestring_ascii


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def is_valid_client_id(value: str | None) -> bool:
    """1 to 128 printable ASCII characters: what we accept from clients as request or session ids."""
    return value is not None and 0 < len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable()


def api_key_fingerprint(key: str) -> str:
    """A stable, non-reversible tag for an API key: scopes sessions without storing the secret."""
    return hashlib.sha256(b"qwen_persist\x00" + key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def canonical_text(content: Any) -> str:
    """The text a message stands for: strings as is; content parts joined by newlines.

    Images and audio count by URL, or by a hash of inline data, so the same picture gives the same id.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part_text(part) for part in content)
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def _part_text(part: Any) -> str:
    if not isinstance(part, dict):
        return canonical_text(part)
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str):
            return url if not url.startswith("data:") else "image:sha256:" + _sha256(url)
    return f"{kind}:sha256:" + _sha256(json.dumps(part, sort_keys=True, ensure_ascii=False))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def first_user_message(body: Any) -> str | None:
    """Canonical text of the first ``user`` message, or None when there is none."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            return canonical_text(message.get("content"))
    return None


def message_count(body: Any) -> int:
    messages = body.get("messages") if isinstance(body, dict) else None
    return len(messages) if isinstance(messages, list) else 0


def resolve_session_id(
    body: Any, *, header_value: str | None, key_fingerprint: str | None, request_id: str
) -> tuple[str, str]:
    """(session id, first user message text) for a request. Deterministic in its inputs.

    A request with no user message gets a session of its own, named after its request id.
    """
    first = first_user_message(body)
    if is_valid_client_id(header_value):
        return str(header_value), first or ""
    metadata = body.get("metadata") if isinstance(body, dict) else None
    from_metadata = metadata.get("session_id") if isinstance(metadata, dict) else None
    if isinstance(from_metadata, str) and is_valid_client_id(from_metadata):
        return from_metadata, first or ""
    if first is None:
        return f"request-{request_id}", ""
    user = body.get("user") if isinstance(body, dict) else None
    scope = ""
    if key_fingerprint or isinstance(user, str):
        # A JSON array is self-delimiting, so no (key, user, message) triple can pass for another. Spelled
        # out, it is the text json.dumps gives for the two strings (its separator and its ASCII string
        # encoder), byte for byte: stored session ids depend on it (tests/test_sessions.py checks).
        fingerprint, name = key_fingerprint or "", user if isinstance(user, str) else ""
        scope = f"[{_json_string(fingerprint)}, {_json_string(name)}]"
    return hashlib.md5((scope + first).encode("utf-8", "surrogateescape")).hexdigest(), first


class _RequestIds:
    """Random (version 4) UUID strings, as ``str(uuid.uuid4())`` makes them, at a third of its cost.

    The bytes come from the operating system's CSPRNG like uuid4's, read 4 KiB at a time and formatted
    by slicing their hex form: ids echoed to clients stay unguessable, so no client can claim the id the
    next request will get by sending it as its own X-Request-Id. A forked worker drops the parent's
    unread bytes, or the two would hand out the same ids.
    """

    __slots__ = ("_state",)

    _BYTES: ClassVar[int] = 4096
    # The variant's two high bits are 10: the first hex digit of the fourth group is one of 8, 9, a, b.
    _VARIANT: ClassVar[dict[str, str]] = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}

    def __init__(self) -> None:
        self._state = self._fresh()
        os.register_at_fork(after_in_child=self._renew)

    def _fresh(self) -> tuple[str, itertools.count[int]]:
        return os.urandom(self._BYTES).hex(), itertools.count(0, 32)

    def _renew(self) -> None:
        self._state = self._fresh()

    def __call__(self) -> str:
        # The buffer and its positions are read as one tuple, and next() on a count is atomic, so
        # threads calling at once (SessionManager.generate_session_id may run anywhere) never share
        # a position; two that both reach the end each format from a fresh buffer of their own.
        state = self._state
        at = next(state[1])
        if at >= 2 * self._BYTES:
            state = self._fresh()
            self._state = state
            at = next(state[1])
        h = state[0]
        # 32 random hex digits, of which the version digit and the variant's two bits are then fixed.
        return (
            f"{h[at : at + 8]}-{h[at + 8 : at + 12]}-4{h[at + 13 : at + 16]}-"
            f"{self._VARIANT[h[at + 16]]}{h[at + 17 : at + 20]}-{h[at + 20 : at + 32]}"
        )


new_request_id = _RequestIds()
"""A new request id: a random UUID string (what ``X-Request-Id`` echoes when the client sent none)."""


class CaptureIds:
    """Capture ids: a random per-process token and a counter, so cheap to make on the request path and
    unique across replicas, workers forked from one parent (the token is renewed in the child) and
    restarts. They are how a replayed record is told from a fresh one."""

    __slots__ = ("_counter", "_token")

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._token = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._token}-{next(self._counter):x}"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    chat_id: str | None
    parent_id: str | None
    first_user_message: str
    message_count: int
    created_at: int
    updated_at: int
    last_accessed: int
    expires_at: int
    ids_updated_at: int | None = None  # arrival time of the exchange that set chat_id/parent_id

    @property
    def expired(self) -> bool:
        return self.expires_at <= now_ms()


class SessionManager:
    """Database-backed sessions with sliding expiry (the original's phase 3), safe for the event loop.

    A thin async face over `repositories.SessionRepository`: every method runs its SQL in a worker
    thread. Updates are single atomic statements, so concurrent callers never lose each other's writes.
    ``get`` returns None for an expired session: it is not continued, but its history stays until an
    explicit retention policy deletes it.
    """

    def __init__(self, engine: Engine, *, ttl: float = 30 * 60.0) -> None:
        # Imported here: the repositories import this module's SessionInfo.
        from .repositories.sessions import SessionRepository

        self.engine = engine
        self.ttl_ms = int(ttl * 1000)
        self.repository = SessionRepository(engine)

    @staticmethod
    def generate_session_id(body: Any, *, api_key: str | None = None) -> str:
        """The id a request body would get with no session header (derived from its first user message)."""
        fingerprint = api_key_fingerprint(api_key) if api_key else None
        return resolve_session_id(
            body, header_value=None, key_fingerprint=fingerprint, request_id=new_request_id()
        )[0]

    async def create(
        self, session_id: str, first_user_message: str = "", *, chat_id: str | None = None
    ) -> SessionInfo:
        """Create the session, or renew it if it exists (expired ones lose chat_id and parent_id)."""
        return await self.repository.acreate(session_id, first_user_message, self.ttl_ms, chat_id=chat_id)

    async def get(self, session_id: str) -> SessionInfo | None:
        """The live session, touched (its expiry slides); None if missing or expired."""
        return await self.repository.atouch(session_id, self.ttl_ms)

    async def peek(self, session_id: str) -> SessionInfo | None:
        """The session row as stored, expired or not, without touching it."""
        return await self.repository.aget(session_id)

    async def is_new(self, session_id: str) -> bool:
        """True when no live session has this id (a request with it would start a conversation).
        Only looks: unlike `get`, it does not slide the expiry."""
        info = await self.peek(session_id)
        return info is None or info.expired

    async def get_parent_id(self, session_id: str) -> str | None:
        info = await self.get(session_id)
        return info.parent_id if info else None

    async def update_parent_id(self, session_id: str, parent_id: str | None) -> bool:
        return await self.repository.aset_ids(session_id, self.ttl_ms, {"parent_id": parent_id})

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        return await self.repository.aset_ids(session_id, self.ttl_ms, {"chat_id": chat_id})

    async def delete(self, session_id: str) -> bool:
        """Delete a session with its requests and responses."""
        return await self.repository.adelete(session_id)

    async def cleanup_expired(self, *, batch_size: int = 1000) -> int:
        """Retention, never automatic: delete expired sessions with their history, in batches."""
        return await self.repository.apurge_expired(batch_size=batch_size)

    async def metrics(self) -> dict[str, int]:
        """``active`` (not expired) and ``total`` sessions."""
        return await self.repository.ametrics()

    async def list(
        self, *, limit: int = 100, offset: int = 0, active_only: bool = False
    ) -> list[SessionInfo]:
        """Sessions, most recently used first."""
        from .repositories import InvalidParameter, Pagination, SessionFilter

        try:
            page = Pagination(limit=limit, offset=offset)
        except InvalidParameter:
            raise ValueError("limit must be within 1..1000 and offset >= 0") from None
        found = await self.repository.alist(SessionFilter(active=True if active_only else None), page)
        return found.items

    async def request_count(self, session_id: str) -> int:
        detail = await self.repository.adetail(session_id)
        return detail.request_count if detail is not None else 0


def session_row(
    session_id: str, first_user_message: str, messages: int, now: int, ttl_ms: int
) -> dict[str, Any]:
    """A sessions row as a request arriving at ``now`` would create it."""
    return {
        "id": session_id,
        "chat_id": None,
        "parent_id": None,
        "first_user_message": first_user_message,
        "message_count": messages,
        "created_at": now,
        "updated_at": now,
        "last_accessed": now,
        "expires_at": now + ttl_ms,
        "ids_updated_at": None,
    }
