"""The accumulator on pathological input (issue #8): deep nesting anywhere, huge numbers, odd types, bytes.

Whatever it is fed, the reconstructor never raises; what it cannot process is counted and named in
``StreamResult.problem``, and what it can is rebuilt as it came, however deep.
"""

from __future__ import annotations

import gc
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_persist.completion import ChatCompletionAccumulator, StreamResult, reconstruct_stream
from qwen_persist.sse import SSEDecoder

BASE = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m"'
DONE = b"data: [DONE]\n\n"
LONG_NUMBER = "1234567890123456789012345"  # 20+ digits: jsonlib parses with the standard library


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
    assert (result.problem, result.unprocessable, result.malformed) == (None, 0, 0)
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
    assert result.problem is None
    vendor = choice0(result)["message"]["vendor"]
    for _ in range(levels):
        assert isinstance(vendor, list)
        assert [entry["index"] for entry in vendor] == [0, None, None]
        vendor = vendor[0]["a"]
    assert vendor == "xx"


@pytest.mark.parametrize("depth", [1100, 5000, 100_000])
@pytest.mark.parametrize("kind", ["object", "list"])
def test_nesting_past_the_parser_is_a_problem_not_an_exception(depth: int, kind: str) -> None:
    deep = chunk('"choices":[{"index":0,"delta":{"vendor":' + nested(depth, kind=kind) + "}}]")
    result = reconstruct_stream([event(content_chunk("a")), event(deep), event(content_chunk("b")), DONE])
    assert result.problem == "unprocessable event 2: RecursionError"
    assert (result.unprocessable, result.malformed, result.events) == (1, 0, 4)
    # The other events are rebuilt and the stream's end is judged as usual.
    assert choice0(result)["message"] == {"role": "assistant", "content": "ab"}
    assert result.complete


def test_deep_json_with_a_long_number_is_a_problem() -> None:
    # The long number sends the text to the standard library's parser, which raises RecursionError itself.
    deep = chunk('"choices":[{"index":0,"delta":{"vendor":' + nested(2000, LONG_NUMBER) + "}}]")
    result = reconstruct_stream([event(deep), event(content_chunk("a")), DONE])
    assert result.problem == "unprocessable event 1: RecursionError"
    assert choice0(result)["message"]["content"] == "a"


def test_numbers_too_large_to_add_are_a_problem_and_later_events_still_count() -> None:
    def count(value: str) -> str:
        return chunk('"choices":[{"index":0,"delta":{"content":"a","vendor_count":' + value + "}}]")

    huge = "1" + "0" * 400  # an int; adding it to a float overflows
    result = reconstruct_stream([event(count("1.5")), event(count(huge)), event(content_chunk("b")), DONE])
    assert result.problem == "unprocessable event 2: OverflowError"
    assert result.unprocessable == 1
    assert choice0(result)["message"]["content"].endswith("b")


def test_usage_with_numbers_too_large_to_add_is_kept_without_a_total() -> None:
    huge = "1" + "0" * 400
    usage = chunk('"choices":[],"usage":{"input_tokens":' + huge + ',"output_tokens":1.5}')
    result = reconstruct_stream([event(content_chunk("a")), event(usage)])
    assert result.usage == {"prompt_tokens": 10**400, "completion_tokens": 1.5}
    assert result.problem is None
    assert result.complete


def test_odd_types_stay_out_of_the_typed_fields_but_in_the_completion() -> None:
    odd = {"id": ["x"], "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": {"r": 1}}]}
    result = reconstruct_stream([event(json.dumps(odd)), DONE])
    assert (result.finish_reason, result.upstream_id) == (None, None)
    assert result.completion is not None
    assert result.completion["id"] == ["x"]
    assert choice0(result)["finish_reason"] == {"r": 1}


def test_error_values_that_are_not_objects_become_text() -> None:
    deep_event = b"event: error\ndata: " + nested(900, kind="list").encode() + b"\n\n"
    assert reconstruct_stream([deep_event]).error == {"message": nested(900, kind="list")}
    assert reconstruct_stream([event('{"error": [1, [true]]}')]).error == {"message": "[1,[true]]"}
    # Too deep for the standard library's encoder (orjson stops at 255 levels): a placeholder, no raise.
    deep_chunk = reconstruct_stream([event('{"error":' + nested(1020, kind="list") + "}")])
    assert deep_chunk.error is not None and isinstance(deep_chunk.error["message"], str)
    assert deep_chunk.problem is None


class _Exploding(Mapping[str, Any]):
    """A chunk whose reading fails half-way, standing in for any bug the guard must contain."""

    def __getitem__(self, key: str) -> Any:
        return None

    def __iter__(self) -> Iterator[str]:
        yield "id"
        raise ZeroDivisionError

    def __len__(self) -> int:
        return 2


def test_an_exception_while_merging_is_counted_and_the_accumulator_stays_usable() -> None:
    accumulator = ChatCompletionAccumulator()
    accumulator.add_chunk(json.loads(content_chunk("a")))
    accumulator.add_chunk(_Exploding())
    accumulator.add_chunk(json.loads(content_chunk("b")))
    result = accumulator.result()
    assert result.problem == "unprocessable chunk: ZeroDivisionError"
    assert result.unprocessable == 1
    assert choice0(result)["message"]["content"] == "ab"


def test_a_decoder_failure_loses_only_its_network_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    feed = SSEDecoder.feed

    def flaky(self: SSEDecoder, chunk: bytes) -> Any:
        if b"boom" in chunk:
            raise RuntimeError("decoder bug")
        return feed(self, chunk)

    monkeypatch.setattr(SSEDecoder, "feed", flaky)
    chunks = [event(content_chunk("a")), b"boom", event(content_chunk("b")), DONE]
    result = reconstruct_stream(chunks, fast_path=False)
    assert result.problem == "unprocessable network chunk: RuntimeError"
    assert choice0(result)["message"]["content"] == "ab"
    assert result.complete
    # The fast path hands the decoder whole event blocks (an unfinished one waits for the rest of its
    # bytes): a failure loses the block, here a comment.
    chunks[1] = b": boom\n\n"
    result = reconstruct_stream(chunks)
    assert result.problem == "unprocessable network chunk: RuntimeError"
    assert choice0(result)["message"]["content"] == "ab"
    assert result.complete


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


# --- properties ------------------------------------------------------------------------------------

_KEYS = [
    "choices", "delta", "content", "reasoning_content", "tool_calls", "function", "arguments", "name",
    "index", "id", "type", "role", "usage", "prompt_tokens", "input_tokens", "logprobs", "finish_reason",
    "error", "message", "phase", "status", "extra", "summary_thought", "response.created", "vendor",
]  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**60), 10**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "a", "stop", "assistant", "function", "think", "answer", "finished"])
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5),
    max_leaves=25,
)
_LEAVES = ['"x"', "1", "1.5", LONG_NUMBER, "null", "true", "{}", "[]", '{"index":0}', '[{"index":1}]']
_PLACES = [template for template, _, _ in PLACES.values()] + ["@", '{"choices":[@]}', '{"choices":@}']


@st.composite
def _deep_json(draw: st.DrawFn) -> str:
    """A deep value as text, its levels cycling through a drawn pattern of objects and lists."""
    pattern = draw(st.lists(st.sampled_from([*_KEYS, "[]"]), min_size=1, max_size=4))
    repeats, rest = divmod(draw(st.integers(0, 3000)), len(pattern))
    steps = pattern * repeats + pattern[:rest]
    head = "".join("[" if step == "[]" else '{"' + step + '":' for step in steps)
    tail = "".join("]" if step == "[]" else "}" for step in reversed(steps))
    return head + draw(st.sampled_from(_LEAVES)) + tail


def _data_line(text: str) -> bytes:
    return b"data: " + text.encode("utf-8", "surrogatepass") + b"\n\n"


_events = st.one_of(
    _json.map(lambda value: _data_line(json.dumps(value))),
    st.tuples(st.sampled_from(_PLACES), _deep_json()).map(lambda p: _data_line(p[0].replace("@", p[1]))),
    _json.map(lambda value: b"event: error\n" + _data_line(json.dumps(value))),
    st.sampled_from([DONE, b": keep-alive\n\n", b"retry: " + b"9" * 5000 + b"\n", b"data: {\n\n"]),
    st.binary(max_size=64),
)


def _check(result: StreamResult) -> None:
    assert result.finish_reason is None or isinstance(result.finish_reason, str)
    assert result.upstream_id is None or isinstance(result.upstream_id, str)
    assert (result.problem is None) == (result.unprocessable == 0)
    assert result.done or not result.complete


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_events, max_size=6), data=st.data())
def test_reconstruction_never_raises(events: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6), label="cuts"))
    _check(reconstruct_stream(raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_json, max_size=6))
def test_accumulator_never_raises_on_parsed_chunks(chunks: list[Any]) -> None:
    accumulator = ChatCompletionAccumulator()
    for chunk in chunks:
        if isinstance(chunk, dict):
            accumulator.add_chunk(chunk)
    _check(accumulator.result())
