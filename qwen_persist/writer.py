"""The background writer: takes captured exchanges off the request path and stores them in batches.

A bounded queue feeds one thread. The thread rebuilds each exchange (`records.py`) and writes a batch in
one transaction (`repositories/writes.py`). What the database cannot take promptly goes to the journal
(`journal.py`, in ``spill_dir``), an append-only, checksummed on-disk buffer fsynced once per batch:

* **Outage.** A batch that fails with a transient error (connection refused or lost, a lock, a timeout,
  the schema not migrated yet) is journaled at once, and until the database answers again every batch
  is journaled instead of held in memory, so a kill during an outage loses at most the batch being
  gathered. The database is probed with backoff (up to `MAX_BACKOFF`).
* **Recovery.** Whenever the journal holds anything (this process's outage, or segments an earlier
  process or a crash left behind, found at start-up) and the database answers, the writer loads it back
  in order, a slice at a time between live batches. Loading is idempotent (capture ids), so a segment
  read twice after a crash stores nothing twice. A record the database rejects for good goes to a
  dead-letter file with its error; the rest go on.
* **Shutdown** is bounded by ``shutdown_timeout``: what is not stored by then (the queue, and a batch
  stuck in a hung database call) is journaled by the closing thread, and the next start-up stores it.

Nothing is dropped silently: every record is counted as written, journaled (and later written), or
failed, and the thread restarts itself if it ever stops.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .config import Settings
from .engine import SQLITE_BUSY_TIMEOUT_MS
from .gil import yield_gil
from .journal import Journal, JournalFull, Segment
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
from .repositories.writes import Op, write_ops

log = logging.getLogger("qwen_persist")

Record = CapturedRequest | CapturedResponse
MAX_BACKOFF = 5.0
LOG_INTERVAL = 10.0  # seconds between warnings of one kind
WRITER_SQLITE_BUSY_MS = 250  # how long a batch waits for another process's lock on a SQLite file
IDLE_CHECK = 1.0  # seconds between looks at the journal while no record arrives
RECOVERY_SLICE = 4  # journal batches loaded between two live batches, so live records never wait long
ORPHAN_TIMEOUT = 60.0  # seconds a response waits for its request before it is set aside
# PostgreSQL "undefined_table": the schema is not migrated yet; like a locked SQLite file, it can heal.
_TRANSIENT_SQLSTATES = {"42P01"}


@dataclass(frozen=True, slots=True)
class WriterStats:
    accepted: int  # records handed to the writer
    written: int  # records stored in the database (directly or from the journal)
    spilled: int  # records put in the journal, to be stored later
    failed: int  # records set aside in a dead-letter file, or lost (the journal full or unwritable)
    duplicates: int  # records found already stored (a journal read twice, a replay)
    retries: int  # times the database was found unavailable (an outage began, or a probe failed)
    queue_depth: int
    restarts: int = 0  # times the writer thread was found stopped and started again
    replayed: int = 0  # records loaded back from the journal (stored now, or found stored)
    buffered_bytes: int = 0  # bytes of journal in spill_dir, as this writer last saw it
    corrupt: int = 0  # torn or corrupt journal records skipped


class _Barrier:
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()


_STOP = object()


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt can get past: connection loss, locks, timeouts, a schema not yet
    migrated."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES
    return False


NOT_MIGRATED_HINT = (
    "; the tables are missing: run `qwen-persist db upgrade` (or `alembic upgrade head`) for this "
    "database, or pass auto_upgrade=True"
)


def missing_schema(exc: BaseException) -> bool:
    """Whether ``exc`` says the tables do not exist (a database that was never migrated)."""
    if not isinstance(exc, DBAPIError):
        return False
    return getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in str(exc.orig)


def _check_tables(conn: Connection) -> None:
    """Raise unless the three tables are there: a database that answers but was never migrated is still
    unavailable to the writer, and probing it as available would retry every few milliseconds."""
    for table in ("sessions", "requests", "responses"):
        conn.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 0")


class _Unavailable(Exception):
    """The database cannot take a batch now (the transient error is the cause)."""


class Writer:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._journal_lock = threading.Lock()
        self._journal: Journal | None = None  # opened on first use, in the process that uses it
        self._wakeup = threading.Event()
        self._abandon = threading.Event()  # shutdown timed out: journal instead of writing
        self._start_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._atexit_registered = False
        self._requests: dict[str, RequestFacts] = {}  # request_id -> facts, until its response comes
        self._renames: dict[str, str] = {}
        self._logged: dict[str, float] = {}
        self._inflight: list[Op] = []  # the batch being stored: journaled by close() if it hangs
        self._outage = False
        self._attempts = 0
        self._next_probe = 0.0
        self._orphans: list[Op] = []  # responses whose request is not stored yet
        self._segments: list[Segment] = []  # journal segments claimed and being loaded, oldest first
        self._reader: Iterator[Op] | None = None  # the first segment's records still to load
        self._carry: list[Op] = []  # a journal batch read and not stored yet
        self._accepted = self._written = self._spilled = self._failed = 0
        self._duplicates = self._retries = self._restarts = self._replayed = 0
        self._upgraded = not settings.auto_upgrade
        self._released = False  # the engine's connections closed by close(), until the next start
        self._redaction = Redaction(settings.redact_fields, settings.redact)
        self._limit = settings.max_body_bytes

    # -- the request path ------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a record over without blocking."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._restart(thread)
        self._accepted += 1  # only the event loop thread submits
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            # The writer is far behind (a database call hanging past its timeouts, or no CPU to
            # spare): rather than hold more in memory, this record goes to the journal from here.
            self._journal_ops(self._to_ops([record]), reason="queue full")

    def feed_stream(self, handoff: StreamHandoff) -> None:
        """Ask the writer thread to rebuild what a large stream has passed so far (skipped if the queue
        is full: the next request, or the response record itself, does it)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(handoff)

    async def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before now is stored (or journaled). False on timeout."""
        if self._thread is None:
            return True
        future = self.mark()
        if future is None:
            return False
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def mark(self) -> concurrent.futures.Future[None] | None:
        """A future done once everything submitted before now is stored (or journaled); None if the
        queue is full."""
        marker = _Barrier()
        try:
            self._queue.put_nowait(marker)
        except queue.Full:
            return None
        self._wakeup.set()
        return marker.future

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
        """Store everything queued, then stop, within ``timeout`` seconds (default: the
        ``shutdown_timeout`` option); what is not stored by then is in the journal when this returns."""
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is None and self._released:
            return self.stats()  # closed already (the lifespan shutdown, then interpreter exit)
        if thread is not None and thread.is_alive():
            with contextlib.suppress(queue.Full):  # a full queue is journaled below
                self._queue.put_nowait(_STOP)
            self._wakeup.set()
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # The database is slow or hangs: stop writing, and journal what is left from here.
                self._abandon.set()
                self._wakeup.set()
                self._evacuate()
                thread.join(0.2)  # it may be done with what it held; if it hangs, it is a daemon
        self._thread = None
        if thread is None:
            self._release_segments()  # driven from outside (the writer process): nothing else will
        with self._journal_lock:
            if self._journal is not None:
                self._journal.close()
        if not self._released and (thread is None or not thread.is_alive()):
            self._release_database()
        stats = self.stats()
        log_stopped(stats)
        return stats

    def _evacuate(self) -> None:
        """Journal the batch the writer thread is stuck on and everything still queued. Either may also
        reach the database later, if the thread gets through: loading is idempotent."""
        ops = list(self._inflight)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Barrier):
                _complete(item)
            elif isinstance(item, CapturedRequest | CapturedResponse):
                ops.extend(self._to_ops([item]))
        self._journal_ops(ops, reason="database unavailable at shutdown")

    def _release_database(self) -> None:
        """Close the pool's connections. On SQLite, first fold the write-ahead log into the database
        file, so that a copy of the ``.db`` file alone (a backup, a volume snapshot) holds every row."""
        self.engine.dispose()
        self._released = True
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database:
            try:
                # A connection of its own, without the engine's 5 s busy timeout: a shutdown must not
                # wait out another process's long transaction (the checkpoint is then left to SQLite).
                uri = f"file:{urllib.parse.quote(database)}?mode=rw"  # never create a missing file
                with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=0.5)) as conn:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("qwen_persist: could not checkpoint the SQLite WAL at shutdown: %s", exc)

    async def aclose(self, timeout: float | None = None) -> WriterStats:
        return await asyncio.to_thread(self.close, timeout)

    def stats(self) -> WriterStats:
        journal = self._journal
        return WriterStats(
            accepted=self._accepted,
            written=self._written,
            spilled=self._spilled,
            failed=self._failed,
            duplicates=self._duplicates,
            retries=self._retries,
            queue_depth=self._queue.qsize(),
            restarts=self._restarts,
            replayed=self._replayed,
            buffered_bytes=journal.size if journal is not None else 0,
            corrupt=journal.corrupt if journal is not None else 0,
        )

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = self._gather()
            stopping = any(item is _STOP for item in items)
            try:
                self.process(items, stopping=stopping)
            finally:
                for item in items:
                    if isinstance(item, _Barrier):
                        _complete(item)
        self._release_segments()

    def process(self, items: list[Any], *, stopping: bool = False) -> None:
        """One turn of the writer: store (or journal) ``items``, then load a slice of the journal (all of
        it when ``stopping``). The thread's loop, and the writer process's (`writer_process.py`)."""
        try:
            self._handle(items)
            self._park_orphans()
            if not self._abandon.is_set():
                self._recover(everything=stopping)
        except Exception:  # never let the writer die: a dead writer would lose everything after
            log.exception("qwen_persist writer: unexpected error")

    def journal_records(self, records: list[Record], *, reason: str) -> None:
        """Put ``records`` straight into the journal (the writer process's feeder, when it is behind),
        and release the segment so that another process (the writer process) can load it now."""
        self._journal_ops(self._to_ops(records), reason=reason)
        with self._journal_lock:
            if self._journal is not None:
                self._journal.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def idle_wait(self) -> float:
        """Seconds the writer may wait for records before it should look at the journal again."""
        return self._idle_wait()

    def _gather(self) -> list[Any]:
        """The next batch: wait for a record, then let a batch gather for one flush interval (one
        wake-up per interval, not per record, keeps the GIL with the event loop)."""
        try:
            first = self._queue.get(timeout=self._idle_wait())
        except queue.Empty:
            return []
        items = [first]
        if (
            first is not _STOP
            and not isinstance(first, _Barrier)
            and self._queue.qsize() < self.settings.batch_size - 1
        ):
            # A barrier or shutdown cuts the wait short, and so does a full batch already waiting
            # (under load, sleeping would cap throughput at batch_size/interval).
            self._wakeup.wait(self.settings.flush_interval)
        self._wakeup.clear()
        while len(items) < self.settings.batch_size:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _idle_wait(self) -> float:
        if self._outage:
            return max(0.01, self._next_probe - time.monotonic())
        return IDLE_CHECK

    def _handle(self, items: list[Any]) -> None:
        records: list[Record] = []
        for item in items:
            if isinstance(item, StreamHandoff):
                item.drain()
            elif isinstance(item, CapturedRequest | CapturedResponse):
                records.append(item)
        ops = self._to_ops(records)
        if not ops:
            return
        self._inflight = ops
        try:
            if self._outage or self._abandon.is_set():
                self._journal_ops(ops, reason="database unavailable")
                return
            try:
                self._store(ops)
            except _Unavailable as exc:
                self._begin_outage(exc.__cause__)
                self._journal_ops(ops, reason="database unavailable")
        finally:
            self._inflight = []

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

    # -- the database ----------------------------------------------------------------------------

    def _store(self, ops: list[Op], *, again: bool = False) -> None:
        """One attempt to store ``ops``. Raises `_Unavailable` when the database cannot take them now;
        records it rejects for good are set aside one by one, and the rest stored."""
        try:
            self._ensure_schema()
        except Exception as exc:  # a migration that cannot run now (the database down, a lock)
            raise _Unavailable from exc
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "sqlite":
                    # Another process holding the file is an outage to journal through, not a reason to
                    # hold a batch in memory for the pool's whole busy timeout (the connection goes
                    # back to the pool with it restored).
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={WRITER_SQLITE_BUSY_MS}")
                try:
                    outcome = write_ops(conn, ops, self._renames)
                finally:
                    if conn.dialect.name == "sqlite":
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        except Exception as exc:
            if isinstance(exc, SQLAlchemyError) and is_transient(exc):
                raise _Unavailable from exc
            if isinstance(exc, IntegrityError) and not again:
                # Another writer (a replica) stored the same request id between this batch's reads and
                # its inserts. Read again, once: the batch then sees that row and files its own under a
                # fresh id. Only a rejection that repeats is the record's fault.
                self._store(ops, again=True)
                return
            # Rejected by the database, or a value no rule foresaw: find the records at fault and
            # set them aside, store the rest.
            if len(ops) == 1:
                log.error("qwen_persist: a record could not be stored (%s); set aside", _short(exc))
                self._dead_letter(ops[0], _short(exc))
                return
            for op in ops:
                self._store([op], again=again)
            return
        with self._counter_lock:
            self._written += outcome.written
            self._duplicates += outcome.duplicates
        # A response whose request is not stored yet (it is in the journal, or still queued): it is
        # kept for the next recovery pass.
        self._orphans.extend(outcome.orphans)

    def _ensure_schema(self) -> None:
        if self._upgraded:
            return
        from .migrate import upgrade

        upgrade(self.settings.database_url)
        self._upgraded = True

    def _begin_outage(self, cause: BaseException | None) -> None:
        with self._counter_lock:
            self._retries += 1
        self._attempts += 1
        delay = min(MAX_BACKOFF, 0.05 * 2**self._attempts)
        self._next_probe = time.monotonic() + delay
        if not self._outage or self._attempts % 10 == 0:
            log.warning(
                "qwen_persist: database unavailable (%s); records go to the journal in %s, "
                "next try in %.2fs%s",
                _short(cause) if cause is not None else "unknown",
                self.settings.spill_dir,
                delay,
                NOT_MIGRATED_HINT if cause is not None and missing_schema(cause) else "",
            )
        self._outage = True

    def _recover(self, *, everything: bool) -> None:
        """Load the journal back into the database, a slice at a time (all of it when ``everything``, at
        shutdown, as long as the deadline allows), once the database answers again."""
        # Probe before claiming: a claim closes this journal's active segment, and claiming at every
        # try of a long outage would cut the journal into slivers. At shutdown, one last try now.
        waiting = time.monotonic() < self._next_probe and not everything
        if self._outage and (waiting or not self._probe()):
            return
        # At shutdown a few passes: responses parked in one pass find their requests in the next.
        for _ in range(3 if everything else 1):
            if not self._segments:
                journal = self._journal_or_none()
                if journal is not None and journal.pending():
                    self._segments = journal.claim()
                if not self._segments:
                    return
            if not self._load_segments(everything):
                return

    def _load_segments(self, everything: bool) -> bool:
        """Store the claimed segments' records; False when it stopped before the end of them."""
        batches = 0
        try:
            while self._segments:
                if self._reader is None:
                    self._reader = self._segments[0].records()
                batch = self._carry or list(itertools.islice(self._reader, self.settings.batch_size))
                self._carry = batch  # kept until stored: the database may go away meanwhile
                if not batch:
                    # A response journaled before its request (a full queue) finds it now; what
                    # still has none is parked in the journal before the segment is deleted.
                    orphans, self._orphans = self._orphans, []
                    if orphans:
                        self._store(orphans)
                        self._park_orphans()
                    self._reader = None
                    self._segments.pop(0).done()
                    continue
                self._store(batch)
                self._carry = []
                with self._counter_lock:
                    self._replayed += len(batch)
                batches += 1
                if self._abandon.is_set() or (not everything and batches >= RECOVERY_SLICE):
                    return False  # live records get their turn; the segment stays claimed
        except _Unavailable as exc:
            self._begin_outage(exc.__cause__)
            return False
        return True

    def _release_segments(self) -> None:
        self._reader = None
        for segment in self._segments:
            segment.release()  # read again later, here or by another process: loading is idempotent
        self._segments = []

    def _park_orphans(self) -> None:
        """Responses whose request is not stored yet (it may still be queued, or in a journal segment
        another process holds) go to the journal and are tried again with it; after `ORPHAN_TIMEOUT`
        seconds one is set aside in the dead-letter file."""
        orphans, self._orphans = self._orphans, []
        if not orphans:
            return
        now = time.time()
        waiting: list[Op] = []
        for op in orphans:
            since = op.get("orphan_since", now)
            if now - since > ORPHAN_TIMEOUT:
                self._dead_letter(op, "response without a stored request")
            else:
                waiting.append({**op, "orphan_since": since})
        self._journal_ops(waiting, reason="response without a stored request yet")

    def _probe(self) -> bool:
        """Whether the database answers again (which ends the outage)."""
        try:
            self._ensure_schema()
            with self.engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    # A locked file still answers reads: ask for the write lock, briefly.
                    conn.exec_driver_sql("PRAGMA busy_timeout=100")
                    try:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                        _check_tables(conn)
                        conn.exec_driver_sql("ROLLBACK")
                    finally:
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                else:
                    _check_tables(conn)
        except SQLAlchemyError as exc:
            self._begin_outage(exc)
            return False
        log.warning("qwen_persist: database available again; loading the journal")
        self._outage = False
        self._attempts = 0
        return True

    # -- the journal -----------------------------------------------------------------------------

    def _journal_or_none(self) -> Journal | None:
        with self._journal_lock:
            if self._journal is None:
                try:
                    self._journal = Journal(self.settings.spill_dir, max_bytes=self.settings.spill_max_bytes)
                except OSError as exc:
                    self._warn("journal", "qwen_persist: the journal in %s cannot be read: %s", exc)
            return self._journal

    def _journal_ops(self, ops: list[Op], *, reason: str) -> None:
        if not ops:
            return
        journal = self._journal_or_none()
        try:
            if journal is None:
                raise OSError(f"the journal in {self.settings.spill_dir} cannot be used")
            count = journal.append(ops)
        except (OSError, TypeError, ValueError) as exc:
            with self._counter_lock:
                self._failed += len(ops)
            full = isinstance(exc, JournalFull)
            self._warn(
                "lost",
                "qwen_persist: %d records LOST (%s) because the journal %s: %s",
                len(ops),
                reason,
                "is full (spill_max_bytes)" if full else "cannot be written",
                exc,
                level=logging.ERROR,
            )
            return
        with self._counter_lock:
            self._spilled += count
        self._warn(reason, "qwen_persist: records journaled (%s); %d in all so far", reason, self._spilled)

    def _dead_letter(self, op: Op, error: str) -> None:
        with self._counter_lock:
            self._failed += 1
        journal = self._journal_or_none()
        try:
            if journal is None:
                raise OSError("no journal")
            path = journal.dead_letter(op, error)
        except (OSError, TypeError, ValueError) as exc:
            log.error("qwen_persist: a rejected record could not be set aside either (%s): LOST", exc)
            return
        self._warn("dead", "qwen_persist: records the database rejects are set aside in %s", path)

    def _warn(self, kind: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
        # One line per kind and interval: under a full queue or an outage every batch would log.
        now = time.monotonic()
        with self._counter_lock:
            if now - self._logged.get(kind, -LOG_INTERVAL) < LOG_INTERVAL:
                return
            self._logged[kind] = now
        log.log(level, message, *args)


def log_stopped(stats: WriterStats) -> None:
    """The counters at shutdown, in one line (operators and the fault suite read it)."""
    log.info(
        "qwen_persist writer stopped: accepted=%d written=%d journaled=%d failed=%d duplicates=%d",
        stats.accepted,
        stats.written,
        stats.spilled,
        stats.failed,
        stats.duplicates,
    )


def _complete(barrier: _Barrier) -> None:
    # The app may have given up on its barrier (a cancelled wait): never complete a cancelled future,
    # which raises and would end the writer thread.
    if barrier.future.set_running_or_notify_cancel():
        barrier.future.set_result(None)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"
