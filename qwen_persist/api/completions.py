"""The OpenAI Stored Completions API over the captured exchanges, so the official SDKs'
``client.chat.completions.list / retrieve / update / delete`` and ``.messages.list`` work against any
upstream the proxy fronts.

Served at OpenAI's own paths under the API prefix (``/v1`` by default), beside the proxy's
``POST /v1/chat/completions``, which is never one of these routes and keeps going to the proxied app:

- ``GET  {prefix}/chat/completions``: a cursor page (``model``, ``metadata[key]=value``, ``after``,
  ``limit`` 1..100 (20), ``order`` ``asc`` (default) or ``desc``);
- ``GET  {prefix}/chat/completions/{id}``: one ``chat.completion``;
- ``GET  {prefix}/chat/completions/{id}/messages``: its request messages, a cursor page (``after``,
  ``limit``, ``order``);
- ``POST {prefix}/chat/completions/{id}``: ``{"metadata": {...}}`` replaces the client's metadata;
- ``DELETE {prefix}/chat/completions/{id}``: ``chat.completion.deleted``.

What counts as a stored completion, which id it has, and what its metadata is: see
`qwen_persist.repositories.completions`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from .. import jsonlib
from ..repositories import InvalidParameter, Page, Pagination
from ..repositories.completions import DEFAULT_LIMIT, MAX_LIMIT, CompletionFilter, StoredCompletion
from ..repositories.queries import parse_int
from .errors import ApiError, not_found
from .params import read_pairs, read_query
from .responses import JSON, answer, history

T = TypeVar("T")

PAGE_PARAMETERS = ("after", "limit", "order")
LIST_PARAMETERS = (*PAGE_PARAMETERS, "model")
# An update carries at most 16 short pairs; a body far larger than that is not an update.
MAX_UPDATE_BYTES = 64 * 1024


def _pagination(query: dict[str, Any]) -> Pagination:
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise InvalidParameter("order", f"must be asc or desc; got {order!r}")
    limit = query.get("limit")
    return Pagination(
        limit=DEFAULT_LIMIT if limit is None else parse_int(limit, "limit", minimum=1, maximum=MAX_LIMIT),
        after=query.get("after"),
        descending=order == "desc",
    )


async def _cursor_page(
    request: Request, page: Page[T], to_dict: Callable[[T], dict[str, Any]], id_of: Callable[[T], str]
) -> JSON:
    """OpenAI's cursor page: the SDK's auto-pagination asks for ``after=<last id>`` while ``has_more``."""
    return await answer(
        request,
        lambda: {
            "object": "list",
            "data": [to_dict(item) for item in page.items],
            "first_id": id_of(page.items[0]) if page.items else None,
            "last_id": id_of(page.items[-1]) if page.items else None,
            "has_more": page.has_more,
        },
    )


async def list_completions(request: Request) -> JSON:
    query = read_query(request, LIST_PARAMETERS, pairs="metadata")
    page = _pagination(query)
    found = await history(request).completions.alist(
        CompletionFilter(model=query.get("model"), metadata=read_pairs(query, "metadata")), page
    )
    return await _cursor_page(request, found, StoredCompletion.to_openai, lambda completion: completion.id)


async def retrieve_completion(request: Request) -> JSON:
    read_query(request, ())
    completion_id = request.path_params["completion_id"]
    completion = await history(request).completions.aget(completion_id)
    if completion is None:
        raise not_found("chat completion", completion_id)
    return await answer(request, completion.to_openai)


async def update_completion(request: Request) -> JSON:
    read_query(request, ())
    body = await _json_body(request)
    if not isinstance(body, dict) or "metadata" not in body:
        raise InvalidParameter("metadata", 'the body must be a JSON object with "metadata"')
    completion_id = request.path_params["completion_id"]
    completion = await history(request).completions.aupdate_metadata(completion_id, body["metadata"])
    if completion is None:
        raise not_found("chat completion", completion_id)
    return await answer(request, completion.to_openai)


async def delete_completion(request: Request) -> JSON:
    read_query(request, ())
    completion_id = request.path_params["completion_id"]
    deleted = await history(request).completions.adelete(completion_id)
    if deleted is None:
        raise not_found("chat completion", completion_id)
    return JSON({"id": deleted, "object": "chat.completion.deleted", "deleted": True})


async def list_messages(request: Request) -> JSON:
    page = _pagination(read_query(request, PAGE_PARAMETERS))
    completion_id = request.path_params["completion_id"]
    found = await history(request).completions.amessages(completion_id, page)
    if found is None:
        raise not_found("chat completion", completion_id)
    return await _cursor_page(request, found, lambda message: message, lambda message: str(message["id"]))


async def _json_body(request: Request) -> Any:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_UPDATE_BYTES:
            raise ApiError(413, f"The body is over {MAX_UPDATE_BYTES} bytes.", code="body_too_large")
    try:
        return jsonlib.loads(bytes(data))
    except ValueError:
        raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None


def routes(prefix: str) -> list[BaseRoute]:
    """The Stored Completions routes under ``prefix``; ``POST {prefix}/chat/completions`` is not one of
    them (the middleware hands it to the proxied app)."""
    base = f"{prefix}/chat/completions"
    one = base + "/{completion_id}"
    return [
        Route(base, list_completions, methods=["GET"]),
        Route(one, retrieve_completion, methods=["GET"]),
        Route(one, update_completion, methods=["POST"]),
        Route(one, delete_completion, methods=["DELETE"]),
        Route(one + "/messages", list_messages, methods=["GET"]),
    ]
