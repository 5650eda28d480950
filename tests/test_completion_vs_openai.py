"""Differential test: our accumulator against the official SDK's ``ChatCompletionStreamState``.

Hypothesis generates OpenAI-shaped chunk sequences (n>1 choices, content, reasoning, refusal, several
interleaved tool calls with fragmented arguments, legacy function_call, audio, logprobs, a usage chunk with
empty choices, finish reasons or none). Both accumulators see the same chunks and must agree on every field
the SDK produces.

The generator stays inside what the SDK itself handles correctly, and only there is equality meaningful:

* a choice or tool call first appears after the one with the previous index (the SDK stores them by
  arrival position, we store them by ``index``);
* ``role``, tool call ``id``/``type``/``name`` arrive once, in the first fragment, as OpenAI sends them (the
  SDK concatenates repeats, see the completion module docstring);
* ``usage`` only on the last chunk, and ``system_fingerprint``/``service_tier`` constant across chunks (the
  SDK keeps the last chunk's or the first chunk's value, we keep the last non-null one);
* top-level and choice-level unknown fields only where the SDK reads them (first chunk, first appearance
  of the choice);
* a choice that first appears after the first chunk carries no logprobs on that appearance (the SDK adds
  them twice there).

One case the generator does produce although SDKs before openai 3.14 get it wrong: several fragments of
the same tool call in one delta. Those SDKs store the first ``tool_calls`` list of a choice as it comes,
one entry per fragment, so that list's extra fragments become extra calls (no id, no name) and later
fragments merge into whichever entry sits at position ``index``; later deltas are merged by ``index``
correctly. Fragments only ever concatenate, so the same stream with one fragment per delta means the same
thing: the SDK is given that (see ``_one_tool_fragment_per_delta``), our accumulator the chunks as drawn.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from openai import ContentFilterFinishReasonError, LengthFinishReasonError
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from qwen_persist.completion import ChatCompletionAccumulator, reconstruct_stream

Chunk = dict[str, Any]

_text = st.text(st.characters(codec="utf-8"), max_size=6)
_finish = st.sampled_from(["stop", "length", "tool_calls", "content_filter", "function_call"])


def _logprob_items(rng: random.Random) -> list[dict[str, Any]]:
    def token() -> dict[str, Any]:
        text = "".join(rng.choice("ab é€😀") for _ in range(rng.randint(0, 3)))
        raw = list(text.encode()) if rng.random() < 0.7 else None
        return {"token": text, "logprob": -rng.random() * 20, "bytes": raw}

    return [
        {**token(), "top_logprobs": [token() for _ in range(rng.randint(0, 2))]}
        for _ in range(rng.randint(0, 2))
    ]


def _logprobs(rng: random.Random) -> dict[str, Any] | None:
    """None, or a logprobs object whose lists may be null, empty or filled."""
    if rng.random() < 0.4:
        return None
    out: dict[str, Any] = {"content": _logprob_items(rng) if rng.random() < 0.8 else None}
    if rng.random() < 0.5:
        out["refusal"] = _logprob_items(rng) if rng.random() < 0.5 else None
    return out


def _split(rng: random.Random, text: str) -> list[str]:
    """Cut a string into 1..4 fragments (empty fragments allowed, as real streams have them)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 3)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _interleave(rng: random.Random, queues: list[list[Any]], ordered_start: bool) -> list[Any]:
    """Merge queues keeping each queue's order; with ordered_start queue k starts after queue k-1."""
    queues = [list(q) for q in queues if q]
    out: list[Any] = []
    started = 0 if ordered_start else len(queues)
    while any(queues):
        pick = rng.choice([i for i in range(min(started + 1, len(queues))) if queues[i]])
        started = max(started, pick + 1)
        out.append(queues[pick].pop(0))
    return out


def _tool_fragments(draw: st.DrawFn, rng: random.Random) -> list[dict[str, Any]]:
    tools: list[list[dict[str, Any]]] = []
    for index in range(draw(st.integers(0, 3))):
        arguments = json.dumps({"q": draw(_text), "n": draw(st.integers(0, 99))})
        pieces = _split(rng, arguments)
        first: dict[str, Any] = {
            "index": index,
            "id": f"call_{index}_{draw(st.integers(0, 999))}",
            "function": {"name": draw(st.sampled_from(["search", "lookup", "get_weather"])), "arguments": ""},
        }
        if draw(st.booleans()):
            first["type"] = "function"
        if draw(st.booleans()):  # arguments sometimes start in the opening fragment
            first["function"]["arguments"] = pieces.pop(0)
        tools.append([first] + [{"index": index, "function": {"arguments": p}} for p in pieces])
    fragments = _interleave(rng, tools, ordered_start=True)
    # Several fragments may travel in one delta, even two for the same call.
    grouped: list[dict[str, Any]] = []
    while fragments:
        take = rng.randint(1, min(3, len(fragments)))
        grouped.append({"tool_calls": fragments[:take]})
        fragments = fragments[take:]
    return grouped


def _choice_deltas(draw: st.DrawFn, rng: random.Random) -> list[dict[str, Any]]:
    """The deltas of one choice after its opening one: text fields interleaved with tool calls."""
    texts: list[dict[str, Any]] = []
    for key in ("content", "reasoning_content", "reasoning", "refusal"):
        if draw(st.booleans()):
            texts.extend({key: piece} for piece in _split(rng, draw(_text)))
    queues = [texts, _tool_fragments(draw, rng)]
    if draw(st.integers(0, 4)) == 0:
        name_and_args = [{"function_call": {"name": "legacy", "arguments": ""}}]
        name_and_args += [{"function_call": {"arguments": p}} for p in _split(rng, '{"a": 1}')]
        queues.append(name_and_args)
    if draw(st.integers(0, 4)) == 0:
        audio = [{"audio": {"id": "audio_1", "transcript": ""}}]
        audio += [{"audio": {"transcript": p}} for p in _split(rng, draw(_text))]
        queues.append(audio)
    return _interleave(rng, queues, ordered_start=False)


@st.composite
def openai_streams(draw: st.DrawFn) -> list[Chunk]:
    # Orderings and cut points come from a seeded generator: one draw instead of hundreds keeps the
    # generation cheap; values (text, numbers, which features appear) still come from Hypothesis.
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 3))
    base: Chunk = {
        "id": f"chatcmpl-{draw(st.integers(0, 10**6))}",
        "object": "chat.completion.chunk",
        "created": draw(st.integers(0, 2**31)),
        "model": draw(st.sampled_from(["gpt-4o", "qwen3-max"])),
    }
    fingerprint = draw(st.none() | st.just("fp_44709d6fcb"))
    if fingerprint is not None:
        base["system_fingerprint"] = fingerprint
    tier = draw(st.none() | st.sampled_from(["default", "auto", "flex"]))
    if tier is not None:
        base["service_tier"] = tier
    in_first = draw(st.integers(1, n))  # choices opened by the first chunk; the rest open later

    openings: list[dict[str, Any]] = []
    bodies: list[list[dict[str, Any]]] = []
    for index in range(n):
        opening: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": ""}}
        if draw(st.booleans()):
            opening["delta"]["refusal"] = None
        if index < in_first:
            opening["logprobs"] = _logprobs(rng)
        if draw(st.integers(0, 5)) == 0:
            opening["content_filter_results"] = {"hate": {"filtered": False}}
        openings.append(opening)
        body: list[dict[str, Any]] = []
        with_logprobs = draw(st.booleans())
        for delta in _choice_deltas(draw, rng):
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None}
            if with_logprobs:
                choice["logprobs"] = _logprobs(rng)
            body.append(choice)
        if draw(st.integers(0, 5)):  # most choices finish, some streams stop short
            body.append({"index": index, "delta": {}, "finish_reason": draw(_finish)})
        bodies.append(body)

    first: Chunk = {**base, "choices": openings[:in_first]}
    if draw(st.booleans()):
        first["x_request_tag"] = draw(_text)
    later = _interleave(
        rng, [[o, *b] for o, b in zip(openings[in_first:], bodies[in_first:], strict=True)], True
    )
    early = _interleave(rng, bodies[:in_first], ordered_start=False)
    # Later choices open in index order, anywhere among the first choices' deltas.
    merged = _interleave(rng, [early, later], ordered_start=False)
    chunks = [first] + [{**base, "choices": [choice]} for choice in merged]
    if draw(st.booleans()):
        usage: dict[str, Any] = {
            "prompt_tokens": draw(st.integers(0, 999)),
            "completion_tokens": draw(st.integers(0, 999)),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if draw(st.booleans()):
            usage["prompt_tokens_details"] = {"cached_tokens": draw(st.integers(0, 9))}
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def _several_fragments_in_one_delta(chunks: list[Chunk]) -> bool:
    return any(len(choice["delta"].get("tool_calls") or []) > 1 for c in chunks for choice in c["choices"])


def _one_call_twice_in_one_delta(chunks: list[Chunk]) -> bool:
    """Some delta carries two fragments of the same tool call (the case old SDKs get wrong)."""
    for chunk in chunks:
        for choice in chunk["choices"]:
            indexes = [fragment["index"] for fragment in choice["delta"].get("tool_calls") or []]
            if len(set(indexes)) < len(indexes):
                return True
    return False


def _one_tool_fragment_per_delta(chunks: list[Chunk]) -> list[Chunk]:
    """The same stream with a delta carrying several tool call fragments cut into one delta per fragment.

    Everything else the choice carries (other delta fields, logprobs, unknown fields) stays with the first
    fragment, its finish reason goes with the last one.
    """
    out: list[Chunk] = []
    for chunk in chunks:
        if not _several_fragments_in_one_delta([chunk]):
            out.append(chunk)
            continue
        (choice,) = chunk["choices"]  # the generator gives each delta after the opening ones its own chunk
        fragments = choice["delta"]["tool_calls"]
        pieces = [
            {"index": choice["index"], "delta": {"tool_calls": [f]}, "finish_reason": None} for f in fragments
        ]
        pieces[0] = {
            **choice,
            "delta": {**choice["delta"], "tool_calls": fragments[:1]},
            "finish_reason": None,
        }
        pieces[-1]["finish_reason"] = choice.get("finish_reason")
        out.extend({**chunk, "choices": [piece]} for piece in pieces)
    return out


def _sdk_completion(chunks: list[Chunk]) -> dict[str, Any]:
    state: ChatCompletionStreamState[object] = ChatCompletionStreamState()
    for chunk in _one_tool_fragment_per_delta(chunks):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    try:
        return state.get_final_completion().to_dict()
    except (LengthFinishReasonError, ContentFilterFinishReasonError):
        # The SDK refuses to *parse* a truncated or filtered completion; the snapshot is exactly what it
        # would have parsed, so it is the object to compare with.
        return state.current_completion_snapshot.to_dict()


def _comparable(value: Any) -> Any:
    """Drop null-valued keys (absent and null mean the same for these optional fields) and SDK-only keys.

    ``parsed``/``parsed_arguments`` are the SDK's structured-output parsing (always None without a
    ``response_format``/strict tools); a tool call's ``index`` is a streaming coordinate the SDK leaves in
    the message, while a ``chat.completion`` message has none.
    """
    if isinstance(value, dict):
        return {
            key: _comparable(item)
            for key, item in value.items()
            if item is not None and key not in ("parsed", "parsed_arguments")
        }
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    return value


def _without_tool_index(completion: dict[str, Any]) -> dict[str, Any]:
    for choice in completion["choices"]:
        for call in choice["message"].get("tool_calls") or []:
            call.pop("index", None)
    return completion


def _sse(chunks: list[Chunk]) -> bytes:
    return (
        b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"
    )


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=openai_streams(), data=st.data())
def test_accumulator_matches_openai_sdk(chunks: list[Chunk], data: st.DataObject) -> None:
    expected = _without_tool_index(_comparable(_sdk_completion(chunks)))

    accumulator = ChatCompletionAccumulator()
    for chunk in chunks:
        accumulator.add_chunk(chunk)
    result = accumulator.result()
    assert result.completion is not None
    assert _comparable(result.completion) == expected

    # The same chunks through the SSE decoder, cut at arbitrary byte offsets, give the same completion.
    raw = _sse(chunks)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts"))
    bounds = [0, *cuts, len(raw)]
    streamed = reconstruct_stream(raw[a:b] for a, b in itertools.pairwise(bounds))
    assert streamed.completion == result.completion
    assert streamed.done
    assert streamed.usage == expected.get("usage")


def test_several_fragments_of_one_call_in_one_delta() -> None:
    # The choice's first tool_calls delta: call 0 opens and goes on, call 1 opens, call 0 goes on again.
    def fragment(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return {"index": index, "function": {"arguments": arguments}}
        return {
            "index": index,
            "id": f"call_{index}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o"}
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""},
        {
            "tool_calls": [
                fragment(0, '{"q"', "search"),
                fragment(0, ": "),
                fragment(1, "", "lookup"),
                fragment(0, '"a"'),
            ]
        },
        {"tool_calls": [fragment(1, '{"n": 1}'), fragment(0, "}")]},
    ]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    calls = [
        {"id": "call_0", "type": "function", "function": {"name": "search", "arguments": '{"q": "a"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"n": 1}'}},
    ]

    accumulator = ChatCompletionAccumulator()
    for chunk in chunks:
        accumulator.add_chunk(chunk)
    result = accumulator.result().completion
    assert result is not None
    assert result["choices"][0]["message"]["tool_calls"] == calls
    # The reference, given one fragment per delta, agrees (whatever the SDK version).
    expected = _without_tool_index(_comparable(_sdk_completion(chunks)))
    assert expected["choices"][0]["message"]["tool_calls"] == calls


def test_generated_streams_carry_several_fragments_of_one_call_in_one_delta() -> None:
    """The case the reference is helped with stays among the streams our accumulator is checked on."""
    # Raises NoSuchExample if none of the streams drawn has it.
    find(
        openai_streams(),
        _one_call_twice_in_one_delta,
        settings=settings(max_examples=500, phases=[Phase.generate], database=None),
        random=random.Random(0),
    )
