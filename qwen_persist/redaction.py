"""What is kept out of the database and the journal: credential fields, and what the user's hook removes.

Request headers are never stored at all. Bodies can carry credentials too (LiteLLM, for one, accepts
``api_key`` or AWS keys in the JSON), so fields with those names are replaced by ``"[redacted]"`` in every
stored document, at any depth, by default. Then the user's ``redact`` hook sees every stored text: the
bodies, the provider payloads the app reports, the first user message and error texts. Both run on the
writer's side before a record is written anywhere, the journal included.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("qwen_persist")

# A redaction hook gets a value about to be stored and its kind, and returns what to store instead
# (None: store nothing). Kinds and their values: "request", "response", "provider_request",
# "provider_response", "metadata" (parsed JSON documents; metadata is what the app reports through the
# exchange handle), "first_user_message" and "error" (strings).
Redactor = Callable[[Any, str], Any]

DEFAULT_REDACT_FIELDS = (
    "api_key",
    "apikey",
    "api_secret",
    "secret_key",
    "client_secret",
    "access_token",
    "refresh_token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "azure_ad_token",
    "vertex_credentials",
    "private_key",
    "authorization",
)
REDACTED_VALUE = "[redacted]"
REDACTED_DOCUMENT: dict[str, Any] = {"$qwen_persist_redacted": True}


class Redaction:
    """The redaction policy of one middleware: credential field names, then the user's hook."""

    __slots__ = ("_needles", "fields", "hook")

    def __init__(self, fields: Iterable[str], hook: Redactor | None) -> None:
        self.fields = frozenset(fields)
        self.hook = hook
        # One pass over the body for every field name (a scan per name cost 2.5 µs per document).
        names = b"|".join(re.escape(name.encode()) for name in sorted(self.fields))
        self._needles = re.compile(b'"(?:' + names + b')"')

    def document(self, value: Any, kind: str, *, text: bytes | None = None) -> Any:
        """A parsed document as it may be stored. ``text``, its JSON source, lets a body that names no
        credential field skip the walk."""
        if self.fields and (text is None or self._needles.search(text) is not None):
            value = _strip(value, self.fields)
        if self.hook is None:
            return value
        try:
            result = self.hook(value, kind)
        except Exception:
            _hook_failed(kind)
            return REDACTED_DOCUMENT
        return REDACTED_DOCUMENT if result is None and value is not None else result

    def text(self, value: str | None, kind: str) -> str | None:
        if self.hook is None or value is None:
            return value
        try:
            result = self.hook(value, kind)
            if result is not None and not isinstance(result, str):
                raise TypeError(f"redact() returned {type(result).__name__} for a {kind!r} string")
        except Exception:
            _hook_failed(kind)
            return REDACTED_VALUE
        # An error withheld must still read as an error (and a first message as withheld, not empty).
        return REDACTED_VALUE if result is None else result


def _hook_failed(kind: str) -> None:
    # Fail closed: what the hook could not look at is not stored. Said once per kind, not per record.
    if kind not in _FAILED_KINDS:
        _FAILED_KINDS.add(kind)
        log.exception(
            "qwen_persist: the redact hook failed on a %r value; such values are stored redacted", kind
        )


_FAILED_KINDS: set[str] = set()


def _strip(value: Any, fields: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: REDACTED_VALUE if key in fields and item is not None else _strip(item, fields)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_strip(item, fields) for item in value]
    return value
