"""Loading spill files back into the database (`qwen-persist replay FILE`).

Spill files hold the writer's ops, so replay is the writer's own batch write; it is idempotent: ops
already stored are counted as duplicates and skipped, so a file can be replayed twice safely.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from sqlalchemy import Engine

from .repository import Op, write_ops
from .spill import read_spill

BATCH = 500


@dataclass(slots=True)
class ReplayOutcome:
    written: int = 0
    duplicates: int = 0
    orphans: list[Op] = field(default_factory=list)  # responses whose request is in no file and no row


def _batches(ops: Iterable[Op]) -> Iterator[list[Op]]:
    iterator = iter(ops)
    while batch := list(islice(iterator, BATCH)):
        yield batch


def replay(engine: Engine, paths: Iterable[Path]) -> ReplayOutcome:
    """Write every op of the spill files, in order, one transaction per batch.

    A response can be spilled before its request (the request path spills when the queue is full while
    the writer still holds the request), so responses without a request are tried again at the end.
    """
    outcome = ReplayOutcome()
    renames: dict[str, str] = {}
    waiting: list[Op] = []
    for path in paths:
        for batch in _batches(read_spill(path)):
            waiting.extend(_write(engine, batch, renames, outcome))
    for batch in _batches(waiting):
        outcome.orphans.extend(_write(engine, batch, renames, outcome))
    return outcome


def _write(engine: Engine, batch: list[Op], renames: dict[str, str], outcome: ReplayOutcome) -> list[Op]:
    with engine.begin() as conn:
        result = write_ops(conn, batch, renames)
    outcome.written += result.written
    outcome.duplicates += result.duplicates
    return result.orphans
