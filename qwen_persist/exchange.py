"""The per-request exchange handle, through which the proxy app talks to the recorder."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .bodies import decode_json_body
from .records import CapturedRequest, Reports
from .sessions import SessionInfo, resolve_session_id

if TYPE_CHECKING:
    from .middleware import PersistenceMiddleware

log = logging.getLogger("qwen_persist")

SCOPE_KEY = "qwen_persist.exchange"
SESSION_TIMEOUT = 1.0  # seconds exchange.session() waits at most
_UNSET: Any = object()


class Exchange:
    """One captured request/response pair, as the proxy app sees it while handling the request.

    The app reports provider-side data here (`report`) and reads the ids the recorder assigned.
    Reports made after the response has ended cannot be stored and are logged as such.
    """

    __slots__ = ("_middleware", "_record", "ended", "reports")

    def __init__(self, middleware: PersistenceMiddleware, record: CapturedRequest) -> None:
        self._middleware = middleware
        self._record = record
        # Made on the first report: most exchanges report nothing, and each object made per exchange
        # is one more for the request path to allocate and the collector to count.
        self.reports: Reports | None = None
        self.ended = False

    @property
    def request_id(self) -> str:
        """The id stored in ``requests.request_id`` and echoed in the ``X-Request-Id`` header."""
        return self._record.request_id

    @property
    def session_id(self) -> str:
        """The session this request belongs to (SPEC §5), derived from the body read so far."""
        record = self._record
        if record.session_id is not None:
            return record.session_id
        body, _ = decode_json_body(
            record.body,
            truncated=record.body_truncated,
            size=record.body_size,
            codings=record.codings,
            limit=self._middleware.settings.max_body_bytes,
        )
        session_id = resolve_session_id(
            body,
            header_value=record.session_header,
            key_fingerprint=record.key_fingerprint,
            request_id=record.request_id,
        )[0]
        # Pinned only once the whole body is known: asked earlier, the answer is provisional, and
        # pinning it would file the request under a session of its own instead of its conversation.
        if record.body_complete:
            record.session_id = session_id
        return session_id

    def report(
        self,
        *,
        provider_request: Any = _UNSET,
        provider_response: Any = _UNSET,
        parent_id: str | None = _UNSET,
        chat_id: str | None = _UNSET,
        provider: str | None = _UNSET,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record provider-side data: ``qwen_request``/``qwen_response``, the next parent id, the
        upstream chat id, the provider name, and extra request metadata (merged into ``metadata``)."""
        if self.ended:
            log.warning("qwen_persist: report() after the response of %s ended; not stored", self.request_id)
            return
        reports = self.reports
        if reports is None:
            reports = self.reports = Reports()
        if provider_request is not _UNSET:
            reports.provider_request = provider_request
        if provider_response is not _UNSET:
            reports.provider_response = provider_response
        if parent_id is not _UNSET:
            reports.parent_id = parent_id
        if chat_id is not _UNSET:
            reports.chat_id = chat_id
        if provider is not _UNSET:
            reports.provider = provider
        if metadata:
            reports.metadata.update(metadata)

    async def session(self, timeout: float = SESSION_TIMEOUT) -> SessionInfo | None:
        """This request's session as stored, including what earlier exchanges reported (chat_id,
        parent_id). Waits for the writer to store what came before, so a follow-up sees its parent.

        Answers within ``timeout`` seconds whatever the database does: while it is down, locked or
        hung, the answer is None (the app proceeds as for a new conversation) and a warning is logged.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._middleware.writer.barrier(timeout)
        try:
            return await asyncio.wait_for(
                self._middleware.sessions.get(self.session_id), max(deadline - loop.time(), 0.001)
            )
        except asyncio.TimeoutError:
            log.warning("qwen_persist: session %s not read within %.1fs", self.session_id, timeout)
        except Exception:
            log.exception("qwen_persist: could not read session %s", self.session_id)
        return None


def current_exchange(request_or_scope: Any) -> Exchange | None:
    """The exchange of a captured request (a Starlette/FastAPI ``Request`` or a raw ASGI scope), else None."""
    scope = getattr(request_or_scope, "scope", request_or_scope)
    if not isinstance(scope, Mapping):
        raise TypeError("current_exchange() takes a request object with a .scope, or an ASGI scope")
    exchange = scope.get(SCOPE_KEY)
    return exchange if isinstance(exchange, Exchange) else None
