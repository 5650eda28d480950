"""The background writer: takes captured exchanges off the request path and stores them in batches.

A bounded queue feeds one thread. The thread rebuilds each exchange (`records.py`) and writes a batch
in one transaction (`repository.py`). While the database is down or locked the batch is retried with
backoff and new records wait in the queue; when the queue is full, records go to the spill file
instead. Nothing is dropped silently: every record is counted as written, spilled or failed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .config import Settings
from .gil import yield_gil
from .records import (
    CapturedRequest,
    CapturedResponse,
    RequestFacts,
    StreamHandoff,
    fallback_op,
    request_op,
    response_op,
)
from .redaction import Redaction
from .repository import Op, write_ops
from .spill import SpillFile

log = logging.getLogger("qwen_persist")

Record = CapturedRequest | CapturedResponse
MAX_BACKOFF = 5.0
SPILL_LOG_INTERVAL = 10.0  # seconds between "records spilled" warnings of one kind
# PostgreSQL "undefined_table": the schema is not migrated yet; like a locked SQLite file, it can heal.
_TRANSIENT_SQLSTATES = {"42P01"}


@dataclass(frozen=True, slots=True)
class WriterStats:
    accepted: int  # records handed to the writer
    written: int  # records stored in the database
    spilled: int  # records written to the spill file instead
    failed: int  # records the database rejected (kept in the spill file)
    duplicates: int  # records found already stored (replays)
    retries: int  # batch attempts that failed and were retried
    queue_depth: int
    restarts: int = 0  # times the writer thread was found stopped and started again


class _Barrier:
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()


_STOP = object()


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt can get past: connection loss, locks, a schema not yet migrated."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES
    return False


class Writer:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._spill = SpillFile(settings.spill_dir)
        self._wakeup = threading.Event()
        self._abandon = threading.Event()  # shutdown timed out: spill instead of retrying
        self._start_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._atexit_registered = False
        self._requests: dict[str, RequestFacts] = {}  # request_id -> facts, until its response comes
        self._renames: dict[str, str] = {}
        self._spill_logged: dict[str, float] = {}
        self._accepted = self._written = self._spilled = self._failed = 0
        self._duplicates = self._retries = self._restarts = 0
        self._upgraded = not settings.auto_upgrade
        self._released = False  # the engine's connections closed by close(), until the next start
        self._redaction = Redaction(settings.redact_fields, settings.redact)
        self._limit = settings.max_body_bytes

    # -- the request path ------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a record over without blocking; spill it if the queue is full."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._restart(thread)
        self._accepted += 1  # only the event loop thread submits
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._spill_ops(self._to_ops([record]), reason="queue full")

    def feed_stream(self, handoff: StreamHandoff) -> None:
        """Ask the writer thread to rebuild what a large stream has passed so far (skipped if the queue
        is full: the next request, or the response record itself, does it)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(handoff)

    async def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before now is stored (or spilled). False on timeout."""
        if self._thread is None:
            return True
        marker = _Barrier()
        try:
            self._queue.put_nowait(marker)
        except queue.Full:
            return False
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.wrap_future(marker.future), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------------

    def _restart(self, dead: threading.Thread | None) -> None:
        if dead is not None:
            # Not expected (every error is caught per batch), but a writer that stopped must never
            # stay stopped: the next record starts it again.
            log.error("qwen_persist: the writer thread had stopped; starting it again")
            with self._counter_lock:
                self._restarts += 1
        self.start()

    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._abandon.clear()
            self._released = False
            self._thread = threading.Thread(target=self._run, name="qwen-persist-writer", daemon=True)
            self._thread.start()
            if not self._atexit_registered:
                # The thread is a daemon so it never blocks interpreter exit; this flush is what
                # saves the queue when the host app has no lifespan shutdown.
                atexit.register(self.close)
                self._atexit_registered = True

    def close(self, timeout: float | None = None) -> WriterStats:
        """Store everything queued, then stop. After ``timeout`` seconds (default: the
        ``shutdown_timeout`` option), spill what is left."""
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        thread = self._thread
        if thread is not None and thread.is_alive():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        self._abandon.set()
            self._wakeup.set()
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self._abandon.set()
                self._wakeup.set()
                thread.join()
        self._thread = None
        self._spill.close()
        if not self._released:
            self._release_database()
        stats = self.stats()
        log.info(
            "qwen_persist writer stopped: accepted=%d written=%d spilled=%d failed=%d duplicates=%d",
            stats.accepted,
            stats.written,
            stats.spilled,
            stats.failed,
            stats.duplicates,
        )
        return stats

    def _release_database(self) -> None:
        """Close the pool's connections. On SQLite, first fold the write-ahead log into the database
        file, so that a copy of the ``.db`` file alone (a backup, a volume snapshot) holds every row."""
        if self.engine.dialect.name == "sqlite":
            try:
                with self.engine.connect() as conn:
                    # Short: a shutdown must not wait out another process's long transaction.
                    conn.exec_driver_sql("PRAGMA busy_timeout=500")
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            except SQLAlchemyError as exc:
                log.warning("qwen_persist: could not checkpoint the SQLite WAL at shutdown: %s", _short(exc))
        self.engine.dispose()
        self._released = True

    async def aclose(self, timeout: float | None = None) -> WriterStats:
        return await asyncio.to_thread(self.close, timeout)

    def stats(self) -> WriterStats:
        return WriterStats(
            accepted=self._accepted,
            written=self._written,
            spilled=self._spilled,
            failed=self._failed,
            duplicates=self._duplicates,
            retries=self._retries,
            queue_depth=self._queue.qsize(),
            restarts=self._restarts,
        )

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            items = [first]
            if (
                first is not _STOP
                and not isinstance(first, _Barrier)
                and self._queue.qsize() < self.settings.batch_size - 1
            ):
                # Let a batch gather: one wake-up per interval, not per record, keeps the GIL with
                # the event loop. A barrier or shutdown cuts the wait short, and so does a full batch
                # already waiting (under load, sleeping would cap throughput at batch_size/interval).
                self._wakeup.wait(self.settings.flush_interval)
            self._wakeup.clear()
            while len(items) < self.settings.batch_size:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = any(item is _STOP for item in items)
            try:
                self._handle(items)
            finally:
                for item in items:
                    # The app may have given up on its barrier (a cancelled wait): never complete a
                    # cancelled future, which raises and would end this thread.
                    if isinstance(item, _Barrier) and item.future.set_running_or_notify_cancel():
                        item.future.set_result(None)

    def _handle(self, items: list[Any]) -> None:
        records: list[Record] = []
        ops: list[Op] = []
        try:
            for item in items:
                if isinstance(item, StreamHandoff):
                    item.drain()
                elif isinstance(item, CapturedRequest | CapturedResponse):
                    records.append(item)
            ops = self._to_ops(records)
            self._write(ops)
        except Exception:  # never let the thread die: a dead writer would lose everything after
            log.exception("qwen_persist writer: unexpected error; records spilled")
            self._spill_ops(ops or self._to_ops(records), reason="writer error")

    def _to_ops(self, records: list[Record]) -> list[Op]:
        ops: list[Op] = []
        for record in records:
            yield_gil()
            try:
                if isinstance(record, CapturedRequest):
                    op, facts = request_op(
                        record,
                        ttl_ms=self.settings.session_ttl_ms,
                        redaction=self._redaction,
                        limit=self._limit,
                    )
                    self._requests[record.request_id] = facts
                else:
                    record.request = self._requests.pop(record.request_id, None)
                    op = response_op(record, redaction=self._redaction, limit=self._limit)
            except Exception as exc:
                # A redaction hook that raised, or input no rule foresaw: the record is still stored,
                # with its content withheld (the hook never saw it) and the reason in its error.
                log.exception(
                    "qwen_persist: could not prepare record %s; stored without content", record.request_id
                )
                op = fallback_op(record, exc, ttl_ms=self.settings.session_ttl_ms)
            ops.append(op)
        return ops

    def _write(self, ops: list[Op]) -> None:
        if not ops:
            return
        attempt = 0
        while True:
            try:
                self._ensure_schema()
                with self.engine.begin() as conn:
                    outcome = write_ops(conn, ops, self._renames)
            except SQLAlchemyError as exc:
                if not is_transient(exc):
                    self._write_one_by_one(ops, exc)
                    return
                if self._abandon.is_set():
                    self._spill_ops(ops, reason=f"database unavailable at shutdown: {exc.__class__.__name__}")
                    return
                attempt += 1
                with self._counter_lock:
                    self._retries += 1
                delay = min(MAX_BACKOFF, 0.05 * 2**attempt)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "qwen_persist: database unavailable (%s); %d records waiting, retry %d in %.2fs",
                        _short(exc),
                        len(ops) + self._queue.qsize(),
                        attempt,
                        delay,
                    )
                self._abandon.wait(delay)
                continue
            if attempt:
                log.warning("qwen_persist: database available again after %d retries", attempt)
            with self._counter_lock:
                self._written += outcome.written
                self._duplicates += outcome.duplicates
            if outcome.orphans:
                self._spill_ops(outcome.orphans, reason="response without a stored request")
            return

    def _write_one_by_one(self, ops: list[Op], cause: SQLAlchemyError) -> None:
        """A batch the database rejected: find the records at fault, store the rest."""
        if len(ops) == 1:
            log.error(
                "qwen_persist: the database rejected a record (%s); kept in the spill file", _short(cause)
            )
            with self._counter_lock:
                self._failed += 1
            self._spill_ops(ops, reason="rejected by the database")
            return
        for op in ops:
            self._write([op])

    def _ensure_schema(self) -> None:
        if self._upgraded:
            return
        from .migrate import upgrade

        upgrade(self.settings.database_url)
        self._upgraded = True

    def _spill_ops(self, ops: list[Op], *, reason: str) -> None:
        try:
            count = self._spill.append(ops)
        except OSError:
            log.exception("qwen_persist: could not spill %d records (%s): they are lost", len(ops), reason)
            with self._counter_lock:
                self._failed += len(ops)
            return
        with self._counter_lock:
            self._spilled += count
            now = time.monotonic()
            # One line per reason and interval: a full queue spills every record, and a log line per
            # record would cost the event loop more than the spill itself.
            if now - self._spill_logged.get(reason, -SPILL_LOG_INTERVAL) < SPILL_LOG_INTERVAL:
                return
            self._spill_logged[reason] = now
        log.warning("qwen_persist: records spilled (%s); %d spilled in all so far", reason, self._spilled)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"
