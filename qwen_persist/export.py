"""Exchanges as documents: whole exchanges as JSON, and OpenAI's chat fine-tuning format.

`exchange_document` is the one JSON shape of a stored exchange (the request row's columns, with its
response row under ``"response"``), used by ``qwen-persist export`` and every ``--json`` output.

`openai_chat_example` is one line of a chat fine-tuning file, as OpenAI's fine-tuning API takes it: the
request's ``messages`` (and ``tools`` / ``parallel_tool_calls`` when it had them) followed by the
assistant message that was stored as the answer, tool calls included. Only the fields that format knows
are kept (``role``, ``content``, ``name``, ``tool_calls``, ``tool_call_id``, ``function_call``): the
reasoning a model streamed (``reasoning_content``), a ``refusal: null`` or a tool call's stream ``index``
are not part of it. A ``developer`` message becomes ``system``, the role the format has for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .bodies import RAW_MARKER
from .jsonlib import RawJSON, dumpb
from .repositories.rows import ExchangeRecord, RequestRecord, ResponseRecord

FORMATS = ("jsonl", "openai-chat")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
ROLES = ("system", "user", "assistant", "tool", "function")

_REQUEST_FIELDS = tuple(field.name for field in dataclasses.fields(RequestRecord))
_RESPONSE_FIELDS = tuple(field.name for field in dataclasses.fields(ResponseRecord))


def exchange_document(exchange: ExchangeRecord) -> dict[str, Any]:
    """The exchange as one JSON object: `ExchangeRecord.to_dict`'s shape, built without copying the
    documents (an export writes them straight out)."""
    request, response = exchange.request, exchange.response
    document = {name: getattr(request, name) for name in _REQUEST_FIELDS}
    document["response"] = (
        {name: getattr(response, name) for name in _RESPONSE_FIELDS} if response is not None else None
    )
    return document


def parsed(document: Any) -> Any:
    """A stored document, parsed if it was read as text (``iter_exchanges(raw_documents=True)``)."""
    return document.parse() if isinstance(document, RawJSON) else document


def exchange_json(exchange: ExchangeRecord) -> bytes:
    """`exchange_document` as JSON bytes, written straight from the records (orjson writes dataclasses
    natively): what ``export`` writes for each exchange."""
    try:
        request = dumpb(exchange.request)
        response = dumpb(exchange.response) if exchange.response is not None else b"null"
    except TypeError:
        # A document orjson cannot write (an integer wider than 64 bits, a lone surrogate) sends
        # `dumpb` to the standard library, which knows no dataclasses: give it the records as dicts. Only
        # parsed documents get here (those stored with NUL escaped); the others stay text.
        return dumpb(exchange_document(exchange))
    return request[:-1] + b',"response":' + response + b"}"


def reply_message(response: ResponseRecord | None) -> dict[str, Any] | None:
    """The assistant message a response holds (its first choice), as stored; None when it has none."""
    body = parsed(response.openai_response) if response is not None else None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None


def request_messages(request: RequestRecord) -> list[Any] | None:
    """The request's ``messages`` (None when its body is not a chat completion request, or not JSON)."""
    body = parsed(request.openai_request)
    if not isinstance(body, dict) or body.get(RAW_MARKER) is True:
        return None
    messages = body.get("messages")
    return messages if isinstance(messages, list) else None


def openai_chat_example(exchange: ExchangeRecord) -> dict[str, Any] | None:
    """One line of an OpenAI chat fine-tuning file, or None for an exchange that cannot be one: not a
    success, no reply message, or a request without messages."""
    response = exchange.response
    if response is None or not response.succeeded:
        return None
    reply = reply_message(response)
    body = parsed(exchange.request.openai_request)
    messages = body.get("messages") if isinstance(body, dict) and body.get(RAW_MARKER) is not True else None
    if reply is None or not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(message, dict) for message in messages):
        return None
    example: dict[str, Any] = {
        "messages": [_message(message) for message in messages] + [_message({**reply, "role": "assistant"})]
    }
    if isinstance(body.get("tools"), list) and body["tools"]:
        example["tools"] = body["tools"]
        if isinstance(body.get("parallel_tool_calls"), bool):
            example["parallel_tool_calls"] = body["parallel_tool_calls"]
    return example


def _message(message: dict[str, Any]) -> dict[str, Any]:
    kept = {key: message[key] for key in MESSAGE_KEYS if key in message}
    if kept.get("role") == "developer":
        kept["role"] = "system"
    calls = kept.get("tool_calls")
    if isinstance(calls, list) and calls:
        kept["tool_calls"] = [_tool_call(call) for call in calls]
        if kept.get("content") is None:
            kept.pop("content", None)  # a call without text, as OpenAI's own examples write it
    elif "tool_calls" in kept:
        del kept["tool_calls"]  # an empty or null list is no call
    if kept.get("function_call") is None:
        kept.pop("function_call", None)
    if kept.get("name") is None:
        kept.pop("name", None)
    return kept


def _tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    kept: dict[str, Any] = {"id": call.get("id"), "type": call.get("type") or "function"}
    if isinstance(function, dict):
        kept["function"] = {"name": function.get("name"), "arguments": function.get("arguments")}
    return kept
