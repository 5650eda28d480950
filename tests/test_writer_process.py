"""The writer in a child process (``writer="process"``): what the thread writer promises, it keeps, and a
child that dies, a server that dies, a terminal's Ctrl-C and a fork cost no record.

The fault suite runs against this writer too (``FAULT_WRITER=process``, see `.ci/run`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from support import stored_exchanges
from traffic import record_traffic
from writer_process_app import answer as _answer
from writer_process_app import exchange as _exchange

from qwen_persist import PersistenceMiddleware
from qwen_persist.engine import make_engine
from qwen_persist.writer_process import ProcessWriter

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def writer_children(parent: int) -> list[int]:
    """The writer processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"qwen_persist.writer_child" in command:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_traffic_through_uvicorn_from_the_openai_sdk_is_stored_and_the_child_ends(
    migrated_url: str, tmp_path: Path
) -> None:
    before = set(writer_children(os.getpid()))
    traffic = record_traffic(migrated_url, tmp_path, rounds=2, writer="process")
    stored = stored_exchanges(migrated_url)
    assert sorted(req.request_id for req, _ in stored) == sorted(seen.request_id for seen in traffic.seen)
    assert all(resp is not None for _, resp in stored)
    by_id = {req.request_id: resp for req, resp in stored}
    for seen in traffic.ok():
        response = by_id[seen.request_id]
        assert response is not None and response.upstream_id == seen.completion_id
        stored_content = response.openai_response["choices"][0]["message"]["content"]
        assert (stored_content or "") == (seen.content or "")
    # The server stopped: its writer process stored everything and exited.
    assert wait_for(lambda: not (set(writer_children(os.getpid())) - before), 10)


def test_a_killed_writer_process_is_replaced_and_nothing_is_lost(migrated_url: str, tmp_path: Path) -> None:
    middleware = PersistenceMiddleware(
        _answer, database_url=migrated_url, spill_dir=str(tmp_path / "spill"), writer="process"
    )
    writer = middleware.writer
    assert isinstance(writer, ProcessWriter)

    async def run() -> None:
        for i in range(50):
            await _exchange(middleware, f"first {i}")
        assert await writer.barrier(30)
        (child,) = [pid for pid in writer_children(os.getpid()) if alive(pid)]
        for i in range(50):
            await _exchange(middleware, f"second {i}")
        os.kill(child, signal.SIGKILL)  # with frames sent and not acknowledged, or still to send
        for i in range(50):
            await _exchange(middleware, f"third {i}")
        assert await writer.barrier(30)
        await middleware.aclose()

    asyncio.run(run())
    stats = middleware.stats()
    stored = stored_exchanges(migrated_url)
    assert len(stored) == 150 and all(resp is not None for _, resp in stored)
    assert stats.accepted == 300 and stats.restarts >= 1 and stats.failed == 0
    assert stats.written + stats.duplicates >= 300


def test_no_interpreter_to_start_falls_back_to_the_writer_thread(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    middleware = PersistenceMiddleware(
        _answer, database_url=migrated_url, spill_dir=str(tmp_path / "spill"), writer="process"
    )

    async def run() -> None:
        for i in range(20):
            await _exchange(middleware, f"m {i}")
        assert await middleware.writer.barrier(30)
        await middleware.aclose()

    asyncio.run(run())
    assert len(stored_exchanges(migrated_url)) == 20
    assert middleware.stats().written == 40 and middleware.stats().accepted == 40


@contextmanager
def _server(migrated_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The recorded app under uvicorn in a process of its own; killed at the end if still running."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        WRITER_TEST_DATABASE_URL=migrated_url,
        WRITER_TEST_SPILL=str(tmp_path / "spill"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "uvicorn", "writer_process_app:app", "--app-dir", str(TESTS)]
    command += ["--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"]
    server = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,  # its own process group: the test can signal it as a terminal would
    )
    try:
        yield server, port
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _all_answered(database_url: str, count: int) -> bool:
    stored = stored_exchanges(database_url)
    return len(stored) == count and all(resp is not None for _, resp in stored)


def _send_requests(port: int, count: int) -> None:
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _up(base), 30), "server did not start"
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            body = {"model": "m", "messages": [{"role": "user", "content": f"n {i}"}]}
            assert client.post(f"{base}/v1/chat/completions", json=body).status_code == 200


def _up(base: str) -> bool:
    try:
        httpx.get(base, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("how", ["SIGKILL to the server", "SIGINT to the process group"])
def test_the_writer_process_outlives_neither_the_server_nor_its_records(
    how: str, migrated_url: str, tmp_path: Path
) -> None:
    """A server killed outright: its writer process sees the pipe close, stores what it received and
    exits. A terminal's Ctrl-C (SIGINT to the whole group): the writer ignores it, the server stops in
    order, and the writer ends when the server closes the pipe."""
    with _server(migrated_url, tmp_path) as (server, port):
        _send_requests(port, 40)
        (child,) = writer_children(server.pid)
        time.sleep(0.5)  # several flush intervals: everything has reached the writer process
        if how == "SIGKILL to the server":
            server.kill()
        else:
            os.killpg(server.pid, signal.SIGINT)
        assert server.wait(20) is not None
        assert wait_for(lambda: not alive(child), 15), "the writer process outlived the server"
    assert _all_answered(migrated_url, 40)


@contextmanager
def _writes_held(database_url: str) -> Iterator[None]:
    """Another session holds the write lock: the writer process blocks inside its transaction."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            if database_url.startswith("sqlite"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(text("LOCK TABLE requests IN EXCLUSIVE MODE"))
            yield
            conn.rollback()
    finally:
        engine.dispose()


def test_an_orphaned_writer_process_stores_what_is_left_in_the_pipe(
    migrated_url: str, tmp_path: Path
) -> None:
    """The server dies while its writer process is busy storing a batch (held up by a lock here; a busy
    machine or a slow database are the same) and more frames wait in the pipe: they are the dead
    server's last records, and the writer process reads and stores them all before it exits."""
    with _server(migrated_url, tmp_path) as (server, port):
        _send_requests(port, 5)
        (child,) = writer_children(server.pid)
        assert wait_for(lambda: _all_answered(migrated_url, 5), 30)
        with _writes_held(migrated_url):
            _send_requests(port, 1)
            time.sleep(0.5)  # the writer process took that frame and waits for the lock
            _send_requests(port, 30)
            time.sleep(0.5)  # several flush intervals: these frames wait in the pipe
            server.kill()
            assert server.wait(20) is not None
        assert wait_for(lambda: not alive(child), 30), "the writer process outlived the server"
    assert _all_answered(migrated_url, 36)


def test_a_forked_worker_starts_its_own_writer_process(migrated_url: str, tmp_path: Path) -> None:
    """gunicorn --preload and the like: the app (and a writer that has run) built before a fork."""
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(TESTS)!r})
        from writer_process_app import answer, exchange
        from qwen_persist import PersistenceMiddleware

        mw = PersistenceMiddleware(answer, database_url={migrated_url!r},
                                   spill_dir={str(tmp_path / "spill")!r}, writer="process")

        async def run(label, n):
            for i in range(n):
                await exchange(mw, label + str(i))
            assert await mw.writer.barrier(30)

        asyncio.run(run("parent", 5))
        pid = os.fork()
        if pid == 0:
            asyncio.run(run("worker", 7))
            mw.writer.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        mw.writer.close()
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    stored = stored_exchanges(migrated_url)
    texts = sorted(req.openai_request["messages"][0]["content"] for req, _ in stored)
    assert texts == sorted([f"parent{i}" for i in range(5)] + [f"worker{i}" for i in range(7)])
    assert all(resp is not None for _, resp in stored)


def test_a_writer_process_that_stops_reading_costs_memory_no_more_than_queue_size(
    migrated_url: str, tmp_path: Path
) -> None:
    """The child frozen (SIGSTOP) under traffic: the pipe fills, the feeder journals what piles up past
    queue_size instead of holding it, and once the child runs again everything is stored."""
    middleware = PersistenceMiddleware(
        _answer, database_url=migrated_url, spill_dir=str(tmp_path / "spill"), writer="process", queue_size=50
    )
    writer = middleware.writer
    assert isinstance(writer, ProcessWriter)
    padding = "x" * 4000  # 1,500 exchanges of ~4 KB: several times the pipe's capacity

    async def run() -> int:
        await _exchange(middleware, "first")
        assert await writer.barrier(30)
        (child,) = [pid for pid in writer_children(os.getpid()) if alive(pid)]
        os.kill(child, signal.SIGSTOP)
        try:
            for i in range(1500):
                await _exchange(middleware, f"{i} {padding}")
                if i % 100 == 0:
                    await asyncio.sleep(0.06)  # the feeder's turns
            await asyncio.sleep(0.5)
            backlog = len(writer._pending)
        finally:
            os.kill(child, signal.SIGCONT)
        await middleware.aclose()
        return backlog

    backlog = asyncio.run(run())
    stats = middleware.stats()
    assert backlog <= 50 + 10  # what arrived since the feeder's last look
    assert stats.spilled > 0 and stats.failed == 0, stats
    # What the closing child could not load yet, the next start does.
    again = PersistenceMiddleware(_answer, database_url=migrated_url, spill_dir=str(tmp_path / "spill"))
    again.writer.start()
    again.writer.close()
    stored = stored_exchanges(migrated_url)
    assert len(stored) == 1501 and all(resp is not None for _, resp in stored)
