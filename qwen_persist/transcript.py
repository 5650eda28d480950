"""Stored exchanges as a conversation a person can read: for ``qwen-persist show``.

`build` turns exchanges (oldest first) into turns. Clients send the whole conversation with every
request, so a turn shows only the messages that are new since the turn before it (that turn's messages
and its reply); when a request does not continue the one before (another branch, an edited history, an
unrelated request in the same session) its messages are shown in full. Each turn ends with the reply:
reasoning, text and tool calls, or the error.

Two renderings: `render` (rich renderables for the terminal, or plain text when piped) and `markdown`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rich.console import Group, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .bodies import RAW_MARKER
from .export import reply_message, request_messages
from .repositories.rows import ExchangeRecord

ROLE_STYLES = {
    "system": "magenta",
    "developer": "magenta",
    "user": "green",
    "assistant": "cyan",
    "tool": "yellow",
    "function": "yellow",
}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str | None
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One message of the conversation, as text."""

    role: str
    text: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def key(self) -> tuple[Any, ...]:
        """What makes two messages the same turn of a conversation (a client may drop the reasoning or
        other fields when it sends a reply back)."""
        return (
            self.role,
            self.text,
            tuple((c.name, c.arguments) for c in self.tool_calls),
            self.tool_call_id,
        )


@dataclass(frozen=True, slots=True)
class Turn:
    exchange: ExchangeRecord
    messages: list[Message]  # the request's messages not shown by an earlier turn
    continued: bool  # True when earlier messages were left out as already shown
    reply: Message | None
    error: str | None
    notes: list[str] = field(default_factory=list)


def build(exchanges: Iterable[ExchangeRecord]) -> list[Turn]:
    """The turns of ``exchanges`` (give them oldest first)."""
    turns: list[Turn] = []
    shown: list[tuple[Any, ...]] = []
    for exchange in exchanges:
        notes = []
        raw = request_messages(exchange.request)
        if raw is None:
            body = exchange.request.openai_request
            reason = body.get("reason") if isinstance(body, dict) and body.get(RAW_MARKER) else None
            notes.append(f"request body not readable as a chat request ({reason or 'no messages'})")
        messages = [_message(item) for item in raw or []]
        keys = [message.key() for message in messages]
        continued = bool(shown) and keys[: len(shown)] == shown
        new = messages[len(shown) :] if continued else messages
        reply_body = reply_message(exchange.response)
        reply = _message({**reply_body, "role": "assistant"}) if reply_body is not None else None
        error = _error(exchange)
        turns.append(Turn(exchange, new, continued, reply, error, notes))
        shown = keys + ([reply.key()] if reply is not None else [])
    return turns


def _message(item: Any) -> Message:
    if not isinstance(item, dict):
        return Message(role="?", text=_compact(item))
    calls = []
    listed = item.get("tool_calls")
    for call in listed if isinstance(listed, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            calls.append(
                ToolCall(call.get("id"), str(function.get("name")), _text(function.get("arguments")))
            )
    legacy = item.get("function_call")
    if isinstance(legacy, dict):
        calls.append(ToolCall(None, str(legacy.get("name")), _text(legacy.get("arguments"))))
    reasoning = item.get("reasoning_content") or item.get("reasoning")
    return Message(
        role=str(item.get("role") or "?"),
        text=content_text(item.get("content")),
        reasoning=reasoning if isinstance(reasoning, str) and reasoning else None,
        tool_calls=tuple(calls),
        tool_call_id=item.get("tool_call_id") if isinstance(item.get("tool_call_id"), str) else None,
        name=item.get("name") if isinstance(item.get("name"), str) else None,
    )


def content_text(content: Any) -> str:
    """A message's content as text: content parts joined, images and audio as a short placeholder."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_part(part) for part in content)
    return _compact(content)


def _part(part: Any) -> str:
    if not isinstance(part, dict):
        return _compact(part)
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url.startswith("data:"):
            return f"[image: {url.split(';', 1)[0][5:] or 'inline'}, {len(url)} characters inline]"
        return f"[image: {url}]"
    return f"[{kind or 'part'}]"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _compact(value)


def _compact(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except RecursionError:
        # A stored document may nest as deep as the parser allowed, deeper than the encoder goes.
        return f"[{type(value).__name__} nested too deeply to show]"


def _error(exchange: ExchangeRecord) -> str | None:
    response = exchange.response
    if response is None:
        return "no response stored (still in flight, or it never came)"
    if response.succeeded:
        return None
    status = f"HTTP {response.status_code}" if response.status_code is not None else "no status"
    return f"{status}: {response.error}" if response.error else status


def pretty_arguments(arguments: str) -> str:
    """Tool-call arguments, indented when they are JSON."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False, indent=2)
    except (ValueError, TypeError, RecursionError):
        return arguments


def clock(ms: int) -> str:
    """A stored time (ms since the epoch) as UTC: ``2026-11-24 10:00:05``."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def summary(exchange: ExchangeRecord) -> list[str]:
    """The turn's facts: model, time, outcome, tokens, timings and ids."""
    request, response = exchange.request, exchange.response
    facts = [f"#{request.id}", clock(request.timestamp) + " UTC", request.model or "(no model)"]
    if request.stream:
        facts.append("streamed")
    if response is not None:
        outcome = str(response.status_code) if response.status_code is not None else "-"
        if response.finish_reason:
            outcome += f" {response.finish_reason}"
        facts.append(outcome)
        if response.prompt_tokens is not None or response.completion_tokens is not None:
            facts.append(f"tokens {_n(response.prompt_tokens)} in / {_n(response.completion_tokens)} out")
        if response.duration_ms is not None:
            timing = f"{response.duration_ms} ms"
            if response.first_byte_ms is not None:
                timing += f" (first byte {response.first_byte_ms} ms)"
            facts.append(timing)
    facts.append(f"request {request.request_id}")
    return facts


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


# ---------------------------------------------------------------------------------------- terminal


def render(turns: Sequence[Turn], title: str, *, terminal: bool = True) -> list[RenderableType]:
    """The turns for a rich console: a line per turn with its facts (a rule on a terminal), then its
    messages."""
    out: list[RenderableType] = [Text(title, style="bold")]
    for turn in turns:
        facts = " · ".join(summary(turn.exchange))
        out.append(Rule(Text(facts, style="dim"), align="left") if terminal else Text(f"\n── {facts}"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        if turn.continued:
            grid.add_row(Text("…", style="dim"), Text("(earlier messages as above)", style="dim"))
        for note in turn.notes:
            grid.add_row(Text("note", style="dim"), Text(note, style="dim"))
        for message in turn.messages:
            _rows(grid, message)
        if turn.reply is not None:
            _rows(grid, turn.reply)
        if turn.error is not None:
            grid.add_row(Text("error", style="bold red"), Text(turn.error, style="red"))
        out.append(grid)
    return out


def _rows(grid: Table, message: Message) -> None:
    style = ROLE_STYLES.get(message.role, "white")
    label = message.role
    if message.role in ("tool", "function"):
        label += f" ({message.tool_call_id or message.name or '?'})"
    elif message.name:
        label += f" ({message.name})"
    if message.reasoning:
        grid.add_row(
            Text(f"{message.role} thinking", style=f"dim {style}"), Text(message.reasoning, style="dim")
        )
    if message.text or not (message.tool_calls or message.reasoning):
        grid.add_row(Text(label, style=f"bold {style}"), Text(message.text))
    for call in message.tool_calls:
        head = Text(f"calls {call.name}", style="bold")
        if call.id:
            head.append(f"  [{call.id}]", style="dim")
        grid.add_row(Text(label, style=f"bold {style}"), Group(head, Text(pretty_arguments(call.arguments))))


# ---------------------------------------------------------------------------------------- markdown


def markdown(turns: Sequence[Turn], title: str) -> str:
    """The turns as a Markdown document."""
    lines = [f"# {title}", ""]
    for number, turn in enumerate(turns, 1):
        facts = summary(turn.exchange)
        lines += [
            f"## {number}. {facts[2]} · {facts[1]}",
            "",
            "*" + " · ".join(_md_code(f) for f in facts) + "*",
            "",
        ]
        if turn.continued:
            lines += ["*(earlier messages as above)*", ""]
        for note in turn.notes:
            lines += [f"*{note}*", ""]
        for message in turn.messages:
            lines += _md_message(message)
        if turn.reply is not None:
            lines += _md_message(turn.reply)
        if turn.error is not None:
            lines += [f"> **Error:** {turn.error}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_code(fact: str) -> str:
    if fact.startswith("request "):
        return f"request `{fact[8:]}`"
    return fact


def _md_message(message: Message) -> list[str]:
    label = f"**{message.role}**"
    if message.role in ("tool", "function"):
        label += f" (`{message.tool_call_id or message.name or '?'}`)"
    elif message.name:
        label += f" ({message.name})"
    lines = [label, ""]
    if message.reasoning:
        lines += ["<details><summary>Reasoning</summary>", "", message.reasoning, "", "</details>", ""]
    if message.role in ("tool", "function") and message.text:
        lines += [_fence(message.text), message.text, _fence(message.text), ""]
    elif message.text:
        lines += [message.text, ""]
    for call in message.tool_calls:
        arguments = pretty_arguments(call.arguments)
        ident = f" (`{call.id}`)" if call.id else ""
        lines += [
            f"Calls `{call.name}`{ident}:",
            "",
            _fence(arguments) + "json",
            arguments,
            _fence(arguments),
            "",
        ]
    return lines


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)
