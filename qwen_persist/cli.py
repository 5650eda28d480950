"""The ``qwen-persist`` command line.

Each command group is a function that adds its subparsers and sets ``handler`` on them; ``build_parser``
registers the groups. A handler returns the exit status and raises :class:`CLIError` for anything the
user should read as a message rather than a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from qwen_persist import demo
from qwen_persist.engine import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, normalize_url, resolve_database_url

Handler = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """An error reported to the user as one line on stderr, with exit status 1."""


def add_database_url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help=f"SQLAlchemy database URL (default: ${DATABASE_URL_ENV}, else {DEFAULT_DATABASE_URL})",
    )


def database_url(args: argparse.Namespace) -> str:
    """The URL the user asked for, validated, so a typo is reported before any connection is tried."""
    url = resolve_database_url(args.database_url)
    try:
        normalize_url(url)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return url


def _safe_url(url: str) -> str:
    return normalize_url(url).render_as_string(hide_password=True)


def _database_errors(url: str, action: Callable[[], Any]) -> Any:
    """Run ``action``, turning driver, connection and migration failures into one-line messages."""
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    try:
        return action()
    except ImportError as exc:
        hint = "for PostgreSQL: pip install 'qwen-persist[postgres]'"
        raise CLIError(f"no database driver for {_safe_url(url)} ({exc}); {hint}") from None
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        raise CLIError(f"database {_safe_url(url)}: {reason}") from None
    except SQLAlchemyError as exc:
        raise CLIError(f"database {_safe_url(url)}: {exc}") from None
    except CommandError as exc:
        raise CLIError(str(exc)) from None


# ------------------------------------------------------------------------------------------------ db


def _db_upgrade(args: argparse.Namespace) -> int:
    from qwen_persist import migrate

    url = database_url(args)
    before = _database_errors(url, lambda: migrate.current(url))
    _database_errors(url, lambda: migrate.upgrade(url, args.revision))
    after = _database_errors(url, lambda: migrate.current(url))
    if before == after:
        print(f"{_safe_url(url)}: already at {after}")
    else:
        print(f"{_safe_url(url)}: upgraded from {before or 'an empty schema'} to {after}")
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    from qwen_persist import migrate

    url = database_url(args)
    before = _database_errors(url, lambda: migrate.current(url))
    _database_errors(url, lambda: migrate.downgrade(url, args.revision))
    after = _database_errors(url, lambda: migrate.current(url))
    print(f"{_safe_url(url)}: downgraded from {before} to {after or 'base'}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    from qwen_persist import migrate

    url = database_url(args)
    revision = _database_errors(url, lambda: migrate.current(url))
    if revision is None:
        print("none (not migrated)")
    else:
        print(f"{revision} (head)" if revision == migrate.head() else revision)
    return 0


def _db_history(args: argparse.Namespace) -> int:
    from qwen_persist import migrate

    # Only a database named explicitly is consulted: the default URL would create an empty file.
    at = None
    if args.database_url or os.environ.get(DATABASE_URL_ENV):
        url = database_url(args)
        at = _database_errors(url, lambda: migrate.current(url))
    for script in migrate.history():
        marks = "".join(
            mark
            for mark, present in ((" (head)", script.is_head), (" (current)", script.revision == at))
            if present
        )
        print(f"{script.down_revision or '<base>'} -> {script.revision}{marks}, {script.doc}")
    return 0


def add_db_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = commands.add_parser("db", help="manage the database schema (Alembic migrations)")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")

    upgrade = actions.add_parser("upgrade", help="upgrade the schema (creates it in an empty database)")
    upgrade.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    add_database_url_option(upgrade)
    upgrade.set_defaults(handler=_db_upgrade)

    downgrade = actions.add_parser("downgrade", help="downgrade the schema to REVISION ('base': remove it)")
    downgrade.add_argument("revision", help="target revision, e.g. base or 0002_split_tables")
    add_database_url_option(downgrade)
    downgrade.set_defaults(handler=_db_downgrade)

    current = actions.add_parser("current", help="show the database's revision")
    add_database_url_option(current)
    current.set_defaults(handler=_db_current)

    history = actions.add_parser("history", help="list the revisions, oldest first")
    add_database_url_option(history)
    history.set_defaults(handler=_db_history)


# -------------------------------------------------------------------------------------------- replay


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen_persist.engine import make_engine
    from qwen_persist.replay import replay

    url = database_url(args)
    paths = [Path(name) for name in args.files]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise CLIError(f"no such file: {', '.join(missing)}")
    engine = _database_errors(url, lambda: make_engine(url))
    try:
        outcome = _database_errors(url, lambda: replay(engine, paths))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    finally:
        engine.dispose()
    print(
        f"{_safe_url(url)}: {outcome.written} records written, "
        f"{outcome.duplicates} already stored, {len(outcome.orphans)} responses without a request, "
        f"{len(outcome.rejected)} rejected, {outcome.corrupt} corrupt skipped"
    )
    for op in outcome.orphans:
        print(f"  no request row for response of request_id {op['request_id']}", file=sys.stderr)
    for op, error in outcome.rejected:
        print(
            f"  rejected {op['op']} {op.get('request_id') or op['request']['request_id']}: {error}",
            file=sys.stderr,
        )
    return 1 if outcome.orphans or outcome.rejected else 0


def add_replay_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="load journal files into a database, e.g. another store (idempotent: stored records are "
        "skipped; the middleware loads its own journal by itself)",
    )
    replay.add_argument(
        "files", nargs="+", metavar="FILE", help="journal segments (journal-*.log) or older spill files"
    )
    add_database_url_option(replay)
    replay.set_defaults(handler=_replay)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-persist", description="Record and inspect OpenAI-compatible chat completion traffic."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Imported here: the commands import this module's helpers.
    from qwen_persist.commands import add_read_commands

    add_read_commands(commands)
    add_db_commands(commands)
    add_replay_command(commands)
    demo.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CLIError as exc:
        print(f"qwen-persist: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m qwen_persist.cli` runs this file as __main__; the commands import qwen_persist.cli, so
    # main must be that module's for the two to share one CLIError.
    from qwen_persist import cli

    sys.exit(cli.main())
