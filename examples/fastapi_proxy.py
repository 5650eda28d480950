"""The forwarding proxy of ``openai_proxy.py`` as a FastAPI app: the same one line records it.

Run it from this folder::

    UPSTREAM_BASE_URL=http://127.0.0.1:9000/v1 UPSTREAM_API_KEY=sk-... uvicorn fastapi_proxy:app --port 8000

FastAPI is a Starlette app underneath, so :class:`~qwen_persist.PersistenceMiddleware` (pure ASGI) wraps it
the same way; the routes stay ordinary FastAPI endpoints.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

# The header rules, timeouts and error shape are the Starlette proxy's; only the app is FastAPI's.
from openai_proxy import NOT_FORWARDED, NOT_RETURNED, TIMEOUT, error_response

from qwen_persist import PersistenceMiddleware


def create_app(
    upstream_base_url: str | None = None,
    api_key: str | None = None,
    *,
    persistence: bool = True,
    **persistence_options: Any,
) -> FastAPI:
    base_url = (upstream_base_url or os.environ.get("UPSTREAM_BASE_URL", "http://127.0.0.1:9000/v1")).rstrip(
        "/"
    )
    key = api_key if api_key is not None else os.environ.get("UPSTREAM_API_KEY", "")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled client for the app's lifetime, kept on app.state for the endpoints.
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            app.state.upstream = client
            yield

    app = FastAPI(title="OpenAI-compatible proxy", lifespan=lifespan)

    async def forward(request: Request, path: str) -> Response:
        client: httpx.AsyncClient = request.app.state.upstream
        headers = {name: value for name, value in request.headers.items() if name not in NOT_FORWARDED}
        if key:
            headers["authorization"] = f"Bearer {key}"
        headers["accept-encoding"] = "identity"  # pass (and record) plain JSON/SSE, not gzip
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

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):  # closes even when the client disconnected
                    await upstream.aclose()

        returned = {
            name: value for name, value in upstream.headers.items() if name.lower() not in NOT_RETURNED
        }
        return StreamingResponse(relay(), status_code=upstream.status_code, headers=returned)

    # The request body is forwarded untouched, so the endpoints take the raw Request, not a model.
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(request, "/models")

    if persistence:
        # The one line.
        app.add_middleware(PersistenceMiddleware, **persistence_options)
    return app


# `uvicorn fastapi_proxy:app`; auto_upgrade creates the tables for this example (production: run
# `qwen-persist db upgrade` as a deploy step).
app = create_app(auto_upgrade=True)
