"""``qwen-persist cleanup``: delete expired sessions, or history older than a duration, in batches.

What goes (see `repositories.pruning`): with ``--expired``, the sessions whose expiry has passed with all
their exchanges; with ``--older-than``, the exchanges whose request is older than that, then the
sessions left without any request once they have expired. A request still waiting for its response is
kept for a day whatever the cutoff. Each batch is one short transaction, with a pause after it, so a
proxy writing to the same database waits milliseconds at most.
"""

from __future__ import annotations

import argparse

from ..repositories import History, PruneCounts, parse_duration
from ..retention import describe
from ..sessions import now_ms
from ..transcript import clock
from .base import Output, add_output_options, count, run

PAUSE = 0.01  # seconds between two batches: the writer's turn


def _cleanup(args: argparse.Namespace) -> int:
    def body(history: History, out: Output) -> int:
        now = now_ms()
        pruning = history.pruning
        cutoff = None
        if args.older_than is not None:
            age = parse_duration(args.older_than, "older_than")
            cutoff = now - age
            what = f"history older than {describe(age)} (before {clock(cutoff)} UTC)"
            if args.dry_run:
                counts = pruning.count_older_than(cutoff, now=now)
            else:
                counts = pruning.delete_older_than(cutoff, batch_size=args.batch_size, pause=PAUSE, now=now)
        else:
            what = "expired sessions and their history"
            if args.dry_run:
                counts = pruning.count_expired(now=now)
            else:
                counts = pruning.delete_expired(batch_size=args.batch_size, pause=PAUSE, now=now)
        if out.as_json:
            out.json_line(
                {
                    "dry_run": args.dry_run,
                    "expired": args.expired,
                    "older_than": args.older_than,
                    "cutoff": cutoff,
                    **counts.to_dict(),
                }
            )
        else:
            out.line(f"{'would delete' if args.dry_run else 'deleted'} {_counts(counts)}: {what}")
        return 0

    return run(args, body)


def _counts(counts: PruneCounts) -> str:
    return ", ".join(
        count(number, noun)
        for number, noun in (
            (counts.requests, "request"),
            (counts.responses, "response"),
            (counts.sessions, "session"),
        )
    )


def _batch_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 1 <= size <= 10_000:
        raise argparse.ArgumentTypeError(f"between 1 and 10000, got {size}")
    return size


def add_cleanup_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cleanup = commands.add_parser(
        "cleanup",
        help="delete expired sessions, or history older than a duration, in short batches",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = cleanup.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--expired", action="store_true", help="sessions whose expiry has passed, with their history"
    )
    which.add_argument(
        "--older-than", metavar="DURATION", help="exchanges older than DURATION (e.g. 30d, 12h, 2w)"
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    cleanup.add_argument(
        "--batch-size", type=_batch_size, default=500, metavar="N", help="rows per transaction (default 500)"
    )
    add_output_options(cleanup)
    cleanup.set_defaults(handler=_cleanup)
