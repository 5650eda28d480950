"""The writer in a child process of its own, so its CPU and its garbage never land on the event loop.

The request path appends each captured record to a deque and returns. A feeder thread in the server
process wakes once per ``flush_interval``, turns what gathered into one frame (a pickle of plain tuples)
and writes it to a pipe; the child, a clean ``python -m qwen_persist.writer_child`` (not
multiprocessing's spawn, which re-imports the user's main module), runs the ordinary `Writer` over each
frame and answers with an acknowledgement once the frame's records are stored or journaled. Until then
the server process keeps the frame's bytes (bytes: nothing a garbage collection walks), so a child that
dies loses nothing: it is started again and the frames not acknowledged are sent again (storing is
idempotent by capture id).

* **Priority.** The child runs at ``SCHED_IDLE`` while it keeps up, so it only takes CPU the server
  leaves unused; when its backlog passes `HIGH_WATER` records it is moved to normal priority until the
  backlog has stayed under `LOW_WATER` for `CALM_SECONDS` (sustained throughput is bound by total CPU, and
  a starved writer must never cost records); so is a child whose oldest frame has waited
  `STARVED_SECONDS` (idle priority gets no CPU at all on a busy machine), and one someone awaits.
* **Parent death.** The child ends when the pipe reaches end of file (the server exited, however it
  died) and on the platform's parent-death signal (Linux ``PR_SET_PDEATHSIG``), storing or journaling
  what it holds and what is left in the pipe first. It runs in a session of its own, so the terminal's
  SIGINT and signals sent to the server's process group never reach it: the server decides when to stop.
* **Forks.** Everything is started lazily in the process that submits (``uvicorn --workers N``, gunicorn
  with ``--preload``): a process that inherited a writer from its parent starts its own child.
* **Fallback.** Where a child process cannot run (no interpreter to start, a child that dies at once three
  times running) the in-process writer thread takes over, with every frame not acknowledged.
* **Overload.** If the child falls more than ``queue_size`` records behind, the feeder journals the excess
  itself (as the thread writer does with a full queue).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine

from . import jsonlib
from .config import Settings
from .records import CapturedRequest, CapturedResponse, RebuiltStream, Reports, StreamHandoff
from .writer import Record, Writer, WriterStats, log_stopped

log = logging.getLogger("qwen_persist")

HIGH_WATER = 2_000  # records not acknowledged: the child is moved to normal priority
LOW_WATER = 200  # ... and back to idle priority once the backlog stays under this
CALM_SECONDS = 1.0
STARVED_SECONDS = 0.25  # a frame not acknowledged for this long: the child gets normal priority
MAX_QUICK_DEATHS = 3  # children dying within QUICK_DEATH seconds of their start, in a row: fall back
QUICK_DEATH = 10.0
FULL_WAIT = 0.05  # seconds between looks at the backlog while the pipe is full
PIPE_BYTES = 1 << 20  # the pipe's capacity, where the platform lets us set it (Linux: F_SETPIPE_SZ)
_HEADER = struct.Struct("!I")
_F_SETPIPE_SZ = 1031
_PR_SET_PDEATHSIG = 1

_REQUEST_FIELDS = tuple(field.name for field in dataclasses.fields(CapturedRequest))
_RESPONSE_FIELDS = tuple(field.name for field in dataclasses.fields(CapturedResponse))
_request_values = attrgetter(*_REQUEST_FIELDS)
_response_values = attrgetter(*_RESPONSE_FIELDS)
_REPORTS_INDEX = _RESPONSE_FIELDS.index("reports")
_STREAM_INDEX = _RESPONSE_FIELDS.index("stream")


# -- the wire: frames of (kind, seq, payload), each a length and a pickle -------------------------------


def encode_frame(kind: str, seq: int, payload: Any) -> bytes:
    data = pickle.dumps((kind, seq, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _pack(record: Record) -> tuple[str, tuple[Any, ...]]:
    """A record as a tuple of plain values (what pickles fast, and what a collection never walks)."""
    if isinstance(record, CapturedRequest):
        return "q", _request_values(record)
    values = list(_response_values(record))
    reports = values[_REPORTS_INDEX]
    if reports is not None:
        values[_REPORTS_INDEX] = _plain_reports(reports)
    stream = values[_STREAM_INDEX]
    if isinstance(stream, StreamHandoff):
        # A stream over max_body_bytes was rebuilt here as it passed; the child gets the result.
        values[_STREAM_INDEX] = RebuiltStream(stream.finish(), stream.problem)
    return "r", tuple(values)


def _unpack(packed: tuple[str, tuple[Any, ...]]) -> Record:
    kind, values = packed
    if kind == "q":
        return CapturedRequest(*values)
    return CapturedResponse(*values)


def _frame_records(frame: bytes) -> list[Record]:
    _, _, packed = pickle.loads(frame[_HEADER.size :])
    return [_unpack(item) for item in packed]


def _plain_reports(reports: Reports) -> Reports:
    """What the app reported, as values that surely pickle (an app may report any object): JSON, as the
    writer would store it anyway (``records._reported`` turns the rest into a note)."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, str | int | float | bool):
            return value
        try:
            return jsonlib.loads(json.dumps(value, default=str, ensure_ascii=False))
        except (TypeError, ValueError, RecursionError) as exc:
            return {"$qwen_persist_unstorable": f"{type(exc).__name__}: {exc}"[:500]}

    return Reports(
        provider_request=plain(reports.provider_request),
        provider_response=plain(reports.provider_response),
        parent_id=plain(reports.parent_id),
        chat_id=plain(reports.chat_id),
        provider=plain(reports.provider),
        metadata=plain(dict(reports.metadata)) if reports.metadata else {},
    )


class _FrameReader:
    """Frames out of a blocking file descriptor, with a timeout per wait."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.eof = False
        self.received = 0  # bytes the last read brought

    def read(self, timeout: float | None) -> list[tuple[str, int, Any]]:
        """The frames complete after waiting at most ``timeout`` seconds for bytes (None: no limit)."""
        self.received = 0
        if not self.eof:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if ready:
                data = os.read(self.fd, 1 << 20)
                self.received = len(data)
                if data:
                    self.buffer += data
                else:
                    self.eof = True
        frames = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                break
            frames.append(pickle.loads(self.buffer[_HEADER.size : _HEADER.size + size]))
            del self.buffer[: _HEADER.size + size]
        return frames


# -- the server process's side ------------------------------------------------------------------------


class _Child:
    """One child process and its pipes."""

    def __init__(self, settings: Settings) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # the child imports this very copy
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qwen_persist.writer_child", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            # A session of its own, from the first instruction: the terminal's Ctrl-C and a signal sent to
            # the server's process group never reach it, not even while it is still importing (the server
            # stops in order and then closes the pipe; a server that dies is seen by end of file and the
            # parent-death signal).
            start_new_session=True,
        )
        self.started = time.monotonic()
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin: IO[bytes] = self.process.stdin
        self.stdout: IO[bytes] = self.process.stdout
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(self.stdin.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
        # Never blocked in a write: a child that falls behind must not hold the feeder, which then
        # journals what piles up (see `ProcessWriter._spill_pending`).
        os.set_blocking(self.stdin.fileno(), False)
        self.acknowledged_any = False
        self.stats: WriterStats | None = None
        self.idle = False
        self.reader: threading.Thread = threading.Thread(name="qwen-persist-acks", daemon=True)
        self.send(encode_frame("config", 0, dataclasses.replace(settings, redact=None)))

    def send(self, frame: bytes, while_full: Callable[[], None] | None = None) -> None:
        """Write a whole frame (only the feeder thread calls this), calling ``while_full`` every
        ``FULL_WAIT`` seconds while the pipe is full (the child is behind). Raises OSError if the child
        is gone."""
        fd = self.stdin.fileno()
        view = memoryview(frame)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                _, ready, _ = select.select([], [fd], [], FULL_WAIT)
                if not ready and while_full is not None:
                    while_full()

    def set_idle(self, idle: bool) -> bool:
        """Move every thread of the child to idle (or normal) scheduling; False where that is refused."""
        policy = getattr(os, "SCHED_IDLE", None) if idle else getattr(os, "SCHED_OTHER", None)
        if policy is None:
            return False
        try:
            tasks = os.listdir(f"/proc/{self.process.pid}/task")
            for task in tasks:
                os.sched_setscheduler(int(task), policy, os.sched_param(0))
        except (OSError, ValueError):
            return False
        self.idle = idle
        return True

    def close_input(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()


class _Waiter:
    __slots__ = ("future", "seq")

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.seq = 0


class ProcessWriter:
    """The `Writer`'s face (submit, feed_stream, barrier, start, close, stats) over a writer process."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        # The in-process writer: it journals overload from the feeder, and takes over if no child can run.
        self.local = Writer(settings, engine)
        self._reset()
        self._accepted = 0
        self._restarts = 0

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._pending: deque[Any] = deque()  # records and waiters, appended by the request path
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._abandoned = False  # shutdown ran out of time: the feeder journals instead of sending
        self._feeder: threading.Thread | None = None
        self._child: _Child | None = None
        self._unacked: deque[tuple[int, bytes, int, float]] = deque()  # seq, frame, records, sent at
        self._unacked_records = 0
        self._waiters: list[_Waiter] = []
        self._seq = 0
        self._quick_deaths = 0
        self._fallback = False
        self._calm_since: float | None = None
        self._stats_base: WriterStats | None = None  # counters of children that have exited
        self._last_child_stats: WriterStats | None = None
        self._atexit = False

    # -- the request path ----------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a record over without blocking: an append (the feeder does the rest)."""
        if self._pid != os.getpid():
            self._forked()
        self._accepted += 1
        if self._fallback:
            self.local.submit(record)
            return
        self._pending.append(record)
        if self._feeder is None:
            self.start()

    def feed_stream(self, handoff: StreamHandoff) -> None:
        """A large stream passing: the feeder rebuilds what has arrived (see `StreamHandoff`)."""
        if self._fallback:
            self.local.feed_stream(handoff)
        else:
            self._pending.append(handoff)

    async def barrier(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted before now is stored (or journaled). False on timeout."""
        if self._fallback:
            return await self.local.barrier(timeout)
        if self._feeder is None:
            return True
        waiter = _Waiter()
        self._pending.append(waiter)
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.wrap_future(waiter.future), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- lifecycle -----------------------------------------------------------------------------------

    def _forked(self) -> None:
        """This process was forked from one that had a writer running: its threads and child are the
        parent's. Start afresh; records the parent had are the parent's to store."""
        accepted = self._accepted
        self.engine.dispose(close=False)  # the parent's connections stay the parent's
        self.local = Writer(self.settings, self.engine)
        self._reset()
        self._accepted = accepted

    def start(self) -> None:
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            if self._fallback:
                self.local.start()
                return
            if self._feeder is not None and self._feeder.is_alive():
                return
            self._stopping = False
            self._abandoned = False
            self._feeder = threading.Thread(target=self._feed, name="qwen-persist-feeder", daemon=True)
            self._feeder.start()
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True

    def close(self, timeout: float | None = None) -> WriterStats:
        """Store everything submitted, then stop the child, within ``timeout`` seconds (default: the
        ``shutdown_timeout`` option); what is not stored by then is in the journal when this returns."""
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        deadline = time.monotonic() + timeout
        feeder = self._feeder
        if feeder is not None:
            self._stopping = True
            self._wake.set()
            feeder.join(max(0.0, deadline - time.monotonic()))
            if feeder.is_alive():
                # The child cannot take the frames (a hung database, no CPU): journal them from here.
                self._journal_unacknowledged("the writer process did not finish in time")
                feeder.join(0.5)  # what it had taken from the queue, it now journals too
            self._feeder = None
        if self._fallback or self.local.running:
            self.local.close(max(0.0, deadline - time.monotonic()))
        self.engine.dispose()  # the server process's connections (the child closes its own)
        stats = self.stats()
        log_stopped(stats)
        return stats

    async def aclose(self, timeout: float | None = None) -> WriterStats:
        return await asyncio.to_thread(self.close, timeout)

    def stats(self) -> WriterStats:
        local = self.local.stats()
        child = self._combined_child_stats()
        backlog = len(self._pending) + self._unacked_records
        if child is None:
            return dataclasses.replace(
                local,
                accepted=self._accepted,
                queue_depth=local.queue_depth + backlog,
                restarts=self._restarts,
            )
        return WriterStats(
            accepted=self._accepted,
            written=child.written + local.written,
            spilled=child.spilled + local.spilled,
            failed=child.failed + local.failed,
            duplicates=child.duplicates + local.duplicates,
            retries=child.retries + local.retries,
            queue_depth=backlog + local.queue_depth,
            restarts=self._restarts,
            replayed=child.replayed + local.replayed,
            buffered_bytes=max(child.buffered_bytes, local.buffered_bytes),
            corrupt=child.corrupt + local.corrupt,
        )

    def _combined_child_stats(self) -> WriterStats | None:
        base, last = self._stats_base, self._last_child_stats
        if base is None or last is None:
            return last or base
        return _add_stats(base, last)

    # -- the feeder thread -----------------------------------------------------------------------------

    def _feed(self) -> None:
        # The child starts with the feeder, not with the first record: it also loads what an earlier
        # process left in the journal, whether traffic comes or not.
        self._check_child(start=True)
        while True:
            try:
                stopping = self._stopping
                if not stopping:
                    self._wake.wait(self.settings.flush_interval)
                    self._wake.clear()
                self._feed_once()
                if stopping and not self._pending:
                    self._finish_child()
                    return
            except Exception:  # never let the feeder die: records would pile up unseen
                log.exception("qwen_persist: the writer process feeder failed; retrying")
                time.sleep(0.1)

    def _feed_once(self) -> None:
        records: list[tuple[str, tuple[Any, ...]]] = []
        waiters: list[_Waiter] = []
        pending = self._pending
        if self._fallback:
            self._hand_to_local()
            return
        while pending:
            item = pending.popleft()
            if isinstance(item, CapturedRequest | CapturedResponse):
                records.append(_pack(item))
            elif isinstance(item, StreamHandoff):
                item.drain(wait=False)
            else:
                waiters.append(item)
        if records or waiters:
            self._seq += 1
            seq = self._seq
            frame = encode_frame("records", seq, records)
            with self._lock:
                abandoned = self._abandoned
                if not abandoned:
                    self._unacked.append((seq, frame, len(records), time.monotonic()))
                    self._unacked_records += len(records)
                    for waiter in waiters:
                        waiter.seq = seq
                        self._waiters.append(waiter)
            if abandoned:
                self._journal_frame(frame, "the writer process did not finish in time")
                for waiter in waiters:
                    _resolve(waiter)
                return
            self._send(frame)
        if self._abandoned:
            return
        self._check_child()
        self._steer_priority()
        self._shed_overload()

    def _send(self, frame: bytes) -> None:
        child = self._child
        if child is None or child.process.poll() is not None:
            self._spawn()  # which sends every frame not acknowledged, this one included
            return
        with contextlib.suppress(OSError):  # the child died: the next turn starts another, which gets
            child.send(frame, self._spill_pending)  # this frame too

    def _spawn(self) -> _Child | None:
        """Start a child and send it every frame not acknowledged yet, in order."""
        if self._abandoned:
            return None
        old = self._child
        if old is not None:
            self._retire(old)
        try:
            child = _Child(self.settings)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            log.error("qwen_persist: cannot start the writer process (%s); using the writer thread", exc)
            self._fall_back()
            return None
        with self._lock:
            self._child = child
            frames = [entry[1] for entry in self._unacked]
        child.reader = threading.Thread(
            target=self._read_acks, args=(child,), name="qwen-persist-acks", daemon=True
        )
        child.reader.start()
        if _can_leave_idle():
            child.set_idle(True)
        for frame in frames:
            try:
                child.send(frame, self._spill_pending)
            except OSError:
                break
        return child

    def _retire(self, child: _Child) -> None:
        """A child that has exited: keep its counters, count the restart."""
        child.reader.join(1.0)  # its last acknowledgement carries its final counters
        code = child.process.poll()
        if child.stats is not None:
            self._stats_base = (
                child.stats if self._stats_base is None else _add_stats(self._stats_base, child.stats)
            )
            self._last_child_stats = None
        if code is not None and not self._stopping:
            self._restarts += 1
            quick = time.monotonic() - child.started < QUICK_DEATH and not child.acknowledged_any
            self._quick_deaths = self._quick_deaths + 1 if quick else 0
            log.error(
                "qwen_persist: the writer process exited (code %s); starting another, %d records to resend",
                code,
                self._unacked_records,
            )
            if self._quick_deaths >= MAX_QUICK_DEATHS:
                log.error("qwen_persist: the writer process keeps dying at start; using the writer thread")
                self._fall_back()

    def _check_child(self, *, start: bool = False) -> None:
        child = self._child
        if self._fallback:
            return
        if (child is None and start) or (child is not None and child.process.poll() is not None):
            self._spawn()

    def _read_acks(self, child: _Child) -> None:
        reader = _FrameReader(child.stdout.fileno())
        while not reader.eof:
            try:
                frames = reader.read(None)
            except OSError:
                break
            for kind, seq, payload in frames:
                if kind == "ack":
                    child.acknowledged_any = True
                    child.stats = payload
                    with self._lock:
                        if self._child is child:
                            self._last_child_stats = payload
                    self._acknowledge(seq)
        with contextlib.suppress(OSError):
            child.stdout.close()
        self._wake.set()  # the feeder notices the exit and starts another child

    def _acknowledge(self, seq: int) -> None:
        done: list[_Waiter] = []
        with self._lock:
            while self._unacked and self._unacked[0][0] <= seq:
                self._unacked_records -= self._unacked.popleft()[2]
            kept: list[_Waiter] = []
            for waiter in self._waiters:
                (done if waiter.seq <= seq else kept).append(waiter)
            self._waiters = kept
        for waiter in done:
            _resolve(waiter)

    def _steer_priority(self) -> None:
        child = self._child
        if child is None:
            return
        backlog = self._unacked_records + len(self._pending)
        with self._lock:
            oldest = self._unacked[0][3] if self._unacked else None
            waited = bool(self._waiters)
        # Behind, starved (idle priority gets no CPU on a busy machine), or someone waits for it.
        late = oldest is not None and time.monotonic() - oldest > STARVED_SECONDS
        if child.idle and (backlog > HIGH_WATER or late or waited):
            child.set_idle(False)
            self._calm_since = None
        elif not child.idle and backlog < LOW_WATER:
            now = time.monotonic()
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since > CALM_SECONDS and not self._stopping:
                child.set_idle(True)
        else:
            self._calm_since = None

    def _shed_overload(self) -> None:
        """More than queue_size records behind: the oldest frames go to the journal from here."""
        while True:
            with self._lock:
                if self._unacked_records <= self.settings.queue_size or len(self._unacked) <= 1:
                    return
                _, frame, count, _ = self._unacked.popleft()
                self._unacked_records -= count
            self._journal_frame(frame, "writer process behind")

    def _spill_pending(self) -> None:
        """The child cannot take a frame now: records piling up beyond ``queue_size`` go to the journal
        from here rather than wait in memory."""
        if len(self._pending) <= self.settings.queue_size:
            return
        records: list[Record] = []
        for _ in range(len(self._pending)):
            item = self._pending.popleft()
            if isinstance(item, CapturedRequest | CapturedResponse):
                records.append(item)
            else:
                self._pending.append(item)  # waiters and stream hand-offs stay, in their order
        self.local.journal_records(records, reason="writer process behind")

    def _journal_frame(self, frame: bytes, reason: str) -> None:
        self.local.journal_records(_frame_records(frame), reason=reason)

    def _journal_unacknowledged(self, reason: str) -> None:
        with self._lock:
            self._abandoned = True
            frames = list(self._unacked)
            self._unacked.clear()
            self._unacked_records = 0
            waiters, self._waiters = self._waiters, []
        pending = []
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, CapturedRequest | CapturedResponse):
                pending.append(item)
            elif isinstance(item, _Waiter):
                waiters.append(item)
        for entry in frames:
            self._journal_frame(entry[1], reason)
        if pending:
            self.local.journal_records(pending, reason=reason)
        for waiter in waiters:
            _resolve(waiter)
        child = self._child
        if child is not None and child.process.poll() is None:
            child.process.kill()  # it may still store some of them: loading is idempotent

    def _finish_child(self) -> None:
        """Shutdown: end the child's input and wait for it to store what it has."""
        child = self._child
        if child is None:
            return
        child.set_idle(False)  # it must not wait for idle CPU now
        child.close_input()
        child.process.wait()  # the child keeps to shutdown_timeout itself; close() journals past it
        self._retire(child)
        with self._lock:
            self._child = None
            leftover = bool(self._unacked)
        if leftover:
            self._journal_unacknowledged("the writer process exited before storing them")

    def _fall_back(self) -> None:
        self._fallback = True
        self.local.start()
        with self._lock:
            frames = list(self._unacked)
            self._unacked.clear()
            self._unacked_records = 0
            waiters, self._waiters = self._waiters, []
        for entry in frames:
            for record in _frame_records(entry[1]):
                self.local.submit(record)
        for waiter in waiters:
            self._wait_locally(waiter)

    def _hand_to_local(self) -> None:
        """What reached the queue before the fall-back, to the writer thread, waiters after it."""
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, CapturedRequest | CapturedResponse):
                self.local.submit(item)
            elif isinstance(item, StreamHandoff):
                self.local.feed_stream(item)
            else:
                self._wait_locally(item)

    def _wait_locally(self, waiter: _Waiter) -> None:
        future = self.local.mark()
        if future is None:
            _resolve(waiter)  # a full queue: the waiter learns no more by waiting
        else:
            future.add_done_callback(lambda _: _resolve(waiter))


def _can_leave_idle() -> bool:
    """Whether a thread put at idle priority can be given normal priority again: without privilege, Linux
    allows it only within RLIMIT_NICE (sched(7)); a writer stuck at idle would fall behind for good."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    if os.geteuid() == 0:
        return True
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


def _resolve(waiter: _Waiter) -> None:
    if waiter.future.set_running_or_notify_cancel():
        waiter.future.set_result(None)


def _add_stats(a: WriterStats, b: WriterStats) -> WriterStats:
    return WriterStats(
        **{field.name: getattr(a, field.name) + getattr(b, field.name) for field in dataclasses.fields(a)}
    )


# -- the child ----------------------------------------------------------------------------------------


def _parent_death_signal() -> None:
    """Ask Linux for SIGTERM when the parent dies (the pipe's end of file covers other platforms)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_main(argv: Iterable[str]) -> int:
    args = list(argv)
    parent = int(args[0]) if args else os.getppid()
    # Our own session keeps the terminal's signals away; these cover a SIGINT or SIGTERM sent to every
    # process (systemd stopping a unit's control group): the server stops in order, then ends our input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()

    def terminate(*_: Any) -> None:
        # Only the parent-death signal stops us here.
        if os.getppid() != parent:
            stopping.set()

    signal.signal(signal.SIGTERM, terminate)
    _parent_death_signal()
    # The acknowledgements get stdout to themselves: anything else printing goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING, format=f"%(levelname)s qwen_persist writer[{os.getpid()}]: %(message)s"
        )
    reader = _FrameReader(0)
    settings: Settings | None = None
    early: list[tuple[str, int, Any]] = []  # frames that came in the same read as the settings
    while settings is None and not reader.eof:
        for frame in reader.read(None):
            if frame[0] == "config":
                settings = frame[2]
            else:
                early.append(frame)
    if settings is None:
        return 0
    from .engine import WRITER_LOCK_TIMEOUT, make_engine

    engine = make_engine(settings.database_url, lock_timeout=WRITER_LOCK_TIMEOUT)
    writer = Writer(dataclasses.replace(settings, flush_interval=0.0), engine)

    def acknowledge(seq: int) -> None:
        frame = encode_frame("ack", seq, writer.stats())
        view = memoryview(frame)
        # A dead parent no longer reads: the records are stored all the same, so that is no reason to stop.
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(out, view) :]

    while not reader.eof:
        # The parent gone (the death signal, or a new parent if it died before we asked for the signal):
        # what it left in the pipe is still ours to store, so read on without waiting until nothing more
        # comes (a forked sibling may hold the pipe open, so end of file may never come).
        orphaned = stopping.is_set() or os.getppid() != parent
        frames, early = early or reader.read(0 if orphaned else writer.idle_wait()), []
        if not frames:
            if orphaned and not reader.received:
                break
            writer.process([])  # look at the journal: an outage may have ended
            continue
        records = [_unpack(item) for _, _, payload in frames for item in payload]
        seq = frames[-1][1]
        for start in range(0, max(1, len(records)), settings.batch_size):
            writer.process(records[start : start + settings.batch_size])
        acknowledge(seq)
    # Input ended (the server stops, or died): store what is journaled if the time allows, then stop.
    writer.process([], stopping=True)
    writer.close(settings.shutdown_timeout)
    acknowledge(0)
    return 0
