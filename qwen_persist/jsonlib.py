"""The package's JSON codec: orjson (about four times faster per call than the standard library,
measured in benchmarks/README.md), with the standard library where orjson would not be exact.

Parsing is strict, standard JSON: ``NaN`` and ``Infinity`` are not JSON (PostgreSQL refuses them too).
orjson turns integers wider than 64 bits into floats and cannot write them or non-string keys; those
take the standard library's path, so stored values never depend on which codec ran.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Twenty digits in a row may be an integer wider than 64 bits; let the standard library parse it. Found by
# mapping every digit to "0" and everything else to " " (a C-speed pass; a regex costs more than orjson).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_RUN = b"0" * 20


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def needs_stdlib(raw: bytes) -> bool:
    """Whether `loads` hands ``raw`` to the standard library (it may hold an integer wider than 64 bits).

    When it does not, `loads_bytes_unchecked` parses ``raw`` exactly as `loads` would; one check may then
    cover many documents at once (they have no longer digit runs than the text holding them all).
    """
    # Twenty digits in a row hold two neighbours among every tenth byte: that tenth is looked at first.
    return b"00" in raw[::10].translate(_DIGITS_ONLY) and _LONG_RUN in raw.translate(_DIGITS_ONLY)


def loads(data: bytes | str) -> Any:
    """Parse standard JSON; raises ``ValueError`` when it is not, or when it nests too deeply to parse."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if not needs_stdlib(raw):
        return orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError, "depth limit" included
    try:
        return json.loads(data, parse_constant=_not_json)
    except RecursionError:
        # orjson refuses more than 1024 levels with a ValueError; the standard library runs out of stack
        # near 1000 instead, and callers only expect ValueError.
        raise ValueError("JSON nested past the parser's depth limit") from None


# `loads` for bytes that `needs_stdlib` has cleared (a ValueError for anything that is not JSON).
loads_bytes_unchecked = orjson.loads


class RawJSON:
    """A JSON document kept as the text it was read as: `dumps` writes it as is, without parsing it
    (what an export of stored documents needs). Not a dataclass: orjson would write its fields."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawJSON({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJSON) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def parse(self) -> Any:
        return loads(self.text)


def _raw(value: Any) -> Any:
    if isinstance(value, RawJSON):
        return orjson.Fragment(value.text)
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _raw_parsed(value: Any) -> Any:
    if isinstance(value, RawJSON):
        return value.parse()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as is; ``TypeError`` or ``ValueError`` when that cannot be."""
    return dumpb(value).decode("utf-8")


def dumpb(value: Any) -> bytes:
    """`dumps` as UTF-8 bytes (the form orjson makes, so writing bytes saves a decode and an encode)."""
    try:
        return orjson.dumps(value, default=_raw)
    except TypeError:
        # orjson also gives up past 254 levels of nesting, with a TypeError.
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_raw_parsed)
        except RecursionError:
            raise ValueError("value nested past the JSON encoder's depth limit") from None
        return text.encode("utf-8", "surrogatepass")
