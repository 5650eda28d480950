"""``qwen-persist tail``: print exchanges as they are stored, until interrupted.

It polls by request id: each poll reads the requests stored since the last one. An exchange is printed
once its response is stored, so the lines come in the order exchanges finish; one whose response has
not come after `GIVE_UP` seconds is printed as pending and left. The response filters (--errors,
--no-errors, --status) are applied to each exchange as its response arrives, so a request that is
answered late is still judged by its answer. On PostgreSQL, where a transaction can
commit a smaller id after a larger one was read, ids are read again for `SETTLE_SECONDS` first; a
writer transaction held open longer than that (a stalled database) can slip past.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from ..export import exchange_document
from ..repositories import ExchangeRecord, History, Pagination, RequestFilter
from .base import Output, add_filter_options, add_output_options, request_filter, run
from .lists import request_row

GIVE_UP = 600.0  # seconds a request may wait for its response before it is printed without one
SETTLE_SECONDS = 2.0  # PostgreSQL: how long ids are read again in case an older one commits late


def _print(out: Output, exchange: ExchangeRecord) -> None:
    if out.as_json:
        out.json_line(exchange_document(exchange))
        return
    cells = ["-" if value is None else str(value) for value in request_row(exchange)]
    row_id, when, model, status, tokens, duration, first_byte, request_id, session, preview = cells
    timing = f"{duration} ms" if duration != "-" else "-"
    if first_byte != "-":
        timing += f" (ttfb {first_byte})"
    bad = not status.startswith(("2", "3"))
    tokens = f"{tokens} tok  " if tokens != "-" else ""
    text = f"{when}  #{row_id}  {model}  {status}  {tokens}{timing}  {request_id}  {session}  {preview}"
    out.line(text, style="red" if bad and out.terminal else "")


def _tail(args: argparse.Namespace) -> int:
    def body(history: History, out: Output) -> int:
        # Relative times (--since 1h) are fixed once, when tail starts.
        found = request_filter(args)
        # Polls read requests whatever their response: one answered after a later one was read must
        # still be seen, and judged by the response filter only once its response is stored.
        polled = dataclasses.replace(found, has_error=None, status_code=None)
        judged = polled != found
        # On PostgreSQL ids are handed out before the transactions holding them commit, and several
        # writers commit in any order: ids are read again for a moment before they count as seen.
        lag = SETTLE_SECONDS if history.engine.dialect.name == "postgresql" else 0.0
        newest = history.requests.exchanges(None, Pagination(limit=1, order_by="id")).items
        settled = newest[0].request.id if newest else 0  # every id up to here has been dealt with
        recent: dict[int, float] = {}  # ids past `settled` dealt with -> when first read
        waiting: dict[int, float] = {}  # ids read without a response -> when first read
        if args.lines > 0:
            latest = history.requests.exchanges(found, Pagination(limit=args.lines, order_by="id")).items
            for exchange in reversed(latest):
                _deal(out, exchange, waiting, found)
            if judged:  # unanswered ones the response filter could not match yet
                recent_requests = history.requests.exchanges(
                    polled, Pagination(limit=args.lines, order_by="id")
                ).items
                for exchange in recent_requests:
                    if exchange.response is None:
                        waiting.setdefault(exchange.request.id, time.monotonic())
        try:
            while True:
                time.sleep(args.interval)
                now = time.monotonic()
                for exchange in history.requests.iter_exchanges(polled, after=settled, batch_size=500):
                    if exchange.request.id not in recent:
                        recent[exchange.request.id] = now
                        _deal(out, exchange, waiting, found)
                for request_id, since in sorted(waiting.items()):
                    pending = history.requests.exchange(request_id)
                    if pending is None:
                        del waiting[request_id]  # deleted meanwhile
                    elif pending.response is not None or now - since > GIVE_UP:
                        del waiting[request_id]
                        if matches(found, pending):
                            _print(out, pending)
                old = [request_id for request_id, since in recent.items() if now - since >= lag]
                if old:
                    settled = max(settled, *old)
                    recent = {i: since for i, since in recent.items() if i > settled}
        except KeyboardInterrupt:
            return 0

    return run(args, body, flags={"limit": "--lines"})


def _deal(out: Output, exchange: ExchangeRecord, waiting: dict[int, float], found: RequestFilter) -> None:
    if exchange.response is None:
        waiting.setdefault(exchange.request.id, time.monotonic())
    elif matches(found, exchange):
        _print(out, exchange)


def matches(found: RequestFilter, exchange: ExchangeRecord) -> bool:
    """Whether the exchange passes the filter's response terms, as the repositories judge them
    (`ResponseRecord.failed`; no response is no failure)."""
    response = exchange.response
    if found.status_code is not None and (response is None or response.status_code != found.status_code):
        return False
    if found.has_error is None:
        return True
    return (response is not None and response.failed) == found.has_error


def _interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"between 0.05 and 3600 seconds, got {value}")
    return seconds


def add_tail_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tail = commands.add_parser(
        "tail",
        help="print exchanges as they are stored, until interrupted (Ctrl-C)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail.add_argument(
        "-n",
        "--lines",
        type=int,
        default=10,
        metavar="N",
        help="first print the last N stored exchanges (default 10; 0: only new ones)",
    )
    tail.add_argument(
        "--interval", type=_interval, default=1.0, metavar="SECONDS", help="seconds between polls (default 1)"
    )
    add_filter_options(tail)
    add_output_options(tail)
    tail.set_defaults(handler=_tail)
