"""Helpers shared by the end-to-end tests: a real uvicorn server in a thread, and stored rows."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

from qwen_persist.engine import make_engine
from qwen_persist.models import Request as RequestRow
from qwen_persist.models import Response as ResponseRow
from qwen_persist.models import Session as SessionRow

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yield its base URL. ``config``
    goes to ``uvicorn.Config`` (``root_path=...``, say).

    Leaving the block runs the app's lifespan shutdown, which is where the middleware flushes.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Handed a socket, uvicorn does not set TCP_NODELAY itself; without it keep-alive requests stall
    # on Nagle's algorithm (about 40 ms each).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    config.setdefault("lifespan", "auto")
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def stored_exchanges(database_url: str) -> list[tuple[RequestRow, ResponseRow | None]]:
    """Every stored request with its response (None if it has none), in arrival order."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            query = (
                select(RequestRow, ResponseRow)
                .outerjoin(ResponseRow, ResponseRow.request_id == RequestRow.id)
                .order_by(RequestRow.id)
            )
            result = [(row[0], row[1]) for row in session.execute(query)]
            session.expunge_all()
            return result
    finally:
        engine.dispose()


def stored_sessions(database_url: str) -> dict[str, SessionRow]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            rows = {row.id: row for row in session.scalars(select(SessionRow))}
            session.expunge_all()
            return rows
    finally:
        engine.dispose()


def find_middleware(app: Any) -> Any:
    """The PersistenceMiddleware inside a Starlette app's built middleware stack."""
    from qwen_persist import PersistenceMiddleware

    layer = app.middleware_stack
    while not isinstance(layer, PersistenceMiddleware):
        layer = layer.app
    return layer


def percentile_cont(values: list[float], p: float) -> float | None:
    """The p-th percentile as PostgreSQL's ``percentile_cont`` defines it, computed the slow obvious way:
    the reference the stats tests hold both backends to."""
    if not values:
        return None
    ordered = sorted(values)
    position = p * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
