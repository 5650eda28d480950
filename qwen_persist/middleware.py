"""`PersistenceMiddleware`: a pure ASGI middleware that tees chat completion exchanges to the writer.

Shaped like Starlette's own middleware: a scope guard, then a per-request responder holding the state.
Messages reach the app and the client untouched, except for one added ``X-Request-Id`` header. The
request path only copies bytes and hands records to the writer's queue; all parsing happens there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

from sqlalchemy.exc import NoSuchModuleError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import ConfigurationError, Redactor, Settings, build_settings
from .engine import make_engine
from .exchange import SCOPE_KEY, Exchange
from .records import CapturedRequest, CapturedResponse, StreamHandoff
from .sessions import SessionManager, api_key_fingerprint, is_valid_client_id, new_request_id, now_ms
from .writer import Writer, WriterStats

log = logging.getLogger("qwen_persist")

REQUEST_ID_HEADER = b"x-request-id"
_SEEN_IDS = 65_536  # client request ids remembered to refuse reuse without a database round trip


class PersistenceMiddleware:
    """Record every POST to the captured paths (default ``/v1/chat/completions``) in the database.

    Use it as ``app.add_middleware(PersistenceMiddleware, database_url=...)`` or wrap an ASGI app with
    ``PersistenceMiddleware(app, ...)``. Options are keyword-only; those not given come from
    ``QWEN_PERSIST_<NAME>`` environment variables, else defaults (see the README). Invalid options raise
    `ConfigurationError` here, at construction.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        database_url: str | None = None,
        paths: Iterable[str] | None = None,
        session_header: str | None = None,
        session_ttl: float | None = None,
        max_body_bytes: int | None = None,
        redact: Redactor | None = None,
        queue_size: int | None = None,
        batch_size: int | None = None,
        flush_interval: float | None = None,
        spill_dir: str | None = None,
        auto_upgrade: bool | None = None,
    ) -> None:
        self.app = app
        self.settings: Settings = build_settings(
            database_url=database_url,
            paths=paths,
            session_header=session_header,
            session_ttl=session_ttl,
            max_body_bytes=max_body_bytes,
            redact=redact,
            queue_size=queue_size,
            batch_size=batch_size,
            flush_interval=flush_interval,
            spill_dir=spill_dir,
            auto_upgrade=auto_upgrade,
        )
        try:
            self.engine = make_engine(self.settings.database_url)
        except (ImportError, NoSuchModuleError) as exc:
            raise ConfigurationError(
                f"no database driver for {self.settings.database_url.split(':', 1)[0]} URLs ({exc}); "
                "for PostgreSQL install qwen-persist[postgres]"
            ) from None
        self.writer = Writer(self.settings, self.engine)
        self.sessions = SessionManager(self.engine, ttl=self.settings.session_ttl)
        self._session_header = self.settings.session_header.encode("latin-1")
        self._seen_ids: OrderedDict[str, None] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.settings.paths:
            await _ExchangeResponder(self, scope)(receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, _LifespanSend(self.writer, send))
        else:
            await self.app(scope, receive, send)

    def stats(self) -> WriterStats:
        """Counters: accepted, written, spilled, failed, duplicates, retries, queue depth."""
        return self.writer.stats()

    async def aclose(self, timeout: float = 30.0) -> WriterStats:
        """Store everything still queued (spilling what the database cannot take within ``timeout``)."""
        return await self.writer.aclose(timeout)

    def _request_id(self, offered: str | None) -> str:
        if offered is not None and is_valid_client_id(offered) and offered not in self._seen_ids:
            self._seen_ids[offered] = None
            if len(self._seen_ids) > _SEEN_IDS:
                self._seen_ids.popitem(last=False)
            return offered
        return new_request_id()


class _LifespanSend:
    """Starts the writer with the app and flushes it when the app has finished shutting down."""

    __slots__ = ("send", "writer")

    def __init__(self, writer: Writer, send: Send) -> None:
        self.writer = writer
        self.send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            self.writer.start()
        elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await self.writer.aclose()
        await self.send(message)


class _ExchangeResponder:
    """The state of one exchange: the request bytes, the response bytes, timings, disconnects."""

    def __init__(self, middleware: PersistenceMiddleware, scope: Scope) -> None:
        self.started_ns = time.perf_counter_ns()
        self.middleware = middleware
        self.app = middleware.app
        self.writer = middleware.writer
        self.limit = middleware.settings.max_body_bytes
        self.scope = scope
        offered = session_value = key = None
        session_header = middleware._session_header
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                offered = value.decode("latin-1")
            elif name == session_header:
                session_value = value.decode("latin-1")
            elif name == b"authorization":
                scheme, _, credential = value.decode("latin-1").partition(" ")
                key = credential.strip() if scheme.lower() == "bearer" else key
            elif name in (b"api-key", b"x-api-key") and key is None:
                key = value.decode("latin-1")
        self.record = CapturedRequest(
            request_id=middleware._request_id(offered),
            arrived_ms=now_ms(),
            method=scope["method"],
            path=scope["path"],
            body=b"",
            body_size=0,
            body_truncated=False,
            session_header=session_value,
            key_fingerprint=api_key_fingerprint(key) if key else None,
            body_complete=False,
        )
        self.exchange = Exchange(middleware, self.record)
        scope[SCOPE_KEY] = self.exchange
        self.request_chunks: list[bytes] = []
        self.request_submitted = False
        self.status: int | None = None
        self.streamed = False
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self.response_truncated = False
        self.handoff: StreamHandoff | None = None
        self.handed_over = 0  # bytes of the handoff already queued for the writer
        self.first_byte_ns: int | None = None
        self.finished = False
        self.client_gone = False
        self.watcher: asyncio.Future[Message] | None = None
        self.app_receiving = 0

    async def __call__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send
        try:
            await self.app(self.scope, self.receive_with_capture, self.send_with_capture)
        except BaseException as exc:
            if not self.finished:
                error = "client_disconnected" if self.client_gone else f"{type(exc).__name__}: {exc}"
                # The server answers an unhandled exception with 500 when no response had started.
                self.finish(error=error, status=self.status if self.status is not None else 500)
            raise
        finally:
            if self.watcher is not None and not self.watcher.done():
                self.watcher.cancel()
        if not self.finished:
            self.finish(error="client_disconnected" if self.client_gone else "response_incomplete")

    # -- request side ------------------------------------------------------------------------------

    async def receive_with_capture(self) -> Message:
        if self.request_submitted:
            return await self._receive_after_body()
        message = await self.receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                self._keep_request_bytes(chunk)
            if not message.get("more_body", False):
                self.record.body_complete = True
                self.submit_request()
        elif message["type"] == "http.disconnect":
            self.client_gone = True
            self.submit_request()
        return message

    def _keep_request_bytes(self, chunk: bytes) -> None:
        record = self.record
        room = self.limit - record.body_size
        record.body_size += len(chunk)
        if room >= len(chunk):
            self.request_chunks.append(chunk)
        else:
            if room > 0:
                self.request_chunks.append(chunk[:room])
            record.body_truncated = True

    def submit_request(self) -> None:
        if self.request_submitted:
            return
        self.request_submitted = True
        chunks = self.request_chunks
        self.record.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.request_chunks = []
        self.writer.submit(self.record)

    async def _receive_after_body(self) -> Message:
        # After the body only a disconnect can come. A watcher may already own the server's receive
        # (see _watch_disconnect); then the app shares its answer instead of racing it.
        if self.watcher is not None:
            return await asyncio.shield(self.watcher)
        self.app_receiving += 1
        try:
            message = await self.receive()
        finally:
            self.app_receiving -= 1
        if message["type"] == "http.disconnect" and not self.finished:
            self.client_gone = True
        return message

    async def _watch_disconnect(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect" and not self.finished:
            self.client_gone = True
        return message

    # -- response side -----------------------------------------------------------------------------

    async def send_with_capture(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            headers = list(message.get("headers", ()))
            has_id = False
            for name, value in headers:
                lowered = name.lower()
                if lowered == b"content-type":
                    self.streamed = value.lower().startswith(b"text/event-stream")
                elif lowered == REQUEST_ID_HEADER:
                    has_id = True
            if not has_id:
                headers.append((REQUEST_ID_HEADER, self.record.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            self.submit_request()  # an app that answers without reading the whole body
            await self._send(message)
            return
        if kind != "http.response.body":
            await self._send(message)
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        gone_before = self.client_gone
        await self._send(message)
        if chunk and not gone_before:
            if self.first_byte_ns is None:
                self.first_byte_ns = time.perf_counter_ns()
            self._keep_response_bytes(chunk)
        if not more:
            self.finish(error="client_disconnected" if self.client_gone else None)
        elif self.watcher is None and self.app_receiving == 0 and not self.client_gone:
            # A streamed response: servers drop what is sent after a disconnect without telling the
            # app, so listen for it ourselves (only if the app is not already listening).
            self.watcher = asyncio.ensure_future(self._watch_disconnect())

    async def _send(self, message: Message) -> None:
        try:
            await self.send(message)
        except OSError:
            self.client_gone = True
            raise

    def _keep_response_bytes(self, chunk: bytes) -> None:
        self.response_size += len(chunk)
        if self.handoff is not None:
            self._hand_over(chunk)
        elif self.response_size <= self.limit:
            self.response_chunks.append(chunk)
        elif self.streamed:
            # Past max_body_bytes a stream is rebuilt as it passes, so memory stays bounded by the
            # completion's size rather than by the stream's.
            self.handoff = StreamHandoff()
            for kept in self.response_chunks:
                self.handoff.add(kept)
            self.response_chunks = []
            self._hand_over(chunk)
        else:
            self.response_truncated = True
            room = self.limit - (self.response_size - len(chunk))
            if room > 0:
                self.response_chunks.append(chunk[:room])

    def _hand_over(self, chunk: bytes) -> None:
        handoff = self.handoff
        assert handoff is not None
        handoff.add(chunk)
        # It goes to the writer in parts of max_body_bytes; if the writer falls far behind, the request
        # path rebuilds the backlog itself rather than hold the stream in memory.
        if handoff.added >= self.handed_over + self.limit:
            self.handed_over = handoff.added
            self.writer.feed_stream(handoff)
        if handoff.backlog > 4 * self.limit:
            handoff.drain(wait=False)

    def finish(self, *, error: str | None = None, status: int | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.exchange.ended = True
        self.submit_request()
        end_ns = time.perf_counter_ns()
        chunks = self.response_chunks
        self.response_chunks = []
        record = CapturedResponse(
            request_id=self.record.request_id,
            status_code=status if status is not None else self.status,
            streamed=self.streamed,
            body=chunks[0] if len(chunks) == 1 else b"".join(chunks),
            body_size=self.response_size,
            body_truncated=self.response_truncated,
            ended_ms=self.record.arrived_ms + (end_ns - self.started_ns) // 1_000_000,
            duration_ms=(end_ns - self.started_ns) // 1_000_000,
            first_byte_ms=None
            if self.first_byte_ns is None
            else (self.first_byte_ns - self.started_ns) // 1_000_000,
            error=error,
            stream=self.handoff,
            reports=self.exchange.reports,
        )
        self.writer.submit(record)
