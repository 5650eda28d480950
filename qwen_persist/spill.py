"""The spill file: an append-only JSON-lines file of ops the database could not take in time.

One file per process and writer, created only when something spills. Each line is one op (see
`repository.py`); `qwen-persist replay FILE` writes them to the database idempotently.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from .repository import Op

log = logging.getLogger("qwen_persist")


class SpillFile:
    """Appends ops durably (flushed and fsynced per call); safe to call from any thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def append(self, ops: Iterable[Op]) -> int:
        lines = [json.dumps(op, ensure_ascii=False, separators=(",", ":"), default=str) + "\n" for op in ops]
        if not lines:
            return 0
        with self._lock:
            if self._file is None:
                # Owner-only: the records hold whole conversations.
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                name = f"spill-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{id(self):x}.jsonl"
                self.path = self.directory / name
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._file = os.fdopen(descriptor, "a", encoding="utf-8")
                log.warning(
                    "qwen_persist: spilling records to %s (replay with: qwen-persist replay FILE)", self.path
                )
            self._file.writelines(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
        return len(lines)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_spill(path: Path) -> Iterator[Op]:
    """The ops in a spill file, in order. A torn last line (a crash mid-append) is skipped with a warning."""
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)
            except ValueError:
                log.warning("qwen_persist: %s line %d is not a complete record; skipped", path, number)
                continue
            if not isinstance(op, dict) or op.get("op") not in ("request", "response"):
                raise ValueError(f"{path} line {number} is not a qwen_persist spill record")
            yield op
