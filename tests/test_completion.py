"""The chunk accumulator: one test per merge rule, the Qwen native stream, and split-invariance properties."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_persist.completion import ChatCompletionAccumulator, StreamResult, reconstruct_stream
from qwen_persist.sse import ServerSentEvent

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "qwen3-max"}


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**BASE, "choices": list(choices), **top}


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish_reason}


def accumulate(*chunks: dict[str, Any], done: bool = True) -> StreamResult:
    accumulator = ChatCompletionAccumulator()
    for item in chunks:
        accumulator.add_chunk(item)
    if done:
        accumulator.add_event(ServerSentEvent(data="[DONE]"))
    return accumulator.result()


def message(result: StreamResult, index: int = 0) -> dict[str, Any]:
    assert result.completion is not None
    return dict(result.completion["choices"][index]["message"])


def sse(*payloads: object) -> bytes:
    return b"".join(
        b"data: " + (p.encode() if isinstance(p, str) else json.dumps(p).encode()) + b"\n\n" for p in payloads
    )


# --- message fields --------------------------------------------------------------------------------


def test_content_is_concatenated() -> None:
    result = accumulate(
        chunk(delta(role="assistant", content="")),
        chunk(delta(content="Hel")),
        chunk(delta(content="lo")),
        chunk(delta(finish_reason="stop")),
    )
    assert message(result) == {"role": "assistant", "content": "Hello"}
    assert result.finish_reason == "stop"
    assert result.done and result.complete


def test_reasoning_content_and_reasoning_are_concatenated() -> None:
    result = accumulate(
        chunk(delta(role="assistant", reasoning_content="Let me ")),
        chunk(delta(reasoning_content="think.", reasoning="r1")),
        chunk(delta(reasoning="r2", content="42")),
    )
    assert message(result) == {
        "role": "assistant",
        "content": "42",
        "reasoning_content": "Let me think.",
        "reasoning": "r1r2",
    }


def test_refusal_is_concatenated() -> None:
    result = accumulate(
        chunk(delta(role="assistant", content=None, refusal="I can")),
        chunk(delta(refusal="'t help.")),
    )
    assert message(result) == {"role": "assistant", "content": None, "refusal": "I can't help."}


def test_role_is_replaced_not_concatenated() -> None:
    result = accumulate(
        chunk(delta(role="assistant", content="a")), chunk(delta(role="assistant", content="b"))
    )
    assert message(result)["role"] == "assistant"


def test_null_never_erases_streamed_text() -> None:
    result = accumulate(chunk(delta(content="a")), chunk(delta(content=None)))
    assert message(result)["content"] == "a"


# --- tool calls ------------------------------------------------------------------------------------


def test_tool_call_fragments_merge_by_index() -> None:
    result = accumulate(
        chunk(delta(role="assistant", content=None)),
        chunk(
            delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            )
        ),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"a"'}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}])),
        chunk(delta(finish_reason="tool_calls")),
    )
    assert message(result)["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert result.finish_reason == "tool_calls"


def test_tool_calls_after_content() -> None:
    result = accumulate(
        chunk(delta(role="assistant", content="Checking")),
        chunk(delta(content="…")),
        chunk(delta(tool_calls=[{"index": 0, "id": "c", "type": "function", "function": {"name": "g"}}])),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": "{}"}}])),
    )
    got = message(result)
    assert got["content"] == "Checking…"
    assert got["tool_calls"] == [
        {"id": "c", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    ]


def test_interleaved_tool_calls_keep_their_own_arguments() -> None:
    result = accumulate(
        chunk(delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "one", "arguments": "[1"}}])),
        chunk(delta(tool_calls=[{"index": 1, "id": "b", "function": {"name": "two", "arguments": "[2"}}])),
        chunk(
            delta(tool_calls=[{"index": 0, "function": {"arguments": ",1]"}}, {"index": 1, "function": {}}])
        ),
        chunk(delta(tool_calls=[{"index": 1, "function": {"arguments": ",2]"}}])),
    )
    calls = message(result)["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("a", "one", "[1,1]"),
        ("b", "two", "[2,2]"),
    ]


def test_tool_calls_are_ordered_by_index_not_arrival() -> None:
    result = accumulate(
        chunk(delta(tool_calls=[{"index": 1, "id": "b", "function": {"name": "two", "arguments": "{}"}}])),
        chunk(delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "one", "arguments": "{}"}}])),
    )
    assert [c["id"] for c in message(result)["tool_calls"]] == ["a", "b"]


def test_repeated_tool_call_id_type_and_name_are_taken_once() -> None:
    fragment = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{"}}
    repeat = {**fragment, "function": {"name": "f", "arguments": "}"}}
    result = accumulate(chunk(delta(tool_calls=[fragment])), chunk(delta(tool_calls=[repeat])))
    assert message(result)["tool_calls"] == [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]


def test_tool_call_type_stays_null_when_never_sent() -> None:
    # The SDK leaves it null rather than guessing "function"; so do we.
    result = accumulate(chunk(delta(tool_calls=[{"index": 0, "id": "x", "function": {"name": "f"}}])))
    assert message(result)["tool_calls"][0]["type"] is None


def test_tool_calls_without_index_open_on_id_and_continue_otherwise() -> None:
    result = accumulate(
        chunk(delta(tool_calls=[{"id": "a", "function": {"name": "one", "arguments": "{"}}])),
        chunk(delta(tool_calls=[{"function": {"arguments": "}"}}])),
        chunk(delta(tool_calls=[{"id": "b", "function": {"name": "two", "arguments": "[]"}}])),
    )
    calls = message(result)["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("a", "{}"), ("b", "[]")]


def test_legacy_function_call_name_and_arguments_concatenate() -> None:
    result = accumulate(
        chunk(delta(role="assistant", function_call={"name": "get_", "arguments": ""})),
        chunk(delta(function_call={"name": "weather", "arguments": '{"city":'})),
        chunk(delta(finish_reason="function_call", function_call={"arguments": '"Oslo"}'})),
    )
    assert message(result)["function_call"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert result.finish_reason == "function_call"


# --- choices, logprobs, finish ---------------------------------------------------------------------


def test_choices_are_kept_apart_by_index() -> None:
    result = accumulate(
        chunk(delta(1, role="assistant", content="B")),
        chunk(delta(0, role="assistant", content="A")),
        chunk(delta(1, content="b"), delta(0, content="a")),
        chunk(delta(0, finish_reason="stop"), delta(1, finish_reason="length")),
    )
    assert result.completion is not None
    choices = result.completion["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "Aa", "stop"),
        (1, "Bb", "length"),
    ]
    assert result.finish_reason == "stop"
    assert result.complete


def test_ended_stream_is_complete_even_if_a_choice_has_no_finish_reason() -> None:
    # LiteLLM sends the finish reason of an n=2 stream for choice 0 only; [DONE] still ends the stream.
    result = reconstruct_stream(
        [
            sse(
                chunk(delta(0, content="a"), delta(1, content="b")),
                chunk(delta(0, finish_reason="stop")),
                "[DONE]",
            )
        ]
    )
    assert result.completion is not None
    assert [c["finish_reason"] for c in result.completion["choices"]] == ["stop", None]
    assert result.done and result.complete


def test_logprobs_lists_are_concatenated() -> None:
    def token(text: str) -> dict[str, Any]:
        return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}

    result = accumulate(
        chunk({**delta(content="a"), "logprobs": {"content": [token("a")], "refusal": None}}),
        chunk({**delta(content="b"), "logprobs": {"content": [token("b")], "refusal": [token("r")]}}),
        chunk({**delta(content="c"), "logprobs": {"content": [], "refusal": None}}),
        chunk({**delta(content="d"), "logprobs": None}),
    )
    assert result.completion is not None
    logprobs = result.completion["choices"][0]["logprobs"]
    assert logprobs == {"content": [token("a"), token("b")], "refusal": [token("r")]}


def test_first_empty_logprobs_list_stays_a_list() -> None:
    result = accumulate(chunk({**delta(content="a"), "logprobs": {"content": []}}))
    assert result.completion is not None
    assert result.completion["choices"][0]["logprobs"] == {"content": [], "refusal": None}


def test_finish_reason_is_per_choice_and_ignores_empty_values() -> None:
    result = accumulate(chunk(delta(0, finish_reason="tool_calls")), chunk(delta(0, finish_reason="")))
    assert result.finish_reason == "tool_calls"


# --- top level -------------------------------------------------------------------------------------


def test_usage_from_final_chunk_with_empty_choices() -> None:
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    result = accumulate(chunk(delta(content="a", finish_reason="stop")), chunk(usage=usage))
    assert result.usage == usage
    assert result.completion is not None
    assert result.completion["usage"] == usage
    assert len(result.completion["choices"]) == 1


def test_usage_last_non_null_wins() -> None:
    result = accumulate(
        chunk(delta(content="a"), usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
        chunk(delta(content="b"), usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
        chunk(delta(content="c"), usage=None),
    )
    assert result.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_identity_fields_come_from_the_first_chunk_and_the_rest_from_the_last() -> None:
    result = accumulate(
        chunk(delta(content="a"), system_fingerprint="fp_1", service_tier="default"),
        {**chunk(delta(content="b"), system_fingerprint="fp_2"), "id": "other", "model": "other"},
        chunk(delta(content="c"), system_fingerprint=None),
    )
    completion = result.completion
    assert completion is not None
    assert (completion["id"], completion["model"], completion["created"]) == (
        "chatcmpl-1",
        "qwen3-max",
        1700000000,
    )
    assert completion["object"] == "chat.completion"
    assert (completion["system_fingerprint"], completion["service_tier"]) == ("fp_2", "default")
    assert result.upstream_id == "chatcmpl-1"


def test_unknown_fields_are_kept_last_value_wins() -> None:
    result = accumulate(
        chunk(
            {**delta(content="a", vendor_note="x"), "content_filter_results": {"hate": False}}, provider="p1"
        ),
        chunk(
            {**delta(content="b", vendor_note="y"), "content_filter_results": {"hate": True}}, provider="p2"
        ),
        chunk(delta(content="c", vendor_count=2), provider=None),
        chunk(delta(vendor_count=3)),
    )
    completion = result.completion
    assert completion is not None
    assert completion["provider"] == "p2"
    choice = completion["choices"][0]
    assert choice["content_filter_results"] == {"hate": True}
    # Delta fields stream like the known ones (the SDK merges them the same way).
    assert choice["message"]["vendor_note"] == "xy"
    assert choice["message"]["vendor_count"] == 5


def test_obfuscation_padding_is_dropped() -> None:
    result = accumulate(chunk(delta(content="a"), obfuscation="Xy12"))
    assert result.completion is not None
    assert "obfuscation" not in result.completion


# --- stream framing, errors, robustness ------------------------------------------------------------


def test_done_ends_the_stream() -> None:
    result = reconstruct_stream([sse(chunk(delta(content="a", finish_reason="stop")), "[DONE]")])
    assert result.done and result.complete
    assert result.events == 2


def test_stream_without_done_still_yields_a_result() -> None:
    result = reconstruct_stream([sse(chunk(delta(role="assistant", content="partial")))])
    assert message(result)["content"] == "partial"
    assert not result.done
    assert not result.complete
    assert result.finish_reason is None


def test_done_without_finish_reason_is_complete() -> None:
    result = reconstruct_stream([sse(chunk(delta(content="a")), "[DONE]")])
    assert result.done and result.complete
    assert result.finish_reason is None


USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_final_usage_chunk_ends_the_stream_without_done() -> None:
    result = reconstruct_stream([sse(chunk(delta(content="a", finish_reason="stop")), chunk(usage=USAGE))])
    assert result.done and result.complete
    assert result.usage == USAGE


def test_usage_chunk_followed_by_choices_does_not_end_the_stream() -> None:
    result = reconstruct_stream([sse(chunk(usage=USAGE), chunk(delta(content="a", finish_reason="stop")))])
    assert not result.done
    assert not result.complete
    # Only a usage *object* with empty choices is the end marker.
    assert not reconstruct_stream([sse(chunk(delta(content="a")), chunk(usage=None))]).done
    assert not reconstruct_stream([sse(chunk(delta(content="a")), {"usage": USAGE})]).done


def test_finish_reasons_without_an_end_marker_are_truncated() -> None:
    result = reconstruct_stream(
        [sse(chunk(delta(0, content="a", finish_reason="stop"), delta(1, content="b", finish_reason="stop")))]
    )
    assert not result.done
    assert not result.complete


def test_stream_cut_mid_event_is_truncated_whatever_came_before() -> None:
    ended = sse(chunk(delta(content="a", finish_reason="stop")), chunk(usage=USAGE), "[DONE]")
    assert reconstruct_stream([ended]).complete
    cut = reconstruct_stream([ended + b": keep-alive\ndata: {"])
    assert cut.done
    assert not cut.complete


def test_done_is_final_and_an_empty_ended_stream_is_complete() -> None:
    late = reconstruct_stream([sse(chunk(delta(content="a")), "[DONE]", chunk(delta(content="b")))])
    assert late.done and late.complete
    assert message(late)["content"] == "ab"
    empty = reconstruct_stream([sse("[DONE]")])
    assert empty.complete
    assert empty.completion is None


def test_error_payload_is_captured() -> None:
    error = {"message": "rate limited", "type": "rate_limit_error", "code": "429"}
    result = reconstruct_stream([sse(chunk(delta(content="a")), {"error": error}, "[DONE]")])
    assert result.error == error
    assert result.done
    assert not result.complete
    assert message(result)["content"] == "a"


def test_error_event_is_captured() -> None:
    json_error = b'event: error\ndata: {"error": {"message": "upstream failed"}}\n\n'
    assert reconstruct_stream([json_error]).error == {"message": "upstream failed"}
    assert reconstruct_stream([b"event: error\ndata: boom\n\n"]).error == {"message": "boom"}


def test_malformed_payloads_are_counted_not_raised() -> None:
    result = reconstruct_stream(
        [sse("not json", "[1, 2]", "42", '{"choices": "nope"}', chunk(delta(content="ok")))]
    )
    assert result.malformed == 3
    assert result.events == 5
    assert message(result)["content"] == "ok"


def test_no_chunk_means_no_completion() -> None:
    assert reconstruct_stream([b": keep-alive\n\n"]).completion is None
    assert reconstruct_stream([sse("[DONE]")]).completion is None


def test_result_can_be_taken_mid_stream_and_is_idempotent() -> None:
    accumulator = ChatCompletionAccumulator()
    accumulator.add_chunk(chunk(delta(content="a")))
    first = accumulator.result()
    assert accumulator.result() == first
    accumulator.add_chunk(chunk(delta(content="b")))
    assert message(first)["content"] == "a"
    assert message(accumulator.result())["content"] == "ab"


def test_truncated_stream_is_incomplete_but_keeps_its_tail() -> None:
    raw = sse(chunk(delta(content="a", finish_reason="stop")), "[DONE]")
    assert reconstruct_stream([raw]).complete
    cut = reconstruct_stream([raw.rstrip(b"\n")])
    assert cut.done
    assert not cut.complete
    mid_event = reconstruct_stream([sse(chunk(delta(content="a"))) + b'data: {"choices": [{"delta": {"conte'])
    assert message(mid_event)["content"] == "a"
    assert mid_event.malformed == 1
    assert not mid_event.complete


# --- Qwen web native stream ------------------------------------------------------------------------


def qwen(content: str, phase: str = "answer", status: str = "typing", **usage: int) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "choices": [{"delta": {"role": "assistant", "content": content, "phase": phase, "status": status}}],
        "response_id": "resp-1",
    }
    if usage:
        frame["usage"] = usage
    return frame


CREATED = {"response.created": {"chat_id": "chat-1", "parent_id": "parent-1", "response_id": "resp-1"}}


def test_qwen_response_created_ids() -> None:
    result = reconstruct_stream([sse(CREATED)])
    assert (result.chat_id, result.parent_id, result.response_id) == ("chat-1", "parent-1", "resp-1")
    assert result.completion is None


def test_qwen_think_phase_goes_to_reasoning_content() -> None:
    result = reconstruct_stream(
        [sse(CREATED, qwen("Hmm", "think"), qwen(", ok", "think"), qwen("", "think", "finished"), qwen("Hi"))]
    )
    assert message(result) == {"role": "assistant", "content": "Hi", "reasoning_content": "Hmm, ok"}
    # The thinking phase's own "finished" closes the reasoning, not the answer.
    assert not result.done
    assert result.finish_reason is None


def test_qwen_finished_status_ends_the_stream_without_done() -> None:
    result = reconstruct_stream([sse(CREATED, qwen("Hello"), qwen(" world"), qwen("", status="finished"))])
    assert message(result)["content"] == "Hello world"
    assert result.done and result.complete
    assert result.finish_reason == "stop"


def test_qwen_usage_is_cumulative_and_renamed() -> None:
    result = reconstruct_stream(
        [
            sse(
                qwen("a", input_tokens=10, output_tokens=1),
                qwen("b", input_tokens=10, output_tokens=2),
                qwen("", status="finished", input_tokens=10, output_tokens=3),
            )
        ]
    )
    assert result.usage == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_qwen_usage_keeps_given_total_and_details() -> None:
    usage = {
        "input_tokens": 5,
        "output_tokens": 2,
        "total_tokens": 8,
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    result = reconstruct_stream([sse({**qwen("a"), "usage": usage})])
    assert result.usage == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 8,
        "completion_tokens_details": {"reasoning_tokens": 1},
    }


def test_qwen_thinking_summary_appends_only_new_paragraphs() -> None:
    def summary(*paragraphs: str, status: str = "typing") -> dict[str, Any]:
        frame = qwen("", "thinking_summary", status)
        frame["choices"][0]["delta"]["extra"] = {"summary_thought": {"content": list(paragraphs)}}
        return frame

    result = reconstruct_stream(
        [sse(summary("Plan."), summary("Plan.", "Check."), summary("Plan.", "Check.", status="finished"))]
    )
    assert message(result)["reasoning_content"] == "Plan.\nCheck."


def test_qwen_platform_tool_frames_are_not_the_answer() -> None:
    tool = {
        "choices": [
            {"delta": {"role": "function", "name": "web_search", "content": "", "phase": "web_search"}}
        ]
    }
    result = reconstruct_stream([sse(qwen("Searching"), tool, qwen(" done", status="finished"))])
    assert message(result) == {"role": "assistant", "content": "Searching done"}


# --- properties ------------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=5)


@st.composite
def openai_payloads(draw: st.DrawFn) -> list[object]:
    payloads: list[object] = []
    for _ in range(draw(st.integers(0, 8))):
        fields = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "content": _text,
                    "reasoning_content": _text,
                    "tool_calls": st.lists(
                        st.fixed_dictionaries(
                            {
                                "index": st.integers(0, 2),
                                "function": st.fixed_dictionaries({"arguments": _text}),
                            },
                            optional={"id": st.just("call_x")},
                        ),
                        max_size=2,
                    ),
                },
            )
        )
        payloads.append(
            chunk(delta(draw(st.integers(0, 1)), draw(st.sampled_from([None, "stop"])), **fields))
        )
    if draw(st.booleans()):
        payloads.append(chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    if draw(st.booleans()):
        payloads.append("[DONE]")
    return payloads


@st.composite
def qwen_payloads(draw: st.DrawFn) -> list[object]:
    payloads: list[object] = [CREATED]
    for i in range(draw(st.integers(0, 6))):
        phase = draw(st.sampled_from(["think", "answer", "thinking_summary"]))
        payloads.append(
            qwen(draw(_text), phase, draw(st.sampled_from(["typing", "finished"])), output_tokens=i)
        )
    return payloads


@st.composite
def encoded_streams(draw: st.DrawFn) -> bytes:
    """Payloads framed with assorted line endings, comments and split data lines."""
    payloads = draw(openai_payloads() | qwen_payloads())
    out = b""
    for payload in payloads:
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=draw(st.booleans()))
        end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        if draw(st.booleans()):
            out += f": keep-alive{end}".encode()
        # A JSON text may be cut over several data lines: they are joined with "\n", which JSON ignores.
        lines = text.split(" ", 1) if text.startswith("{") and draw(st.booleans()) else [text]
        out += "".join(f"data: {line}{end}" for line in lines).encode() + end.encode()
    return out


@settings(max_examples=400)
@given(raw=encoded_streams(), data=st.data())
def test_any_network_split_gives_the_same_completion(raw: bytes, data: st.DataObject) -> None:
    whole = reconstruct_stream([raw])
    assert whole.malformed == 0
    if data.draw(st.booleans(), label="one byte at a time"):
        pieces = [raw[i : i + 1] for i in range(len(raw))]
    else:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=16), label="cuts"))
        pieces = [raw[a:b] for a, b in itertools.pairwise([0, *cuts, len(raw)])]
    assert reconstruct_stream(pieces) == whole
