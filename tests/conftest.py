"""Shared fixtures: every database test runs on SQLite and, when configured, on PostgreSQL.

Set ``QWEN_PERSIST_TEST_POSTGRES_URL`` (for example ``postgresql://root@127.0.0.1:5432/test``) to run the
PostgreSQL half; each test then gets a database of its own, created and dropped around it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from sqlalchemy import text

from qwen_persist.engine import make_engine, normalize_url

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
POSTGRES_URL_ENV = "QWEN_PERSIST_TEST_POSTGRES_URL"

# The examples (fake upstream, proxies) are plain scripts; tests import them as modules.
sys.path.insert(0, str(ROOT / "examples"))

BACKENDS = ["sqlite", "postgresql"]

# Hypothesis: every run of the suite, CI's and a developer's alike, uses the "ci" profile, so a verdict
# depends on the code alone, not on how busy the machine is or on what earlier runs found. The property
# tests' own @settings (example counts) still apply on top of it.
# * No deadline and no too_slow health check: both time examples on the wall clock, and a loaded 2-core
#   machine makes slow examples out of correct code. The other health checks count, not time, and stay.
# * derandomize: the examples are derived from each test's source, so every run checks the same ones and
#   a failure in CI fails again anywhere. A fixed example database would not give that: it only replays
#   past failures, it lives beside the checkout (a fresh clone has none), and it changes as runs go on.
#   Hence no database, and print_blob so a failure prints the @reproduce_failure line that replays it.
# Exploring new examples is a deliberate act: `python -m pytest --hypothesis-profile=explore` (random
# examples, the local example database), or --hypothesis-seed with that profile.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    database=None,
    print_blob=True,
)
settings.register_profile(
    "explore",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) has SIGINT ignored, and
# children inherit an ignored signal. The tests stop their servers and CLIs with Ctrl-C as a terminal
# would, so this process takes Python's usual handler back (a handler, unlike "ignored", is not inherited).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The suite's tests are written against the thread writer: its timing (a record stored within a flush
# interval, no child process to start first) and its internals. The default, "auto", would start a writer
# process for every middleware on a machine with two CPUs. The tests that mean the writer process ask
# for it: tests/test_writer_process.py, tests/test_cpus.py, the demo's (which runs the real default),
# and the fault suite run with FAULT_WRITER=process.
os.environ.setdefault("QWEN_PERSIST_WRITER", "thread")


def _postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_URL_ENV) or None


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each backend: a new SQLite file, or a new PostgreSQL database."""
    yield from _empty_database(request.param, tmp_path)


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`database_url` shared by a module's tests: for read-only tests over data recorded once."""
    yield from _empty_database(request.param, tmp_path_factory.mktemp("module-db"))


def _empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    admin_url = _postgres_admin_url()
    if admin_url is None:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_URL_ENV} must be set in CI: the PostgreSQL tests must run, not skip")
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    yield from _fresh_postgres_database(admin_url)


def _fresh_postgres_database(admin_url: str) -> Iterator[str]:
    name = f"qp_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = normalize_url(admin_url).set(database=name)
        yield url.render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """`database_url`, migrated to the head revision."""
    from qwen_persist.migrate import upgrade

    upgrade(database_url)
    return database_url


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, the loop uvicorn and the middleware use."""
    return "asyncio"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def legacy_fixture(tmp_path: Path) -> Path:
    """A private copy of the Node.js original's v1 database (``tests/fixtures``, shipped with the tests).

    The file is in WAL mode: SQLite opening it, even read-only, creates ``-wal``/``-shm`` files beside it.
    Tests get a copy so the checkout is never written to (and may be read-only).
    """
    path = FIXTURES / "provider-router-v1.db"
    if not path.exists():
        pytest.fail(f"legacy fixture missing: {path}")
    copy = tmp_path / "fixture" / path.name
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    return copy
