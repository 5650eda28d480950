"""The journal: an on-disk buffer of ops that every process sharing one directory can append to and drain.

Each `Journal` appends to a *segment* of its own and holds an exclusive ``flock`` on it while it is open,
so no other process takes it; `Journal.claim` hands out every segment nobody holds: this journal's own
closed segments, other processes' closed ones, and those of processes that died (the kernel drops a dead
process's locks, after SIGKILL too). A claimed segment stays locked by its claimer until `Segment.done`
deletes it or `Segment.release` gives it back. Delivery is at least once: a segment can be read again
after a crash between storing its records and ``done()``, so its reader must be idempotent (as
``repositories.writes.write_ops`` is).

Files in the directory (created 0o700; every file 0o600, as records hold whole conversations):

``journal-<time_ns:020d>-<pid>-<n>.log``
    A segment. Names sort in creation order: by wall-clock time across processes, strictly increasing
    within one. The first line is `HEADER` (``qwen_persist-journal 1``); each record is one line,
    ``<crc32 of the JSON, 8 lowercase hex digits> <compact JSON>\\n``. A segment never splits a batch.
``journal-….log.tmp``
    A segment being created: it is written, fsynced and locked before it is renamed into place, so a
    ``.log`` file always has its header and an owner from the start. A crash can leave one behind;
    `Journal.claim` deletes those older than a minute that nobody holds.
``journal-….log.corrupt``
    A segment whose header is missing or garbled, set aside for a human; never read or deleted.
``dead-letter-<pid>.jsonl``
    Ops the database rejected for good, one ``{"error": …, "op": …}`` line each (`Journal.dead_letter`).

fsync policy: `Journal.append` writes a batch with one ``write`` and one ``fsync``; creating a segment
fsyncs the file and then the directory; a dead letter is fsynced (and the directory, when it creates the
file). Deleting, setting aside and closing do not fsync the directory: after a power loss a deleted
segment may come back and be read again, which at-least-once delivery allows.

Locks are ``flock`` locks, which belong to an open file, not to a process, so two journals in one process
exclude each other too. They hold on one machine (containers sharing a volume included); over NFS they
depend on the server. A journal must not cross ``fork()``: create it in the process that uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from . import jsonlib
from .repositories.writes import Op

log = logging.getLogger("qwen_persist")

HEADER = b"qwen_persist-journal 1\n"
_MAGIC = b"qwen_persist-journal "
PREFIX = "journal-"
SUFFIX = ".log"
TEMPORARY = ".tmp"
SET_ASIDE = ".corrupt"
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# A temporary file lives for microseconds while its creator is alive; only one older than this is left
# over from a crash (the age also keeps a cleaner from racing a creator between open() and flock()).
STALE_TEMPORARY_SECONDS = 60.0

_names_lock = threading.Lock()
_last_time_ns = 0
_serial = itertools.count()


class JournalFull(OSError):
    """`Journal.append` refused a batch: the journal would grow past ``max_bytes``. Nothing was written.

    An ``OSError`` (errno ``EDQUOT``), so code that handles a full disk handles this too.
    """

    def __init__(self, needed: int, size: int, max_bytes: int) -> None:
        super().__init__(
            errno.EDQUOT, f"journal full: {size} of {max_bytes} bytes used, a batch needs {needed} more"
        )
        self.needed = needed
        self.size = size
        self.max_bytes = max_bytes


def _segment_name() -> str:
    global _last_time_ns
    with _names_lock:
        # Wall-clock time orders segments across processes; never going backwards keeps one process's
        # segments in order even when the clock is stepped back.
        _last_time_ns = max(time.time_ns(), _last_time_ns + 1)
        return f"{PREFIX}{_last_time_ns:020d}-{os.getpid()}-{next(_serial)}{SUFFIX}"


def _is_segment(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def _encode(op: Op) -> bytes:
    # jsonlib.dumps never writes a raw newline (both of its codecs escape control characters), so a
    # record is always exactly one line.
    body = jsonlib.dumps(op).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_record(line: bytes) -> Op | None:
    """The op a record line holds, or None when the line is torn or corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    body = line[9:-1]
    if line[:8] != b"%08x" % zlib.crc32(body):
        return None
    try:
        op = jsonlib.loads(body)
    except ValueError:
        return None
    return op if isinstance(op, dict) else None


def _header_kind(fd: int) -> Literal["ours", "newer", "corrupt"]:
    head = os.pread(fd, 64, 0)
    if head.startswith(HEADER):
        return "ours"
    line, newline, _ = head.partition(b"\n")
    if newline and line.startswith(_MAGIC) and line[len(_MAGIC) :].isdigit():
        return "newer"
    return "corrupt"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> bool:
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


@dataclass(slots=True)
class _Active:
    name: str
    fd: int
    bytes: int
    records: int = 0


class Journal:
    """Segments of ops in one directory, shared safely with every other process that uses it.

    Thread-safe. ``size`` is the bytes of all segments in the directory (``.log`` files, any owner) as
    of the last directory scan (at construction, at every `claim`, and before `append` refuses a batch),
    plus this journal's own appends and deletions since: other processes' usage is seen at the next scan.
    Files set aside and dead letters are not counted.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_bytes: int | None = None,
        probe_interval: float = 5.0,
    ) -> None:
        """Nothing is created until something is written. Raises ``OSError`` if an existing directory
        cannot be scanned.

        ``segment_bytes``: a segment with records is closed before a batch would take it past this size.
        ``max_bytes``: the most the journal may hold (``size``); None for no limit.
        ``probe_interval``: seconds between `pending`'s lock probes of other processes' segments.
        """
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError("max_bytes must be positive or None")
        if probe_interval < 0:
            raise ValueError("probe_interval must not be negative")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.probe_interval = probe_interval
        self._lock = threading.Lock()
        self._dead_letter_lock = threading.Lock()
        self._pid = os.getpid()
        self._active: _Active | None = None
        self._held: dict[str, int] = {}  # segments this journal claimed and still holds: name -> bytes
        self._busy: set[str] = set()  # segments other processes held at the last look
        self._ignored: set[str] = set()  # a newer format, or unreadable: left alone for this run
        self._probed_at = -math.inf
        self._appended = 0
        self._corrupt = 0
        self._size = sum(size for _, size in self._listing())

    @property
    def size(self) -> int:
        """Bytes of journal segments in the directory, as far as this journal knows (see the class)."""
        return self._size

    @property
    def appended(self) -> int:
        """Records this journal has appended."""
        return self._appended

    @property
    def corrupt(self) -> int:
        """Torn or corrupt records skipped, plus segments set aside, by this journal's claims."""
        return self._corrupt

    def append(self, ops: Sequence[Op]) -> int:
        """Store ``ops`` durably, in order; returns how many (0 for none, without touching the disk).

        The whole batch is written with one ``write`` and one ``fsync`` to this journal's active segment
        (created, or rotated past ``segment_bytes``, first). Raises `JournalFull` before writing anything
        if ``size`` would pass ``max_bytes``; ``TypeError``/``ValueError`` before writing anything if an op
        is not JSON (``jsonlib.dumps``); ``OSError`` for a disk error. Records stored before a failed call
        are never damaged: what the call wrote is cut off again when the file allows it, and its segment
        is closed so the next call starts a new one (a torn tail left behind is skipped by readers).
        """
        data = b"".join([_encode(op) for op in ops])
        if not data:
            return 0
        with self._lock:
            self._check_process()
            active = self._active
            rotate = (
                active is not None and active.records > 0 and active.bytes + len(data) > self.segment_bytes
            )
            needed = len(data) + (len(HEADER) if active is None or rotate else 0)
            if self.max_bytes is not None and self._size + needed > self.max_bytes:
                # Other processes may have drained the directory since the last scan.
                self._size = sum(size for _, size in self._listing())
                if self._size + needed > self.max_bytes:
                    raise JournalFull(needed, self._size, self.max_bytes)
            if rotate:
                self._close_active()
            if self._active is None:
                self._active = self._open_segment()
            active = self._active
            start = active.bytes
            try:
                _write_all(active.fd, data)
                os.fsync(active.fd)
            except OSError:
                self._abandon(active, start)
                raise
            active.bytes += len(data)
            active.records += len(ops)
            self._size += len(data)
            self._appended += len(ops)
        return len(ops)

    def claim(self) -> list[Segment]:
        """Take every segment nobody holds, oldest first; each stays locked until done() or release().

        This journal's active segment is handed over first if it has records (without ever unlocking
        it, so its records come back here); the next `append` starts a new one. Other processes' active
        segments, and segments another journal has claimed, are skipped. A segment without a valid
        header is renamed aside to ``*.corrupt`` and counted in ``corrupt``; one in a newer format is
        left alone. Stale temporary files are deleted. Refreshes ``size`` from the directory.
        """
        with self._lock:
            self._check_process()
            claimed: list[Segment] = []
            if self._active is not None and self._active.records:
                active, self._active = self._active, None
                self._held[active.name] = active.bytes
                claimed.append(Segment(self, self.directory / active.name, active.fd, active.bytes))
            entries = self._listing()
            skip = self._held.keys() | self._ignored
            if self._active is not None:
                skip.add(self._active.name)
            busy: set[str] = set()
            try:
                for name, _ in entries:
                    if name not in skip and (segment := self._try_claim(name, busy)) is not None:
                        claimed.append(segment)
            except BaseException:
                # Segments nobody gets are unlocked, or they would stay locked as long as this process.
                for segment in claimed:
                    self._held.pop(segment.name, None)
                    segment._drop()
                raise
            self._busy = busy
            self._probed_at = time.monotonic()
            # Set aside or vanished meanwhile: no longer journal bytes.
            self._size = sum(size for name, size in entries if (self.directory / name).exists())
        claimed.sort(key=lambda segment: segment.name)
        return claimed

    def pending(self) -> bool:
        """Whether `claim` would return something: this journal's active segment has records, or a
        segment in the directory may be free.

        Costs one directory listing (no open, no stat) per call. Segments another process held at the
        last look are assumed still held, except once per ``probe_interval``, when each of them costs an
        open, a non-blocking ``flock`` and a close: a process that died is noticed within that interval.
        A segment new since the last look counts as free until a `claim` finds otherwise.
        """
        with self._lock:
            if self._active is not None and self._active.records:
                return True
            skip = self._held.keys() | self._ignored
            if self._active is not None:
                skip.add(self._active.name)
            busy = self._busy
            probe = time.monotonic() - self._probed_at >= self.probe_interval
        try:
            names = [name for name in os.listdir(self.directory) if _is_segment(name) and name not in skip]
        except FileNotFoundError:
            return False
        if any(name not in busy for name in names):
            return True
        if not names or not probe:
            return False
        free = any(self._probe(self.directory / name) for name in names)
        with self._lock:
            self._busy &= set(names)
            self._probed_at = time.monotonic()
        return free

    def dead_letter(self, op: Op, error: str) -> Path:
        """Append ``{"error": error, "op": op}`` as one line to ``dead-letter-<pid>.jsonl``, fsynced;
        returns the file's path. Raises ``OSError`` if it cannot be stored, ``TypeError``/``ValueError``
        if ``op`` is not JSON. Not counted in ``size`` nor limited by ``max_bytes``."""
        line = (jsonlib.dumps({"error": error, "op": op}) + "\n").encode("utf-8")
        path = self.directory / f"dead-letter-{os.getpid()}.jsonl"
        with self._dead_letter_lock:
            self._make_directory()
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                created = False
            try:
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":
                    line = b"\n" + line  # an earlier write failed midway: keep its remains off this line
                _write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_directory(self.directory)
        return path

    def close(self) -> None:
        """Close the active segment, which releases it to `claim`; an empty one is deleted. Segments
        claimed from this journal stay with their holder. A later `append` starts a new segment."""
        with self._lock:
            active = self._active
            if active is not None and os.getpid() != self._pid:
                self._active = None
                os.close(active.fd)  # a forked copy: the segment is the parent's, not to be deleted here
                return
            self._close_active()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a Journal cannot be used across fork(): create one in each process")

    def _make_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            return
        _fsync_directory(self.directory.parent)

    def _listing(self) -> list[tuple[str, int]]:
        """(name, bytes) of the segments in the directory, by name; deletes stale temporary files."""
        entries: list[tuple[str, int]] = []
        try:
            scan = os.scandir(self.directory)
        except FileNotFoundError:
            return entries
        with scan:
            for entry in scan:
                try:
                    if _is_segment(entry.name):
                        entries.append((entry.name, entry.stat(follow_symlinks=False).st_size))
                    elif _is_segment(entry.name.removesuffix(TEMPORARY)) and entry.name.endswith(TEMPORARY):
                        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                        if age > STALE_TEMPORARY_SECONDS and self._probe(Path(entry.path)):
                            _unlink_quietly(Path(entry.path))  # header only: never holds a record
                except FileNotFoundError:
                    continue
        entries.sort()
        return entries

    def _open_segment(self) -> _Active:
        self._make_directory()
        while True:
            name = _segment_name()
            temporary = self.directory / (name + TEMPORARY)
            try:
                flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                fd = os.open(temporary, flags, 0o600)
            except FileExistsError:
                continue  # same time, pid and number in another container: take the next name
            break
        path = self.directory / name
        renamed = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know this file yet
            _write_all(fd, HEADER)
            os.fsync(fd)
            os.rename(temporary, path)
            renamed = True
            _fsync_directory(self.directory)
        except BaseException:
            _unlink_quietly(path if renamed else temporary)
            os.close(fd)
            raise
        self._size += len(HEADER)
        return _Active(name, fd, len(HEADER))

    def _close_active(self, *, keep: bool = False) -> None:
        active, self._active = self._active, None
        if active is None:
            return
        try:
            # Deleted while still locked, so nobody claims an empty segment in between.
            if not keep and active.records == 0 and _unlink_quietly(self.directory / active.name):
                self._size -= active.bytes
        finally:
            os.close(active.fd)

    def _abandon(self, active: _Active, start: int) -> None:
        """After a failed write or fsync: cut off what the call wrote, and give the segment up, because
        after a failed fsync the kernel may have dropped pages it could not write, and a later fsync
        would not report it."""
        end = start
        try:
            os.ftruncate(active.fd, start)
        except OSError:
            with contextlib.suppress(OSError):
                end = os.fstat(active.fd).st_size  # a torn tail stays: readers skip it
        self._size += end - start
        self._close_active(keep=end != start)

    def _try_claim(self, name: str, busy: set[str]) -> Segment | None:
        path = self.directory / name
        try:
            # Read-write although only read: over NFS, flock is emulated with fcntl locks, and an
            # exclusive one needs a descriptor open for writing.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._ignore(name, f"cannot be opened ({exc})")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy.add(name)
            return None
        try:
            # Whoever held it may have deleted or set it aside before letting go: then this is a dead file.
            opened = os.fstat(fd)
            current = os.stat(path, follow_symlinks=False)
            if opened.st_nlink == 0 or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                os.close(fd)
                return None
            kind = _header_kind(fd)
        except OSError as exc:
            os.close(fd)
            if not isinstance(exc, FileNotFoundError):
                self._ignore(name, f"cannot be read ({exc})")
            return None
        if kind == "ours":
            self._held[name] = opened.st_size
            return Segment(self, path, fd, opened.st_size)
        try:
            if kind == "newer":
                self._ignore(name, "is in a newer journal format; left for a newer qwen_persist")
            else:
                self._set_aside(path, opened.st_size)
        finally:
            os.close(fd)
        return None

    def _set_aside(self, path: Path, size: int) -> None:
        """Rename a segment with a bad header to ``*.corrupt`` (the caller holds its lock)."""
        target = path.with_name(path.name + SET_ASIDE)
        try:
            os.rename(path, target)
        except OSError as exc:
            self._ignore(path.name, f"has no valid header and cannot be set aside ({exc})")
            return
        self._size -= size
        self._corrupt += 1
        log.warning("qwen_persist journal: %s has no valid header; set aside as %s", path, target.name)

    def _ignore(self, name: str, why: str) -> None:
        self._ignored.add(name)
        log.warning("qwen_persist journal: %s %s; left alone", self.directory / name, why)

    @staticmethod
    def _probe(path: Path) -> bool:
        """Whether nobody holds the file: its lock is taken and dropped at once."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        finally:
            os.close(fd)  # also drops the lock when it was taken
        return True


class Segment:
    """A segment this process holds locked (from `Journal.claim`) until `done` or `release`.

    Not thread-safe: one reader at a time. Usable as a context manager that releases it on exit, unless
    it was done.
    """

    def __init__(self, journal: Journal, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.name = path.name
        self.size = size  # bytes when claimed
        self.corrupt = 0  # torn or corrupt records skipped by records() (plus one if set aside)
        self._journal = journal
        self._fd: int | None = fd
        self._keep = False  # its header was bad: done() must not delete it

    @property
    def held(self) -> bool:
        return self._fd is not None

    def records(self) -> Iterator[Op]:
        """The segment's records, in order, each checksum verified; never raises for bad content.

        A torn line (no newline: a crash mid-append) or a corrupt one (checksum or JSON) is skipped and
        counted in ``corrupt``. A segment without a valid header yields nothing, counts as one corrupt
        record and is renamed aside to ``*.corrupt``. Raises ``OSError`` only if the file cannot be read,
        ``RuntimeError`` if the segment is no longer held. Stops if it is released meanwhile.
        """
        fd = self._fd
        if fd is None:
            raise RuntimeError(f"{self.name} is no longer held")
        with open(fd, "rb", closefd=False) as reader:
            reader.seek(0)
            if reader.readline(len(HEADER)) != HEADER:
                self._setting_aside()
                return
            # Checked before each read: once released, the descriptor may belong to another file.
            while self._fd == fd and (line := reader.readline()):
                op = decode_record(line)
                if op is None:
                    self.corrupt += 1
                    with self._journal._lock:
                        self._journal._corrupt += 1
                    continue
                yield op
        if self.corrupt:
            log.warning(
                "qwen_persist journal: %d torn or corrupt records skipped in %s", self.corrupt, self.path
            )

    def done(self) -> None:
        """Delete the segment (its records are stored) and release it; ``size`` goes down by its bytes.

        Raises ``OSError`` if it cannot be deleted (it stays held), ``RuntimeError`` if no longer held.
        """
        if self._fd is None:
            raise RuntimeError(f"{self.name} is no longer held: another process may have claimed it")
        freed = 0
        if not self._keep:
            try:
                os.unlink(self.path)
                freed = self.size
            except FileNotFoundError:
                pass  # removed by hand: ``size`` drops at the next scan
        self._finish(freed)

    def release(self) -> None:
        """Unlock the segment and keep it, for a later `Journal.claim` here or elsewhere. Idempotent."""
        if self._fd is not None:
            self._finish(0)

    def __enter__(self) -> Segment:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.size} bytes{'' if self.held else ' (released)'}>"

    def _setting_aside(self) -> None:
        self.corrupt += 1
        self._keep = True
        with self._journal._lock:
            self._journal._set_aside(self.path, self.size)

    def _finish(self, freed: int) -> None:
        journal = self._journal
        with journal._lock:
            journal._held.pop(self.name, None)
            journal._size -= freed
        self._drop()

    def _drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with the last descriptor
