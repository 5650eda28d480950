"""What the read commands share: opening the database (checked first), the filters, and the output.

Output goes through rich: on a terminal, aligned tables cut to its width with colour; piped, the same
columns as plain text without colour or cutting (long previews shortened all the same); with ``--json``,
one JSON object per line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from .. import jsonlib
from ..cli import CLIError, _database_errors, _safe_url, add_database_url_option, database_url
from ..engine import missing_sqlite_file
from ..repositories import History, InvalidParameter, RequestFilter, parse_since
from ..sessions import now_ms

PLAIN_WIDTH = 100_000  # piped output is never wrapped or cut to a width
PREVIEW = 80  # characters of a message shown in a list, piped (on a terminal: what fits)
TEXT_MIN = 12  # the narrowest a text column gets on a terminal before other columns are dropped
COLUMN_GAP = 3  # what rich puts between two columns of a SIMPLE_HEAD table

Body = Callable[[History, "Output"], int]


# ------------------------------------------------------------------------------------------- output


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: ``id`` values are never cut, ``text`` values are cut to fit, ``number`` values
    are right-aligned. When a terminal is too narrow, columns with the highest ``drop`` go first."""

    header: str
    kind: str = "id"
    drop: int = 0


class _TrailingSpaceless:
    """Piped tables without the padding rich adds at the end of each line."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write("\n".join(line.rstrip(" ") for line in text.split("\n")))

    def flush(self) -> None:
        self.file.flush()

    def isatty(self) -> bool:
        return False


class Output:
    """Where a command prints: a rich console on stdout, and ``--json`` lines."""

    def __init__(self, as_json: bool = False, file: TextIO | None = None) -> None:
        self.as_json = as_json
        self.file = file if file is not None else sys.stdout
        console = Console(file=self.file, highlight=False, markup=False, emoji=False)
        self.terminal = console.is_terminal
        if not self.terminal:
            console = Console(
                file=_TrailingSpaceless(self.file),  # type: ignore[arg-type]
                highlight=False,
                markup=False,
                emoji=False,
                color_system=None,
                width=PLAIN_WIDTH,
                soft_wrap=True,
            )
        self.console = console

    def write(self, text: str) -> None:
        """Text as it is (a Markdown document, say), without rich's rendering."""
        self.file.write(text)
        self.file.flush()

    def json_line(self, value: Any) -> None:
        """One JSON object on a line of its own, flushed (``tail`` and pipes see it at once)."""
        self.write(jsonlib.dumps(value) + "\n")

    def print(self, *renderables: RenderableType) -> None:
        self.console.print(*renderables)

    def line(self, text: str, style: str = "") -> None:
        """One line; on a terminal cut to its width instead of wrapped."""
        self.console.print(Text(text, style=style), no_wrap=True, overflow="ellipsis", crop=True)
        self.file.flush()

    def table(self, columns: Sequence[Column], rows: Sequence[Sequence[Any]], *, footer: str = "") -> None:
        """Rows under a header; with no rows, only the footer (which says so)."""
        if not rows:
            self.console.print(Text(footer, style="dim"))
            return
        cells = [
            [self._cell(value, column) for value, column in zip(row, columns, strict=True)] for row in rows
        ]
        keep = self._fitting(columns, cells) if self.terminal else list(range(len(columns)))
        has_text = any(columns[i].kind == "text" for i in keep)
        if self.terminal:
            table = Table(
                box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, expand=has_text
            )
        else:
            table = Table(box=None, header_style="", pad_edge=False, show_edge=False)
        for i in keep:
            column = columns[i]
            table.add_column(
                Text(column.header, no_wrap=True, overflow="ellipsis"),
                justify="right" if column.kind == "number" else "left",
                no_wrap=True,
                overflow="ellipsis",
                ratio=1 if column.kind == "text" and self.terminal else None,
                min_width=TEXT_MIN if column.kind == "text" else None,
            )
        for row in cells:
            table.add_row(*(row[i] for i in keep))
        self.console.print(table)
        hidden = [columns[i].header for i in range(len(columns)) if i not in keep]
        if hidden:
            footer += f"{'; ' if footer else ''}not shown for want of width: {', '.join(hidden)} (see --json)"
        if footer:
            self.console.print(Text(footer, style="dim"))

    def _fitting(self, columns: Sequence[Column], cells: list[list[Text]]) -> list[int]:
        """The columns that fit the terminal: those that cannot drop, then the others, most important
        (lowest ``drop``) first, each if it still fits whole (text columns counted at their smallest)."""
        widths = [
            TEXT_MIN
            if column.kind == "text"
            else max([len(column.header), *(row[i].cell_len for row in cells)])
            for i, column in enumerate(columns)
        ]
        keep = [i for i, column in enumerate(columns) if not column.drop]
        for i in sorted(
            (i for i, column in enumerate(columns) if column.drop), key=lambda i: columns[i].drop
        ):
            if sum(widths[j] for j in [*keep, i]) + COLUMN_GAP * len(keep) <= self.console.width:
                keep.append(i)
        return sorted(keep)

    def _cell(self, value: Any, column: Column) -> Text:
        text = "-" if value is None or value == "" else str(value)
        if column.kind == "text":
            text = " ".join(text.split())  # one row per line
            if not self.terminal and len(text) > PREVIEW:
                text = text[: PREVIEW - 1] + "…"
            return Text(text, no_wrap=True, overflow="ellipsis")
        return Text(text)


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 exchange``, ``2 exchanges``: a number with its noun in the right number."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def add_output_options(parser: argparse.ArgumentParser) -> None:
    add_database_url_option(parser)
    parser.add_argument(
        "--json", action="store_true", help="JSON instead of a table (one object per line for lists)"
    )


# ----------------------------------------------------------------------------------------- database


def check_database(url: str) -> None:
    """Refuse, in one line, a database a read cannot use: a SQLite file that does not exist (a read
    must not create an empty one) and a schema that is missing or older than this version's."""
    from .. import migrate

    shown = _safe_url(url)
    path = missing_sqlite_file(url)
    if path is not None:
        raise CLIError(
            f"no database at {path}: the SQLite file does not exist (nothing recorded there yet?); "
            "give the right one with --database-url or QWEN_PERSIST_DATABASE_URL"
        )
    revision = migrate.current(url)
    fix = f"run: qwen-persist db upgrade --database-url {shown}"
    if revision is None:
        raise CLIError(f"database {shown} is not migrated (no qwen_persist tables); {fix}")
    known = [script.revision for script in migrate.history()]
    if revision in known and revision != known[-1]:
        raise CLIError(f"database {shown} is at revision {revision}, older than this version's; {fix}")


def run(args: argparse.Namespace, body: Body, flags: Mapping[str, str] | None = None) -> int:
    """Open the database the user named, check it, and run ``body`` with it and the output; database
    failures and bad parameters become one-line errors, a closed pipe a quiet exit. A bad parameter is
    named by its flag: ``--`` and its name, or what ``flags`` maps the name to (``{"limit": "--lines"}``)."""
    url = database_url(args)
    output = Output(getattr(args, "json", False))

    def action() -> int:
        check_database(url)
        history = History(url)
        try:
            return body(history, output)
        finally:
            history.close()

    try:
        status: int = _database_errors(url, action)
        return status
    except InvalidParameter as exc:
        flag = (flags or {}).get(exc.param) or "--" + exc.param.replace("_", "-")
        raise CLIError(f"{flag}: {exc.message}") from None
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


# ------------------------------------------------------------------------------------------ filters


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """The HTTP API's request filters, as flags."""
    parser.add_argument("--model", metavar="NAME", help="only this model (as the request named it)")
    parser.add_argument("--session", metavar="ID", help="only this session")
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only requests from then on: an ISO date or time (UTC unless it says), or a duration ago "
        "(90s, 15m, 2h, 7d, 2w)",
    )
    parser.add_argument(
        "--until", metavar="WHEN", help="only requests up to then (same spellings as --since)"
    )
    parser.add_argument(
        "--errors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only failed exchanges (an error or an error status); --no-errors: only the others",
    )
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only streamed requests; --no-stream: only the others",
    )
    parser.add_argument("--status", metavar="CODE", type=int, help="only responses with this HTTP status")


def when(value: str | None, now: int, param: str) -> int | None:
    """A ``--since``/``--until`` value as ms since the epoch (None when not given); the error for one
    that is neither a time nor a duration lists every spelling the flag takes."""
    if value is None:
        return None
    try:
        return parse_since(value, now, param)
    except InvalidParameter as exc:
        if "is not a time" not in exc.message:
            raise
        raise InvalidParameter(
            param,
            f"{value!r} is not a time: an ISO date or time (2026-11-24, 2026-11-24T10:00), milliseconds "
            "since the epoch, or a duration ago (90s, 15m, 2h, 7d, 2w)",
        ) from None


def request_filter(args: argparse.Namespace, now: int | None = None) -> RequestFilter:
    at = now_ms() if now is None else now
    return RequestFilter(
        session_id=args.session,
        model=args.model,
        stream=args.stream,
        since=when(args.since, at, "since"),
        until=when(args.until, at, "until"),
        has_error=args.errors,
        status_code=args.status,
    )


def add_limit_option(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "-n", "--limit", type=int, default=default, metavar="N", help=f"show N at most (default {default})"
    )
