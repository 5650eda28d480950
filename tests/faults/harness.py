"""Processes and places the fault scenarios break: a throwaway PostgreSQL cluster, a database that hangs,
the example proxy and the fake upstream under real uvicorn subprocesses, a SQLite lock holder, a tmpfs.

Everything listens on 127.0.0.1 only, every wait is bounded, and only processes started here are ever
signalled: by their pid, or by the process group created for them (``start_new_session``), so that the
workers of ``uvicorn --workers N`` go with their supervisor.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TESTS = ROOT / "tests"
ENV_PREFIX = "QWEN_PERSIST_"
LOG_TAIL = 4000  # characters of a process log shown in a failure report
ServerT = TypeVar("ServerT", bound="UvicornProcess")


class HarnessUnavailable(RuntimeError):
    """Something a scenario needs is missing on this machine (PostgreSQL binaries, mount rights, ...);
    the message says what, so the test can skip (or fail, in CI) with that reason."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the usual small race with other binders is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, limit: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text if len(text) <= limit else "..." + text[-limit:]


def _private_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child: ours without any QWEN_PERSIST_* setting (a developer's own database
    URL must not leak into a scenario), this worktree first on PYTHONPATH (an editable install may point
    elsewhere), then ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    path = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- PostgreSQL ----------------------------------------------------------------------------------------


def find_postgres_bindir() -> Path | None:
    """Where ``initdb`` and ``postgres`` live: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian's layout), else wherever ``initdb`` is on PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    return None


def _postgres_owner() -> tuple[int, int] | None:
    """initdb and postgres refuse to run as root: as root, the cluster belongs to the ``postgres`` user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise HarnessUnavailable(
            "running as root, and there is no 'postgres' user to own a throwaway cluster"
        ) from None
    return entry.pw_uid, entry.pw_gid


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own in a temporary directory: trust authentication, 127.0.0.1 only,
    durability off (``fsync=off``: nothing here must survive the machine), one database created.

    ``stop()``/``refuse()`` make connections be refused (nothing listens on the port), ``start()`` and
    ``restart()`` bring it back on the same port, so URLs handed out stay valid. ``close()`` (or leaving
    the ``with`` block) stops it and removes every file, also after a failure.
    """

    def __init__(self, *, database: str = "faults", bindir: Path | None = None) -> None:
        found = bindir or find_postgres_bindir()
        if found is None:
            raise HarnessUnavailable(
                "PostgreSQL server binaries (initdb, postgres) not found: no pg_config --bindir, no "
                "/usr/lib/postgresql/*/bin, no initdb on PATH"
            )
        self.bindir = found
        self.database = database
        self.port = free_port()
        self._owner = _postgres_owner()
        self.root = Path(tempfile.mkdtemp(prefix="qp-faults-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        try:
            if self._owner is not None:
                os.chown(self.root, *self._owner)
            self._initdb()
            self.start()
            with self.admin() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        except BaseException:
            self.close()
            raise

    # -- URLs and connections --

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The URL of the database created at start."""
        return self.url_for(self.database)

    def admin(self, database: str = "postgres") -> psycopg.Connection[Any]:
        """An autocommit connection that ignores any statement timeout set on the cluster."""
        return psycopg.connect(
            self.url_for(database), autocommit=True, connect_timeout=5, options="-c statement_timeout=0"
        )

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- lifecycle --

    def _as_owner(self) -> dict[str, Any]:
        if self._owner is None:
            return {}
        uid, gid = self._owner
        return {"user": uid, "group": gid, "extra_groups": []}

    def _initdb(self) -> None:
        command = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        done = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=180, **self._as_owner()
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (a no-op while it runs) and wait until it takes connections."""
        if self.running:
            return
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=80",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "log_min_messages=warning",
        ]
        if self._log is None:
            self._log = self.log_path.open("ab")
        # A session of its own: a Ctrl-C in the terminal must not reach it; we stop it ourselves.
        self._process = subprocess.Popen(
            command,
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._as_owner(),
        )

        def accepting() -> bool:
            if not self.running:
                raise RuntimeError(f"postgres exited at start:\n{tail(self.log_path)}")
            try:
                with psycopg.connect(self.url_for("postgres"), connect_timeout=1):
                    return True
            except psycopg.OperationalError:
                return False

        if not wait_until(accepting, timeout, interval=0.1):
            raise RuntimeError(
                f"postgres did not accept connections within {timeout}s:\n{tail(self.log_path)}"
            )

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: ``fast`` (SIGINT: roll back, disconnect everyone), ``immediate`` (SIGQUIT:
        as a crash would), ``smart`` (SIGTERM: wait for sessions to end). SIGKILL after ``timeout``."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        signum = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def refuse(self) -> None:
        """Connections are refused from now on (the server is stopped; ``start()`` brings it back)."""
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def terminate_backends(self, database: str | None = None) -> int:
        """``pg_terminate_backend`` every other client backend (of ``database`` if given): a writer in the
        middle of a batch loses its connection. Returns how many were terminated."""
        with self.admin() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND (%(db)s::text IS NULL OR datname = %(db)s::text)",
                {"db": database},
            ).fetchone()
        return int(row[0]) if row else 0

    def set_statement_timeout(self, value: str | None, *, database: str | None = None) -> None:
        """Set (``"1ms"``) or reset (None) ``statement_timeout``. Cluster-wide by default (ALTER SYSTEM
        and a reload, which sessions already open pick up too); with ``database``, ALTER DATABASE, which
        only sessions opened afterwards see."""
        with self.admin() as conn:
            if database is None:
                if value is None:
                    conn.execute("ALTER SYSTEM RESET statement_timeout")
                else:
                    conn.execute(
                        sql.SQL("ALTER SYSTEM SET statement_timeout = {}").format(sql.Literal(value))
                    )
                conn.execute("SELECT pg_reload_conf()")
            elif value is None:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RESET statement_timeout").format(sql.Identifier(database))
                )
            else:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET statement_timeout = {}").format(
                        sql.Identifier(database), sql.Literal(value)
                    )
                )

    def log(self) -> str:
        return tail(self.log_path)

    def close(self) -> None:
        try:
            self.stop(mode="immediate", timeout=15)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HungServer:
    """A TCP listener on 127.0.0.1 that accepts connections and never sends a byte: a PostgreSQL that
    hangs (a client without a connect timeout waits forever in the start-up handshake)."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)  # so the accept loop notices close() promptly
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()

    def url(self, database: str = "hung") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)  # held open, never read, never answered
            self.accepted += 1

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- uvicorn subprocesses ------------------------------------------------------------------------------


class UvicornProcess:
    """An ASGI app under ``python -m uvicorn`` in a process group of its own, on 127.0.0.1.

    Output goes to ``log_path`` (a pipe could fill and stall the server). ``unprivileged`` runs it, when
    we are root, without the capabilities that bypass file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so a read-only file or directory is read-only to it as it would be to a
    service account; it needs ``setpriv`` (util-linux).
    """

    def __init__(
        self,
        app: str,
        *,
        app_dir: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        ready_path: str = "/v1/models",
        unprivileged: bool = False,
    ) -> None:
        self.app = app
        self.app_dir = app_dir
        self.log_path = log_path
        self.env = dict(env or {})
        self.workers = workers
        self.port = port or free_port()
        self.ready_path = ready_path
        self.unprivileged = unprivileged
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            self.app,
            "--app-dir",
            str(self.app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "on",  # a start-up error fails the process instead of answering 500 to everything
        ]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        if self.unprivileged and os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise HarnessUnavailable(
                    "setpriv (util-linux) is needed to run the proxy without root's DAC rights"
                )
            command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
        return command

    def start(self: ServerT, timeout: float = 30.0) -> ServerT:
        """Start it and wait until ``ready_path`` answers 200."""
        assert not self.alive, "already running"
        self.exit_code = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_private_env(self.env),
                cwd=self.log_path.parent,
                start_new_session=True,
            )

        def ready() -> bool:
            if not self.alive:
                raise RuntimeError(f"{self.app} exited at start-up:\n{self.log()}")
            try:
                return httpx.get(self.base_url + self.ready_path, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(ready, timeout, interval=0.1):
            self.kill()
            raise RuntimeError(f"{self.app} was not ready within {timeout}s:\n{self.log()}")
        return self

    def terminate(self, limit: float = 30.0) -> float:
        """SIGTERM (uvicorn's graceful shutdown: in-flight requests finish, then the lifespan shutdown,
        where the middleware flushes). Seconds until the process exited; ``math.inf`` if it had not
        exited after ``limit`` seconds, in which case it is killed."""
        process = self.process
        if process is None or process.poll() is not None:
            return 0.0
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = process.wait(limit)
        except subprocess.TimeoutExpired:
            self.kill()
            return math.inf
        elapsed = time.monotonic() - started
        self._reap_group()  # workers of --workers N normally end with their supervisor
        return elapsed

    def kill(self) -> None:
        """SIGKILL the process group (the server and any workers): a crash, nothing flushed."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.exit_code = process.wait(10)

    def _reap_group(self) -> None:
        # A worker that outlived its supervisor would hold the port and the database; it is ours.
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log(self) -> str:
        return tail(self.log_path)

    def close(self) -> None:
        if self.process is not None:
            self.kill()

    def __enter__(self) -> UvicornProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class UpstreamProcess(UvicornProcess):
    """The fake OpenAI upstream (``examples/fake_upstream.py``); ``url`` is its ``/v1`` base."""

    def __init__(self, log_path: Path) -> None:
        super().__init__("fake_upstream:app", app_dir=EXAMPLES, log_path=log_path)

    @property
    def url(self) -> str:
        return self.base_url + "/v1"


class ProxyProcess(UvicornProcess):
    """The example proxy (``examples/openai_proxy.py``) with the middleware, under uvicorn, built by
    ``tests/faults/proxy_app.py`` from its environment: ``UPSTREAM_BASE_URL`` and the middleware's
    ``QWEN_PERSIST_*`` options. ``options`` adds more of those (``{"queue_size": "64"}``).
    """

    def __init__(
        self,
        *,
        upstream_url: str,
        database_url: str,
        spill_dir: Path,
        log_path: Path,
        shutdown_timeout: float = 2.0,
        flush_interval: float = 0.05,
        options: Mapping[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        unprivileged: bool = False,
    ) -> None:
        env = {
            "UPSTREAM_BASE_URL": upstream_url,
            "QWEN_PERSIST_DATABASE_URL": database_url,
            "QWEN_PERSIST_SPILL_DIR": str(spill_dir),
            "QWEN_PERSIST_SHUTDOWN_TIMEOUT": str(shutdown_timeout),
            "QWEN_PERSIST_FLUSH_INTERVAL": str(flush_interval),
            # The suite runs against either writer: FAULT_WRITER=process (CI runs both).
            "QWEN_PERSIST_WRITER": os.environ.get("FAULT_WRITER", "thread"),
        }
        env.update({ENV_PREFIX + name.upper(): value for name, value in (options or {}).items()})
        super().__init__(
            "faults.proxy_app:app",
            app_dir=TESTS,
            log_path=log_path,
            env=env,
            workers=workers,
            port=port,
            unprivileged=unprivileged,
        )
        self.upstream_url = upstream_url
        self.database_url = database_url
        self.spill_dir = spill_dir
        self.shutdown_timeout = shutdown_timeout
        self.flush_interval = flush_interval
        self.options = dict(options or {})

    def again(self) -> ProxyProcess:
        """A new, not yet started process with the same configuration, port, spill directory and log: the
        proxy restarted."""
        return ProxyProcess(
            upstream_url=self.upstream_url,
            database_url=self.database_url,
            spill_dir=self.spill_dir,
            log_path=self.log_path,
            shutdown_timeout=self.shutdown_timeout,
            flush_interval=self.flush_interval,
            options=self.options,
            workers=self.workers,
            port=self.port,
            unprivileged=self.unprivileged,
        )


# -- SQLite and file system faults ---------------------------------------------------------------------


class SqliteLock:
    """Another writer holding a SQLite file: ``BEGIN EXCLUSIVE`` keeps every other reader and writer out
    (in WAL mode, other writers) until ``release()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def hold(self, timeout: float = 10.0) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=timeout, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            self._conn.execute("COMMIT")
            self._conn.close()
            self._conn = None

    @property
    def held(self) -> bool:
        return self._conn is not None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"8m"``) mounted at ``path`` for the block; unmounted afterwards (lazily if
    something still holds it). Raises HarnessUnavailable when mounting is not allowed here."""
    path.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        raise HarnessUnavailable("mount/umount not found")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "qp-faults", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise HarnessUnavailable(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run([umount, str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run([umount, "-l", str(path)], capture_output=True, timeout=30)


def fill_filesystem(directory: Path, name: str = "filler") -> Path:
    """Write a file into ``directory`` until its file system is full (ENOSPC), down to the last byte; the
    file is returned so the caller can delete it to free the space again."""
    path = directory / name
    # Unbuffered: a buffered file would fail again at close, flushing what did not fit.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(descriptor, block)
            except OSError:
                continue  # full at this size: try smaller pieces
    finally:
        os.close(descriptor)
    return path


def make_read_only(paths: Sequence[Path]) -> dict[Path, int]:
    """chmod every path read-only (directories keep their x bit); the old modes, for ``restore_modes``."""
    modes: dict[Path, int] = {}
    for path in paths:
        if path.exists():
            mode = path.stat().st_mode & 0o7777
            modes[path] = mode
            path.chmod(mode & ~0o222)
    return modes


def restore_modes(modes: Mapping[Path, int]) -> None:
    for path, mode in modes.items():
        with contextlib.suppress(FileNotFoundError):
            path.chmod(mode)
