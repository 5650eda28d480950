"""Middleware configuration: keyword-only options with environment-variable defaults, validated once."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from .engine import DEFAULT_DATABASE_URL, normalize_url
from .paths import check_path
from .redaction import DEFAULT_REDACT_FIELDS, Redactor

ENV_PREFIX = "QWEN_PERSIST_"
# The spellings clients and SDKs post chat completions to: OpenAI's, the bare one (LiteLLM, many SDK
# base URLs), and Azure OpenAI's. One trailing slash is ignored.
DEFAULT_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/openai/deployments/{deployment}/chat/completions",
)
# Response headers that link a row to the upstream's own records; never credentials.
DEFAULT_RESPONSE_HEADERS = (
    "x-request-id",
    "openai-processing-ms",
    "openai-version",
    "x-litellm-call-id",
    "x-litellm-model-id",
    "x-litellm-response-cost",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "content-encoding",
)
# Headers that carry credentials are never stored, whatever the allow-list says.
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "api-key", "x-api-key"}
)
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_SPILL_MAX_BYTES = 2 * 1024**3
DEFAULT_SESSION_HEADER = "x-session-id"
DEFAULT_SESSION_TTL = 30 * 60.0
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_INTERVAL = 0.05
DEFAULT_SPILL_DIR = "qwen_persist_spill"
DEFAULT_API_PREFIX = "/v1"
WRITER_MODES = ("auto", "process", "thread")
DEFAULT_WRITER = "auto"


class ConfigurationError(ValueError):
    """An option has a value the middleware cannot work with."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    paths: frozenset[str]
    session_header: str
    session_ttl: float
    max_body_bytes: int
    redact: Redactor | None
    queue_size: int
    batch_size: int
    flush_interval: float
    spill_dir: Path
    auto_upgrade: bool
    redact_fields: frozenset[str] = frozenset(DEFAULT_REDACT_FIELDS)
    response_headers: frozenset[str] = frozenset(DEFAULT_RESPONSE_HEADERS)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    spill_max_bytes: int = DEFAULT_SPILL_MAX_BYTES
    # The HTTP API (history, Stored Completions): on with tokens or api_anonymous, else off.
    api_tokens: tuple[str, ...] = ()
    api_anonymous: bool = False
    api_prefix: str = DEFAULT_API_PREFIX
    retention_ms: int | None = None  # history older than this is deleted in the background; None: kept
    # "process" (a child process), "thread" (in the server process), or "auto": the process where this
    # one may use two CPUs or more (see `middleware.writer_mode`).
    writer: str = DEFAULT_WRITER

    @property
    def api_enabled(self) -> bool:
        return bool(self.api_tokens) or self.api_anonymous

    @property
    def session_ttl_ms(self) -> int:
        return int(self.session_ttl * 1000)


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    value = environ.get(ENV_PREFIX + name)
    return value if value not in (None, "") else None


def _number(name: str, value: Any, env: str | None, default: float, *, integer: bool, minimum: float) -> Any:
    source = f"{ENV_PREFIX}{name.upper()}" if value is None and env is not None else name
    raw = value if value is not None else (env if env is not None else default)
    kind = "an integer" if integer else "a number"
    if isinstance(raw, bool) or (value is not None and not isinstance(value, int | float)):
        raise ConfigurationError(f"{source} must be {kind}, got {raw!r}")
    try:
        number = float(raw)
        if integer:
            if not number.is_integer():  # never truncate 1.5 to 1 silently
                raise ValueError
            number = int(raw) if isinstance(raw, int) else _to_int(raw, number)
    except (TypeError, ValueError, OverflowError):
        raise ConfigurationError(f"{source} must be {kind}, got {raw!r}") from None
    if not math.isfinite(number):
        raise ConfigurationError(f"{source} must be a finite number, got {raw!r}")
    if number < minimum:
        raise ConfigurationError(f"{source} must be >= {minimum:g}, got {raw!r}")
    return number


def _to_int(raw: Any, number: float) -> int:
    try:
        return int(raw)  # exact for digit strings beyond a float's precision
    except (TypeError, ValueError):
        return int(number)


# RFC 9110 token characters: what a header name may be made of.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_header_name(name: str) -> bool:
    return bool(name) and all(c in _TCHARS for c in name)


def _strings(name: str, values: Iterable[Any]) -> list[str]:
    try:
        items = list(values)
    except TypeError:
        raise ConfigurationError(f"{name} must be a collection of strings, got {values!r}") from None
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigurationError(f"{name} must contain only strings, got {bad[0]!r}")
    return items


def _spill_dir(value: Any) -> Path:
    try:
        return Path(value)
    except TypeError:
        raise ConfigurationError(f"spill_dir must be a path, got {value!r}") from None


def _flag(name: str, value: bool | None, env: str | None) -> bool:
    if value is not None:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be True or False, got {value!r}")
        return value
    if env is None:
        return False
    lowered = env.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{ENV_PREFIX}{name.upper()} must be a boolean (1/0, true/false), got {env!r}")


def build_settings(
    *,
    database_url: str | None = None,
    paths: Iterable[str] | None = None,
    session_header: str | None = None,
    session_ttl: float | None = None,
    max_body_bytes: int | None = None,
    redact: Redactor | None = None,
    queue_size: int | None = None,
    batch_size: int | None = None,
    flush_interval: float | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
    auto_upgrade: bool | None = None,
    redact_fields: Iterable[str] | None = None,
    response_headers: Iterable[str] | None = None,
    shutdown_timeout: float | None = None,
    spill_max_bytes: int | None = None,
    api_token: str | Iterable[str] | None = None,
    api_anonymous: bool | None = None,
    api_prefix: str | None = None,
    retention: str | timedelta | None = None,
    writer: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every option (argument, else environment, else default) and fail on nonsense."""
    env = os.environ if environ is None else environ
    if isinstance(database_url, str) and not database_url.strip():
        raise ConfigurationError("database_url is empty; leave it out to use the default")
    # Only ``env``: an explicit ``environ`` must not be overridden by the process environment.
    url = database_url if database_url is not None else (_env("DATABASE_URL", env) or DEFAULT_DATABASE_URL)
    try:
        backend = normalize_url(url).get_backend_name()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if backend not in ("sqlite", "postgresql"):
        raise ConfigurationError(f"database_url: only SQLite and PostgreSQL are supported, not {backend}")
    if backend == "sqlite":
        _check_sqlite_file(normalize_url(url))

    path_set = frozenset(_names("paths", paths, _env("PATHS", env), DEFAULT_PATHS))
    if not path_set:
        raise ConfigurationError("paths must name at least one path, e.g. '/v1/chat/completions'")
    for path in sorted(path_set):
        problem = check_path(path)
        if problem:
            raise ConfigurationError(f"paths: {path!r} {problem}")

    headers = frozenset(
        name.lower()
        for name in _names(
            "response_headers", response_headers, _env("RESPONSE_HEADERS", env), DEFAULT_RESPONSE_HEADERS
        )
    )
    for name in sorted(headers):
        if not _is_header_name(name):
            raise ConfigurationError(f"response_headers: {name!r} is not a header name")
    if headers & SECRET_HEADERS:
        raise ConfigurationError(
            f"response_headers: {sorted(headers & SECRET_HEADERS)} carry credentials and are never stored"
        )
    fields = frozenset(
        _names("redact_fields", redact_fields, _env("REDACT_FIELDS", env), DEFAULT_REDACT_FIELDS)
    )

    if session_header is not None and not isinstance(session_header, str):
        raise ConfigurationError(f"session_header must be a header name, got {session_header!r}")
    header = (
        session_header
        if session_header is not None
        else (_env("SESSION_HEADER", env) or DEFAULT_SESSION_HEADER)
    )
    header = header.strip().lower()
    if not _is_header_name(header):
        raise ConfigurationError(f"session_header is not a valid header name: {header!r}")

    if redact is not None and not callable(redact):
        raise ConfigurationError("redact must be a callable (body, kind) -> body or None")
    tokens, anonymous, prefix = api_options(api_token, api_anonymous, api_prefix, env)

    return Settings(
        database_url=url,
        paths=path_set,
        session_header=header,
        session_ttl=_number(
            "session_ttl",
            session_ttl,
            _env("SESSION_TTL", env),
            DEFAULT_SESSION_TTL,
            integer=False,
            minimum=1,
        ),
        max_body_bytes=_number(
            "max_body_bytes",
            max_body_bytes,
            _env("MAX_BODY_BYTES", env),
            DEFAULT_MAX_BODY_BYTES,
            integer=True,
            minimum=1024,
        ),
        redact=redact,
        queue_size=_number(
            "queue_size", queue_size, _env("QUEUE_SIZE", env), DEFAULT_QUEUE_SIZE, integer=True, minimum=1
        ),
        batch_size=_number(
            "batch_size", batch_size, _env("BATCH_SIZE", env), DEFAULT_BATCH_SIZE, integer=True, minimum=1
        ),
        flush_interval=_number(
            "flush_interval",
            flush_interval,
            _env("FLUSH_INTERVAL", env),
            DEFAULT_FLUSH_INTERVAL,
            integer=False,
            minimum=0,
        ),
        spill_dir=_spill_dir(
            spill_dir if spill_dir is not None else (_env("SPILL_DIR", env) or DEFAULT_SPILL_DIR)
        ),
        auto_upgrade=_flag("auto_upgrade", auto_upgrade, _env("AUTO_UPGRADE", env)),
        redact_fields=fields,
        response_headers=headers,
        shutdown_timeout=_number(
            "shutdown_timeout",
            shutdown_timeout,
            _env("SHUTDOWN_TIMEOUT", env),
            DEFAULT_SHUTDOWN_TIMEOUT,
            integer=False,
            minimum=0,
        ),
        spill_max_bytes=_number(
            "spill_max_bytes",
            spill_max_bytes,
            _env("SPILL_MAX_BYTES", env),
            DEFAULT_SPILL_MAX_BYTES,
            integer=True,
            minimum=1024 * 1024,
        ),
        api_tokens=tokens,
        api_anonymous=anonymous,
        api_prefix=prefix,
        retention_ms=retention_option(retention, _env("RETENTION", env)),
        writer=_writer_mode(writer, _env("WRITER", env)),
    )


def _writer_mode(value: str | None, env: str | None) -> str:
    source = "writer" if value is not None else f"{ENV_PREFIX}WRITER"
    mode = value if value is not None else (env or DEFAULT_WRITER)
    if not isinstance(mode, str) or mode.strip().lower() not in WRITER_MODES:
        raise ConfigurationError(f"{source} must be one of {', '.join(WRITER_MODES)}, got {mode!r}")
    return mode.strip().lower()


RETENTION_OFF = ("off", "none", "never")
MIN_RETENTION_MS = 60_000


def retention_option(value: str | timedelta | None, env: str | None) -> int | None:
    """How old history may get, in ms: a duration (``"30d"``, ``"12h"``, a `timedelta`), else
    ``QWEN_PERSIST_RETENTION``; None (the default, or ``"off"``) keeps everything."""
    from .repositories.queries import InvalidParameter, parse_duration

    source = "retention" if value is not None else f"{ENV_PREFIX}RETENTION"
    raw: str | timedelta | None = value if value is not None else env
    if raw is None:
        return None
    if isinstance(raw, timedelta):
        ms = int(raw.total_seconds() * 1000)
    elif isinstance(raw, str) and raw.strip().lower() in RETENTION_OFF:
        return None
    else:
        try:
            ms = parse_duration(raw, source) if isinstance(raw, str) else -1
        except InvalidParameter:
            ms = -1
        if ms < 0:
            raise ConfigurationError(
                f"{source} must be a duration such as '30d', '12h' or '2w' (or 'off'), got {raw!r}"
            )
    if ms < MIN_RETENTION_MS:
        raise ConfigurationError(f"{source} must be at least one minute, got {raw!r}")
    return ms


def api_options(
    api_token: str | Iterable[str] | None,
    api_anonymous: bool | None,
    api_prefix: str | None,
    env: Mapping[str, str],
) -> tuple[tuple[str, ...], bool, str]:
    """The API's tokens, anonymous flag and prefix: arguments, else ``QWEN_PERSIST_API_TOKEN`` (several
    comma-separated, for rotation), ``QWEN_PERSIST_API_ANONYMOUS`` and ``QWEN_PERSIST_API_PREFIX``."""
    if isinstance(api_token, str):
        given: list[str] | None = [api_token]
    elif api_token is None:
        given = None
    else:
        given = _strings("api_token", api_token)
    raw = given if given is not None else (_env("API_TOKEN", env) or "").split(",")
    tokens = tuple(dict.fromkeys(token.strip() for token in raw if token.strip()))
    if given is not None and not tokens:
        raise ConfigurationError("api_token is empty; leave it out to keep the API off")
    for token in tokens:
        # ASCII, as a bearer token's characters are (RFC 6750): a header carries nothing else reliably.
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise ConfigurationError("api_token: a token must be printable ASCII, without spaces")
    anonymous = _flag("api_anonymous", api_anonymous, _env("API_ANONYMOUS", env))
    if tokens and anonymous:
        raise ConfigurationError("api_anonymous=True and api_token contradict each other; choose one")
    if api_prefix is not None and not isinstance(api_prefix, str):
        raise ConfigurationError(f"api_prefix must be a path such as '/v1', got {api_prefix!r}")
    prefix = api_prefix if api_prefix is not None else (_env("API_PREFIX", env) or DEFAULT_API_PREFIX)
    prefix = prefix.strip().rstrip("/")
    if prefix and (not prefix.startswith("/") or "{" in prefix or "}" in prefix):
        raise ConfigurationError(f"api_prefix must be a path such as '/v1' or '/admin', got {prefix!r}")
    return tokens, anonymous, prefix


def _names(name: str, value: Iterable[str] | None, env: str | None, default: Iterable[str]) -> list[str]:
    """A list option: the argument (a collection of strings), else the comma-separated environment
    variable, else the default. Blank entries are dropped."""
    if value is None:
        value = env.split(",") if env is not None else list(default)
    elif isinstance(value, str):
        raise ConfigurationError(f"{name} must be a collection of strings, not a single string")
    return [item.strip() for item in _strings(name, value) if item.strip()]


def _check_sqlite_file(url: URL) -> None:
    """An in-memory database would vanish with each connection, and a file in a missing directory cannot
    be created: both would only show later as a writer retrying forever, so refuse them now."""
    database = url.database or ""
    memory = (
        database in ("", ":memory:")
        or "mode=memory" in str(url.query)
        or database.startswith("file::memory:")
    )
    if memory:
        raise ConfigurationError(
            "database_url: an in-memory SQLite database cannot be shared by the writer and the app; "
            "use a file, e.g. sqlite:///qwen_persist.db"
        )
    path = Path(database.removeprefix("file:").split("?", 1)[0])
    if not path.parent.is_dir():
        raise ConfigurationError(
            f"database_url: the directory {str(path.parent)!r} of the SQLite file does not exist; create it "
            "first (it is not created for you, so a mistyped path cannot scatter databases around)"
        )
