"""Loading journal files into a database by hand (`qwen-persist replay FILE`), e.g. into another store.

The writer loads its journal back by itself; this is for moving files elsewhere. A file is a journal
segment (``journal-*.log``, checksummed: torn or corrupt records are skipped and counted) or a spill file
of earlier versions (JSON lines). Replay is the writer's own batch write, so it is idempotent: records
already stored count as duplicates, and a file can be replayed twice. A record the database rejects is
reported and the rest go on; a response whose request is in no file and no row is reported too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .journal import HEADER, decode_record
from .repositories.writes import Op, write_ops

log = logging.getLogger("qwen_persist")

BATCH = 500


@dataclass(slots=True)
class ReplayOutcome:
    written: int = 0
    duplicates: int = 0
    corrupt: int = 0  # torn or corrupt records skipped
    orphans: list[Op] = field(default_factory=list)  # responses whose request is in no file and no row
    rejected: list[tuple[Op, str]] = field(default_factory=list)  # records the database refused, why


def read_ops(path: Path, outcome: ReplayOutcome) -> Iterator[Op]:
    """The ops of a journal segment or an old spill file, in order."""
    with path.open("rb") as handle:
        first = handle.readline()
        if first == HEADER:
            for line in handle:
                op = decode_record(line)
                if op is None:
                    outcome.corrupt += 1
                else:
                    yield op
            return
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except ValueError:
                log.warning("qwen_persist: %s line %d is not a complete record; skipped", path, number)
                outcome.corrupt += 1
                continue
            if not isinstance(op, dict) or op.get("op") not in ("request", "response"):
                raise ValueError(f"{path} line {number} is not a qwen_persist journal or spill record")
            yield op


def _batches(ops: Iterable[Op]) -> Iterator[list[Op]]:
    iterator = iter(ops)
    while batch := list(islice(iterator, BATCH)):
        yield batch


def replay(engine: Engine, paths: Iterable[Path]) -> ReplayOutcome:
    """Write every op of the files, in order, one transaction per batch.

    A response can be journaled before its request (when the queue was full), so responses without a
    request are tried again at the end.
    """
    outcome = ReplayOutcome()
    renames: dict[str, str] = {}
    waiting: list[Op] = []
    for path in paths:
        for batch in _batches(read_ops(path, outcome)):
            waiting.extend(_write(engine, batch, renames, outcome))
    for batch in _batches(waiting):
        outcome.orphans.extend(_write(engine, batch, renames, outcome))
    return outcome


def _write(engine: Engine, batch: list[Op], renames: dict[str, str], outcome: ReplayOutcome) -> list[Op]:
    try:
        with engine.begin() as conn:
            result = write_ops(conn, batch, renames)
    except SQLAlchemyError as exc:
        if len(batch) == 1:
            outcome.rejected.append((batch[0], str(getattr(exc, "orig", None) or exc).splitlines()[0]))
            return []
        # Find the records at fault; store the rest.
        return [orphan for op in batch for orphan in _write(engine, [op], renames, outcome)]
    outcome.written += result.written
    outcome.duplicates += result.duplicates
    return result.orphans
