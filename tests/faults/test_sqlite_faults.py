"""SQLite under faults: another writer holding the file, a read-only file, an unwritable spill directory,
a full disk. Each while traffic flows; afterwards every accepted exchange must be stored exactly once,
without anyone running ``qwen-persist replay``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import FAULT_QUEUE_SIZE, Backend, Proxies
from .counts import Verdict, sqlite_integrity
from .harness import HarnessUnavailable, SqliteLock, fill_filesystem, make_read_only, restore_modes, tmpfs
from .scenario import log_lines, settle, traffic_with_fault

pytestmark = pytest.mark.fault

QUEUE = {"queue_size": FAULT_QUEUE_SIZE}
PROBLEM_LINES = r"WARNING|ERROR|Traceback|lost"


def test_sqlite_locked_by_another_writer_mid_traffic(
    sqlite_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    assert sqlite_backend.path is not None
    proxy = proxies.start(sqlite_backend.url, options=QUEUE)
    lock = SqliteLock(sqlite_backend.path)
    outcomes = traffic_with_fault([proxy.base_url], lock.hold, lock.release, hold=3.0)
    verdict = settle("sqlite locked 3 s", sqlite_backend.url, [proxy], outcomes, report)
    assert verdict.ok, verdict.explain()


def test_sqlite_read_only_then_writable_again(
    sqlite_backend: Backend, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    """The file, its WAL and its directory lose their write permission while the proxy is up, and get it
    back 3 s into the traffic. The proxy runs without root's permission override, as a service account.

    SQLite keeps writing through a handle opened while the file was writable, so a chmod only reaches
    connections opened afterwards; the fault is therefore applied before the writer's first connection,
    which is then opened read-only, and stays so unless the writer opens another one.
    """
    assert sqlite_backend.path is not None
    directory = sqlite_backend.path.parent
    proxy = proxies.start(sqlite_backend.url, options=QUEUE, unprivileged=True)
    paths = [directory, *sorted(directory.iterdir())]
    modes: dict[Path, int] = {}

    def inject() -> None:
        modes.update(make_read_only(paths))

    outcomes = traffic_with_fault([proxy.base_url], inject, lambda: restore_modes(modes), warmup=0, hold=3.0)
    verdict = settle("sqlite read-only 3 s", sqlite_backend.url, [proxy], outcomes, report)
    print("proxy said:", *log_lines(proxy, PROBLEM_LINES), sep="\n  ")
    assert verdict.ok, verdict.explain()


def test_sqlite_spill_directory_unwritable(
    sqlite_backend: Backend, proxies: Proxies, tmp_path: Path, report: Callable[[Verdict], None]
) -> None:
    """The journal's directory cannot be written, and the database is locked for 3 s. This is the one
    case where loss is by design (README, "What survives what"): what the database cannot take while
    nothing can hold it on disk is lost. The target: never silently. Every client is still answered,
    every lost record is counted in ``failed`` and said at ERROR, and the rest is stored."""
    assert sqlite_backend.path is not None
    spill_dir = tmp_path / "spill-unwritable"
    spill_dir.mkdir(mode=0o500)
    proxy = proxies.start(sqlite_backend.url, spill_dir=spill_dir, options=QUEUE, unprivileged=True)
    lock = SqliteLock(sqlite_backend.path)
    outcomes = traffic_with_fault([proxy.base_url], lock.hold, lock.release, hold=3.0)
    verdict = settle(
        "sqlite journal unwritable + locked 3 s (loss counted)", sqlite_backend.url, [proxy], outcomes, report
    )
    said = log_lines(proxy, r"LOST|writer stopped", limit=50)
    print("proxy said:", *said, sep="\n  ")
    assert not verdict.failures and verdict.stored > 0
    lost_exchanges = len(verdict.lost) + len(verdict.unanswered)
    [stopped] = [line for line in said if "writer stopped" in line]
    failed = int(re.search(r"failed=(\d+)", stopped).group(1))  # type: ignore[union-attr]
    assert lost_exchanges > 0 and failed >= lost_exchanges  # one record or two per lost exchange
    assert any("records LOST" in line for line in said)


def test_sqlite_disk_full_mid_traffic(
    tmp_path: Path, proxies: Proxies, report: Callable[[Verdict], None]
) -> None:
    """The database lives on a 16 MiB tmpfs that is filled to the last byte for 3 s mid-traffic."""
    from qwen_persist.migrate import upgrade

    with contextlib.ExitStack() as stack:
        try:
            small = stack.enter_context(tmpfs(tmp_path / "small", "16m"))
        except HarnessUnavailable as exc:
            pytest.skip(str(exc))
        url = f"sqlite:///{small / 'faults.db'}"
        upgrade(url)
        proxy = proxies.start(url, options=QUEUE)
        stack.callback(proxy.close)  # before the unmount: an open database would keep it busy
        filler: list[Path] = []

        def clear() -> None:
            for path in filler:
                path.unlink()

        outcomes = traffic_with_fault(
            [proxy.base_url], lambda: filler.append(fill_filesystem(small)), clear, hold=3.0
        )
        verdict = settle("sqlite disk full 3 s", url, [proxy], outcomes, report)
        integrity = sqlite_integrity(url)
        print("proxy said:", *log_lines(proxy, PROBLEM_LINES), sep="\n  ")
    assert integrity == "ok", integrity
    assert verdict.ok, verdict.explain()
