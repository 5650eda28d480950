"""The OpenAI Stored Completions API over the captured exchanges."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes(prefix: str) -> list[BaseRoute]:
    return []
