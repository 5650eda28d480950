"""Bearer-token authentication for the API's own paths (and nothing else)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; never a query-string parameter, which
    would end up in access logs and browser histories."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else None
    return None


def token_matches(offered: str, tokens: tuple[bytes, ...]) -> bool:
    """Compare with every accepted token in constant time, always all of them: neither the position of a
    match nor the length of a common prefix shows in the timing."""
    candidate = offered.encode("utf-8", "surrogateescape")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    return matched


class BearerAuth:
    """Let a request through when it carries one of ``tokens``; else answer 401. With no tokens
    (anonymous access, chosen explicitly) everything passes."""

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...]) -> None:
        self.app = app
        self.tokens = tuple(token.encode("utf-8", "surrogateescape") for token in tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.tokens:
            offered = bearer_token(scope)
            if offered is None or not token_matches(offered, self.tokens):
                message = "Missing bearer token." if offered is None else "Invalid bearer token."
                response = error_response(
                    401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
