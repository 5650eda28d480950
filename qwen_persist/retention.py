"""The ``retention`` option: history older than a set age is deleted in the background.

A daemon thread of its own, started with the writer and stopped at shutdown, runs a pass shortly after
start-up and then every `INTERVAL` seconds. A pass deletes the exchanges whose request is older than the
retention, `BATCH_SIZE` at a time with a `PAUSE` between batches (`PruningRepository.delete_older_than`:
responses with their requests, then the sessions left empty and expired), so the writer never waits
long for the database. Nothing it does reaches the request path: a pass that fails is logged and the
next one tries again.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import Engine

from .repositories.pruning import PruneCounts, PruningRepository
from .sessions import now_ms

log = logging.getLogger("qwen_persist")

FIRST_PASS = 10.0  # seconds after start-up: out of the way of start-up itself (and of auto_upgrade)
INTERVAL = 300.0  # seconds between passes
BATCH_SIZE = 200  # exchanges (or sessions) per transaction
PAUSE = 0.05  # seconds between two transactions, for the writer's batches
STOP_TIMEOUT = 5.0  # seconds `stop` waits for a batch in progress


def describe(ms: int) -> str:
    """A retention as people say it: ``30d``, ``12h``, ``90m``."""
    for unit, size in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return str(timedelta(milliseconds=ms))


class Retention:
    """Deletes history older than ``retention_ms`` from time to time, off the request path."""

    def __init__(self, engine: Engine, retention_ms: int) -> None:
        self.retention_ms = retention_ms
        self.repository = PruningRepository(engine)
        self.deleted = PruneCounts()  # everything this instance has deleted
        self.passes = 0  # passes completed (whether or not they found anything)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background passes (again after `stop`); a no-op while they run."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="qwen-persist-retention", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop between two batches; waits up to ``timeout`` seconds for the batch in progress."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def prune(self) -> PruneCounts:
        """One pass now, in the calling thread: delete what is older than the retention."""
        counts = self.repository.delete_older_than(
            now_ms() - self.retention_ms, batch_size=BATCH_SIZE, pause=PAUSE, stop=self._stop
        )
        with self._lock:
            self.deleted += counts
            self.passes += 1
        if counts.total:
            log.info(
                "qwen_persist: retention (%s) deleted %d requests, %d responses and %d sessions",
                describe(self.retention_ms),
                counts.requests,
                counts.responses,
                counts.sessions,
            )
        return counts

    def _run(self) -> None:
        wait = FIRST_PASS
        while not self._stop.wait(wait):
            wait = INTERVAL
            try:
                self.prune()
            except Exception as exc:  # the next pass tries again; nothing here may stop the thread
                log.warning(
                    "qwen_persist: retention pass failed (next in %.0f s): %s: %s",
                    INTERVAL,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
