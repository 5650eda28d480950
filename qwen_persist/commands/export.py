"""``qwen-persist export``: every matching exchange as JSON lines, read from the database in batches.

Memory stays flat however many exchanges there are: the repository reads them by cursor, a batch at a
time, and each line is written as soon as it is made. A file is written beside its final name and
renamed when complete, so an interrupted export never leaves a file that looks whole.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import jsonlib
from ..cli import CLIError, add_database_url_option
from ..export import FORMATS, exchange_json, openai_chat_example
from ..repositories import ExchangeRecord, History, Pagination
from .base import Output, add_filter_options, count, request_filter, run

BATCH = 1000  # exchanges per read, and between two progress updates


def _chat_line(exchange: ExchangeRecord) -> bytes | None:
    example = openai_chat_example(exchange)
    return jsonlib.dumpb(example) if example is not None else None


CONVERTERS: dict[str, Callable[[ExchangeRecord], bytes | None]] = {
    "jsonl": exchange_json,
    "openai-chat": _chat_line,
}


@contextlib.contextmanager
def _destination(name: str | None) -> Iterator[BinaryIO]:
    if name is None or name == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    final = Path(name)
    partial = final.with_name(final.name + ".partial")
    try:
        file = open(partial, "wb")  # noqa: SIM115 - closed below, then renamed
    except OSError as exc:
        raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from None
    try:
        yield file
        file.close()
        os.replace(partial, final)
    finally:
        if not file.closed:
            file.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _export(args: argparse.Namespace) -> int:
    convert = CONVERTERS[args.format]
    to_file = args.output not in (None, "-")
    stderr = Console(stderr=True, highlight=False)
    # A bar only where someone watches, and never on top of the data itself.
    show_progress = not args.no_progress and stderr.is_terminal and (to_file or not sys.stdout.isatty())

    def body(history: History, _out: Output) -> int:
        found = request_filter(args)
        if args.format == "openai-chat" and found.has_error is None:
            found = dataclasses.replace(found, has_error=False)  # failures are never examples
        total = None
        if show_progress:
            total = history.requests.list(found, Pagination(limit=1, count_total=True)).total
        written = skipped = 0
        with _destination(args.output) as file, _progress(stderr, show_progress, total) as advance:
            exchanges = history.requests.iter_exchanges(found, batch_size=BATCH, raw_documents=True)
            for exchange in exchanges:
                line = convert(exchange)
                if line is None:
                    skipped += 1
                else:
                    file.write(line + b"\n")
                    written += 1
                if (written + skipped) % BATCH == 0:
                    advance(written + skipped)
            advance(written + skipped)
        where = args.output if to_file else "stdout"
        note = f", {skipped} skipped (not a successful chat completion)" if skipped else ""
        stderr.print(
            f"exported {count(written, 'exchange')} to {where} as {args.format}{note}",
            style="dim",
            soft_wrap=True,
        )
        return 0

    return run(args, body)


@contextlib.contextmanager
def _progress(console: Console, shown: bool, total: int | None) -> Iterator[Callable[[int], None]]:
    if not shown:
        yield lambda done: None
        return
    columns = (
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("export", total=total)
        yield lambda done: progress.update(task, completed=done)


def add_export_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="write every matching exchange as JSON lines (whole exchanges, or OpenAI's chat fine-tuning "
        "format)",
        description="Write every matching exchange, oldest first, one JSON object per line: the whole "
        "exchange (jsonl), or with --format openai-chat a chat fine-tuning example (the request's messages "
        "and tools plus the assistant's reply; successful exchanges only).",
    )
    export.add_argument("--format", choices=FORMATS, default="jsonl", help="jsonl (default) or openai-chat")
    export.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    add_filter_options(export)
    add_database_url_option(export)
    export.set_defaults(handler=_export)
