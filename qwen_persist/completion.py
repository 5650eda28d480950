"""Rebuild one ``chat.completion`` object from the chunks of a streamed chat completion.

For OpenAI-format streams the result equals what the official SDK's accumulator
(``openai.lib.streaming.chat.ChatCompletionStreamState``) builds from the same chunks, minus the SDK's own
additions (``parsed``, ``parsed_arguments``, the ``index`` of tool calls). Where the SDK's merge is
accidental rather than meaningful we depart from it on purpose, and only there:

* ``role`` is replaced, never concatenated (Qwen repeats it in every delta; the SDK would build
  ``"assistantassistant…"``);
* a tool call's ``id``, ``type`` and ``function.name`` come from the first fragment that carries them
  (some servers repeat them in every fragment; the SDK concatenates ``id`` and ``name``);
* tool calls are merged by their ``index`` field and sorted by it, not by arrival position;
* top-level and choice-level scalars (``system_fingerprint``, ``service_tier``, ``usage``, unknown fields)
  take the last non-null value; the SDK takes most of them from the first chunk only and lets a later
  chunk without ``usage`` or ``system_fingerprint`` erase them;
* a list of entries without ``index`` is extended instead of raising, and nothing here ever raises on
  odd input (see "Input that cannot be processed" below).

Qwen web API native stream (chat.qwen.ai ``/api/v2/chat/completions``), as observed in public proxies of
that site (a format assumption, not a published contract)::

    data: {"response.created": {"chat_id": "…", "parent_id": "…", "response_id": "…"}}
    data: {"choices": [{"delta": {"role": "assistant", "content": "…", "phase": "think",
           "status": "typing"}}], "usage": {"input_tokens": 9, "output_tokens": 3}, "response_id": "…"}
    data: {"choices": [{"delta": {"content": "", "phase": "thinking_summary", "status": "finished",
           "extra": {"summary_thought": {"content": ["…", "…"]}}}}], …}
    data: {"choices": [{"delta": {"content": "…", "phase": "answer", "status": "typing"}}], …}
    data: {"choices": [{"delta": {"content": "", "phase": "answer", "status": "finished"}}], …}

There is no ``[DONE]``: ``status: "finished"`` outside a thinking phase ends the answer (a thinking
phase's own ``finished`` only closes the reasoning). Thinking phases (``think``, ``thinking``,
``thinking_summary``) feed ``reasoning_content``; ``thinking_summary`` frames carry a cumulative list of
summary paragraphs in ``extra.summary_thought.content``, of which only the new ones are appended. Usage is
cumulative (last wins) and named ``input_tokens``/``output_tokens``. Deltas with ``role: "function"`` are
the platform's own tool traffic (web search and the like), not the assistant's message, and are skipped.

When a stream counts as truncated
---------------------------------
A stream *ended* (``StreamResult.done``) when it carried one of these end markers:

* ``data: [DONE]``, OpenAI's terminator;
* a usage chunk, the one ``stream_options.include_usage`` adds last: ``choices`` an empty list and ``usage``
  an object. It ends the stream only while no chunk with a non-empty ``choices`` list follows it (a usage
  chunk that more choices follow was not the last one);
* a Qwen native frame with ``status: "finished"`` outside a thinking phase.

``[DONE]`` and Qwen's ``finished`` say so explicitly, so they stay in force: chunks after them are still
merged but do not reopen the stream.

A stream is *complete* (``StreamResult.complete``) when it ended, was not cut mid-event (the SSE decoder's
``unterminated``: bytes after the last blank line, known only to ``StreamReconstructor`` and
``reconstruct_stream``) and carried no error (an ``error`` event, or a chunk with a non-null ``error``:
``StreamResult.error`` then holds it, which says more than "truncated"). Every other stream is *truncated*.
Finish reasons play no part: a server may send one for only some choices of an ``n > 1`` stream (LiteLLM
does), and a stream that ended is not cut short for lacking one.

Input that cannot be processed
------------------------------
Feeding never raises, whatever the bytes. Merging and rendering walk nested values with an explicit queue
instead of recursing, so a chunk nested as deeply as the parser accepts is rebuilt as it came. Event data
that is not JSON, or JSON but not an object, is counted in ``StreamResult.malformed`` and left out, as a
stream's cut tail or a stray keep-alive is. An event that is well formed but still cannot be processed
(nested deeper than the parser accepts, 1024 levels for orjson; numbers too large to add up; any other
exception while merging it) is counted in ``StreamResult.unprocessable``, and ``StreamResult.problem``
names the first one, e.g. ``"unprocessable event 12: RecursionError"``. Such an event may be partly
merged, so whenever ``problem`` is set the completion is not a faithful rebuild of the stream; the
stream's end is judged by the rule above all the same. ``MemoryError`` is let through: it is the
machine's trouble, not the input's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qwen_persist.sse import ServerSentEvent, SSEDecoder

from . import jsonlib
from .jsonlib import loads_bytes_unchecked, needs_stdlib

__all__ = ["ChatCompletionAccumulator", "StreamResult", "reconstruct_stream"]

_THINK_PHASES = frozenset({"think", "thinking", "thinking_summary"})
# Identity of the completion: every chunk repeats it, the first value is the one the SDK keeps.
_FIRST_WINS = frozenset({"id", "created", "model"})
# Per-chunk noise (anti side-channel padding) that the SDK also drops.
_DROPPED_TOP = frozenset({"obfuscation"})
# Top-level keys a plain chunk (see `_add_plain_chunk`) must not carry with a non-null value: the general
# merge gives them a meaning of their own.
_SPECIAL_TOP = frozenset({"usage", "error", "response.created", "response_id"})
# Delta keys that take the general merge: Qwen native frames, tool calls, and the two keys whose string
# value replaces instead of adding up.
_SPECIAL_DELTA = frozenset({"phase", "status", "tool_calls", "function_call", "index", "type"})
# Skipped by the plain top-level merge: handled apart (`choices`), known null (`_SPECIAL_TOP`) or dropped.
_NOT_TOP = frozenset({"choices", *_SPECIAL_TOP, *_DROPPED_TOP})
# Choice keys `_Choice.add` gives a meaning; any other lands in the choice's extra fields.
_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
_USAGE_RENAMES = {
    "input_tokens": "prompt_tokens",
    "output_tokens": "completion_tokens",
    "input_tokens_details": "prompt_tokens_details",
    "output_tokens_details": "completion_tokens_details",
}


def _loads(data: str) -> Any:
    """The one place stream payloads are parsed."""
    return jsonlib.loads(data)


def _json_text(value: Any) -> str:
    """``value`` as JSON text, for an error that is not an object; never raises."""
    try:
        return jsonlib.dumps(value)
    except MemoryError:
        raise
    except Exception:  # nested deeper than the encoder goes: jsonlib lets RecursionError through
        return "(an error value nested too deeply to print)"


def _too_deep(exc: ValueError) -> bool:
    """Whether the parser refused well-formed JSON for its depth (orjson: "depth limit exceeded").

    Such an event is not malformed: it is data the completion cannot hold, so it must count as a problem.
    """
    message = str(exc)
    return "depth" in message or "recursion" in message


@dataclass(slots=True)
class StreamResult:
    """What a stream amounted to; see the module docstring for the merge rules.

    ``done``: the stream carried an end marker; ``complete``: it ended, was not cut mid-event and carried
    no error (the module docstring has the exact rule; a stream that is not complete is truncated).
    ``finish_reason`` and ``upstream_id`` are strings or ``None`` whatever the stream sent (the completion
    keeps odd values as they came). ``unprocessable`` counts the events that could not be processed (see
    the module docstring); ``problem`` is ``None`` when the completion is a faithful rebuild, else a short
    text naming the first such event (``"unprocessable event 12: RecursionError"``) or, should rendering
    itself fail, ``"unrenderable completion: …"`` with ``completion`` then ``None``.
    """

    completion: dict[str, Any] | None
    done: bool
    complete: bool
    finish_reason: str | None
    usage: dict[str, Any] | None
    upstream_id: str | None
    error: dict[str, Any] | None
    chat_id: str | None = None
    parent_id: str | None = None
    response_id: str | None = None
    events: int = 0
    malformed: int = 0
    unprocessable: int = 0
    problem: str | None = None


class _Text:
    """A string built from fragments; joined once when rendered, so long streams stay linear."""

    __slots__ = ("parts",)

    def __init__(self, first: str) -> None:
        self.parts = [first]


class _List(list[Any]):
    """An accumulated list, with its entries that carry a numeric ``index`` found in one lookup.

    A linear search per delta entry made one chunk holding many indexed entries cost quadratic time.
    """

    __slots__ = ("by_index",)

    def __init__(self) -> None:
        super().__init__()
        self.by_index: dict[Any, dict[str, Any]] = {}


# Merges still to do, as (accumulated container, delta value). Nested values are queued instead of
# recursed into: a chunk may nest as deep as the parser allows (1024 levels) and Python's stack would give
# out first. The queue is worked through in order; since every container's merges are queued by its
# parent's, in the order those ran, each container still receives its deltas in stream order.
_Work = list[tuple[Any, Any]]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fresh(value: Any, work: _Work) -> Any:
    """A new accumulated value for ``value``; a container's contents are queued on ``work``."""
    if isinstance(value, str):
        return _Text(value)
    if isinstance(value, dict):
        acc: dict[str, Any] = {}
        work.append((acc, value))
        return acc
    if isinstance(value, list):
        items = _List()
        work.append((items, value))
        return items
    return value


def _merge(acc: dict[str, Any], delta: Mapping[str, Any]) -> None:
    """Merge a delta the way the SDK does: strings and numbers add up, objects merge, lists grow."""
    work: _Work = []
    _merge_level(acc, delta, work)
    # Appending to a list while iterating over it is well defined: the iterator re-reads the length.
    for target, source in work:
        if type(target) is dict:
            _merge_level(target, source, work)
        else:
            _extend_level(target, source, work)


def _merge_level(acc: dict[str, Any], delta: Mapping[str, Any], work: _Work) -> None:
    """One level of `_merge`: scalars are merged now, nested containers queued."""
    for key, value in delta.items():
        current = acc.get(key)
        if value is None:
            # A null never erases what was streamed, but the key itself is part of the message.
            acc.setdefault(key, None)
        elif current is None or key in ("index", "type"):
            # `index` and `type` identify an entry or a union member: they are replaced, not summed.
            acc[key] = _fresh(value, work)
        elif isinstance(current, _Text) and isinstance(value, str):
            current.parts.append(value)
        elif (isinstance(current, dict) and isinstance(value, dict)) or (
            isinstance(current, _List) and isinstance(value, list)
        ):
            work.append((current, value))
        elif _is_number(current) and _is_number(value):
            acc[key] = current + value
        else:
            acc[key] = _fresh(value, work)


def _extend_level(acc: _List, delta: list[Any], work: _Work) -> None:
    """Entries that carry an integer ``index`` update the entry with that index; others are appended."""
    for entry in delta:
        if not isinstance(entry, dict):
            acc.append(_fresh(entry, work))
            continue
        index = entry.get("index")
        if isinstance(index, int):
            target = acc.by_index.get(index)
            if target is not None:
                _merge_level(target, entry, work)
                continue
        # The entry's own level is merged at once, so a later entry of this same delta finds its index.
        new: dict[str, Any] = {}
        _merge_level(new, entry, work)
        acc.append(new)
        # Any number equal to an integer index matches it (1.0 == 1 == True, hashes included), as == did.
        key = new.get("index")
        if isinstance(key, (int, float)):
            acc.by_index.setdefault(key, new)


def _render(value: Any) -> Any:
    """The plain JSON value of an accumulated one; iterative for the same reason as `_merge`."""
    if type(value) is _Text:
        return "".join(value.parts)
    if isinstance(value, dict):
        root: Any = {}
    elif isinstance(value, list):
        root = []
    else:
        return value
    work: _Work = [(root, value)]
    for target, source in work:
        if type(target) is dict:
            for key, item in source.items():
                target[key] = _render_level(item, work)
        else:
            target.extend([_render_level(item, work) for item in source])
    return root


def _render_level(value: Any, work: _Work) -> Any:
    if type(value) is _Text:
        return "".join(value.parts)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        work.append((out, value))
        return out
    if isinstance(value, list):
        items: list[Any] = []
        work.append((items, value))
        return items
    return value


def _normalize_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Map Qwen/DashScope usage names onto OpenAI's, keeping every other field."""
    out = {_USAGE_RENAMES.get(key, key): value for key, value in usage.items()}
    if (
        "total_tokens" not in out
        and _is_number(out.get("prompt_tokens"))
        and _is_number(out.get("completion_tokens"))
    ):
        # A huge integer plus a float overflows; no total then, rather than losing the usage.
        with contextlib.suppress(OverflowError):
            out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


class _ToolCall:
    __slots__ = ("extra", "function", "id", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.function: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}

    def add(self, fragment: Mapping[str, Any]) -> None:
        for key, value in fragment.items():
            if key == "index":
                continue
            if key in ("id", "type"):
                # Empty placeholders some servers send before the real value do not count as "first".
                if not getattr(self, key) and value is not None:
                    setattr(self, key, value)
            elif key == "function" and isinstance(value, dict):
                self._add_function(value)
            else:
                _merge(self.extra, {key: value})

    def _add_function(self, fragment: Mapping[str, Any]) -> None:
        if self.function is None:
            self.function = {}
        function = self.function
        for key, value in fragment.items():
            if key == "name":
                if not function.get("name") and value is not None:
                    function["name"] = value
            elif type(value) is str and key != "type":
                # The common fragment, a piece of `arguments`, appended without the general merge.
                current = function.get(key)
                if type(current) is _Text:
                    current.parts.append(value)
                elif current is None:
                    function[key] = _Text(value)
                else:
                    _merge(function, {key: value})
            else:
                _merge(function, {key: value})

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.function is not None:
            out["function"] = _render(self.function)
        out.update(_render(self.extra))
        return out


class _Choice:
    __slots__ = (
        "extra",
        "finish_reason",
        "index",
        "last_call",
        "logprobs",
        "message",
        "summary_seen",
        "tool_calls",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: dict[str, Any] = {}
        self.tool_calls: dict[int, _ToolCall] = {}
        self.last_call: int | None = None  # the highest tool call index so far
        self.finish_reason: Any = None  # kept as sent; StreamResult.finish_reason only takes a string
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self.summary_seen = 0  # Qwen `thinking_summary` paragraphs already appended

    def add(self, choice: Mapping[str, Any]) -> bool:
        """Merge one chunk's choice; return True when it is a Qwen native end of answer."""
        finished = False
        for key, value in choice.items():
            if key == "delta":
                if isinstance(value, dict):
                    finished = self._add_delta(value)
            elif key == "finish_reason":
                if value:  # the SDK ignores empty strings too
                    self.finish_reason = value
            elif key == "logprobs":
                self._add_logprobs(value)
            elif key != "index" and (value is not None or key not in self.extra):
                self.extra[key] = value
        if finished and self.finish_reason is None:
            self.finish_reason = "stop"
        return finished

    def _add_delta(self, delta: Mapping[str, Any]) -> bool:
        if "phase" in delta or "status" in delta:
            return self._add_qwen_delta(delta)
        self._add_openai_delta(delta)
        return False

    def _add_openai_delta(self, delta: Mapping[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                if value is not None or key not in self.message:
                    self.message["role"] = value
            elif key == "tool_calls":
                # The calls live in self.tool_calls; the key only records that the delta named it.
                self.message.setdefault("tool_calls", None)
                if isinstance(value, list):
                    self._add_tool_calls(value)
            elif type(value) is str and key not in ("index", "type"):
                # The common delta, a text fragment, appended without the general merge.
                current = self.message.get(key)
                if type(current) is _Text:
                    current.parts.append(value)
                elif current is None:
                    self.message[key] = _Text(value)
                else:
                    _merge(self.message, {key: value})
            else:
                _merge(self.message, {key: value})

    def _add_tool_calls(self, fragments: list[Any]) -> None:
        for fragment in fragments:
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            if not isinstance(index, int):
                # No index (seen on a few OpenAI-compatible servers): a fragment with an id opens a new
                # call, any other continues the latest one.
                index = -1 if self.last_call is None else self.last_call
                if index < 0 or fragment.get("id") is not None:
                    index += 1
            call = self.tool_calls.get(index)
            if call is None:
                call = self.tool_calls[index] = _ToolCall()
                # Kept up to date rather than recomputed: max() per fragment made many calls quadratic.
                if self.last_call is None or index > self.last_call:
                    self.last_call = index
            call.add(fragment)

    def _add_qwen_delta(self, delta: Mapping[str, Any]) -> bool:
        if delta.get("role") == "function":
            return False
        phase = delta.get("phase")
        thinking = phase in _THINK_PHASES
        rest = {key: value for key, value in delta.items() if key not in ("phase", "status", "extra")}
        content = rest.pop("content", None)
        if thinking:
            text = content if isinstance(content, str) else ""
            if phase == "thinking_summary":
                text += self._new_summary(delta.get("extra"))
            if text:
                _merge(self.message, {"reasoning_content": text})
        elif content is not None:
            _merge(self.message, {"content": content})
        self._add_openai_delta(rest)
        return delta.get("status") == "finished" and not thinking

    def _new_summary(self, extra: Any) -> str:
        thought = extra.get("summary_thought") if isinstance(extra, dict) else None
        paragraphs = thought.get("content") if isinstance(thought, dict) else None
        if not isinstance(paragraphs, list) or len(paragraphs) <= self.summary_seen:
            return ""
        new = [p for p in paragraphs[self.summary_seen :] if isinstance(p, str) and p]
        separator = "\n" if new and self.message.get("reasoning_content") is not None else ""
        self.summary_seen = len(paragraphs)
        return separator + "\n".join(new)

    def _add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        if self.logprobs is None:
            # The first logprobs object is taken as is (an empty list stays an empty list), like the SDK.
            self.logprobs = {
                key: list(value) if isinstance(value, list) else value
                for key, value in logprobs.items()
                if key in ("content", "refusal")
            }
            self.logprobs.setdefault("content", None)
            self.logprobs.setdefault("refusal", None)
            return
        for key in ("content", "refusal"):
            items = logprobs.get(key)
            if isinstance(items, list) and items:
                existing = self.logprobs.get(key)
                if isinstance(existing, list):
                    existing.extend(items)
                else:
                    self.logprobs[key] = list(items)

    def render(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None}
        for key, value in self.message.items():
            if key == "tool_calls":
                calls = [self.tool_calls[i].render() for i in sorted(self.tool_calls)]
                message[key] = calls or None
            else:
                message[key] = _render(value)
        out: dict[str, Any] = {
            "index": self.index,
            "message": message,
            "logprobs": _render(self.logprobs),
            "finish_reason": self.finish_reason,
        }
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


class ChatCompletionAccumulator:
    """Feed SSE events (or parsed chunks); ``result()`` gives the completion rebuilt so far."""

    def __init__(self) -> None:
        self._top: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        self._error: dict[str, Any] | None = None
        self._seen_chunk = False
        self._done = False  # [DONE] or a Qwen native end: final
        self._usage_end = False  # a usage chunk that no chunk with choices has followed yet
        self._chat_id: str | None = None
        self._parent_id: str | None = None
        self._response_id: str | None = None
        self._events = 0
        self._malformed = 0
        self._unprocessable = 0
        self._problem: str | None = None

    def add_event(self, event: ServerSentEvent) -> None:
        """Handle one SSE event: ``[DONE]``, a JSON chunk, an error event, or a Qwen native frame.

        Never raises (``MemoryError`` aside): an event that cannot be processed is counted instead.
        """
        self._events += 1
        try:
            data = event.data
            if data.strip() == "[DONE]":
                self._done = True
                return
            too_deep = False
            try:
                payload = _loads(data)
            except RecursionError:  # the standard library's parser, which jsonlib uses for long numbers
                payload, too_deep = None, True
            except ValueError as exc:
                payload, too_deep = None, _too_deep(exc)
            if event.event == "error":
                # Anything but an object or a string is kept as the text that came: str() of a parsed
                # list would recurse as deep as it nests.
                self._set_error(payload if isinstance(payload, (dict, str)) else data)
            elif isinstance(payload, dict):
                self._add_chunk(payload)
            elif too_deep:
                raise RecursionError("JSON nested deeper than the parser accepts")
            else:
                self._malformed += 1
        except MemoryError:
            raise
        except Exception as exc:
            self._note_problem(f"event {self._events}", exc)

    def add_chunk(self, chunk: Mapping[str, Any]) -> None:
        """Merge one parsed chunk; like `add_event`, never raises."""
        try:
            self._add_chunk(chunk)
        except MemoryError:
            raise
        except Exception as exc:
            self._note_problem("chunk", exc)

    def _add_data(self, data: bytes, checked: bool) -> None:
        """`add_event` for a ``message`` event whose data came as the bytes ``data``, not yet decoded.

        ``data`` is what followed ``data:`` on the event's one line, the space the SSE value drops still
        on: JSON text may begin with spaces, so it is parsed as is.

        ``checked``: `jsonlib.needs_stdlib` is known to be false for ``data``. Valid UTF-8 decodes and
        encodes back to the same bytes, so parsing them as they are is what `add_event` does; anything
        orjson refuses (not JSON, not UTF-8, too deep) takes `add_event` itself, which decides as always.
        """
        if data == b" [DONE]":  # "[DONE]" said otherwise is not JSON: add_event has it below
            self._events += 1
            self._done = True
            return
        try:
            if not checked and needs_stdlib(data):
                raise ValueError("a long number")
            payload = loads_bytes_unchecked(data)
        except ValueError:
            # The event the decoder would have made; its `id` is not read here.
            value = data[1:] if data[:1] == b" " else data
            self.add_event(ServerSentEvent(data=value.decode("utf-8", "replace")))
            return
        self._events += 1
        if type(payload) is not dict:
            # "[DONE]" with spaces around it is not JSON, so it went to add_event above.
            self._malformed += 1
            return
        try:
            if not self._add_plain_chunk(payload):
                self._add_chunk(payload)
        except MemoryError:
            raise
        except Exception as exc:
            self._note_problem(f"event {self._events}", exc)

    def _add_plain_chunk(self, chunk: dict[str, Any]) -> bool:
        """`_add_chunk` for the common chunk, cheaper; False, having changed nothing, for any other.

        Plain: one choice with an integer index whose delta holds only strings and nulls (``role``,
        ``content``, ``reasoning_content``, …; no tool calls, no Qwen phase); no usage, error or Qwen
        native keys. Nothing in merging that can raise, so checking first and merging after is the general
        merge exactly; top-level keys and the choice touch different state, so their order does not
        matter.
        """
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1:
            return False
        raw = choices[0]
        if type(raw) is not dict:
            return False
        index = raw.get("index", 0)
        if type(index) is not int:
            return False
        delta = raw.get("delta")
        if delta:  # a delta that is empty or null merges nothing, whatever its type
            if type(delta) is not dict:
                return False
            for key, value in delta.items():
                if key in _SPECIAL_DELTA or (value is not None and type(value) is not str):
                    return False
        if not _SPECIAL_TOP.isdisjoint(chunk) and any(chunk.get(key) is not None for key in _SPECIAL_TOP):
            return False

        self._seen_chunk = True
        self._usage_end = False
        top = self._top
        for key, value in chunk.items():
            if key in _FIRST_WINS:
                if top.get(key) is None:
                    top[key] = value
            elif key not in _NOT_TOP and (value is not None or key not in top):
                top[key] = value

        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice(index)
        if delta:
            # `_Choice._add_openai_delta` for strings and nulls.
            message = choice.message
            for key, value in delta.items():
                if key == "role":
                    if value is not None or key not in message:
                        message[key] = value
                elif value is None:
                    message.setdefault(key, None)  # what `_merge` does with a null
                else:
                    current = message.get(key)
                    if type(current) is _Text:
                        current.parts.append(value)
                    elif current is None:
                        message[key] = _Text(value)
                    else:
                        _merge(message, {key: value})
        # The rest of `_Choice.add`.
        reason = raw.get("finish_reason")
        if reason:  # the SDK ignores empty strings too
            choice.finish_reason = reason
        logprobs = raw.get("logprobs")
        if logprobs is not None:
            choice._add_logprobs(logprobs)
        if not raw.keys() <= _CHOICE_KEYS:
            extra = choice.extra
            for key, value in raw.items():
                if key not in _CHOICE_KEYS and (value is not None or key not in extra):
                    extra[key] = value
        return True

    def _note_problem(self, what: str, exc: BaseException) -> None:
        """Count something that could not be processed; the first one is named in ``result().problem``."""
        self._unprocessable += 1
        if self._problem is None:
            self._problem = f"unprocessable {what}: {type(exc).__name__}"

    def _add_chunk(self, chunk: Mapping[str, Any]) -> None:
        for key, value in chunk.items():
            if key == "choices":
                self._seen_chunk = True
                if isinstance(value, list):
                    # The end marker is judged before the choices are merged, so it holds if that fails
                    # (nothing else in a chunk is known to fail).
                    if value:
                        self._usage_end = False
                        self._add_choices(value)
                    elif isinstance(chunk.get("usage"), dict):
                        self._usage_end = True
            elif key == "usage":
                if isinstance(value, dict):
                    self._usage = _normalize_usage(value)
            elif key == "error":
                if value is not None:
                    self._set_error(value)
            elif key == "response.created":
                self._add_created(value)
            elif key == "response_id":
                if isinstance(value, str):
                    self._response_id = value
            elif key in _FIRST_WINS:
                self._seen_chunk = True
                if self._top.get(key) is None:
                    self._top[key] = value
            elif key not in _DROPPED_TOP and (value is not None or key not in self._top):
                self._seen_chunk = True
                self._top[key] = value

    def result(self) -> StreamResult:
        """The stream as understood so far; cheap enough to call at any time and free of side effects."""
        problem = self._problem
        try:
            completion = self._completion()
        except MemoryError:
            raise
        except Exception as exc:
            # Last resort: rendering does not recurse, so this is not expected; but raising here would
            # lose the stream's framing and ids along with the completion.
            completion = None
            problem = problem or f"unrenderable completion: {type(exc).__name__}"
        choices = completion["choices"] if completion is not None else []
        finish_reason = choices[0]["finish_reason"] if choices else None
        upstream_id = self._top.get("id")
        done = self._done or self._usage_end
        return StreamResult(
            completion=completion,
            done=done,
            complete=done and self._error is None,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            usage=self._usage,
            upstream_id=upstream_id if isinstance(upstream_id, str) else None,
            error=self._error,
            chat_id=self._chat_id,
            parent_id=self._parent_id,
            response_id=self._response_id,
            events=self._events,
            malformed=self._malformed,
            unprocessable=self._unprocessable,
            problem=problem,
        )

    def _completion(self) -> dict[str, Any] | None:
        if not (self._seen_chunk or self._choices):
            return None
        completion: dict[str, Any] = {"id": None, "object": "chat.completion", "created": None, "model": None}
        completion.update(self._top)
        completion["object"] = "chat.completion"
        completion["choices"] = [self._choices[i].render() for i in sorted(self._choices)]
        completion["usage"] = self._usage
        completion.setdefault("system_fingerprint", None)
        return completion

    def _add_choices(self, choices: list[Any]) -> None:
        for raw in choices:
            if not isinstance(raw, dict):
                continue
            index = raw.get("index", 0)
            if not isinstance(index, int):
                continue
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice(index)
            if choice.add(raw):
                self._done = True

    def _add_created(self, created: Any) -> None:
        if not isinstance(created, dict):
            return
        for key in ("chat_id", "parent_id", "response_id"):
            value = created.get(key)
            if isinstance(value, str):
                setattr(self, f"_{key}", value)

    def _set_error(self, error: Any) -> None:
        if isinstance(error, dict):
            inner = error.get("error")
            self._error = dict(inner) if isinstance(inner, dict) else dict(error)
        elif isinstance(error, str):
            self._error = {"message": error}
        else:
            self._error = {"message": _json_text(error)}


class StreamReconstructor:
    """Incremental decode + accumulate: feed network chunks as they pass, then `finish` once.

    Fast path (``fast_path=True``, the default; ``False`` only serves to compare the two): whole events of
    the plain shape, one ``data:`` line ended by a blank line with LF line ends, skip the SSE decoder and
    reach the accumulator as undecoded bytes (`ChatCompletionAccumulator._add_data`); chunks of the plain
    shape skip the general merge (`ChatCompletionAccumulator._add_plain_chunk`). Everything else — other
    fields, comments, multi-line data, CR anywhere in a network chunk — is fed to the decoder, which is at
    an event boundary whenever the fast path hands over (`SSEDecoder.at_event_boundary`), so the result is
    the same as without the fast path, event for event. An event split across network chunks is kept
    here until its end arrives and then taken as a whole: the decoder gives the same events however the
    bytes are split.
    """

    __slots__ = ("_accumulator", "_decoder", "_fast", "_pending", "_use_fast")

    def __init__(self, *, fast_path: bool = True) -> None:
        self._decoder = SSEDecoder()
        self._accumulator = ChatCompletionAccumulator()
        self._use_fast = fast_path
        self._fast = fast_path  # the decoder is at an event boundary and nothing is pending in it
        # Fast path: the start of an event whose blank line has not come yet, in the pieces it came in,
        # joined once when it does (each byte is copied a bounded number of times).
        self._pending: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        """Decode and merge one network chunk; never raises (``MemoryError`` aside), like `finish`."""
        if not self._fast:
            self._feed_decoder(chunk)
            return
        pending = self._pending
        if b"\r" in chunk:
            # CR line ends (or a stray CR) are the decoder's business; it takes over until a boundary.
            self._fast = False
            if pending:
                self._feed_decoder(b"".join(pending))
                pending.clear()
            self._feed_decoder(chunk)
            return
        if pending:
            # Only an event's end, a blank line, makes anything happen; until then keep the pieces.
            if b"\n\n" not in chunk and not (chunk[:1] == b"\n" and pending[-1][-1:] == b"\n"):
                if chunk:
                    pending.append(chunk)
                return
            pending.append(chunk)
            chunk = b"".join(pending)
            pending.clear()
        add = self._accumulator._add_data
        # One look for long digit runs covers every event of the chunk (see `jsonlib.needs_stdlib`).
        checked = not needs_stdlib(chunk)
        lines = chunk.split(b"\n")
        last = len(lines) - 1  # lines[last] follows the last LF: an unfinished line, or nothing
        i = 0
        while True:
            start = i
            while i + 1 < last and not lines[i + 1] and lines[i].startswith(b"data:"):
                # A plain event: one data line, then a blank one. The space after the colon, which
                # the SSE value drops, is left on: JSON ignores it, `_add_data` drops it where it matters.
                add(lines[i][5:], checked)
                i += 2
            self._decoder.passed((i - start) // 2)
            # Any other block, up to and including its blank line, goes to the decoder.
            end = i
            while end < last and lines[end]:
                end += 1
            if end >= last:
                break  # no blank line yet: the block is the tail
            self._feed_decoder(b"\n".join(lines[i : end + 1]) + b"\n")
            i = end + 1
        if i < last or lines[last]:
            pending.append(b"\n".join(lines[i:]))

    def _feed_decoder(self, chunk: bytes) -> None:
        """The general path: the SSE decoder, then `ChatCompletionAccumulator.add_event`."""
        try:
            events = self._decoder.feed(chunk)
        except MemoryError:
            raise
        except Exception as exc:
            # Last resort: the decoder is not known to raise on any bytes; if it does, the chunk is lost.
            self._accumulator._note_problem("network chunk", exc)
            return
        for event in events:
            self._accumulator.add_event(event)
        if self._use_fast:
            self._fast = self._decoder.at_event_boundary()

    def finish(self) -> StreamResult:
        """The rebuilt completion; a stream cut mid-event is never complete."""
        if self._pending:
            # An event cut short: the decoder knows what an unterminated tail amounts to.
            self._feed_decoder(b"".join(self._pending))
            self._pending.clear()
        try:
            events = self._decoder.close()
        except MemoryError:
            raise
        except Exception as exc:
            events = []
            self._accumulator._note_problem("end of stream", exc)
        for event in events:
            self._accumulator.add_event(event)
        result = self._accumulator.result()
        if self._decoder.unterminated:
            result.complete = False
        return result


def reconstruct_stream(chunks: Iterable[bytes], *, fast_path: bool = True) -> StreamResult:
    """Decode an SSE byte stream and rebuild its completion; a stream cut mid-event is never complete.

    ``fast_path=False`` takes the general path for every event (see `StreamReconstructor`): the same
    result, slower; it exists so the two can be compared.
    """
    reconstructor = StreamReconstructor(fast_path=fast_path)
    for chunk in chunks:
        reconstructor.feed(chunk)
    return reconstructor.finish()
