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


async def _database_error(_: Request, exc: Exception) -> Response:
    # A database that is down, locked or not migrated yet is a passing condition of the service, not a
    # fault of the request: a 503 the client may retry, and one log line instead of a traceback.
    assert isinstance(exc, DBAPIError)
    log.error("qwen_persist API: the database could not answer: %s", exc.orig)
    return error_response(503, "The database could not answer; try again later.", code="database_unavailable")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    InvalidParameter: _invalid_parameter,
    HTTPException: _http_exception,
    DBAPIError: _database_error,
}
