"""Turning captured body bytes into what a JSON column can hold, without losing what is not JSON.

Bodies are never rejected: a body that is not JSON, not UTF-8 or too large is stored as a *raw body*
object, marked so that no real request body can be mistaken for it.
"""

from __future__ import annotations

import base64
from typing import Any

from . import jsonlib

RAW_MARKER = "$qwen_persist_raw_body"


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
    data: bytes, *, truncated: bool = False, size: int | None = None
) -> tuple[Any, str | None]:
    """Parse a captured body; returns (value to store, problem) where problem names why it is raw.

    ``truncated`` says the bytes are only the first part of a larger body (``size`` bytes in all).
    """
    total = len(data) if size is None else size
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
    if b"\\u0000" in data:
        # PostgreSQL's JSONB and TEXT cannot hold NUL characters; the escaped text keeps it faithfully.
        return raw_body(data, reason="nul_character", truncated=False, size=total), "body_has_nul_character"
    return value, None
