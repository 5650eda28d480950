"""Errors as the API answers them: ``{"error": {"message", "type", "code", "param"}}``, OpenAI's shape,
so the openai SDK raises its usual exception classes (``BadRequestError``, ``NotFoundError``, ...)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..repositories import InvalidParameter

log = logging.getLogger("qwen_persist")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
}


class ApiError(Exception):
    """An answer other than success: raised by an endpoint, rendered by `error_response`."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def not_found(what: str, id: Any) -> ApiError:
    return ApiError(404, f"No {what} found with id {str(id)!r}.", code="not_found")


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "code": code,
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, code=exc.code, param=exc.param)


async def _invalid_parameter(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidParameter)
    return error_response(
        400, f"Invalid '{exc.param}': {exc.message}", code="invalid_parameter", param=exc.param
    )


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


# PostgreSQL's undefined_table and undefined_column; SQLite says it in words.
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
_SCHEMA_MESSAGES = ("no such table", "no such column")


def schema_missing(exc: DBAPIError) -> bool:
    """Whether the database failed for want of the library's tables or columns: not migrated, or
    migrated by an older version."""
    if getattr(exc.orig, "sqlstate", None) in _SCHEMA_SQLSTATES:
        return True
    return str(exc.orig).startswith(_SCHEMA_MESSAGES)


async def _database_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DBAPIError)
    if schema_missing(exc):
        # Not a passing condition: nothing changes until someone migrates the database, so the answer
        # says what to run, and the log says it once rather than on every request.
        state = request.app.state
        if not getattr(state, "schema_missing_logged", False):
            state.schema_missing_logged = True
            log.error(
                "qwen_persist API: the database has no qwen_persist schema, or an older one (%s); "
                "run: qwen-persist db upgrade --database-url <its URL>",
                exc.orig,
            )
        return error_response(
            503,
            "The database is not migrated: the qwen_persist schema is missing or older than this "
            "version's. Run `qwen-persist db upgrade` against it.",
            code="database_not_migrated",
        )
    # A database that is down or locked is a passing condition of the service, not a fault of the
    # request: a 503 the client may retry, and one log line instead of a traceback.
    log.error("qwen_persist API: the database could not answer: %s", exc.orig)
    return error_response(503, "The database could not answer; try again later.", code="database_unavailable")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    InvalidParameter: _invalid_parameter,
    HTTPException: _http_exception,
    DBAPIError: _database_error,
}
