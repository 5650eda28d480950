"""Shared benchmark plumbing: fresh databases, the pinned server child, CPU and memory readings, stats."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from qwen_persist.engine import make_engine, normalize_url
from qwen_persist.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
SERVER_CORE = 0  # the server (event loop and writer thread) runs here ...
CLIENT_CORE = 1  # ... and the load generator here, so neither steals the other's CPU
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pin_self(core: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {core})


# -- databases ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(backend: str, workdir: Path) -> Iterator[str]:
    """A new, migrated database of ``backend`` ("sqlite" or "postgresql"), dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        upgrade(url)
        yield url
        return
    name = f"qp_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = normalize_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def postgres_available() -> bool:
    try:
        engine = make_engine(POSTGRES_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


def count_rows(url: str, variant: str) -> tuple[int, int]:
    """(requests rows, responses rows) — for the naive variant both are its one-table row count."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if variant == "naive":
                n = conn.execute(text("SELECT count(*) FROM naive_exchanges")).scalar_one()
                return n, n
            requests = conn.execute(text("SELECT count(*) FROM requests")).scalar_one()
            responses = conn.execute(text("SELECT count(*) FROM responses")).scalar_one()
            return requests, responses
    finally:
        engine.dispose()


# -- the server child ------------------------------------------------------------------------------


@dataclass
class ServerRun:
    variant: str
    database_url: str | None
    port: int
    process: subprocess.Popen[bytes]
    count_file: Path
    answered: int = -1
    requests_rows: int = -1
    responses_rows: int = -1

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the whole server process (event loop and writer thread) and of its
        writer process, if it has one."""
        return sum(_cpu_seconds(pid) for pid in (self.pid, *writer_processes(self.pid)))

    def free_writer(self) -> None:
        """Let the writer process run on every core (it inherits the server's pinning). It is started
        by the server's lifespan, in a thread: wait for it."""
        deadline = time.monotonic() + 30
        while not (children := writer_processes(self.pid)):
            if time.monotonic() > deadline:
                raise RuntimeError("the server started no writer process")
            time.sleep(0.02)
        for pid in children:
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), range(os.cpu_count() or 1))

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    @property
    def all_persisted(self) -> bool:
        return self.answered == self.requests_rows == self.responses_rows


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def writer_processes(parent: int) -> list[int]:
    """The writer processes (``writer="process"``) whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"writer_child" in command:
                found.append(int(entry))
    return found


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn leaves sockets it is handed as they are; without NODELAY keep-alive requests stall ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def server(variant: str, database_url: str | None, workdir: Path) -> Iterator[ServerRun]:
    """Start ``benchmarks.app`` on the server core; on exit stop it gracefully and count the rows."""
    sock = listening_socket()
    count_file = workdir / f"answered-{uuid.uuid4().hex[:8]}"
    args = [sys.executable, "-m", "benchmarks.app", variant, str(sock.fileno()), str(count_file)]
    if database_url:
        args.append(database_url)
    if shutil.which("taskset"):
        args = ["taskset", "-c", str(SERVER_CORE), *args]
    process = subprocess.Popen(args, pass_fds=[sock.fileno()], cwd=ROOT)
    port = sock.getsockname()[1]
    sock.close()
    run = ServerRun(variant, database_url, port, process, count_file)
    try:
        _wait_ready(port, process)
        if variant.endswith("-free"):
            run.free_writer()
        yield run
    finally:
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises it
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if count_file.exists():
        run.answered = int(count_file.read_text())
    if database_url:
        run.requests_rows, run.responses_rows = count_rows(database_url, variant)


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"benchmark server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if conn.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("benchmark server did not come up in 30 s")


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qp-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- statistics ------------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``median [min..max]`` of the repeats."""
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> str:
    import sqlite3

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    # uvicorn's "auto" picks httptools and uvloop when they are installed (uvicorn[standard]); the
    # bare and the wrapped server always run on the same choice, shown here.
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return (
        f"nproc={os.cpu_count()} cpu={cpu!r} python={sys.version.split()[0]} sqlite={sqlite3.sqlite_version}"
        f" uvicorn http={os.environ.get('BENCH_HTTP', http)} loop={os.environ.get('BENCH_LOOP', loop)}"
    )


def exit_with_persistence_check(problems: Sequence[str]) -> None:
    """Say whether every exchange the server answered was stored, and exit non-zero if not."""
    print("every exchange persisted:", "yes" if not problems else "NO")
    for problem in problems:
        print("  " + problem)
    sys.exit(1 if problems else 0)
