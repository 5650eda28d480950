"""``qwen-persist sessions`` and ``qwen-persist requests``: recent first, filtered like the HTTP API."""

from __future__ import annotations

import argparse
from typing import Any

from ..export import exchange_document, reply_message, request_messages
from ..repositories import ExchangeRecord, History, Pagination, SessionFilter, SessionInfo
from ..repositories.rows import shallow_dict
from ..sessions import now_ms
from ..transcript import clock, content_text
from .base import (
    Column,
    Output,
    add_filter_options,
    add_limit_option,
    add_output_options,
    count,
    request_filter,
    run,
    when,
)

REQUEST_COLUMNS = (
    Column("id"),
    Column("time (UTC)"),
    Column("model"),
    Column("status"),
    Column("tokens in/out", "number", drop=4),
    Column("ms", "number", drop=3),
    Column("ttfb", "number", drop=5),
    Column("request id", drop=1),
    Column("session", drop=6),
    Column("last message → reply", "text", drop=2),
)
SESSION_COLUMNS = (
    Column("session"),
    Column("created (UTC)", drop=3),
    Column("last used (UTC)", drop=1),
    Column("state", drop=4),
    Column("messages", "number", drop=5),
    Column("first message", "text", drop=2),
)


# ----------------------------------------------------------------------------------------- requests


def request_row(exchange: ExchangeRecord) -> list[Any]:
    """An exchange as a row of `REQUEST_COLUMNS` (``tail`` prints the same facts)."""
    request, response = exchange.request, exchange.response
    status = tokens = duration = first_byte = None
    if response is not None:
        status = str(response.status_code) if response.status_code is not None else "-"
        if response.error and not status.startswith(("4", "5")):
            status += " error"
        if response.prompt_tokens is not None or response.completion_tokens is not None:
            tokens = f"{_n(response.prompt_tokens)}/{_n(response.completion_tokens)}"
        duration, first_byte = response.duration_ms, response.first_byte_ms
    else:
        status = "pending"
    return [
        request.id,
        clock(request.timestamp),
        request.model,
        status,
        tokens,
        duration,
        first_byte,
        request.request_id,
        request.session_id,
        exchange_preview(exchange),
    ]


def exchange_preview(exchange: ExchangeRecord) -> str:
    """The last message sent and what came back, in a few words."""
    messages = request_messages(exchange.request) or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    sent = content_text(last.get("content")) if last else ""
    response = exchange.response
    if response is None:
        got = "…"
    elif response.error:
        got = f"error: {response.error}"
    else:
        reply = reply_message(response) or {}
        calls = reply.get("tool_calls")
        first = calls[0] if isinstance(calls, list) and calls else None
        function = first.get("function") if isinstance(first, dict) else None
        if isinstance(function, dict):
            got = f"{function.get('name')}({function.get('arguments')})"
        else:
            got = content_text(reply.get("content"))
    return f"{sent} → {got}"


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


def _requests(args: argparse.Namespace) -> int:
    def body(history: History, out: Output) -> int:
        page = history.requests.exchanges(
            request_filter(args), Pagination(limit=args.limit, order_by="timestamp", descending=True)
        )
        if out.as_json:
            for exchange in page.items:
                out.json_line(exchange_document(exchange))
            return 0
        more = " (more with -n)" if page.has_more else ""
        out.table(
            REQUEST_COLUMNS,
            [request_row(exchange) for exchange in page.items],
            footer=f"{count(len(page.items), 'exchange')}, newest first{more}"
            if page.items
            else "no exchanges",
        )
        return 0

    return run(args, body)


# ----------------------------------------------------------------------------------------- sessions


def session_document(session: SessionInfo) -> dict[str, Any]:
    return {**shallow_dict(session), "expired": session.expired}


def _sessions(args: argparse.Namespace) -> int:
    def body(history: History, out: Output) -> int:
        now = now_ms()
        active = True if args.active else False if args.expired else None
        found = SessionFilter(
            active=active,
            since=when(args.since, now, "since"),
            until=when(args.until, now, "until"),
        )
        page = history.sessions.list(found, Pagination(limit=args.limit))
        if out.as_json:
            for session in page.items:
                out.json_line(session_document(session))
            return 0
        rows = [
            [
                session.id,
                clock(session.created_at),
                clock(session.last_accessed),
                "expired" if session.expires_at <= now else "active",
                session.message_count,
                session.first_user_message,
            ]
            for session in page.items
        ]
        more = " (more with -n)" if page.has_more else ""
        out.table(
            SESSION_COLUMNS,
            rows,
            footer=f"{count(len(rows), 'session')}, most recently used first{more}"
            if rows
            else "no sessions",
        )
        return 0

    return run(args, body)


# ------------------------------------------------------------------------------------------ parsers


def add_list_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sessions = commands.add_parser(
        "sessions",
        help="list sessions, most recently used first",
        description="List sessions (conversations), most recently used first.",
    )
    sessions.add_argument(
        "--since", metavar="WHEN", help="created then or later (ISO date/time, or 2h, 7d...)"
    )
    sessions.add_argument("--until", metavar="WHEN", help="created then or earlier")
    state = sessions.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only sessions that have not expired")
    state.add_argument("--expired", action="store_true", help="only expired sessions")
    add_limit_option(sessions, 20)
    add_output_options(sessions)
    sessions.set_defaults(handler=_sessions)

    requests = commands.add_parser(
        "requests",
        help="list exchanges (requests with their responses), newest first",
        description="List exchanges (requests with their responses), newest first.",
    )
    add_filter_options(requests)
    add_limit_option(requests, 20)
    add_output_options(requests)
    requests.set_defaults(handler=_requests)
