"""The history endpoints: sessions, requests, responses and stats (the original's phases 5 to 7)."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes(prefix: str) -> list[BaseRoute]:
    return []
