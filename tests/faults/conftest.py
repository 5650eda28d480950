"""Fixtures of the fault suite: the fake upstream, a throwaway PostgreSQL cluster, each scenario's
database (SQLite file or PostgreSQL database) with the means to take it down, proxies that are always
stopped at the end, and the summary table printed after the run.

PostgreSQL scenarios need the server binaries (found at run time); without them they are skipped with
the reason, except in CI (``CI`` set), where they fail: there the suite must run in full.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from qwen_persist.migrate import upgrade

from .counts import Verdict
from .harness import (
    HarnessUnavailable,
    ProxyProcess,
    SqliteLock,
    ThrowawayPostgres,
    UpstreamProcess,
)

SHUTDOWN_TIMEOUT = 2.0  # the proxies' shutdown_timeout: short, so SIGTERM scenarios stay quick
FLUSH_INTERVAL = 0.05  # the default, stated so that the SIGKILL scenario's arithmetic is explicit
# During an outage the queue must overflow within seconds, not after the default 10,000 records, so the
# scenarios reach the spill/journal path a long outage reaches in production.
FAULT_QUEUE_SIZE = "64"

_SUMMARY: list[tuple[str, str]] = []  # (test id, summary line), in run order
_OUTCOMES: dict[str, str] = {}


def unavailable(reason: str) -> NoReturn:
    """Skip for a missing tool; in CI fail, so a suite that silently shrank cannot pass."""
    if os.environ.get("CI"):
        pytest.fail(f"fault suite needs it in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake upstream in a uvicorn process of its own, shared by the suite; its ``/v1`` URL."""
    process = UpstreamProcess(tmp_path_factory.mktemp("upstream") / "upstream.log")
    with process:
        process.start()
        yield process.url


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[ThrowawayPostgres]:
    try:
        cluster = ThrowawayPostgres()
    except HarnessUnavailable as exc:
        unavailable(str(exc))
    with cluster:
        yield cluster


@dataclass
class Backend:
    """A scenario's database and how to take it away: SQLite is locked by another writer (``BEGIN
    EXCLUSIVE``), PostgreSQL is stopped (connections refused)."""

    name: str
    url: str
    path: Path | None = None  # the SQLite file
    cluster: ThrowawayPostgres | None = None
    database: str | None = None  # the PostgreSQL database's name
    _lock: SqliteLock | None = field(default=None, repr=False)

    def outage(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        else:
            assert self.path is not None
            self._lock = SqliteLock(self.path)
            self._lock.hold()

    def recover(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
        elif self._lock is not None:
            self._lock.release()
            self._lock = None


def _postgres_database(cluster: ThrowawayPostgres) -> Generator[Backend, None, None]:
    # Tests share the cluster but never a database; one that stopped the cluster and failed before
    # starting it again must not take the next test down with it.
    cluster.start()
    cluster.set_statement_timeout(None)
    name = f"qpf_{uuid.uuid4().hex[:10]}"
    url = cluster.create_database(name)
    upgrade(url)
    try:
        yield Backend("postgresql", url, cluster=cluster, database=name)
    finally:
        cluster.start()
        cluster.set_statement_timeout(None)
        cluster.drop_database(name)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[Backend]:
    # A directory of its own: scenarios change its permissions without touching logs or spill files.
    path = tmp_path / "db" / "faults.db"
    path.parent.mkdir()
    url = f"sqlite:///{path}"
    upgrade(url)
    backend = Backend("sqlite", url, path=path)
    try:
        yield backend
    finally:
        backend.recover()


@pytest.fixture
def pg_backend(pg_cluster: ThrowawayPostgres) -> Iterator[Backend]:
    yield from _postgres_database(pg_cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The scenario on each backend: a migrated SQLite file, or a migrated database of its own in the
    throwaway cluster."""
    fixture = "sqlite_backend" if request.param == "sqlite" else "pg_backend"
    result: Backend = request.getfixturevalue(fixture)
    return result


class Proxies:
    """Starts proxies for one test and always stops them (SIGKILL of their process group) at the end;
    their logs are printed then, so a failing test shows them."""

    def __init__(self, root: Path, upstream_url: str) -> None:
        self.root = root
        self.upstream_url = upstream_url
        self.started: list[ProxyProcess] = []

    def start(
        self,
        database_url: str,
        *,
        name: str = "proxy",
        spill_dir: Path | None = None,
        options: dict[str, str] | None = None,
        **settings: Any,
    ) -> ProxyProcess:
        proxy = ProxyProcess(
            upstream_url=self.upstream_url,
            database_url=database_url,
            spill_dir=spill_dir or self.root / f"{name}-spill",
            log_path=self.root / f"{name}.log",
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            flush_interval=FLUSH_INTERVAL,
            options=options,
            **settings,
        )
        self.started.append(proxy)
        try:
            return proxy.start()
        except HarnessUnavailable as exc:  # setpriv missing: the permission scenarios cannot run here
            pytest.skip(str(exc))

    def restart(self, proxy: ProxyProcess) -> ProxyProcess:
        """The same proxy started again (same port, spill directory and log) after it stopped."""
        again = proxy.again()
        self.started.append(again)
        return again.start()

    def close(self) -> None:
        logs: dict[Path, str] = {}
        for proxy in self.started:
            proxy.close()
            logs[proxy.log_path] = proxy.log()
        for path, text in logs.items():
            print(f"\n----- {path.name} -----\n{text}")


@pytest.fixture
def proxies(tmp_path: Path, upstream: str) -> Iterator[Proxies]:
    started = Proxies(tmp_path, upstream)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[Verdict], None]:
    """Record a scenario's one-line summary (printed now and in the table after the run)."""

    def record(verdict: Verdict) -> None:
        line = verdict.line()
        print(f"SUMMARY {line}")
        _SUMMARY.append((request.node.nodeid, line))

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    result = yield
    if result.when == "call" or result.outcome != "passed":
        _OUTCOMES.setdefault(item.nodeid, result.outcome)
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SUMMARY:
        return
    terminalreporter.section("fault scenarios")
    terminalreporter.write_line(
        "scenario | sent | client failures | rows stored | journal records | lost | result"
    )
    for nodeid, line in _SUMMARY:
        terminalreporter.write_line(f"{line} | {_OUTCOMES.get(nodeid, '?')}")
