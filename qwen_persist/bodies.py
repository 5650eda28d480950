"""Turning captured body bytes into what a JSON column can hold, without losing what is not JSON.

Bodies are never rejected: a body that is not JSON, not UTF-8, too large or nested too deeply is stored
as a *raw body* object, marked so that no real request body can be mistaken for it. A body sent with a
``Content-Encoding`` is decoded first (`encodings.py`).

NUL characters: PostgreSQL cannot hold U+0000 in ``TEXT`` or ``JSONB``, so on both databases (one
encoding, whichever backend) a document whose strings hold NUL is stored with every string and key
escaped, and the object carries ``"$qwen_persist_nul_escaped": true``. The escape is reversible
(`restore_nul`): ``"\\u2400"`` (␀, SYMBOL FOR NULL) becomes ``"␀␀"`` and U+0000 becomes ``"␀0"``.
Strings of a document without NUL are stored as they are.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from . import jsonlib
from .config import DEFAULT_MAX_BODY_BYTES
from .encodings import ContentDecodingError, decode_content

RAW_MARKER = "$qwen_persist_raw_body"
NUL_MARKER = "$qwen_persist_nul_escaped"
# orjson writes at most 254 levels, and the standard library recurses once per level; a body nested
# deeper than this is pathological and is kept as raw text instead, which every path can store.
MAX_DEPTH = 200

_ESCAPE = "\u2400"
_ESCAPED = re.compile(f"{_ESCAPE}([{_ESCAPE}0])")


def raw_body(data: bytes, *, reason: str, truncated: bool, size: int) -> dict[str, Any]:
    """The stored form of a body that cannot be stored as the JSON it should have been."""
    text, encoding = _as_text(data, truncated=truncated)
    return {
        RAW_MARKER: True,
        "reason": reason,
        "encoding": encoding,
        "text": text,
        "truncated": truncated,
        "size": size,
    }


def _as_text(data: bytes, *, truncated: bool) -> tuple[str, str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A cut at max_body_bytes can split the last character; what comes before it is still text.
        if truncated and exc.reason == "unexpected end of data":
            text = data[: exc.start].decode("utf-8", errors="replace")
        else:
            return base64.b64encode(data).decode("ascii"), "base64"
    if "\x00" in text:  # no NUL in a PostgreSQL TEXT or JSONB value
        return base64.b64encode(data).decode("ascii"), "base64"
    return text, "utf-8"


def decode_json_body(
    data: bytes,
    *,
    truncated: bool = False,
    size: int | None = None,
    codings: list[str] | None = None,
    limit: int = DEFAULT_MAX_BODY_BYTES,
) -> tuple[Any, str | None]:
    """Parse a captured body; returns (value to store, problem) where problem names why it is raw.

    ``truncated`` says the bytes are only the first part of a larger body (``size`` bytes in all).
    ``codings`` is its ``Content-Encoding``; the decoded body is kept up to ``limit`` bytes.
    """
    total = len(data) if size is None else size
    if codings:
        try:
            decoded, overflow = decode_content(data, codings, limit=limit)
        except ContentDecodingError:
            reason = "encoding_invalid"
            return raw_body(data, reason=reason, truncated=truncated, size=total), f"body_{reason}"
        if overflow or truncated:
            return raw_body(decoded, reason="too_large", truncated=True, size=total), "body_too_large"
        data = decoded
    if truncated:
        return raw_body(data, reason="too_large", truncated=True, size=total), "body_too_large"
    try:
        value = jsonlib.loads(data)
    except ValueError:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return raw_body(data, reason="not_utf8", truncated=False, size=total), "body_not_utf8"
        return raw_body(data, reason="not_json", truncated=False, size=total), "body_not_json"
    if too_deep(value, hint=data):
        return raw_body(data, reason="too_deep", truncated=False, size=total), "body_too_deep"
    # Only an escaped NUL in the text can put one in a parsed string: JSON forbids raw control bytes.
    if b"\\u0000" in data:
        if isinstance(value, dict):
            return escape_nul(value), None
        if holds_nul(value):
            return raw_body(
                data, reason="nul_character", truncated=False, size=total
            ), "body_has_nul_character"
    return value, None


def too_deep(value: Any, *, hint: bytes | None = None) -> bool:
    """Whether ``value`` nests more than `MAX_DEPTH` levels. ``hint`` (its JSON text) makes the usual
    case free: fewer brackets than the limit cannot nest that deep."""
    if hint is not None and hint.count(b"{") + hint.count(b"[") <= MAX_DEPTH:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, dict | list))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return False


def holds_nul(value: Any) -> bool:
    """Whether any string or key in ``value`` holds U+0000."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def escape_text(text: str) -> str:
    return text.replace(_ESCAPE, _ESCAPE + _ESCAPE).replace("\x00", _ESCAPE + "0")


def _map_strings(value: Any, convert: Any) -> Any:
    if isinstance(value, str):
        return convert(value)
    if isinstance(value, dict):
        return {convert(k) if isinstance(k, str) else k: _map_strings(v, convert) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(item, convert) for item in value]
    return value


def escape_nul(document: dict[str, Any]) -> dict[str, Any]:
    """The storable form of a JSON object: marked and escaped if any of its strings holds NUL."""
    if not holds_nul(document):
        return document
    escaped: dict[str, Any] = _map_strings(document, escape_text)
    escaped[NUL_MARKER] = True
    return escaped


def restore_text(text: str) -> str:
    """Undo `escape_text`."""
    return _ESCAPED.sub(lambda match: _ESCAPE if match.group(1) == _ESCAPE else "\x00", text)


def restore_nul(value: Any) -> Any:
    """A stored document as it was received: NUL escapes undone where the document is marked."""
    if isinstance(value, dict) and value.get(NUL_MARKER) is True:
        restored = {k: v for k, v in value.items() if k != NUL_MARKER}
        return _map_strings(restored, restore_text)
    return value
