"""The HTTP API over the recorded traffic: the history endpoints and the OpenAI Stored Completions API.

One Starlette app, served two ways:

- by `PersistenceMiddleware` itself, when it is given ``api_token=`` (or ``api_anonymous=True``): a
  request goes to the API only when its method and path are one of the API's routes (under
  ``api_prefix``); everything else, the proxied ``POST …/chat/completions`` first of all, goes to the
  wrapped app untouched, token or not;
- on its own, from `create_app`, to mount in an admin service or run with
  ``uvicorn --factory qwen_persist.api:create_app`` against a database shared by the proxies.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from ..config import ConfigurationError, api_options
from ..repositories import History
from . import completions, history
from .auth import BearerAuth
from .errors import EXCEPTION_HANDLERS


def build_api(store: History, *, tokens: tuple[str, ...], prefix: str, owns_store: bool = False) -> Starlette:
    """The API app over ``store``: every route under ``prefix``, behind ``tokens`` (none: anonymous).
    ``owns_store``: close the store when the app's lifespan ends (a standalone app)."""
    routes: list[BaseRoute] = [*history.routes(prefix), *completions.routes(prefix)]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if owns_store:
            store.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(BearerAuth, tokens=tokens)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.history = store
    return app


def handles(app: Starlette, scope: Scope) -> bool:
    """Whether ``scope`` is one of the API's own requests: a route matches its path *and* method. A path
    that only matches without the method (``POST /v1/chat/completions``) is the wrapped app's."""
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


def create_app(
    database: str | Engine | History | None = None,
    *,
    api_token: str | Iterable[str] | None = None,
    api_anonymous: bool | None = None,
    api_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Starlette:
    """The API as an ASGI app of its own (also a ``uvicorn --factory`` target: every option then comes
    from ``QWEN_PERSIST_DATABASE_URL``, ``QWEN_PERSIST_API_TOKEN`` (comma-separated for several),
    ``QWEN_PERSIST_API_ANONYMOUS`` and ``QWEN_PERSIST_API_PREFIX``).

    ``database``: a URL, an engine, or a `History`; by default the environment's URL, else the embedded
    SQLite file. Refuses to start with neither a token nor ``api_anonymous=True``.
    """
    env = os.environ if environ is None else environ
    tokens, anonymous, prefix = api_options(api_token, api_anonymous, api_prefix, env)
    if not tokens and not anonymous:
        raise ConfigurationError(
            "the API needs api_token= (or QWEN_PERSIST_API_TOKEN), or api_anonymous=True to serve it "
            "without authentication"
        )
    if isinstance(database, History):
        return build_api(database, tokens=tokens, prefix=prefix)
    url: Any = database if database is not None else env.get("QWEN_PERSIST_DATABASE_URL") or None
    return build_api(History(url), tokens=tokens, prefix=prefix, owns_store=True)
