"""What a read asks for: filters, pagination and ordering, validated before any SQL is built.

Every value a user can type (an HTTP query string, a CLI flag) goes through the parsers here, so the
HTTP API and the CLI accept the same spellings and reject the same mistakes, each with an
`InvalidParameter` that names the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class InvalidParameter(ValueError):
    """A parameter a read cannot use; ``param`` names it (the HTTP API's 400s and the CLI's errors)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


# ------------------------------------------------------------------------------------------- parsing

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(value: str, param: str = "duration") -> int:
    """``90s``, ``15m``, ``2h``, ``7d``, ``2w`` (or ``500ms``) as milliseconds."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidParameter(param, f"{value!r} is not a duration such as 90s, 15m, 2h, 7d or 2w")
    amount = float(match.group(1)) * _UNIT_MS[match.group(2).lower()]
    if amount <= 0:
        raise InvalidParameter(param, f"{value!r} must be longer than zero")
    return int(amount)


def parse_time(value: Any, param: str = "time") -> int:
    """A point in time as milliseconds since the epoch, from milliseconds (an int, or digits) or ISO-8601
    (``2026-11-24``, ``2026-11-24T10:00``, ``2026-11-24T10:00:00+01:00``, ``…Z``; no zone means UTC)."""
    if isinstance(value, bool):
        raise InvalidParameter(param, f"{value!r} is not a time")
    if isinstance(value, int):
        return _checked_ms(value, param)
    if not isinstance(value, str) or not value.strip():
        raise InvalidParameter(param, f"{value!r} is not a time (milliseconds since the epoch or ISO-8601)")
    text = value.strip()
    if text.isdigit():
        return _checked_ms(int(text), param)
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read the Z suffix
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParameter(
            param, f"{value!r} is not a time (milliseconds since the epoch or ISO-8601)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return _checked_ms(int(moment.timestamp() * 1000), param)


def parse_since(value: Any, now_ms: int, param: str = "since") -> int:
    """A time, or a duration meaning that long before ``now_ms`` (``2h``: two hours ago)."""
    if isinstance(value, str) and _DURATION.match(value):
        return now_ms - parse_duration(value, param)
    return parse_time(value, param)


def _checked_ms(ms: int, param: str) -> int:
    if not 0 <= ms < 2**53:  # what JSON clients and both databases hold exactly
        raise InvalidParameter(param, f"{ms} is out of range")
    return ms


def parse_int(value: Any, param: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise InvalidParameter(param, f"{value!r} is not an integer")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,18}", text):
            raise InvalidParameter(param, f"{value!r} is not an integer")
        value = int(text)
    if not isinstance(value, int):
        raise InvalidParameter(param, f"{value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise InvalidParameter(param, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameter(param, f"must be <= {maximum}, got {value}")
    return value


def parse_bool(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise InvalidParameter(param, f"{value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


# ------------------------------------------------------------------------------------------- filters


def _check_range(since: int | None, until: int | None) -> None:
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            _checked_ms(parse_int(value, name), name)
    if since is not None and until is not None and since > until:
        raise InvalidParameter("until", f"is before since ({until} < {since})")


def _check_optional_text(**values: Any) -> None:
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise InvalidParameter(name, f"{value!r} is not a string")


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which exchanges (requests, with their responses): every given field must match.

    ``since``/``until`` bound the request's arrival time (ms, both inclusive). ``has_error``: whether the
    response has an error or an error status (4xx/5xx); ``status_code`` is the status sent to the client.
    """

    session_id: str | None = None
    model: str | None = None
    stream: bool | None = None
    since: int | None = None
    until: int | None = None
    has_error: bool | None = None
    status_code: int | None = None

    def __post_init__(self) -> None:
        _check_optional_text(session_id=self.session_id, model=self.model)
        _check_range(self.since, self.until)
        for name in ("stream", "has_error"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise InvalidParameter(name, f"{value!r} is not a boolean")
        if self.status_code is not None:
            parse_int(self.status_code, "status_code", minimum=100, maximum=599)


@dataclass(frozen=True, slots=True)
class ResponseFilter:
    """Which responses. ``request_id`` is the numeric id of the request row; ``since``/``until`` bound the
    time the response ended (ms, inclusive)."""

    session_id: str | None = None
    request_id: int | None = None
    finish_reason: str | None = None
    has_error: bool | None = None
    since: int | None = None
    until: int | None = None

    def __post_init__(self) -> None:
        _check_optional_text(session_id=self.session_id, finish_reason=self.finish_reason)
        _check_range(self.since, self.until)
        if self.request_id is not None:
            parse_int(self.request_id, "request_id", minimum=1)
        if self.has_error is not None and not isinstance(self.has_error, bool):
            raise InvalidParameter("has_error", f"{self.has_error!r} is not a boolean")


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """Which sessions. ``active``: whether the session has not expired yet."""

    active: bool | None = None
    since: int | None = None  # created at or after (ms)
    until: int | None = None  # created at or before (ms)

    def __post_init__(self) -> None:
        _check_range(self.since, self.until)
        if self.active is not None and not isinstance(self.active, bool):
            raise InvalidParameter("active", f"{self.active!r} is not a boolean")


@dataclass(frozen=True, slots=True)
class Pagination:
    """A page: ``limit`` rows (1..1000) from ``offset``, or after the row whose id is ``after`` (a cursor:
    stable while rows are added, and as fast on the last page as on the first).

    ``order_by`` names a column from the list's whitelist (None: its default, ``timestamp`` or the like);
    ties are broken by id, in the same direction, so pages never repeat or skip a row.
    """

    limit: int = DEFAULT_LIMIT
    offset: int = 0
    after: int | str | None = None
    order_by: str | None = None
    descending: bool = True
    count_total: bool = False

    def __post_init__(self) -> None:
        parse_int(self.limit, "limit", minimum=1, maximum=MAX_LIMIT)
        parse_int(self.offset, "offset", minimum=0)
        if self.after is not None and self.offset:
            raise InvalidParameter("after", "cannot be combined with offset")
        if self.order_by is not None and not isinstance(self.order_by, str):
            raise InvalidParameter("order_by", f"{self.order_by!r} is not a column name")

    def column(self, allowed: tuple[str, ...]) -> str:
        """The column to order by, checked against ``allowed`` (the first is the default)."""
        if self.order_by is None:
            return allowed[0]
        if self.order_by not in allowed:
            raise InvalidParameter("order_by", f"must be one of {', '.join(allowed)}; got {self.order_by!r}")
        return self.order_by
