"""`PersistenceMiddleware`: a pure ASGI middleware that tees chat completion exchanges to the writer.

Shaped like Starlette's own middleware: a scope guard, then a per-request responder holding the state.
Messages reach the app and the client untouched, except for one added ``X-Request-Id`` header. The
request path only copies bytes and hands records to the writer's queue; all parsing happens there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import NoSuchModuleError
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.app import build_api, handles
from .config import ConfigurationError, Settings, build_settings
from .cpus import available_cpus
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
)
from .writer import Writer, WriterStats
from .writer_process import ProcessWriter

log = logging.getLogger("qwen_persist")

REQUEST_ID_HEADER = b"x-request-id"
STATE_KEY = "qwen_persist"  # the instance in app.state and in the lifespan state
_SEEN_IDS = 65_536  # client request ids remembered to refuse reuse without a database round trip
_FINGERPRINTS = 256  # API key fingerprints remembered (see _fingerprint)


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
        self._header_kinds = _header_kinds(self._session_header)
        self._response_headers = frozenset(h.encode("latin-1") for h in self.settings.response_headers)
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._fingerprints: dict[str, str] = {}
        self._published = False
        self._capture_ids = CaptureIds()
        self._reaper = _Reaper()
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
            responder = _ExchangeResponder(self, scope, receive, send)
            try:
                await self.app(scope, responder.receive_with_capture, responder.send_with_capture)
            except BaseException as exc:
                responder.failed(exc)
                raise
            responder.ended()
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

    def _fingerprint(self, key: str) -> str:
        # A client sends the same key with every request: a SHA-256 per request was a tenth of the
        # request path's cost. Bounded; the keys it holds are ones the process sees on every request.
        fingerprint = self._fingerprints.get(key)
        if fingerprint is None:
            if len(self._fingerprints) >= _FINGERPRINTS:
                self._fingerprints.clear()
            fingerprint = self._fingerprints[key] = api_key_fingerprint(key)
        return fingerprint

    def _request_id(self, offered: str | None) -> str:
        if offered is not None and is_valid_client_id(offered) and offered not in self._seen_ids:
            self._seen_ids[offered] = None
            if len(self._seen_ids) > _SEEN_IDS:
                self._seen_ids.popitem(last=False)
            return offered
        return new_request_id()


def writer_mode(settings: Settings) -> str:
    """Where the writer runs: "process" or "thread". "auto" takes the process where this one may use two
    CPUs or more (affinity and cgroup quota; `cpus.available_cpus`): measured, that moves the writer's CPU
    and garbage off the event loop's core (benchmarks/README.md, "Performance II"), while confined to one
    core the same work only competes there, so the thread is kept."""
    if settings.redact is not None:
        # The hook is the app's code: the writer process would have to import the app to run it.
        if settings.writer == "process":
            log.info("qwen_persist: a redact hook is set, so the writer runs as a thread in this process")
        return "thread"
    if settings.writer == "auto":
        cpus = available_cpus()
        mode = "process" if os.name == "posix" and cpus >= 2 else "thread"
        log.info("qwen_persist: writer=auto chose the %s (this process may use %g CPUs)", mode, cpus)
        return mode
    return settings.writer


def _make_writer(settings: Settings, engine: Engine) -> Writer | ProcessWriter:
    if writer_mode(settings) == "process":
        return ProcessWriter(settings, engine)
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


# What the request path looks for in a request's headers; one dict lookup per header (see _header_kinds).
_REQUEST_ID, _SESSION, _AUTHORIZATION, _API_KEY, _CODINGS = range(5)


def _header_kinds(session_header: bytes) -> dict[bytes, int]:
    # Inserted from the lowest precedence up, so a name that is two things (a session header named
    # x-request-id, say) keeps the meaning the first-match-wins order gave it.
    kinds = {b"content-encoding": _CODINGS, b"api-key": _API_KEY, b"x-api-key": _API_KEY}
    kinds[b"authorization"] = _AUTHORIZATION
    kinds[session_header] = _SESSION
    kinds[REQUEST_ID_HEADER] = _REQUEST_ID
    return kinds


def _watch(receiving: Awaitable[Message]) -> asyncio.Future[Message]:
    """A task awaiting the server's receive(): create_task takes the usual coroutine straight."""
    try:
        return asyncio.get_running_loop().create_task(receiving)  # type: ignore[arg-type]
    except TypeError:  # another kind of awaitable
        return asyncio.ensure_future(receiving)


class _Reaper:
    """Cancels the disconnect watchers the server leaves waiting after their exchange ended.

    A server like uvicorn answers a waiting receive() once the response is complete, in the loop's next
    turn: cancelling each watcher as its exchange ends would only cost an exception (and a traceback
    holding its frames), and a timer per exchange would cost more than the watcher. So the watchers of
    every exchange ending in a turn are looked at together, two turns later, and only those still
    waiting are cancelled. One sweep per loop turn at most, none while no exchange ends.
    """

    __slots__ = ("_loop", "_older", "_recent")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent: list[asyncio.Future[Message]] = []  # ended since the last sweep
        self._older: list[asyncio.Future[Message]] = []  # still waiting at the last sweep

    def add(self, watcher: asyncio.Future[Message]) -> None:
        loop = watcher.get_loop()
        if loop is not self._loop:
            # The first exchange, or another event loop (a test client's): a sweep scheduled on the
            # old one went with it, as did its tasks.
            self._loop, self._recent, self._older = loop, [], []
        if not self._recent and not self._older:
            loop.call_soon(self._sweep)
        self._recent.append(watcher)

    def _sweep(self) -> None:
        if self._loop is not asyncio.get_running_loop():
            return  # scheduled on a loop this middleware has since left
        for watcher in self._older:
            if not watcher.done():
                watcher.cancel()
        # A watcher whose exchange ended after this sweep was scheduled may have its answer queued
        # behind it in this very turn: it gets one more turn before it counts as left waiting.
        self._older = [watcher for watcher in self._recent if not watcher.done()]
        self._recent = []
        if self._older:
            self._loop.call_soon(self._sweep)


class _ExchangeResponder:
    """The state of one exchange: the request bytes, the response bytes, timings, disconnects.

    Lean by design (issue #12): every exchange passes through here on the event loop. Nothing here
    refers back to the responder from an object that outlives the exchange (no task running one of its
    methods, no callback on one), so it and its records are freed by reference counting when the
    exchange ends, and the collector never walks them.
    """

    __slots__ = (
        "client_gone",
        "exchange",
        "finished",
        "first_byte_ns",
        "handed_over",
        "handoff",
        "limit",
        "middleware",
        "receive",
        "record",
        "request_chunks",
        "request_submitted",
        "response_chunks",
        "response_codings",
        "response_headers",
        "response_size",
        "response_truncated",
        "send",
        "sent_request_id",
        "started_ns",
        "status",
        "streamed",
        "watcher",
        "writer",
    )

    def __init__(self, middleware: PersistenceMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.started_ns = time.perf_counter_ns()
        self.receive = receive
        self.send = send
        self.middleware = middleware
        self.writer = middleware.writer
        self.limit = middleware.settings.max_body_bytes
        offered = session_value = key = codings = None
        kinds = middleware._header_kinds
        for name, value in scope["headers"]:
            if name not in kinds:  # most headers: an `in` test is cheaper than a .get() call
                continue
            kind = kinds[name]
            if kind == _REQUEST_ID:
                offered = value.decode("latin-1")
            elif kind == _SESSION:
                session_value = value.decode("latin-1")
            elif kind == _AUTHORIZATION:
                scheme, _, credential = value.decode("latin-1").partition(" ")
                key = credential.strip() if scheme.lower() == "bearer" else key
            elif kind == _API_KEY:
                if key is None:
                    key = value.decode("latin-1")
            else:
                codings = parse_content_encoding(value.decode("latin-1")) or None
        query = scope.get("query_string", b"")
        path = scope["path"]
        # Positional: keyword arguments cost a dataclass twice as much, on every exchange.
        self.record = record = CapturedRequest(
            new_request_id() if offered is None else middleware._request_id(offered),  # request_id
            time.time_ns() // 1_000_000,  # arrived_ms (sessions.now_ms, without the call)
            scope["method"],  # method
            # As the client addressed it: mount prefix and query string (Azure's api-version) included.
            path + "?" + query.decode("latin-1") if query else path,  # path
            b"",  # body
            0,  # body_size
            False,  # body_truncated
            session_value,  # session_header
            middleware._fingerprint(key) if key else None,  # key_fingerprint
            None,  # session_id
            False,  # body_complete
            codings,  # codings
            middleware._capture_ids(),  # capture_id
        )
        self.exchange = scope[SCOPE_KEY] = Exchange(middleware, record)
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
        # The server's receive() awaited from the body's end on; it is read, never called back (see
        # gone()), so no loop turn is spent on it and nothing in it refers to the responder.
        self.watcher: asyncio.Future[Message] | None = None

    # PersistenceMiddleware.__call__ drives the exchange itself (one coroutine less per exchange):
    #     await app(scope, responder.receive_with_capture, responder.send_with_capture)
    # then calls failed(exc) if that raised, else ended().

    def failed(self, exc: BaseException) -> None:
        """The app raised ``exc`` (it is re-raised)."""
        if not self.finished:
            error = CLIENT_DISCONNECTED if self.gone() else f"{type(exc).__name__}: {exc}"
            # The server answers an unhandled exception with 500 when no response had started.
            self.finish(error=error, status=self.status if self.status is not None else 500)
        self._release_watcher()

    def ended(self) -> None:
        """The app returned."""
        self._release_watcher()
        if not self.finished:
            self.finish(error=CLIENT_DISCONNECTED if self.gone() else "response_incomplete")

    def _release_watcher(self) -> None:
        watcher = self.watcher
        if watcher is not None and not watcher.done():
            self.middleware._reaper.add(watcher)

    def gone(self) -> bool:
        """Whether the client has left: a send failed, or receive() answered ``http.disconnect``."""
        if self.client_gone:
            return True
        watcher = self.watcher
        if watcher is None or not watcher.done() or watcher.cancelled() or watcher.exception() is not None:
            return False
        # Only read before the exchange finishes: a disconnect after that is the server's way of saying
        # the response is complete, not the client leaving.
        self.client_gone = watcher.result()["type"] == "http.disconnect"
        return self.client_gone

    # -- request side ------------------------------------------------------------------------------

    async def receive_with_capture(self) -> Message:
        if self.request_submitted:
            return await self._receive_after_body()
        message = await self.receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                record = self.record
                if record.body_size + len(chunk) <= self.limit:
                    record.body_size += len(chunk)
                    self.request_chunks.append(chunk)
                else:
                    self._keep_request_bytes(chunk)
            if not message.get("more_body", False):
                self.record.body_complete = True
                self.submit_request()
                # From here on only a disconnect can come, and servers drop what is sent after one
                # without telling the app; listen for it, whatever kind of response follows.
                self.watcher = _watch(self.receive())
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

    # -- response side -----------------------------------------------------------------------------

    async def send_with_capture(self, message: Message) -> None:
        if message["type"] != "http.response.body":
            if message["type"] == "http.response.start":
                message = self._start(message)
            try:
                await self.send(message)
            except OSError:
                self.client_gone = True
                raise
            return
        # The common case, once per SSE event, is kept to a few reads and writes of this object.
        chunk = message.get("body", b"")
        watcher = self.watcher
        keep = chunk and not (self.client_gone or (watcher is not None and watcher.done() and self.gone()))
        try:
            await self.send(message)
        except OSError:
            self.client_gone = True
            raise
        if keep:
            size = self.response_size + len(chunk)
            if not self.response_size:
                self.first_byte_ns = time.perf_counter_ns()
            self.response_size = size
            if size <= self.limit and self.handoff is None:
                self.response_chunks.append(chunk)
            else:
                self._keep_past_limit(chunk)
        if not message.get("more_body", False):
            watcher = self.watcher
            gone = self.client_gone or (watcher is not None and watcher.done() and self.gone())
            self.finish(error=CLIENT_DISCONNECTED if gone else None)

    def _start(self, message: Message) -> Message:
        """Note the response's status and headers; the message to send, with our X-Request-Id added."""
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
            elif lowered == REQUEST_ID_HEADER:
                # The app set its own id (a passthrough proxy forwards the upstream's): that is the id
                # the client sees, so the stored request takes it.
                has_id = True
                self.sent_request_id = value.decode("latin-1")
            if lowered in kept:
                if self.response_headers is None:
                    self.response_headers = {}
                self.response_headers[lowered.decode("latin-1")] = value.decode("latin-1")
        if not self.request_submitted:  # an app that answers without reading the whole body
            self.submit_request()
        if has_id:
            return message
        headers.append((REQUEST_ID_HEADER, self.record.request_id.encode("latin-1")))
        return {**message, "headers": headers}

    def _keep_past_limit(self, chunk: bytes) -> None:
        """A chunk that does not fit under max_body_bytes, or one of a stream already handed over."""
        if self.handoff is not None:
            self._hand_over(chunk)
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
        if not self.request_submitted:
            self.submit_request()
        end_ns = time.perf_counter_ns()
        chunks = self.response_chunks
        self.response_chunks = []
        record = self.record
        started_ns = self.started_ns
        duration_ms = (end_ns - started_ns) // 1_000_000
        first_byte_ns = self.first_byte_ns
        sent_request_id = self.sent_request_id
        self.writer.submit(
            CapturedResponse(  # positional, as CapturedRequest above
                record.request_id,  # request_id
                status if status is not None else self.status,  # status_code
                self.streamed,  # streamed
                chunks[0] if len(chunks) == 1 else b"".join(chunks),  # body
                self.response_size,  # body_size
                self.response_truncated,  # body_truncated
                record.arrived_ms + duration_ms,  # ended_ms
                duration_ms,  # duration_ms
                None if first_byte_ns is None else (first_byte_ns - started_ns) // 1_000_000,  # first_byte_ms
                error,  # error
                self.handoff,  # stream
                self.exchange.reports,  # reports
                None,  # request (the writer's)
                self.response_codings,  # codings
                self.response_headers,  # headers
                sent_request_id if sent_request_id != record.request_id else None,  # sent_request_id
                record.capture_id,  # capture_id
            )
        )
