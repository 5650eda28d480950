"""``qwen-persist show ID``: one exchange or a whole session as a readable transcript."""

from __future__ import annotations

import argparse

from .. import transcript
from ..cli import CLIError
from ..export import exchange_document
from ..repositories import ExchangeRecord, History, RequestFilter
from ..repositories.exchanges import check_id
from .base import Output, add_output_options, count, run


def find(history: History, ident: str, *, row: bool) -> tuple[str, list[ExchangeRecord]]:
    """The exchanges ``ident`` names, oldest first, and a title: a request id (what the client got in
    ``X-Request-Id``), else a session id; with ``row``, the numeric id of a request row."""
    if row:
        exchange = history.requests.exchange(check_id(ident, "row"))
        if exchange is None:
            raise CLIError(f"no request row has id {ident}")
        return f"Request {exchange.request.request_id} (session {exchange.request.session_id})", [exchange]
    exchange = history.requests.exchange_by_request_id(ident)
    if exchange is not None:
        return f"Request {ident} (session {exchange.request.session_id})", [exchange]
    detail = history.sessions.detail(ident)
    if detail is None:
        raise CLIError(
            f"no request or session has the id {ident!r} (see `qwen-persist requests` and "
            "`qwen-persist sessions`; a request row's number goes with --row)"
        )
    exchanges = list(history.requests.iter_exchanges(RequestFilter(session_id=ident)))
    return f"Session {ident} ({count(detail.request_count, 'exchange')})", exchanges


def _show(args: argparse.Namespace) -> int:
    def body(history: History, out: Output) -> int:
        title, exchanges = find(history, args.id, row=args.row)
        if args.output is not None:
            return _to_file(args, title, exchanges)
        if out.as_json:
            for exchange in exchanges:
                out.json_line(exchange_document(exchange))
            return 0
        turns = transcript.build(exchanges)
        if args.markdown:
            out.write(transcript.markdown(turns, title))
            return 0
        out.print(*transcript.render(turns, title, terminal=out.terminal))
        return 0

    return run(args, body)


def _to_file(args: argparse.Namespace, title: str, exchanges: list[ExchangeRecord]) -> int:
    try:
        with open(args.output, "w", encoding="utf-8") as file:
            out = Output(args.json, file=file)
            if args.json:
                for exchange in exchanges:
                    out.json_line(exchange_document(exchange))
            elif args.markdown:
                file.write(transcript.markdown(transcript.build(exchanges), title))
            else:
                out.print(*transcript.render(transcript.build(exchanges), title, terminal=False))
    except OSError as exc:
        raise CLIError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def add_show_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = commands.add_parser(
        "show",
        help="a request or a whole session as a readable transcript",
        description="Show a conversation: a request id (the X-Request-Id the client received) or a session "
        "id; each turn with its model, tokens and timings, tool calls with their arguments, tool results, "
        "reasoning and errors.",
    )
    show.add_argument("id", metavar="SESSION_OR_REQUEST_ID")
    show.add_argument(
        "--row", action="store_true", help="the id is a request row's number (the first column of `requests`)"
    )
    show.add_argument("--markdown", action="store_true", help="as a Markdown document")
    show.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of the terminal")
    add_output_options(show)
    show.set_defaults(handler=_checked_show)


def _checked_show(args: argparse.Namespace) -> int:
    if args.json and args.markdown:
        raise CLIError("--json and --markdown exclude each other")
    return _show(args)
