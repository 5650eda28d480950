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
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import NoSuchModuleError
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.app import build_api, handles
from .config import ConfigurationError, Settings, build_settings
from .encodings import parse_content_encoding
from .engine import WRITER_LOCK_TIMEOUT, make_engine
from .exchange import SCOPE_KEY, Exchange
from .paths import PathMatcher, route_path
from .records import CLIENT_DISCONNECTED, CapturedRequest, CapturedResponse, StreamHandoff
from .redaction import Redactor
from .repositories import History
from .retention import Retention
from .sessions import (
    CaptureIds,
    SessionManager,
    api_key_fingerprint,
    is_valid_client_id,
    new_request_id,
    now_ms,
)
from .writer import Writer, WriterStats
from .writer_process import ProcessWriter

log = logging.getLogger("qwen_persist")

REQUEST_ID_HEADER = b"x-request-id"
STATE_KEY = "qwen_persist"  # the instance in app.state and in the lifespan state
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
        redact_fields: Iterable[str] | None = None,
        response_headers: Iterable[str] | None = None,
        shutdown_timeout: float | None = None,
        spill_max_bytes: int | None = None,
        api_token: str | Iterable[str] | None = None,
        api_anonymous: bool | None = None,
        api_prefix: str | None = None,
        retention: str | timedelta | None = None,
        writer: str | None = None,
    ) -> None:
        self.app = app
        try:
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
                redact_fields=redact_fields,
                response_headers=response_headers,
                shutdown_timeout=shutdown_timeout,
                spill_max_bytes=spill_max_bytes,
                api_token=api_token,
                api_anonymous=api_anonymous,
                api_prefix=api_prefix,
                retention=retention,
                writer=writer,
            )
            try:
                self.engine = make_engine(self.settings.database_url, lock_timeout=WRITER_LOCK_TIMEOUT)
            except (ImportError, NoSuchModuleError) as exc:
                raise ConfigurationError(
                    f"no database driver for {self.settings.database_url.split(':', 1)[0]} URLs ({exc}); "
                    "for PostgreSQL install qwen-persist[postgres]"
                ) from None
        except ConfigurationError as exc:
            # Starlette builds its middleware lazily, on the first lifespan or request, and uvicorn's
            # default lifespan mode ("auto") swallows an exception there; this line is then the only
            # place the mistake shows before every request fails.
            log.error("qwen_persist: PersistenceMiddleware cannot start: %s", exc)
            raise
        self.writer: Writer | ProcessWriter = _make_writer(self.settings, self.engine)
        self.sessions = SessionManager(self.engine, ttl=self.settings.session_ttl)
        retention_ms = self.settings.retention_ms
        self.retention = Retention(self.engine, retention_ms) if retention_ms is not None else None
        self._paths = PathMatcher(self.settings.paths)
        self._session_header = self.settings.session_header.encode("latin-1")
        self._response_headers = frozenset(h.encode("latin-1") for h in self.settings.response_headers)
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._published = False
        self._capture_ids = CaptureIds()
        self.history: History | None = None
        self._api: Starlette | None = None
        if self.settings.api_enabled:
            self.history = History(self.engine)
            self._api = build_api(
                self.history, tokens=self.settings.api_tokens, prefix=self.settings.api_prefix
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._published:
            self._publish(scope)
        if scope["type"] == "http" and scope["method"] == "POST" and self._paths(route_path(scope)):
            await _ExchangeResponder(self, scope)(receive, send)
        elif self._api is not None and scope["type"] == "http" and handles(self._api, scope):
            await self._api(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, receive, _LifespanSend(self, send))
        else:
            await self.app(scope, receive, send)

    def _publish(self, scope: Scope) -> None:
        """Make the instance reachable from the app when it was added with ``app.add_middleware``:
        ``app.state.qwen_persist`` (Starlette and FastAPI) and ``request.state.qwen_persist`` (any
        server with ASGI lifespan state)."""
        self._published = True
        if self.retention is not None:
            self.retention.start()  # here too for servers without lifespan events
        app_state = getattr(scope.get("app"), "state", None)
        if app_state is not None:
            setattr(app_state, STATE_KEY, self)
        state = scope.get("state")
        if scope["type"] == "lifespan" and isinstance(state, dict):
            state[STATE_KEY] = self

    def stats(self) -> WriterStats:
        """The writer's counters (see `WriterStats` and the README)."""
        return self.writer.stats()

    async def aclose(self, timeout: float | None = None) -> WriterStats:
        """Store everything still queued; what the database cannot take within ``timeout`` seconds
        (default: the ``shutdown_timeout`` option) is in the journal when this returns."""
        if self.history is not None:
            self.history.close()  # the engine is the writer's: it disposes of it
        if self.retention is not None:
            await asyncio.to_thread(self.retention.stop)
        return await self.writer.aclose(self.settings.shutdown_timeout if timeout is None else timeout)

    def _request_id(self, offered: str | None) -> str:
        if offered is not None and is_valid_client_id(offered) and offered not in self._seen_ids:
            self._seen_ids[offered] = None
            if len(self._seen_ids) > _SEEN_IDS:
                self._seen_ids.popitem(last=False)
            return offered
        return new_request_id()


def _make_writer(settings: Settings, engine: Engine) -> Writer | ProcessWriter:
    if settings.writer == "process":
        if settings.redact is None:
            return ProcessWriter(settings, engine)
        # The hook is the app's code: the writer process would have to import the app to run it.
        log.info("qwen_persist: a redact hook is set, so the writer runs as a thread in this process")
    return Writer(settings, engine)


class _LifespanSend:
    """Starts the writer with the app and flushes it when the app has finished shutting down."""

    __slots__ = ("middleware", "send")

    def __init__(self, middleware: PersistenceMiddleware, send: Send) -> None:
        self.middleware = middleware
        self.send = send

    async def __call__(self, message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            self.middleware.writer.start()
            if self.middleware.retention is not None:
                self.middleware.retention.start()
        elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await self.middleware.aclose()
        await self.send(message)


def middleware_of(app: Any) -> PersistenceMiddleware:
    """The `PersistenceMiddleware` of ``app`` (a Starlette/FastAPI app, a ``Request``, or any ASGI app
    wrapped in middleware that keeps its inner app as ``.app``), for ``stats()``, ``aclose()`` and
    ``sessions`` when it was added with ``app.add_middleware(...)``.

    Called on a Starlette app before it has served anything, it builds the middleware stack the way
    Starlette would on its first call, so a bad option raises `ConfigurationError` here, at start-up.
    """
    found = _search(app)
    if found is None:
        raise LookupError(f"no PersistenceMiddleware found in {app!r}")
    return found


def _search(app: Any) -> PersistenceMiddleware | None:
    seen: set[int] = set()
    layer = app
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        if isinstance(layer, PersistenceMiddleware):
            return layer
        state = getattr(layer, "state", None)
        published = getattr(state, STATE_KEY, None)
        if isinstance(published, PersistenceMiddleware):
            return published
        if hasattr(layer, "build_middleware_stack") and getattr(layer, "middleware_stack", 0) is None:
            layer.middleware_stack = layer.build_middleware_stack()
        scope = getattr(layer, "scope", None)  # a Request: its app, or its lifespan state
        if isinstance(scope, dict) and isinstance(scope.get("state"), dict):
            published = scope["state"].get(STATE_KEY)
            if isinstance(published, PersistenceMiddleware):
                return published
        layer = (
            scope.get("app")
            if isinstance(scope, dict)
            else getattr(layer, "middleware_stack", None) or getattr(layer, "app", None)
        )
    return None


class _ExchangeResponder:
    """The state of one exchange: the request bytes, the response bytes, timings, disconnects."""

    def __init__(self, middleware: PersistenceMiddleware, scope: Scope) -> None:
        self.started_ns = time.perf_counter_ns()
        self.middleware = middleware
        self.app = middleware.app
        self.writer = middleware.writer
        self.limit = middleware.settings.max_body_bytes
        self.scope = scope
        offered = session_value = key = codings = None
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
            elif name == b"content-encoding":
                codings = parse_content_encoding(value.decode("latin-1")) or None
        query = scope.get("query_string", b"")
        self.record = CapturedRequest(
            request_id=middleware._request_id(offered),
            arrived_ms=now_ms(),
            method=scope["method"],
            # As the client addressed it: mount prefix and query string (Azure's api-version) included.
            path=scope["path"] + "?" + query.decode("latin-1") if query else scope["path"],
            body=b"",
            body_size=0,
            body_truncated=False,
            session_header=session_value,
            key_fingerprint=api_key_fingerprint(key) if key else None,
            body_complete=False,
            codings=codings,
            capture_id=middleware._capture_ids(),
        )
        self.exchange = Exchange(middleware, self.record)
        scope[SCOPE_KEY] = self.exchange
        self.request_chunks: list[bytes] = []
        self.request_submitted = False
        self.status: int | None = None
        self.streamed = False
        self.response_codings: list[str] | None = None
        self.response_headers: dict[str, str] | None = None
        self.sent_request_id: str | None = None
        self.response_chunks: list[bytes] = []
        self.response_size = 0
        self.response_truncated = False
        self.handoff: StreamHandoff | None = None
        self.handed_over = 0  # bytes of the handoff already queued for the writer
        self.first_byte_ns: int | None = None
        self.finished = False
        self.client_gone = False
        self.watcher: asyncio.Future[Message] | None = None

    async def __call__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send
        try:
            await self.app(self.scope, self.receive_with_capture, self.send_with_capture)
        except BaseException as exc:
            if not self.finished:
                error = CLIENT_DISCONNECTED if self.client_gone else f"{type(exc).__name__}: {exc}"
                # The server answers an unhandled exception with 500 when no response had started.
                self.finish(error=error, status=self.status if self.status is not None else 500)
            raise
        finally:
            if self.watcher is not None and not self.watcher.done():
                self.watcher.cancel()
        if not self.finished:
            self.finish(error=CLIENT_DISCONNECTED if self.client_gone else "response_incomplete")

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
                # From here on only a disconnect can come, and servers drop what is sent after one
                # without telling the app; listen for it, whatever kind of response follows.
                self.watcher = asyncio.ensure_future(self._watch_disconnect())
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
        # After the body only a disconnect can come. The watcher owns the server's receive (see
        # receive_with_capture); the app shares its answer instead of racing it.
        if self.watcher is not None:
            return await asyncio.shield(self.watcher)
        message = await self.receive()  # the body ended with a disconnect: nothing left to watch
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
            kept = self.middleware._response_headers
            for name, value in headers:
                lowered = name.lower()
                if lowered == b"content-type":
                    self.streamed = value.lower().startswith(b"text/event-stream")
                elif lowered == b"content-encoding":
                    self.response_codings = parse_content_encoding(value.decode("latin-1")) or None
                if lowered == REQUEST_ID_HEADER:
                    # The app set its own id (a passthrough proxy forwards the upstream's): that is the
                    # id the client sees, so the stored request takes it.
                    has_id = True
                    self.sent_request_id = value.decode("latin-1")
                if lowered in kept:
                    if self.response_headers is None:
                        self.response_headers = {}
                    self.response_headers[lowered.decode("latin-1")] = value.decode("latin-1")
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
            self.finish(error=CLIENT_DISCONNECTED if self.client_gone else None)

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
            self.handoff = StreamHandoff(self.response_codings)
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
            capture_id=self.record.capture_id,
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
            codings=self.response_codings,
            headers=self.response_headers,
            sent_request_id=self.sent_request_id if self.sent_request_id != self.record.request_id else None,
        )
        self.writer.submit(record)
