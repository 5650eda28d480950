"""Successful answers: Starlette JSON responses, encoded by the package's codec and built off the loop.

A page of exchanges can hold a thousand request and response bodies. Turning the records into dicts and
the dicts into bytes then takes real CPU, so it happens in the `History`'s read threads, like the query
itself, and the event loop (the proxy's streams) only sends the finished bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import jsonlib
from ..repositories import History, Page

T = TypeVar("T")


class JSON(JSONResponse):
    """Starlette's JSON response with orjson's speed (`jsonlib.dumps`: compact, non-ASCII kept)."""

    def render(self, content: Any) -> bytes:
        try:
            return jsonlib.dumps(content).encode("utf-8")
        except UnicodeError:  # jsonlib's fallback leaves a surrogate that UTF-8 cannot decode
            # A lone surrogate in a stored string (possible in a body the standard library parsed) has no
            # UTF-8 form; JSON's \u escape carries it.
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def history(request: Request) -> History:
    """The store the endpoints read (`build_api` puts it in the app's state)."""
    store: History = request.app.state.history
    return store


async def answer(request: Request, build: Callable[[], Any], status_code: int = 200) -> JSON:
    """The response to ``build()``'s content, built and encoded in the store's read threads."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        history(request).executor, lambda: JSON(build(), status_code=status_code)
    )


def list_body(
    page: Page[T], to_dict: Callable[[T], dict[str, Any]], id_of: Callable[[T], Any]
) -> dict[str, Any]:
    """A page as ``{"object": "list", "data", "first_id", "last_id", "has_more", "limit", "offset" or
    "after", "total" (when counted)}``; ``last_id`` is the ``after`` of the next page."""
    data = [to_dict(item) for item in page.items]
    body: dict[str, Any] = {
        "object": "list",
        "data": data,
        "first_id": id_of(page.items[0]) if page.items else None,
        "last_id": id_of(page.items[-1]) if page.items else None,
        "has_more": page.has_more,
        "limit": page.limit,
    }
    if page.after is not None:
        body["after"] = page.after
    else:
        body["offset"] = page.offset
    if page.total is not None:
        body["total"] = page.total
    return body


def plain_list(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """An unpaginated list (stats): ``{"object": "list", "data": [...]}``."""
    return {"object": "list", "data": list(items)}
