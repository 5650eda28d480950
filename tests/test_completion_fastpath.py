"""The fast path of stream reconstruction against the general path, on the same bytes.

``reconstruct_stream(chunks, fast_path=False)`` sends every event through the SSE decoder and the general
merge, as before the fast path existed (its own tests, and the differential tests against the openai SDK,
cover it). Here both paths see the same streams and must give the same `StreamResult`, compared by
``repr``: that also tells ``1`` from ``1.0`` and ``True`` and sees key order, which ``==`` would not.

The streams mix what the fast path takes (plain ``data:`` events of plain chunks) with everything it must
hand over: other SSE fields, comments, multi-line data, CR and CRLF line ends, a BOM, invalid UTF-8, long
numbers, tool calls, several choices, logprobs, Qwen native frames, odd types where plain ones are
expected; cut short anywhere and split into network chunks at any byte.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_persist import jsonlib
from qwen_persist.completion import StreamResult, reconstruct_stream
from qwen_persist.sse import SSEDecoder

LONG_NUMBER = "123456789012345678901234567890"


def both(chunks: Iterable[bytes]) -> tuple[StreamResult, StreamResult]:
    chunks = list(chunks)
    return reconstruct_stream(chunks), reconstruct_stream(chunks, fast_path=False)


def assert_same(chunks: Iterable[bytes]) -> StreamResult:
    fast, general = both(chunks)
    assert repr(fast) == repr(general)
    return fast


def split(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    return [raw[a:b] for a, b in itertools.pairwise([0, *sorted(cuts), len(raw)])]


# --- payloads ----------------------------------------------------------------------------------------

# Text with everything JSON escapes or carries as is: NUL and other controls, quotes, backslashes,
# non-ASCII, astral characters; written with or without \u escapes.
_text = st.lists(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=3)
    | st.sampled_from(["\0", "\n", "\r", '"', "\\", "\u2028", "\ufeff", "é", "🙂", "[DONE]", "data: "]),
    max_size=4,
).map("".join)
ODD_VALUES = [None, "", 0, 1, 1.0, True, False, [], {}, ["x"], {"a": 1}, "stop", "finished"]
_odd = st.sampled_from(ODD_VALUES)
# Where a plain chunk may get one field of another type or kind, which the general merge must decide.
ODD_PLACES = [
    *(
        ("top", key)
        for key in ["created", "id", "object", "usage", "error", "response_id", "response.created"]
    ),
    *(("top", key) for key in ["obfuscation", "extra"]),
    *(("choice", key) for key in ["index", "delta", "finish_reason", "logprobs", "stop_reason"]),
    *(("delta", key) for key in ["content", "role", "type", "index", "phase", "status", "tool_calls"]),
]


@st.composite
def _plain_chunk(draw: st.DrawFn) -> dict[str, Any]:
    """A chunk of the shape the fast path merges itself, now and then with one field that is not."""
    delta: dict[str, Any] = {}
    for key in draw(
        st.lists(st.sampled_from(["role", "content", "reasoning_content", "refusal"]), unique=True)
    ):
        delta[key] = draw(st.none() | _text | st.just("assistant"))
    choice: dict[str, Any] = {
        "index": draw(st.sampled_from([0, 0, 0, 1])),
        "delta": delta,
        "logprobs": None,
        "finish_reason": draw(st.sampled_from([None, None, "stop", "length", ""])),
    }
    top: dict[str, Any] = {
        "id": draw(st.sampled_from(["chatcmpl-1", "chatcmpl-2", None])),
        "object": "chat.completion.chunk",
        "created": draw(st.sampled_from([1700000000, 1700000001])),
        "model": "qwen3-max",
        "choices": [choice],
    }
    for key in draw(
        st.lists(st.sampled_from(["system_fingerprint", "service_tier", "usage", "obfuscation"]))
    ):
        top[key] = draw(st.none() | _text)
    if draw(st.integers(0, 3)) == 0:
        # One field of another type or kind, where the general merge must decide.
        holder, key = draw(st.sampled_from(ODD_PLACES))
        where = {"top": top, "choice": choice, "delta": delta}[holder]
        where[key] = draw(_odd)
    # Key order is part of the result (the completion keeps the order keys came in).
    order = draw(st.permutations(list(top)))
    return {key: top[key] for key in order}


def _complex_chunks() -> st.SearchStrategy[Any]:
    """Chunks only the general merge takes."""
    tool_call = st.fixed_dictionaries(
        {"index": st.sampled_from([0, 1])},
        optional={
            "id": st.sampled_from(["call_1", "call_2"]),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({}, optional={"name": _text, "arguments": _text}),
        },
    )
    choice = st.fixed_dictionaries(
        {"index": st.sampled_from([0, 1, 2])},
        optional={
            "delta": st.fixed_dictionaries(
                {},
                optional={"content": _text, "tool_calls": st.lists(tool_call, max_size=2)},
            ),
            "logprobs": st.none() | st.just({"content": [{"token": "a", "logprob": -0.5}], "refusal": None}),
            "finish_reason": st.sampled_from([None, "stop", "tool_calls"]),
        },
    )
    qwen = st.builds(
        lambda content, phase, status: {
            "choices": [
                {"delta": {"role": "assistant", "content": content, "phase": phase, "status": status}}
            ],
            "usage": {"input_tokens": 3, "output_tokens": 4},
            "response_id": "r1",
        },
        _text,
        st.sampled_from(["think", "thinking_summary", "answer"]),
        st.sampled_from(["typing", "finished"]),
    )
    return st.one_of(
        st.builds(lambda choices: {"id": "chatcmpl-1", "choices": choices}, st.lists(choice, max_size=3)),
        qwen,
        st.just({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
        st.just({"response.created": {"chat_id": "c1", "parent_id": "p1", "response_id": "r1"}}),
        st.just({"error": {"message": "overloaded", "code": 529}}),
        st.just([1, 2]),
        st.just("text"),
    )


def _dumps(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def _data(draw: st.DrawFn) -> str:
    """An event's data: mostly plain chunks, as JSON written either way."""
    kind = draw(st.integers(0, 9))
    if kind < 6:
        return _dumps(draw(_plain_chunk()), draw(st.booleans()))
    if kind < 8:
        return _dumps(draw(_complex_chunks()), draw(st.booleans()))
    return draw(
        st.sampled_from(
            [
                "[DONE]",
                " [DONE] ",
                "[DONE]\u00a0",
                "{",
                "",
                '{"choices":[{"index":0,"delta":{"content":"\\ud800"}}]}',  # a lone surrogate
                '{"choices":[{"index":0,"delta":{"content":"a"}}],"created":' + LONG_NUMBER + "}",
                '{"choices":[{"index":0,"delta":{"content":"' + LONG_NUMBER + '"}}]}',
                '{"choices":[{"index":0,"delta":{"content":"a"}}],"extra":1e400}',
                '{"choices":[{"index":0,"delta":{"content":"a"}}],"x":1,"x":2}',
                '  {"choices":[{"index":0,"delta":{"content":"spaced"}}]}  ',
            ]
        )
    )


# --- framing -----------------------------------------------------------------------------------------


@st.composite
def _event(draw: st.DrawFn) -> bytes:
    data = draw(_data()).encode("utf-8", "surrogatepass")
    framing = draw(st.integers(0, 19))
    if framing < 12:
        return b"data: " + data + b"\n\n"
    if framing == 12:
        return b"data:" + data + b"\n\n"
    if framing == 13:
        return b"data: " + data + b"\r\n\r\n"
    if framing == 14:
        return b"data: " + data + b"\r\r"
    if framing == 15:
        cut = draw(st.integers(0, len(data)))
        return b"data: " + data[:cut] + b"\ndata: " + data[cut:] + b"\n\n"
    if framing == 16:
        field = draw(st.sampled_from([b"event: error", b"event: message", b"id: 7", b"retry: 10", b": ping"]))
        return field + b"\n" + b"data: " + data + b"\n\n"
    if framing == 17:
        return draw(st.sampled_from([b": keep-alive\n\n", b"\n", b"\n\n", b"event: x\n\n", b"data\n\n"]))
    if framing == 18:
        # Invalid UTF-8 somewhere in the data.
        cut = draw(st.integers(0, len(data)))
        return (
            b"data: "
            + data[:cut]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
            + data[cut:]
            + b"\n\n"
        )
    return b"data: " + data + b"\n\n\n"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_event(), max_size=10),
    bom=st.booleans(),
    cut=st.none() | st.integers(min_value=0),
    data=st.data(),
)
def test_fast_and_general_paths_agree(
    events: list[bytes], bom: bool, cut: int | None, data: st.DataObject
) -> None:
    raw = (b"\xef\xbb\xbf" if bom else b"") + b"".join(events)
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]  # a stream cut short anywhere
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    fast = assert_same(split(raw, cuts))
    # However the bytes were split, the fast path gives what the general path makes of the whole.
    assert repr(fast) == repr(reconstruct_stream([raw], fast_path=False))


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(_plain_chunk(), min_size=1, max_size=12), data=st.data())
def test_plain_streams_split_at_every_byte_agree(chunks: list[dict[str, Any]], data: st.DataObject) -> None:
    raw = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30), label="cuts")
    assert_same(split(raw, cuts))
    assert_same([raw[i : i + 1] for i in range(len(raw))])


# --- hand-overs, one at a time ----------------------------------------------------------------------


def sse(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def content(text: str, **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": text}, **choice}]}


A, B, C = sse(content("a")), sse(content("b")), sse(content("c", finish_reason="stop"))
DONE = b"data: [DONE]\n\n"
TOOL = sse(
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}
)

HAND_OVERS = {
    "plain": [A, B, C, DONE],
    "one body": [A + B + C + DONE],
    "crlf chunk in the middle": [A, B.replace(b"\n", b"\r\n"), C, DONE],
    "cr between chunks": [A, b"data: " + json.dumps(content("b")).encode() + b"\r", b"\n\r\n", C, DONE],
    "event field in the middle": [A + b'event: error\ndata: {"message": "x"}\n\n' + B, C, DONE],
    "comment first": [b": OPENROUTER PROCESSING\n\n" + A, B, C + DONE],
    "multi-line data": [A, b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "b"}}]}\n\n', DONE],
    "event split across chunks": [A[:7], A[7:20], A[20:] + B[:-1], B[-1:], C, DONE],
    "blank line split off": [A[:-1], A[-1:] + B[:-2], B[-2:-1], B[-1:] + DONE],
    "tool call in the middle": [A, TOOL, C, DONE],
    "bom first": [b"\xef\xbb\xbf" + A, B, DONE],
    "bom later is data": [A, b"\xef\xbb\xbf" + B, DONE],
    "long number": [
        A,
        sse(b'{"choices":[{"index":0,"delta":{"content":"b"}}],"n":' + LONG_NUMBER.encode() + b"}"),
    ],
    "invalid utf-8": [A, b'data: {"choices":[{"index":0,"delta":{"content":"\xff"}}]}\n\n', DONE],
    "cut mid event": [A, B, C[:-1]],
    "cut after a data line": [A, B[:-1]],
    "a data line continued": [A[:-1], B, DONE],
    "cut mid line": [A, B, C[:12]],
    "done variants": [A, b"data:[DONE]\n\n", B, b"data:  [DONE] \n\n"],
    "extra blank lines": [A + b"\n\n\n", b"\n" + B, DONE],
    "usage chunk last": [A, sse({"choices": [], "usage": {"input_tokens": 1, "output_tokens": 2}})],
}


@pytest.mark.parametrize("chunks", HAND_OVERS.values(), ids=HAND_OVERS.keys())
def test_hand_overs_give_the_general_result(chunks: list[bytes]) -> None:
    assert_same(chunks)


@pytest.mark.parametrize(("holder", "key"), ODD_PLACES)
def test_each_odd_field_of_a_plain_chunk_gives_the_general_result(holder: str, key: str) -> None:
    """Every place a plain chunk could hold something else, with every odd value, systematically."""
    for value in ODD_VALUES:
        chunk = content("a", finish_reason=None, logprobs=None)
        choice = chunk["choices"][0]
        where = {"top": chunk, "choice": choice, "delta": choice["delta"]}[holder]
        where[key] = value
        # Before and after plain chunks, so that whatever the odd field did is merged with them.
        assert_same([sse(content("x")), sse(chunk), sse(chunk), sse(content("y")), DONE])


def test_plain_events_skip_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise the tests above could pass with the fast path never taken."""
    fed: list[bytes] = []
    feed = SSEDecoder.feed

    def spy(self: SSEDecoder, chunk: bytes) -> Any:
        fed.append(chunk)
        return feed(self, chunk)

    monkeypatch.setattr(SSEDecoder, "feed", spy)
    result = reconstruct_stream([A[:9], A[9:] + B, b": ping\n\n" + C + DONE])
    assert fed == [b": ping\n\n"]
    assert result.complete
    assert result.completion is not None
    assert result.completion["choices"][0]["message"]["content"] == "abc"
    fed.clear()
    reconstruct_stream([A, B], fast_path=False)
    assert fed == [A, B]


def test_the_digit_run_check_matches_a_full_scan() -> None:
    for length in range(60):
        for start in range(12):
            raw = b"x" * start + b"7" * length + b"y"
            assert jsonlib.needs_stdlib(raw) == (length >= 20), (start, length)
