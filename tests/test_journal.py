"""The journal on real files: format, checksums, limits, permissions, and ownership across processes.

Disk errors are simulated by monkeypatching ``os.write``/``os.fsync``/``os.open`` (the journal calls them
through the ``os`` module), because the tests may run as root, whom permission bits do not stop; a real
read-only directory is tried too when they do not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwen_persist import jsonlib
from qwen_persist.journal import HEADER, Journal, JournalFull, Segment
from qwen_persist.repositories.writes import Op

ROOT = Path(__file__).resolve().parent.parent
WAIT = 120.0  # seconds: generous, the machine may be busy


def op(seq: int, text: str = "") -> Op:
    return {"op": "request", "seq": seq, "text": text}


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.log"))


def drain(journal: Journal) -> list[Op]:
    """Every record the journal can claim, in order; the segments are done."""
    records: list[Op] = []
    for segment in journal.claim():
        records.extend(segment.records())
        segment.done()
    return records


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes started by a test; any still running at its end are killed (by their pid)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=WAIT)


def spawn(children: list[subprocess.Popen[str]], code: str, *args: str) -> subprocess.Popen[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    children.append(child)
    return child


def expect_line(child: subprocess.Popen[str], expected: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != expected + "\n":
        child.kill()
        _, errors = child.communicate(timeout=WAIT)
        pytest.fail(f"child said {line!r}, not {expected!r}; stderr:\n{errors}")


def kill(child: subprocess.Popen[str]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=WAIT)
    assert child.returncode == -signal.SIGKILL


# --- format, order, rotation ------------------------------------------------------------------------


def test_records_come_back_in_order_across_appends_and_rotations(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spill", segment_bytes=300)
    batches = [[op(10 * b + i, "x" * 40) for i in range(b % 3 + 1)] for b in range(10)]
    for batch in batches:
        assert journal.append(batch) == len(batch)
    assert journal.append([]) == 0
    expected = [record for batch in batches for record in batch]
    assert journal.appended == len(expected)
    assert len(segment_files(tmp_path / "spill")) > 2

    segments = journal.claim()
    assert [s.name for s in segments] == sorted(s.name for s in segments)
    seen: list[Op] = []
    for segment in segments:
        records = list(segment.records())
        # A batch is never split across segments.
        assert {r["seq"] // 10 for r in records} == {r["seq"] // 10 for r in records if r["seq"] % 10 == 0}
        seen.extend(records)
        assert segment.corrupt == 0
    assert seen == expected
    assert journal.corrupt == 0


def test_file_format_is_a_header_then_one_checksummed_json_line_per_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    ops = [op(0, "héllo\nworld"), {"op": "response", "request_id": "r", "response": {"n": [1, 2.5, None]}}]
    journal.append(ops)
    [path] = segment_files(tmp_path)
    assert re.fullmatch(r"journal-\d{20}-\d+-\d+\.log", path.name)
    header, *lines = path.read_bytes().splitlines(keepends=True)
    assert header == HEADER == b"qwen_persist-journal 1\n"
    assert len(lines) == len(ops)
    for line, expected in zip(lines, ops, strict=True):
        checksum, body = line.rstrip(b"\n").split(b" ", 1)
        assert re.fullmatch(rb"[0-9a-f]{8}", checksum)
        assert int(checksum, 16) == zlib.crc32(body)
        assert jsonlib.loads(body) == expected
    assert journal.size == path.stat().st_size


def test_segment_names_sort_in_creation_order_across_journals(tmp_path: Path) -> None:
    first, second = Journal(tmp_path), Journal(tmp_path)
    for journal, seq in ((first, 0), (second, 1), (first, 2), (second, 3)):
        journal.append([op(seq)])
        journal.close()
    assert [r["seq"] for r in drain(Journal(tmp_path))] == [0, 1, 2, 3]


# --- damage ------------------------------------------------------------------------------------------


def test_a_flipped_byte_fails_its_checksum_and_only_that_record_is_lost(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append([op(0, "first"), op(1, "second"), op(2, "third")])
    journal.close()
    [path] = segment_files(tmp_path)
    data = bytearray(path.read_bytes())
    where = data.index(b"second")
    data[where] ^= 0x01
    path.write_bytes(bytes(data))

    reader = Journal(tmp_path)
    [segment] = reader.claim()
    assert [r["seq"] for r in segment.records()] == [0, 2]
    assert segment.corrupt == 1
    assert reader.corrupt == 1


def test_a_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for seq in range(3):
        journal.append([op(seq, "some text")])
    journal.close()
    [path] = segment_files(tmp_path)
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(size - 7)  # the last line loses its end, newline included, as in a crash

    reader = Journal(tmp_path)
    [segment] = reader.claim()
    assert [r["seq"] for r in segment.records()] == [0, 1]
    assert segment.corrupt == 1


@pytest.mark.parametrize(
    "content", [b"", b"not a journal\n", b"qwen_persist-journal 1", b"qwen_persist-jour"]
)
def test_a_segment_without_a_valid_header_is_set_aside_not_deleted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "journal-00000000000000000001-1-0.log"
    body = b"%08x {}\n" % zlib.crc32(b"{}")
    path.write_bytes(content + body)
    journal = Journal(tmp_path)
    assert journal.pending()
    assert journal.claim() == []
    assert not path.exists()
    assert path.with_name(path.name + ".corrupt").read_bytes() == content + body
    assert journal.corrupt == 1
    assert journal.size == 0
    assert not journal.pending()


def test_a_header_damaged_after_the_claim_yields_nothing_and_is_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append([op(0)])
    [segment] = journal.claim()
    with segment.path.open("r+b") as handle:
        handle.write(b"X")
    assert list(segment.records()) == []
    assert segment.corrupt == 1
    segment.done()
    [kept] = tmp_path.glob("*.corrupt")
    assert kept.name == segment.name + ".corrupt"
    assert journal.size == 0


def test_a_segment_in_a_newer_format_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "journal-00000000000000000001-1-0.log"
    path.write_bytes(b"qwen_persist-journal 2\nanything\n")
    journal = Journal(tmp_path, probe_interval=0)
    assert journal.claim() == []
    assert path.read_bytes() == b"qwen_persist-journal 2\nanything\n"
    assert journal.corrupt == 0
    assert not journal.pending()


def test_stale_temporary_files_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    stale = tmp_path / "journal-00000000000000000001-1-0.log.tmp"
    fresh = tmp_path / "journal-00000000000000000002-1-1.log.tmp"
    for path in (stale, fresh):
        path.write_bytes(HEADER)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    Journal(tmp_path).claim()
    assert not stale.exists()
    assert fresh.exists()


# --- permissions, limits, errors ---------------------------------------------------------------------


def test_directory_is_owner_only_and_so_is_every_file(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "spill"
    journal = Journal(directory)
    assert not directory.exists()  # nothing until something is written
    journal.append([op(0)])
    dead = journal.dead_letter(op(1), "rejected")
    assert mode(directory) == 0o700
    [path] = segment_files(directory)
    assert mode(path) == 0o600
    assert mode(dead) == 0o600


def test_max_bytes_refuses_a_whole_batch_and_writes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=400)
    journal.append([op(0, "a" * 100)])
    [path] = segment_files(tmp_path)
    before = path.read_bytes()
    size = journal.size
    with pytest.raises(JournalFull) as raised:
        journal.append([op(1, "b" * 100), op(2, "c" * 100)])
    assert isinstance(raised.value, OSError)
    assert raised.value.errno == errno.EDQUOT
    assert raised.value.max_bytes == 400
    assert path.read_bytes() == before
    assert (journal.size, journal.appended) == (size, 1)
    journal.append([op(3)])  # a smaller batch still fits
    assert [r["seq"] for r in drain(journal)] == [0, 3]


def test_max_bytes_counts_the_header_of_a_new_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spill", max_bytes=len(HEADER) + 5)
    with pytest.raises(JournalFull):
        journal.append([op(0)])
    assert not (tmp_path / "spill").exists()
    assert journal.size == 0


def test_space_freed_by_another_process_is_seen_before_refusing(tmp_path: Path) -> None:
    other = Journal(tmp_path)
    other.append([op(0, "x" * 500)])
    other.close()
    journal = Journal(tmp_path, max_bytes=700)
    assert journal.size > 500
    drain(Journal(tmp_path))  # someone else stores and deletes it
    journal.append([op(1, "y" * 500)])
    assert journal.size < 700


def test_a_disk_full_mid_write_raises_and_leaves_earlier_records_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: os.write stores half of the batch, then fails with ENOSPC (as a filling disk does)."""
    journal = Journal(tmp_path)
    journal.append([op(0), op(1)])
    [path] = segment_files(tmp_path)
    before = path.read_bytes()
    real_write = os.write
    failed: list[int] = []

    def filling_disk(fd: int, data: Any) -> int:
        if fd in failed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if b'"seq":2' not in bytes(data):
            return real_write(fd, data)
        failed.append(fd)
        return real_write(fd, bytes(data)[: len(data) // 2])

    monkeypatch.setattr(os, "write", filling_disk)
    with pytest.raises(OSError) as raised:
        journal.append([op(2, "z" * 200), op(3)])
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before  # the half-written batch was cut off again
    assert journal.appended == 2
    journal.append([op(4)])
    assert len(segment_files(tmp_path)) == 2  # the failed segment was given up
    journal.close()
    reader = Journal(tmp_path)
    assert [r["seq"] for r in drain(reader)] == [0, 1, 4]
    assert reader.corrupt == 0


def test_a_disk_full_on_a_new_segment_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the header of a new segment fits, its first batch does not (ENOSPC)."""
    journal = Journal(tmp_path)
    real_write = os.write

    def header_only(fd: int, data: Any) -> int:
        if bytes(data) == HEADER:
            return real_write(fd, data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", header_only)
    with pytest.raises(OSError):
        journal.append([op(0)])
    monkeypatch.undo()
    assert segment_files(tmp_path) == []
    assert journal.size == 0
    assert not journal.pending()


def test_a_failed_fsync_raises_and_the_next_batch_goes_to_a_new_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: the next os.fsync fails with EIO."""
    journal = Journal(tmp_path)
    journal.append([op(0)])
    [path] = segment_files(tmp_path)
    before = path.read_bytes()

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        journal.append([op(1)])
    monkeypatch.undo()
    assert path.read_bytes() == before
    journal.append([op(2)])
    assert len(segment_files(tmp_path)) == 2
    journal.close()
    assert [r["seq"] for r in drain(Journal(tmp_path))] == [0, 2]


def test_a_read_only_filesystem_at_rotation_raises_and_earlier_records_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated: creating the next segment fails with EROFS."""
    journal = Journal(tmp_path, segment_bytes=100)
    journal.append([op(0, "a" * 80)])
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as raised:
        journal.append([op(1, "b" * 80)])
    assert raised.value.errno == errno.EROFS
    monkeypatch.undo()
    assert [r["seq"] for r in drain(Journal(tmp_path))] == [0]


def test_a_really_read_only_directory_raises_at_rotation(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spill", segment_bytes=100)
    journal.append([op(0, "a" * 80)])
    (tmp_path / "spill").chmod(0o500)
    try:
        try:
            (tmp_path / "spill" / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("permission bits do not stop this process (root, or CAP_DAC_OVERRIDE)")
        with pytest.raises(OSError):
            journal.append([op(1, "b" * 80)])
    finally:
        (tmp_path / "spill").chmod(0o700)
    assert [r["seq"] for r in drain(Journal(tmp_path / "spill"))] == [0]


def test_an_op_that_is_not_json_writes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with pytest.raises(TypeError):
        journal.append([op(0), {"op": "request", "value": object()}])
    assert segment_files(tmp_path) == []


# --- claiming, done, release, pending ----------------------------------------------------------------


def test_done_deletes_and_the_size_goes_down(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1)  # every batch gets a segment of its own
    for seq in range(3):
        journal.append([op(seq, "x" * 50)])
    total = journal.size
    assert total == sum(path.stat().st_size for path in segment_files(tmp_path))
    segments = journal.claim()
    assert len(segments) == 3
    for segment in segments:
        list(segment.records())
        segment.done()
        assert not segment.path.exists()
        total -= segment.size
        assert journal.size == total
    assert journal.size == 0
    with pytest.raises(RuntimeError):
        segments[0].done()


def test_a_released_segment_can_be_claimed_again_and_a_held_one_cannot(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append([op(0)])
    [segment] = journal.claim()
    other = Journal(tmp_path, probe_interval=0)  # another journal in this process: flock still excludes
    assert other.claim() == []
    assert not other.pending()
    assert not journal.pending()  # its own held segment is not pending
    segment.release()
    segment.release()
    assert other.pending()
    [again] = other.claim()
    assert again.name == segment.name
    with again:
        assert [r["seq"] for r in again.records()] == [0]
    assert not again.held
    with pytest.raises(RuntimeError):
        list(again.records())


@pytest.mark.parametrize("finish", ["done", "set aside"])
def test_a_segment_finished_between_anothers_open_and_lock_is_not_claimed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, finish: str
) -> None:
    """The race a claimer loses: it opens a file, the holder deletes (or sets aside) and unlocks it, then
    the claimer's lock succeeds, on a file that is no longer the journal's. Forced by running the holder's
    step inside the claimer's flock call."""
    journal = Journal(tmp_path)
    journal.append([op(0)])
    [segment] = journal.claim()
    real_flock = fcntl.flock

    def holder_finishes_first(fd: int, operation: int) -> None:
        if segment.held and operation & fcntl.LOCK_NB:
            if finish == "done":
                segment.done()
            else:
                with segment.path.open("r+b") as handle:
                    handle.write(b"X")
                assert list(segment.records()) == []
                segment.release()
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_finishes_first)
    other = Journal(tmp_path)
    caplog.clear()
    assert other.claim() == []
    assert not segment.held
    assert other.corrupt == 0
    # Only the holder's own warning when it set the file aside: the other did not touch what was gone.
    assert len(caplog.records) == (1 if finish == "set aside" else 0)


def test_pending_follows_the_journal(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "missing")
    assert not journal.pending()
    journal.append([op(0)])
    assert journal.pending()
    [segment] = journal.claim()
    assert not journal.pending()
    segment.done()
    assert not journal.pending()
    journal.append([op(1)])
    journal.close()
    assert journal.pending()  # its closed segment is claimable
    assert [r["seq"] for r in drain(journal)] == [1]
    assert not journal.pending()


def test_close_keeps_a_segment_with_records_for_the_next_claim(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        journal.append([op(0)])
    assert len(segment_files(tmp_path)) == 1
    journal.close()
    assert [r["seq"] for r in drain(Journal(tmp_path))] == [0]
    journal.append([op(1)])  # a closed journal starts a new segment
    assert [r["seq"] for r in drain(journal)] == [1]
    assert segment_files(tmp_path) == []


def test_dead_letters_are_written_one_json_line_each(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "spill")
    path = journal.dead_letter(op(0), "IntegrityError: duplicate key")
    assert path == tmp_path / "spill" / f"dead-letter-{os.getpid()}.jsonl"
    with path.open("ab") as handle:
        handle.write(b'{"error": "torn')  # a write that failed midway
    journal.dead_letter(op(1, "ünï"), "DataError")
    lines = path.read_bytes().splitlines()
    assert jsonlib.loads(lines[0]) == {"error": "IntegrityError: duplicate key", "op": op(0)}
    assert jsonlib.loads(lines[-1]) == {"error": "DataError", "op": op(1, "ünï")}
    assert len(lines) == 3
    assert segment_files(tmp_path / "spill") == []
    assert not journal.pending()


# --- other processes ---------------------------------------------------------------------------------

APPEND_AND_WAIT = """
import sys
from qwen_persist.journal import Journal
journal = Journal(sys.argv[1])
journal.append([{"op": "request", "seq": i} for i in range(5)])
journal.append([{"op": "response", "seq": 5}])
print("ready", flush=True)
sys.stdin.read()
"""

APPEND_FOREVER = """
import sys
from qwen_persist.journal import Journal
journal = Journal(sys.argv[1], segment_bytes=2048)
seq = 0
while True:
    journal.append([{"op": "request", "seq": seq + k, "pad": "p" * 40} for k in range(3)])
    seq += 3
    if seq == 300:
        print("ready", flush=True)
"""

CLAIM_AND_STORE = """
import sys
from qwen_persist.journal import Journal
journal = Journal(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for segment in journal.claim():
    seqs = [record["seq"] for record in segment.records()]
    segment.done()
    print(segment.name, *seqs)
print("end", flush=True)
"""


def test_a_live_process_keeps_its_segment_and_a_killed_ones_is_claimable(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    child = spawn(children, APPEND_AND_WAIT, str(tmp_path))
    expect_line(child, "ready")
    [path] = segment_files(tmp_path)
    journal = Journal(tmp_path, probe_interval=3600)
    prober = Journal(tmp_path, probe_interval=0)  # probes the lock on every call
    assert journal.pending()  # a segment it has not looked at yet
    assert journal.claim() == []  # held by the live child
    assert not journal.pending()
    assert journal.size == path.stat().st_size
    assert prober.claim() == []
    assert not prober.pending()

    kill(child)
    assert not journal.pending()  # not probed again within probe_interval: the cost pending() saves
    assert prober.pending()  # its probe finds the lock gone
    [segment] = journal.claim()
    assert segment.name == path.name
    assert [r["seq"] for r in segment.records()] == list(range(6))
    assert segment.corrupt == 0
    segment.done()
    assert segment_files(tmp_path) == []


def test_a_process_killed_while_appending_leaves_every_complete_record_readable(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    child = spawn(children, APPEND_FOREVER, str(tmp_path))
    expect_line(child, "ready")
    kill(child)
    journal = Journal(tmp_path)
    segments = journal.claim()
    assert len(segments) > 1
    seqs = [r["seq"] for segment in segments for r in segment.records()]
    assert len(seqs) >= 300
    assert seqs == list(range(len(seqs)))  # in order, nothing missing but what was cut off at the end
    assert journal.corrupt <= 1  # at most the line SIGKILL tore


def test_processes_claiming_at_once_never_get_the_same_segment(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    journal = Journal(tmp_path, segment_bytes=1)
    for seq in range(120):
        journal.append([op(seq)])
    journal.close()
    names = {path.name for path in segment_files(tmp_path)}
    assert len(names) == 120

    claimers = [spawn(children, CLAIM_AND_STORE, str(tmp_path)) for _ in range(3)]
    for claimer in claimers:
        expect_line(claimer, "ready")
    for claimer in claimers:
        assert claimer.stdin is not None
        claimer.stdin.write("go\n")
        claimer.stdin.flush()
    claimed: list[str] = []
    seqs: list[int] = []
    for claimer in claimers:
        out, errors = claimer.communicate(timeout=WAIT)
        assert claimer.returncode == 0, errors
        *lines, end = out.splitlines()
        assert end == "end"
        for line in lines:
            name, *numbers = line.split()
            claimed.append(name)
            seqs.extend(int(n) for n in numbers)
    assert sorted(claimed) == sorted(names)  # each segment exactly once
    assert sorted(seqs) == list(range(120))
    assert segment_files(tmp_path) == []


def test_segments_claimed_by_a_live_process_are_skipped(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    journal = Journal(tmp_path)
    journal.append([op(0)])
    journal.close()
    holder = spawn(
        children,
        "import sys\nfrom qwen_persist.journal import Journal\n"
        "segments = Journal(sys.argv[1]).claim()\nprint(len(segments), flush=True)\nsys.stdin.read()\n",
        str(tmp_path),
    )
    expect_line(holder, "1")
    assert journal.claim() == []
    kill(holder)
    [segment] = journal.claim()  # released when its claimer died
    assert [r["seq"] for r in segment.records()] == [0]
    segment.release()


def test_segment_repr_says_whether_it_is_held(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append([op(0)])
    [segment] = journal.claim()
    assert isinstance(segment, Segment)
    assert segment.name in repr(segment) and "released" not in repr(segment)
    segment.release()
    assert "released" in repr(segment)
