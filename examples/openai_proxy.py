"""An OpenAI-compatible forwarding proxy (Starlette + httpx), recorded by qwen_persist with one line.

Run it from this folder, pointed at any OpenAI-compatible upstream (here the fake one on port 9000)::

    UPSTREAM_BASE_URL=http://127.0.0.1:9000/v1 UPSTREAM_API_KEY=sk-... uvicorn openai_proxy:app --port 8000

The proxy itself knows nothing about persistence: it forwards ``POST /v1/chat/completions`` and
``GET /v1/models`` and streams the upstream's bytes back as they arrive. :func:`create_app` adds
:class:`~qwen_persist.PersistenceMiddleware` around it, and every chat completion (JSON or SSE, success,
error or disconnect) lands in the database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwen_persist import PersistenceMiddleware

# Connection-level headers (RFC 9110 §7.6.1) belong to one hop and are never forwarded. Content-Length
# goes too: the body is re-framed by the server on each side.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
# The ASGI server adds its own Date and Server headers; the upstream's would be duplicates.
NOT_RETURNED = HOP_BY_HOP | {"date", "server"}
# The client's credentials are for this proxy, not for the upstream; the proxy sends its own key.
NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "api-key", "x-api-key", "cookie", "accept-encoding"}

# Streams can pause for a long time between tokens; only connecting should fail fast.
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=10.0)


def error_response(status: int, message: str, code: str) -> JSONResponse:
    """An error in OpenAI's shape, so SDK clients raise their usual exceptions."""
    return JSONResponse(
        {"error": {"message": message, "type": "proxy_error", "code": code}}, status_code=status
    )


def create_app(
    upstream_base_url: str | None = None,
    api_key: str | None = None,
    *,
    persistence: bool = True,
    **persistence_options: Any,
) -> Starlette:
    """The proxy app; ``persistence_options`` go to :class:`PersistenceMiddleware` as they are."""
    base_url = (upstream_base_url or os.environ.get("UPSTREAM_BASE_URL", "http://127.0.0.1:9000/v1")).rstrip(
        "/"
    )
    key = api_key if api_key is not None else os.environ.get("UPSTREAM_API_KEY", "")
    client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # One client for the app's lifetime: its connection pool keeps upstream connections warm.
        nonlocal client
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            yield

    async def forward(request: Request) -> Response:
        assert client is not None, "the app's lifespan has not run"
        headers = {name: value for name, value in request.headers.items() if name not in NOT_FORWARDED}
        if key:
            headers["authorization"] = f"Bearer {key}"
        # Plain bytes from the upstream: what the client receives and what the middleware records is
        # then readable JSON/SSE rather than a compressed stream.
        headers["accept-encoding"] = "identity"
        path = request.url.path.removeprefix("/v1")
        upstream_request = client.build_request(
            request.method,
            base_url + path,
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return error_response(502, f"upstream request failed: {exc!r}", "upstream_unavailable")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                # Also when the client went away and the stream was cancelled: give the connection back.
                with anyio.CancelScope(shield=True):
                    await upstream.aclose()

        response_headers = {
            name: value for name, value in upstream.headers.items() if name.lower() not in NOT_RETURNED
        }
        return StreamingResponse(body(), status_code=upstream.status_code, headers=response_headers)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", forward, methods=["POST"]),
            Route("/v1/models", forward, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    if persistence:
        # The one line: record every chat completion that passes through this app.
        app.add_middleware(PersistenceMiddleware, **persistence_options)
    return app


# `uvicorn openai_proxy:app`. The database defaults to $QWEN_PERSIST_DATABASE_URL, else
# sqlite:///qwen_persist.db. auto_upgrade creates the tables for this example; in production run
# `qwen-persist db upgrade` as a deploy step instead.
app = create_app(auto_upgrade=True)
