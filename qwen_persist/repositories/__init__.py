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

from concurrent.futures import Executor, ThreadPoolExecutor

from sqlalchemy import Engine

from ..engine import make_engine
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


class History:
    """The repositories over one database: ``sessions``, ``requests``, ``responses``, ``stats``,
    ``pruning``, and ``completions`` (the exchanges as OpenAI's Stored Completions API sees them).

    Give a URL (the engine is made, and disposed by `close`) or an engine of your own (left open). The
    async methods (``a``-prefixed) run in a small thread pool of the History's own, so a burst of
    expensive reads queues there instead of taking every thread the event loop's default pool has.
    """

    def __init__(self, database: str | Engine | None = None, *, executor: Executor | None = None) -> None:
        self._owns_engine = not isinstance(database, Engine)
        self.engine: Engine = database if isinstance(database, Engine) else make_engine(database)
        self._owns_executor = executor is None
        self.executor: Executor = executor or ThreadPoolExecutor(
            max_workers=READ_THREADS, thread_name_prefix="qwen_persist-read"
        )
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
