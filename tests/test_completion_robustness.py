"""The accumulator on pathological input (issue #8): deep nesting anywhere, many entries in one chunk.

What the parser accepts is rebuilt as it came, however deep, in time linear in its size.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from qwen_persist.completion import StreamResult, reconstruct_stream

BASE = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m"'
DONE = b"data: [DONE]\n\n"


def chunk(fields: str) -> str:
    """A chunk's JSON text: the identity fields, then ``fields`` (JSON members, as text)."""
    return "{" + BASE + "," + fields + "}"


def event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


def nested(depth: int, leaf: str = '"x"', kind: str = "object") -> str:
    """JSON text ``depth`` containers deep, built as text: json.dumps itself recurses."""
    if kind == "object":
        return '{"a":' * depth + leaf + "}" * depth
    return "[" * depth + leaf + "]" * depth


def depth_and_leaf(value: Any) -> tuple[int, Any]:
    """How deep a single-path value nests and what sits at its bottom (a loop: checks must not recurse)."""
    depth = 0
    while isinstance(value, (dict, list)) and value:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
        depth += 1
    return depth, value


def content_chunk(text: str) -> str:
    return chunk('"choices":[{"index":0,"delta":{"content":' + json.dumps(text) + "}}]")


def choice0(result: StreamResult) -> dict[str, Any]:
    assert result.completion is not None
    choice: dict[str, Any] = result.completion["choices"][0]
    return choice


# Where a deep value can sit in a chunk: the chunk's text around it, how to find it in the result, and what
# two such chunks leave at the bottom (delta fields merge, so strings add up; other places take the last).
PLACES: dict[str, tuple[str, Callable[[StreamResult], Any], str]] = {
    "delta field": (
        chunk('"choices":[{"index":0,"delta":{"content":"a","vendor":@}}]'),
        lambda r: choice0(r)["message"]["vendor"],
        "xx",
    ),
    "tool call arguments": (
        chunk(
            '"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f",'
            '"arguments":@}}]}}]'
        ),
        lambda r: choice0(r)["message"]["tool_calls"][0]["function"]["arguments"],
        "xx",
    ),
    "tool call extra field": (
        chunk('"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","vendor":@}]}}]'),
        lambda r: choice0(r)["message"]["tool_calls"][0]["vendor"],
        "xx",
    ),
    "unknown top-level key": (
        chunk('"vendor":@,"choices":[]'),
        lambda r: r.completion["vendor"] if r.completion else None,
        "x",
    ),
    "usage": (
        chunk('"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"vendor":@}'),
        lambda r: r.usage["vendor"] if r.usage else None,
        "x",
    ),
    "choice field": (
        chunk('"choices":[{"index":0,"delta":{},"content_filter_results":@}]'),
        lambda r: choice0(r)["content_filter_results"],
        "x",
    ),
    "logprobs": (
        chunk('"choices":[{"index":0,"delta":{},"logprobs":{"content":[@]}}]'),
        lambda r: choice0(r)["logprobs"]["content"][-1],
        "x",
    ),
    "error": (
        '{"error":{"message":"m","vendor":@}}',
        lambda r: r.error["vendor"] if r.error else None,
        "x",
    ),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("depth", [600, 1000])
def test_deep_value_anywhere_is_rebuilt_as_it_came(place: str, depth: int) -> None:
    # 1000 levels is near orjson's limit (1024 with the chunk's own), far past Python's recursion limit.
    template, find, bottom = PLACES[place]
    text = template.replace("@", nested(depth))
    result = reconstruct_stream([event(text), event(text), DONE])
    assert result.malformed == 0
    assert depth_and_leaf(find(result)) == (depth, bottom)
    assert result.done
    assert result.complete == (place != "error")


def test_deep_lists_of_indexed_entries_merge_level_by_level() -> None:
    # At each of 900 levels a list's entry with index 0 takes the next chunk's entry 0 in, and an entry
    # without an integer index is appended. The strings at the bottom add up.
    levels = 450
    value = '[{"index":0,"a":' * levels + '"x"' + '},{"index":null}]' * levels
    text = chunk('"choices":[{"index":0,"delta":{"vendor":' + value + "}}]")
    result = reconstruct_stream([event(text), event(text)])
    vendor = choice0(result)["message"]["vendor"]
    for _ in range(levels):
        assert isinstance(vendor, list)
        assert [entry["index"] for entry in vendor] == [0, None, None]
        vendor = vendor[0]["a"]
    assert vendor == "xx"


# --- linear time -----------------------------------------------------------------------------------


def _best_of(repeats: int, work: Callable[[], object]) -> float:
    """The fastest of several runs: preemption and collector pauses only ever add time."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def _many_entries(count: int) -> Callable[[], object]:
    # Indexed entries of a delta list, sent twice so the second chunk looks every entry up; tool calls
    # without an index, each opening a new call after the highest so far.
    entries = json.dumps([{"index": i, "t": "a"} for i in range(count)])
    calls = json.dumps([{"id": f"c{i}", "function": {"arguments": "{}"}} for i in range(count)])
    text = chunk('"choices":[{"index":0,"delta":{"vendor":' + entries + ',"tool_calls":' + calls + "}}]")
    raw = [event(text), event(text)]
    return lambda: reconstruct_stream(raw)


def test_many_entries_in_one_chunk_cost_linear_time() -> None:
    # Looking each entry up by a scan makes 4x the entries cost ~16x; linear work costs ~4x.
    small = _best_of(3, _many_entries(2000))
    big = _best_of(3, _many_entries(8000))
    assert big / small < 8
