"""Read side on a large store: p50 / p95 / max of every repository call, and of every GET of the HTTP
API, on 1,000,000 exchanges, SQLite and PostgreSQL (SPEC §10: list/get ≤ 20 ms p95, a day's stats
≤ 200 ms).

    python -m benchmarks.bench_read              # ~5 min the first time (2.5 generating), ~3 once cached
    python -m benchmarks.bench_read --exchanges 100000 --json read.json --only stats

The store (`read_store`) is generated once per backend: the SQLite file is kept (``--store``, by default
in the temporary directory, named after the size and seed) and reused while the generator, the size, the
seed and the migrations are the same; the PostgreSQL database ``qp_bench_read`` is dropped at the end
unless ``--keep``, and a kept one is reused on the same terms. Every call runs warm: the store's files
are read once before a backend's calls, and each call runs twice untimed first; then ``--reps`` times
with parameters drawn afresh each time (session ids, ids, days, offsets and cursor positions), stopping
early at ``--budget`` seconds per call (never under 5 runs). The HTTP part builds the API app
(`qwen_persist.api.create_app`, bearer token) over the same `History` and drives it in process through
``httpx.ASGITransport`` (``--http-via uvicorn``: over loopback HTTP to ``uvicorn --factory
qwen_persist.api:create_app`` in a process of its own); a probe whose route the app does not have is
listed as skipped, and the app's GET routes no probe reaches are listed too. For every call that misses
its goal the plan of each SQL statement it ran is printed (SQLite ``EXPLAIN QUERY PLAN``, PostgreSQL
``EXPLAIN (ANALYZE, BUFFERS)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Engine, event, text
from starlette.routing import Match

from qwen_persist.engine import make_engine, normalize_url
from qwen_persist.migrate import upgrade
from qwen_persist.repositories import (
    CompletionFilter,
    History,
    Page,
    Pagination,
    RequestFilter,
    ResponseFilter,
    SessionFilter,
)

from . import read_store
from .common import POSTGRES_ADMIN_URL, listening_socket, machine, percentile, postgres_available, workspace

DAY_MS = read_store.DAY_MS
POSTGRES_DATABASE = "qp_bench_read"
LIST_GOAL_MS = 20.0
DAY_STATS_GOAL_MS = 200.0
MIN_REPS = 5
WARMUP = 2
TOKEN = "bench-read"


# -- the stores ------------------------------------------------------------------------------------


def store_meta(exchanges: int, seed: int, schema: str) -> dict[str, Any]:
    return {"generator": read_store.GENERATOR_VERSION, "exchanges": exchanges, "seed": seed, "schema": schema}


def current_schema() -> str:
    """The fingerprint of the migrations as they are now (an empty SQLite file migrated to head)."""
    with workspace() as workdir:
        url = f"sqlite:///{workdir / 'schema.db'}"
        upgrade(url)
        return read_store.schema_fingerprint(url)


def postgres_url(database: str) -> str:
    return normalize_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def _postgres_comment(admin: Engine, database: str) -> dict[str, Any] | None:
    with admin.connect() as conn:
        row = conn.execute(
            text("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = :name"),
            {"name": database},
        ).first()
    if row is None:
        return None
    try:
        return dict(json.loads(row[0] or "{}"))
    except ValueError:
        return {}


@dataclass
class Stores:
    urls: dict[str, str]
    generated: dict[str, dict[str, float]]  # per backend generated now: seconds and exchanges/s
    reused: list[str]
    end_ms: int


def prepare_stores(
    backends: list[str], exchanges: int, seed: int, store: Path, log: Callable[[str], None]
) -> Stores:
    """A store of ``exchanges`` per backend: reused when a matching one exists, else generated (every
    backend that needs one in the same pass, so the rows are built once)."""
    wanted = store_meta(exchanges, seed, current_schema())
    urls: dict[str, str] = {}
    sinks: list[read_store.Sink] = []
    reused: list[str] = []
    end_ms: int | None = None
    meta_path = store.with_name(store.name + ".json")
    if "sqlite" in backends:
        urls["sqlite"] = f"sqlite:///{store}"
        cached = json.loads(meta_path.read_text()) if meta_path.exists() and store.exists() else {}
        if {key: cached.get(key) for key in wanted} == wanted:
            reused.append("sqlite")
            end_ms = int(cached["end_ms"])
            log(f"SQLite store: reusing {store} (generated {cached.get('generated_at', '?')})")
        else:
            for stale in (store, meta_path, *(store.with_name(store.name + s) for s in ("-wal", "-shm"))):
                stale.unlink(missing_ok=True)
            store.parent.mkdir(parents=True, exist_ok=True)
            upgrade(urls["sqlite"])
            sinks.append(read_store.SqliteSink(str(store)))
    if "postgresql" in backends:
        urls["postgresql"] = postgres_url(POSTGRES_DATABASE)
        admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            comment = _postgres_comment(admin, POSTGRES_DATABASE)
            if comment is not None and {key: comment.get(key) for key in wanted} == wanted:
                reused.append("postgresql")
                end_ms = end_ms if end_ms is not None else int(comment["end_ms"])
                log(f"PostgreSQL store: reusing the kept database {POSTGRES_DATABASE}")
            else:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{POSTGRES_DATABASE}" WITH (FORCE)'))
                    conn.execute(text(f'CREATE DATABASE "{POSTGRES_DATABASE}"'))
                upgrade(urls["postgresql"])
                sinks.append(read_store.PostgresSink(urls["postgresql"]))
        finally:
            admin.dispose()
    generated: dict[str, dict[str, float]] = {}
    if sinks:
        names = " and ".join(sink.backend for sink in sinks)
        log(f"generating {exchanges:,} exchanges into {names} (seed {seed}) ...")
        result = read_store.generate(sinks, exchanges, seed=seed, end_ms=end_ms, progress=log)
        end_ms = result.end_ms
        for sink in sinks:
            seconds = result.plan_seconds + result.build_seconds + result.write_seconds[sink.backend]
            generated[sink.backend] = {
                "seconds": round(seconds, 1),
                "exchanges_per_s": round(result.rate(sink.backend)),
                "plan_s": round(result.plan_seconds, 1),
                "build_s": round(result.build_seconds, 1),
                "write_s": round(result.write_seconds[sink.backend], 1),
                "after_load_s": round(result.finish_seconds[sink.backend], 1),
            }
            part = generated[sink.backend]
            log(
                f"  {sink.backend}: {exchanges:,} exchanges in {seconds:.0f} s = "
                f"{part['exchanges_per_s']:,.0f} exchanges/s (plan {part['plan_s']:.0f} s, build rows "
                f"{part['build_s']:.0f} s, writes {part['write_s']:.0f} s; then {part['after_load_s']:.0f} s"
                " after the load)"
            )
        record = {
            **wanted,
            "end_ms": end_ms,
            "sessions": result.sessions,
            "responses": result.responses,
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for sink in sinks:
            if sink.backend == "sqlite":
                meta_path.write_text(json.dumps({**record, "generation": generated["sqlite"]}))
            else:
                admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
                try:
                    with admin.connect() as conn:
                        body = json.dumps(record).replace("'", "''")
                        conn.execute(text(f"COMMENT ON DATABASE \"{POSTGRES_DATABASE}\" IS '{body}'"))
                finally:
                    admin.dispose()
    assert end_ms is not None
    return Stores(urls, generated, reused, end_ms)


def warm(backend: str, url: str) -> float:
    """Read the store's files once, so the calls are timed on warm caches (the operating system's):
    the SQLite file from end to end; on PostgreSQL every table and index of the three, with
    ``pg_prewarm`` in its ``read`` mode. Returns the seconds it took."""
    began = time.perf_counter()
    if backend == "sqlite":
        with open(url.removeprefix("sqlite:///"), "rb") as file:
            while file.read(16 << 20):
                pass
        return time.perf_counter() - began
    engine = make_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
            relations = conn.execute(
                text(
                    "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i', 't')"
                )
            ).scalars()
            for oid in list(relations):
                conn.execute(text("SELECT pg_prewarm(CAST(:oid AS regclass), 'read')"), {"oid": oid})
    finally:
        engine.dispose()
    return time.perf_counter() - began


def drop_postgres_store() -> None:
    admin = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{POSTGRES_DATABASE}" WITH (FORCE)'))
    finally:
        admin.dispose()


# -- what the calls are asked ----------------------------------------------------------------------


@dataclass
class Samples:
    """Parameters drawn from the store itself, so the benchmark runs on any store, generated or real."""

    max_request: int
    max_response: int
    request_count: int
    sessions: list[str]
    long_sessions: list[str]  # the sessions with the most exchanges
    request_ids: list[str]  # X-Request-Id values
    upstream_ids: list[str]
    completion_ids: list[str]  # upstream ids of successful answers: stored completions (the API's ids)
    days: list[int]  # midnights (UTC, ms) of the whole days the store covers
    first_ms: int
    last_ms: int
    models: list[str]
    deep: list[tuple[int, int]]  # (position, id of the row just before it) in the default order
    active_sessions: int


def draw_samples(engine: Engine, rng: random.Random) -> Samples:
    with engine.connect() as conn:

        def scalar(sql: str, **params: Any) -> Any:
            return conn.execute(text(sql), params).scalar()

        def column(sql: str, **params: Any) -> list[Any]:
            return list(conn.execute(text(sql), params).scalars())

        max_request = int(scalar("SELECT max(id) FROM requests") or 0)
        max_response = int(scalar("SELECT max(id) FROM responses") or 0)
        count = int(scalar("SELECT count(*) FROM requests"))
        picks = [rng.randint(1, max_request) for _ in range(200)]
        request_ids = column(f"SELECT request_id FROM requests WHERE id IN ({','.join(map(str, picks))})")
        upstream_ids = column(
            f"SELECT upstream_id FROM responses WHERE upstream_id IS NOT NULL AND id IN "
            f"({','.join(str(rng.randint(1, max_response)) for _ in range(200))})"
        )
        completion_ids = column(
            f"SELECT upstream_id FROM responses WHERE upstream_id IS NOT NULL AND error IS NULL"
            f" AND status_code >= 200 AND status_code < 400 AND id IN "
            f"({','.join(str(rng.randint(1, max_response)) for _ in range(200))})"
        )
        first, last = conn.execute(text("SELECT min(timestamp), max(timestamp) FROM requests")).one()
        days = list(range((first // DAY_MS + 1) * DAY_MS, (last // DAY_MS) * DAY_MS, DAY_MS)) or [
            first // DAY_MS * DAY_MS
        ]
        long_sessions = column(
            "SELECT session_id FROM requests GROUP BY session_id ORDER BY count(*) DESC LIMIT 20"
        )
        # The position halfway down the default order (newest first), and a few around it.
        deep = []
        for _ in range(8):
            position = max(1, count // 2 + rng.randint(-count // 20, count // 20))
            before = scalar(
                "SELECT id FROM requests ORDER BY timestamp DESC, id DESC LIMIT 1 OFFSET :o", o=position - 1
            )
            deep.append((position, int(before)))
        now = time.time_ns() // 1_000_000
        return Samples(
            max_request=max_request,
            max_response=max_response,
            request_count=count,
            sessions=column("SELECT id FROM sessions"),
            long_sessions=long_sessions,
            request_ids=request_ids,
            upstream_ids=upstream_ids,
            completion_ids=completion_ids,
            days=days,
            first_ms=int(first),
            last_ms=int(last),
            models=column("SELECT DISTINCT model FROM requests WHERE model IS NOT NULL"),
            deep=deep,
            active_sessions=int(scalar("SELECT count(*) FROM sessions WHERE expires_at > :now", now=now)),
        )


def _day(s: Samples, rng: random.Random) -> RequestFilter:
    start = rng.choice(s.days)
    return RequestFilter(since=start, until=start + DAY_MS - 1)


def _shallow(rng: random.Random, limit: int = 100) -> Pagination:
    return Pagination(limit=limit, offset=rng.randrange(10) * limit)


@dataclass
class Case:
    """One call to time: ``call(*params(rng))``, the parameters drawn afresh (untimed) for each run."""

    name: str
    goal_ms: float | None
    call: Callable[..., Any]
    params: Callable[[random.Random], tuple[Any, ...]]
    note: str = ""


def repository_cases(h: History, s: Samples) -> list[Case]:
    """Unfiltered lists are paged by offset, as a UI pages (0 to 900); filtered lists start at the top
    or, four times in five, after a random row (a cursor): an offset into a filtered list costs what
    walking to it costs, which is what the cursor is for (see the deep-offset row)."""
    req, resp, ses, stats, done = h.requests, h.responses, h.sessions, h.stats, h.completions
    month = RequestFilter(since=s.last_ms - 30 * DAY_MS)
    lists, day = LIST_GOAL_MS, DAY_STATS_GOAL_MS

    def session(r: random.Random) -> str:
        return r.choice(s.sessions)

    def twenty(after: str | None = None) -> Pagination:
        # The Stored Completions API's default page: 20, oldest first.
        return Pagination(limit=20, after=after, descending=False)

    def longest(r: random.Random) -> str:
        return r.choice(s.long_sessions)

    def shallow(limit: int) -> Callable[[random.Random], tuple[Any, ...]]:
        return lambda r: (None, _shallow(r, limit))

    def anywhere(f: Any, top: int) -> Callable[[random.Random], tuple[Any, ...]]:
        def params(r: random.Random) -> tuple[Any, ...]:
            start = r.random() < 0.2
            return (
                f(r) if callable(f) else f,
                Pagination() if start else Pagination(after=r.randint(1, top)),
            )

        return params

    def requests(f: Any) -> Callable[[random.Random], tuple[Any, ...]]:
        return anywhere(f, s.max_request)

    def responses(f: Any) -> Callable[[random.Random], tuple[Any, ...]]:
        return anywhere(f, s.max_response)

    x = req.exchanges
    return [
        Case("requests.list (page of 100)", lists, req.list, shallow(100)),
        Case("requests.exchanges (page of 100)", lists, x, shallow(100)),
        Case("requests.exchanges (page of 20)", lists, x, shallow(20)),
        Case("requests.exchanges session_id", lists, x, lambda r: (RequestFilter(session_id=session(r)),)),
        Case(
            "requests.exchanges session_id (longest sessions)",
            lists,
            x,
            lambda r: (RequestFilter(session_id=longest(r)),),
        ),
        Case(
            "requests.exchanges model", lists, x, requests(lambda r: RequestFilter(model=r.choice(s.models)))
        ),
        Case(
            "requests.exchanges stream", lists, x, requests(lambda r: RequestFilter(stream=r.random() < 0.5))
        ),
        Case("requests.exchanges one day", lists, x, lambda r: (_day(s, r),)),
        Case("requests.exchanges has_error=true", lists, x, requests(RequestFilter(has_error=True))),
        Case("requests.exchanges status_code=200", lists, x, requests(RequestFilter(status_code=200))),
        Case("requests.exchanges status_code=500", lists, x, requests(RequestFilter(status_code=500))),
        Case("requests.exchanges status_code=400 (rare)", lists, x, requests(RequestFilter(status_code=400))),
        Case(
            "requests.exchanges offset ~N/2",
            None,
            x,
            lambda r: (None, Pagination(offset=r.choice(s.deep)[0])),
            "deep page by offset",
        ),
        Case(
            "requests.exchanges after=<id at ~N/2>",
            lists,
            x,
            lambda r: (None, Pagination(after=r.choice(s.deep)[1])),
            "same page by cursor",
        ),
        Case(
            "requests.list count_total",
            None,
            req.list,
            lambda r: (None, Pagination(count_total=True)),
            "counts every row",
        ),
        Case("requests.exchange(id)", lists, req.exchange, lambda r: (r.randint(1, s.max_request),)),
        Case(
            "requests.exchange_by_request_id",
            lists,
            req.exchange_by_request_id,
            lambda r: (r.choice(s.request_ids),),
        ),
        Case("responses.list (page of 100)", lists, resp.list, shallow(100)),
        Case(
            "responses.list finish_reason=length",
            lists,
            resp.list,
            responses(ResponseFilter(finish_reason="length")),
        ),
        Case("responses.list has_error=true", lists, resp.list, responses(ResponseFilter(has_error=True))),
        Case(
            "responses.list session_id", lists, resp.list, lambda r: (ResponseFilter(session_id=session(r)),)
        ),
        Case("responses.get(id)", lists, resp.get, lambda r: (r.randint(1, s.max_response),)),
        Case("sessions.list (page of 100)", lists, ses.list, shallow(100)),
        Case(
            "sessions.list active=true",
            lists,
            ses.list,
            lambda r: (SessionFilter(active=True),),
            f"{s.active_sessions:,} active",
        ),
        Case(
            "sessions.list created one day",
            lists,
            ses.list,
            lambda r: (SessionFilter(since=(d := r.choice(s.days)), until=d + DAY_MS - 1),),
        ),
        Case("sessions.detail", lists, ses.detail, lambda r: (session(r),)),
        Case("sessions.detail (longest sessions)", lists, ses.detail, lambda r: (longest(r),)),
        Case("completions.list (page of 20)", lists, done.list, lambda r: ()),
        Case(
            "completions.list model",
            lists,
            done.list,
            lambda r: (CompletionFilter(model=r.choice(s.models)), twenty()),
        ),
        Case(
            "completions.list metadata team",
            lists,
            done.list,
            lambda r: (CompletionFilter(metadata={"team": r.choice(read_store.TEAMS)}), twenty()),
        ),
        Case(
            "completions.list after=<id>",
            lists,
            done.list,
            lambda r: (None, twenty(after=r.choice(s.completion_ids))),
        ),
        Case("completions.get(id)", lists, done.get, lambda r: (r.choice(s.completion_ids),)),
        Case("completions.messages", lists, done.messages, lambda r: (r.choice(s.completion_ids),)),
        Case(
            "stats.summary session (longest sessions)",
            lists,
            stats.summary,
            lambda r: (RequestFilter(session_id=longest(r)),),
            "as /sessions/{id}/stats",
        ),
        Case("stats.summary one day", day, stats.summary, lambda r: (_day(s, r),)),
        Case("stats.summary one day by model", day, stats.summary, lambda r: (_day(s, r), ["model"])),
        Case("stats.summary 30 days by day", None, stats.summary, lambda r: (month, ["day"])),
        Case("stats.summary everything", None, stats.summary, lambda r: ()),
    ]


@dataclass
class Probe:
    """A GET to time: ``url`` (under the API prefix) with ``{placeholders}`` that `draw` fills afresh for
    each run (percent-encoded, as a client sends them)."""

    url: str
    goal_ms: float | None

    @property
    def name(self) -> str:
        return "GET " + self.url

    def make(self, values: dict[str, Any]) -> str:
        return self.url.format(
            **{
                key: value if key in FRAGMENTS else quote(str(value), safe="")
                for key, value in values.items()
            }
        )


# Placeholders that stand for a piece of query string (or nothing), not for a value.
FRAGMENTS = ("after_request", "after_response")


def draw(s: Samples, r: random.Random) -> dict[str, Any]:
    """A value for every placeholder a probe may use."""
    day = r.choice(s.days)
    position, before = r.choice(s.deep)

    def cursor(top: int) -> str:
        # As the repository cases draw a filtered list's page: the top, or four times in five after a row.
        return "" if r.random() < 0.2 else f"&after={r.randint(1, top)}"

    return {
        "session": r.choice(s.sessions),
        "longest": r.choice(s.long_sessions),
        "request": r.randint(1, s.max_request),
        "request_id": r.choice(s.request_ids),
        "response": r.randint(1, s.max_response),
        "completion": r.choice(s.completion_ids),
        "model": r.choice(s.models),
        "team": r.choice(read_store.TEAMS),
        "stream": r.choice(("true", "false")),
        "since": day,
        "until": day + DAY_MS - 1,
        "offset": r.randrange(10) * 100,
        "offset20": r.randrange(10) * 20,
        "deep": position,
        "deep_after": before,
        "after_request": cursor(s.max_request),
        "after_response": cursor(s.max_response),
    }


def http_probes() -> list[Probe]:
    """Every GET of the history API (`qwen_persist.api.history`) and of the Stored Completions API
    (`qwen_persist.api.completions`), with the parameters of the repository calls above; a probe whose
    route the app does not have is skipped (and a GET route no probe reaches is listed)."""
    lists, day = LIST_GOAL_MS, DAY_STATS_GOAL_MS
    return [
        Probe("/sessions?offset={offset}", lists),
        Probe("/sessions?active=true", lists),
        Probe("/sessions?since={since}&until={until}", lists),
        Probe("/sessions/{session}", lists),
        Probe("/sessions/{longest}", lists),
        Probe("/sessions/{session}/requests", lists),
        Probe("/sessions/{longest}/requests", lists),
        Probe("/sessions/{session}/stats", lists),
        Probe("/sessions/{longest}/stats", lists),
        Probe("/requests?offset={offset}", lists),
        Probe("/requests?limit=20&offset={offset20}", lists),
        Probe("/requests?session_id={session}", lists),
        Probe("/requests?model={model}{after_request}", lists),
        Probe("/requests?stream={stream}{after_request}", lists),
        Probe("/requests?since={since}&until={until}", lists),
        Probe("/requests?has_error=true{after_request}", lists),
        Probe("/requests?status_code=500{after_request}", lists),
        Probe("/requests?offset={deep}", None),
        Probe("/requests?after={deep_after}", lists),
        Probe("/requests/{request}", lists),
        Probe("/requests/by-request-id/{request_id}", lists),
        Probe("/responses?offset={offset}", lists),
        Probe("/responses?finish_reason=length{after_response}", lists),
        Probe("/responses?has_error=true{after_response}", lists),
        Probe("/responses?session_id={session}", lists),
        Probe("/responses/{response}", lists),
        Probe("/responses/stats?since={since}&until={until}", day),
        Probe("/stats?since={since}&until={until}", day),
        Probe("/stats?since={since}&until={until}&group_by=model", day),
        Probe("/chat/completions?limit=20", lists),
        Probe("/chat/completions?model={model}", lists),
        Probe("/chat/completions?metadata[team]={team}", lists),
        Probe("/chat/completions?after={completion}", lists),
        Probe("/chat/completions/{completion}", lists),
        Probe("/chat/completions/{completion}/messages", lists),
    ]


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Result:
    call: str
    backend: str
    n: int
    rows: float | None  # median items returned (list pages, stats rows); None for a single object
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None
    goal_ms: float | None
    note: str = ""
    statements: list[tuple[str, Any]] = field(default_factory=list, repr=False)

    @property
    def verdict(self) -> str:
        if self.p95_ms is None:
            return "skipped"
        if self.goal_ms is None:
            return "—"
        return "pass" if self.p95_ms <= self.goal_ms else "FAIL"


def _size(result: Any) -> float | None:
    """Items in a page or stats rows; None for one object (and 0 for a miss)."""
    if isinstance(result, Page):
        return float(len(result.items))
    if isinstance(result, list):
        return float(len(result))
    return None if result is not None else 0.0


def summarise(
    name: str, backend: str, times: list[float], sizes: list[float | None], goal: float | None, note: str
) -> Result:
    ms = [t * 1000 for t in times]
    known = [size for size in sizes if size is not None]
    return Result(
        name,
        backend,
        len(ms),
        statistics.median(known) if known else None,
        round(percentile(ms, 50), 2),
        round(percentile(ms, 95), 2),
        round(max(ms), 2),
        goal,
        note,
    )


def time_call(
    case: Case, rng: random.Random, reps: int, budget: float
) -> tuple[list[float], list[float | None]]:
    for _ in range(WARMUP):
        case.call(*case.params(rng))
    times: list[float] = []
    sizes: list[float | None] = []
    began = time.perf_counter()
    while len(times) < reps and (len(times) < MIN_REPS or time.perf_counter() - began < budget):
        params = case.params(rng)
        start = time.perf_counter()
        result = case.call(*params)
        times.append(time.perf_counter() - start)
        sizes.append(_size(result))
    return times, sizes


@contextlib.contextmanager
def recording(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (with their parameters) run on ``engine`` inside the block."""
    seen: list[tuple[str, Any]] = []

    def hook(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def explain(engine: Engine, statement: str, parameters: Any) -> list[str]:
    """The plan of one statement: SQLite's EXPLAIN QUERY PLAN, PostgreSQL's EXPLAIN (ANALYZE, BUFFERS)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            depth: dict[int, int] = {0: 0}
            lines = []
            for node, parent, _, detail in rows:
                depth[node] = depth.get(parent, 0) + 1
                lines.append("  " * depth[node] + detail)
            return lines
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).all()
        return [row[0] for row in rows]


def run_repository(
    h: History, backend: str, s: Samples, args: argparse.Namespace, log: Callable[[str], None]
) -> list[Result]:
    results = []
    for case in repository_cases(h, s):
        if args.only and not any(word in case.name for word in args.only):
            continue
        rng = random.Random(f"{args.seed}-{case.name}")
        times, sizes = time_call(case, rng, args.reps, args.budget)
        result = summarise(case.name, backend, times, sizes, case.goal_ms, case.note)
        if result.verdict == "FAIL" or args.explain_all:
            with recording(h.engine) as seen:
                case.call(*case.params(rng))
            result.statements = list(seen)
        results.append(result)
        log(_line(result))
    return results


async def _run_http(
    h: History, backend: str, s: Samples, args: argparse.Namespace, log: Callable[[str], None]
) -> list[Result]:
    import httpx

    from qwen_persist.api import create_app
    from qwen_persist.config import api_options

    _, _, prefix = api_options(TOKEN, None, None, {})
    app = create_app(h, api_token=TOKEN)

    def route_of(url: str) -> Any:
        """The route the router sends a GET of ``url`` to (the first that matches), or None."""
        scope = {"type": "http", "method": "GET", "path": unquote(url.partition("?")[0]), "root_path": ""}
        return next(
            (r for r in app.router.routes if r.matches({**scope, "headers": []})[0] is Match.FULL), None
        )

    results = []
    probes = [p for p in http_probes() if not args.only or any(word in p.name for word in args.only)]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    server = contextlib.ExitStack()
    if getattr(args, "via", "asgi") == "uvicorn":
        # Blocks the loop while uvicorn starts: nothing else runs on it yet.
        base_url = server.enter_context(
            api_server(h.engine.url.render_as_string(hide_password=False), prefix)
        )
        client = httpx.AsyncClient(base_url=base_url, headers=headers)
    else:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench", headers=headers
        )
    with server:
        async with client:
            for probe in probes:
                rng = random.Random(f"{args.seed}-{probe.name}")
                url = prefix + probe.make(draw(s, rng))
                if route_of(url) is None:
                    results.append(
                        Result(probe.name, backend, 0, None, None, None, None, probe.goal_ms, "no route")
                    )
                    continue
                answer = await client.get(url)
                if answer.status_code != 200:
                    note = f"HTTP {answer.status_code}: {answer.text[:100]}"
                    results.append(
                        Result(probe.name, backend, 0, None, None, None, None, probe.goal_ms, note)
                    )
                    log(f"  {probe.name}: {note}")
                    continue
                for _ in range(WARMUP - 1):
                    await client.get(url)
                times: list[float] = []
                sizes: list[float | None] = []
                refused: dict[int, int] = {}
                began = time.perf_counter()
                while len(times) < args.reps and (
                    len(times) < MIN_REPS or time.perf_counter() - began < args.budget
                ):
                    url = prefix + probe.make(draw(s, rng))
                    start = time.perf_counter()
                    answer = await client.get(url)
                    times.append(time.perf_counter() - start)
                    if answer.status_code != 200:
                        refused[answer.status_code] = refused.get(answer.status_code, 0) + 1
                    body = answer.json() if answer.status_code == 200 else None
                    data = body.get("data") if isinstance(body, dict) else body
                    sizes.append(float(len(data)) if isinstance(data, list) else None)
                note = "HTTP" + "".join(f"; {n} answered {status}" for status, n in sorted(refused.items()))
                result = summarise(probe.name, backend, times, sizes, probe.goal_ms, note)
                results.append(result)
                log(_line(result))
    # The app's GET routes that no probe reaches: new endpoints this benchmark does not time yet.
    reached = {id(route_of(prefix + probe.make(draw(s, random.Random(0))))) for probe in http_probes()}
    for route in app.router.routes:
        if "GET" in (getattr(route, "methods", None) or ()) and id(route) not in reached:
            name = f"GET {getattr(route, 'path', route)}"
            log(f"  {name}: no probe for this route")
            results.append(Result(name, backend, 0, None, None, None, None, None, "no probe"))
    return results


@contextlib.contextmanager
def api_server(url: str, prefix: str) -> Iterator[str]:
    """The API as it is deployed on its own: ``uvicorn --factory qwen_persist.api:create_app`` over
    ``url``, in a process of its own on a loopback port; yields its base URL."""
    import httpx

    sock = listening_socket()
    env = {**os.environ, "QWEN_PERSIST_DATABASE_URL": url, "QWEN_PERSIST_API_TOKEN": TOKEN}
    command = [sys.executable, "-m", "uvicorn", "--factory", "qwen_persist.api:create_app"]
    command += ["--fd", str(sock.fileno()), "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, pass_fds=[sock.fileno()], env=env)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the API server exited with {process.returncode}")
            try:
                probe = httpx.get(
                    f"{base_url}{prefix}/sessions?limit=1", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                if probe.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not come up in 30 s")
            time.sleep(0.1)
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_http(
    h: History, backend: str, s: Samples, args: argparse.Namespace, log: Callable[[str], None]
) -> list[Result]:
    return asyncio.run(_run_http(h, backend, s, args, log))


# -- output ----------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _line(r: Result) -> str:
    rows = "" if r.rows is None else f"{r.rows:g}"
    goal = "" if r.goal_ms is None else f"≤{r.goal_ms:g}"
    return (
        f"  {r.call:48} {r.backend:10} {r.n:4} {rows:>6} {_ms(r.p50_ms):>8} {_ms(r.p95_ms):>8}"
        f" {_ms(r.max_ms):>8} {goal:>6} {r.verdict:>7}  {r.note}"
    )


HEADER = (
    f"  {'call':48} {'backend':10} {'n':>4} {'rows':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'goal':>6}"
    f" {'verdict':>7}"
)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", type=Path, help="the SQLite store (default: in the temporary directory)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--reps", type=int, default=50, help="timed calls per call (default 50)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per call at most (>= 5 calls)")
    parser.add_argument(
        "--keep", action="store_true", help=f"keep the PostgreSQL database {POSTGRES_DATABASE}"
    )
    parser.add_argument("--no-http", dest="http", action="store_false", help="repository calls only")
    parser.add_argument(
        "--http-via",
        dest="via",
        choices=("asgi", "uvicorn"),
        default="asgi",
        help="drive the API in process (httpx.ASGITransport, the default) or over loopback HTTP to\n"
        "uvicorn --factory qwen_persist.api:create_app in a process of its own",
    )
    parser.add_argument("--only", nargs="*", help="only the calls whose name contains one of these words")
    parser.add_argument(
        "--explain-all", action="store_true", help="print every call's plans, not only misses"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, flush=True)

    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if "postgresql" in backends and not postgres_available():
        log(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} (BENCH_POSTGRES_URL): SQLite only")
        backends.remove("postgresql")
    store = args.store or Path(tempfile.gettempdir()) / f"qp-bench-read-{args.exchanges}-seed{args.seed}.db"
    log(machine())
    load_before = loadavg()
    log(f"load average before: {load_before}")
    began = time.perf_counter()
    stores = prepare_stores(backends, args.exchanges, args.seed, store.resolve(), log)
    results: list[Result] = []
    plans: list[tuple[Result, list[list[str]]]] = []
    try:
        for backend in backends:
            log(f"\n{backend}: reading the store once ({warm(backend, stores.urls[backend]):.0f} s)")
            history = History(stores.urls[backend])
            try:
                samples = draw_samples(history.engine, random.Random(args.seed))
                longest = _session_size(history, samples.long_sessions[0])
                with history.engine.connect() as conn:
                    asked = "SELECT sqlite_version()" if backend == "sqlite" else "SHOW server_version"
                    version = conn.execute(text(asked)).scalar()
                log(
                    f"\n{backend} {version}: {samples.request_count:,} exchanges, {len(samples.sessions):,}"
                    f" sessions ({samples.active_sessions:,} active), longest session {longest:,} exchanges,"
                    f" {len(samples.days)} whole days"
                )
                log(HEADER)
                backend_results = run_repository(history, backend, samples, args, log)
                if args.http:
                    backend_results += run_http(history, backend, samples, args, log)
                for result in backend_results:
                    if result.statements:
                        plans.append(
                            (
                                result,
                                [explain(history.engine, sql, params) for sql, params in result.statements],
                            )
                        )
                results += backend_results
            finally:
                history.close()
    finally:
        if "postgresql" in backends and not args.keep:
            drop_postgres_store()
    load_after = loadavg()
    elapsed = time.perf_counter() - began
    log(f"\n{args.exchanges:,} exchanges; {args.reps} runs per call (fewer past {args.budget:g} s), warm")
    log(HEADER)
    for result in results:
        if result.n:
            log(_line(result))
    skipped: dict[tuple[str, str], list[str]] = {}
    for r in results:
        if not r.n:
            skipped.setdefault((r.call, r.note), []).append(r.backend)
    if skipped:
        log("  not timed: " + "; ".join(f"{c} ({n}: {', '.join(b)})" for (c, n), b in skipped.items()))
    for result, statement_plans in plans:
        log(f"\nplan of {result.call} ({result.backend}, p95 {_ms(result.p95_ms)} ms):")
        for (sql, params), lines in zip(result.statements, statement_plans, strict=True):
            log("  SQL: " + " ".join(sql.split())[:400] + f"  -- {params!r}"[:200])
            for line in lines:
                log("    " + line)
    missed = [r for r in results if r.verdict == "FAIL"]
    log(f"\nload average before {load_before}, after {load_after}; {elapsed:.0f} s in all")
    log(
        f"goals missed: {len(missed)}"
        + "".join(f"\n  {r.call} ({r.backend}): p95 {_ms(r.p95_ms)} ms > {r.goal_ms:g}" for r in missed)
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "exchanges": args.exchanges,
                    "seed": args.seed,
                    "reps": args.reps,
                    "budget_s": args.budget,
                    "load_before": load_before,
                    "load_after": load_after,
                    "generated": stores.generated,
                    "reused": stores.reused,
                    "results": [
                        {**{k: v for k, v in asdict(r).items() if k != "statements"}, "verdict": r.verdict}
                        for r in results
                    ],
                },
                indent=1,
            )
        )
        log(f"results written to {args.json}")
    return 0


def _session_size(h: History, session_id: str) -> int:
    detail = h.sessions.detail(session_id)
    return detail.request_count if detail else 0


if __name__ == "__main__":
    sys.exit(main())
