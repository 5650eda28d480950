"""The repositories: the one place the library's SQL lives.

`History` bundles them over one engine::

    history = History("sqlite:///qwen_persist.db")
    page = history.requests.exchanges(RequestFilter(model="qwen-max"), Pagination(limit=20))
    stats = history.stats.summary(RequestFilter(since=parse_time("2026-11-24")), group_by=["model"])
    detail = await history.sessions.adetail(session_id)   # the async twin: off the event loop
    completion = history.completions.get("chatcmpl-...")   # a stored completion, by the id the client saw

The writer (`writes.write_ops`), `SessionManager`, the history HTTP API, the Stored Completions API and
the CLI all go through these classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from sqlalchemy import Engine

from ..config import ConfigurationError
from ..engine import make_engine, missing_sqlite_file, resolve_database_url
from .completions import LIBRARY_METADATA_KEYS, CompletionFilter, CompletionRepository, StoredCompletion
from .exchanges import RequestRepository, ResponseRepository
from .pruning import PruneCounts, PruningRepository
from .queries import (
    InvalidParameter,
    Pagination,
    RequestFilter,
    ResponseFilter,
    SessionFilter,
    parse_duration,
    parse_since,
    parse_time,
)
from .rows import ExchangeRecord, Page, RequestRecord, ResponseRecord, SessionDetail, SessionInfo, StatsRow
from .sessions import SessionRepository
from .stats import StatsRepository

__all__ = [
    "LIBRARY_METADATA_KEYS",
    "CompletionFilter",
    "CompletionRepository",
    "ExchangeRecord",
    "History",
    "InvalidParameter",
    "Page",
    "Pagination",
    "PruneCounts",
    "PruningRepository",
    "ReadPool",
    "RequestFilter",
    "RequestRecord",
    "RequestRepository",
    "ResponseFilter",
    "ResponseRecord",
    "ResponseRepository",
    "SessionDetail",
    "SessionFilter",
    "SessionInfo",
    "SessionRepository",
    "StatsRepository",
    "StatsRow",
    "StoredCompletion",
    "parse_duration",
    "parse_since",
    "parse_time",
]

READ_THREADS = 4  # reads in flight at once from the async face; more wait their turn

P = ParamSpec("P")
T = TypeVar("T")


class ReadPool(Executor):
    """A thread pool that starts on first use, and again on the first use after `shutdown`: a `History`
    closed at the end of an app's lifespan serves the next lifespan of the same app (a server restarted
    in-process, a test client run twice) instead of refusing every read."""

    def __init__(
        self, max_workers: int = READ_THREADS, thread_name_prefix: str = "qwen_persist-read"
    ) -> None:
        self._max_workers = max_workers
        self._thread_name_prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._max_workers, self._thread_name_prefix)
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)


class History:
    """The repositories over one database: ``sessions``, ``requests``, ``responses``, ``stats``,
    ``pruning``, and ``completions`` (the exchanges as OpenAI's Stored Completions API sees them).

    Give a URL (the engine is made, and disposed by `close`) or an engine of your own (left open). The
    async methods (``a``-prefixed) run in a small thread pool of the History's own, so a burst of
    expensive reads queues there instead of taking every thread the event loop's default pool has.
    `close` may be called any number of times, and a closed History may still be used: its pool and the
    engine's connections start again on demand.

    A SQLite URL must name a file that exists (`ConfigurationError` otherwise): reading never creates
    a database.
    """

    def __init__(self, database: str | Engine | None = None, *, executor: Executor | None = None) -> None:
        if not isinstance(database, Engine):
            url = resolve_database_url(database)
            missing = missing_sqlite_file(url)
            if missing is not None:
                raise ConfigurationError(
                    f"no database at {missing}: the SQLite file does not exist (nothing recorded there "
                    "yet?); reading never creates one: give the right URL, or create and migrate it with "
                    f"qwen-persist db upgrade --database-url {url}"
                )
            database = url
        self._owns_engine = not isinstance(database, Engine)
        self.engine: Engine = database if isinstance(database, Engine) else make_engine(database)
        self._owns_executor = executor is None
        self.executor: Executor = executor or ReadPool()
        self.sessions = SessionRepository(self.engine, self.executor)
        self.requests = RequestRepository(self.engine, self.executor)
        self.responses = ResponseRepository(self.engine, self.executor)
        self.stats = StatsRepository(self.engine, self.executor)
        self.completions = CompletionRepository(self.engine, self.executor)
        self.pruning = PruningRepository(self.engine, self.executor)

    def close(self) -> None:
        """Stop the thread pool (when it is the History's own) and dispose of the engine (when made
        here)."""
        if self._owns_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
