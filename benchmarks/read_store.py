"""A large, realistic store for the read-side benchmark, generated fast.

``N`` exchanges (a ``requests`` row with its ``responses`` row) over ``days`` of traffic are written
straight into databases migrated with `qwen_persist.migrate.upgrade`, in big batches through the raw
drivers (``sqlite3`` executemany; psycopg ``COPY``), not through the writer: the point is the shape of
the data the read side queries, and the writer's own speed is `bench_writer`'s subject.

The data is what the middleware would have stored for a plausible mix of clients (deterministic in the
seed and the store's end time): six models with a skewed mix; sessions (the id the middleware derives
from the first user message) whose sizes follow a Pareto law, so most are one to a few exchanges and a
few run to hundreds or thousands; 30 % streams; ~2 % rate-limited (429), ~1 % upstream failures (500)
and a rare status (400, 0.02 %), with their error bodies and text; ~0.3 % streams the client dropped
(``client_disconnected``); ~1 % ``length`` and ~2 % ``tool_calls`` finish reasons; OpenAI ``metadata``
(``{"team": …}``) and ``user`` on some clients' requests; durations and times to first byte from
log-normal laws; a daily rhythm (more traffic in the afternoon, UTC). Request bodies stay small: clients
here send the system prompt, the first user message, the previous answer and the new question, not the
whole history. Rows are written in arrival order for requests and completion order for responses, as the
writer would; the few exchanges still running at the store's end have no response row (pending).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
import sqlite3
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from qwen_persist.sessions import resolve_session_id

# Bump when the generated data changes: a cached store of another version is generated again.
GENERATOR_VERSION = 2

DAY_MS = 86_400_000
SESSION_TTL_MS = 30 * 60 * 1000  # the middleware's default session_ttl
MAX_SESSION = 2_000  # exchanges in the longest sessions
EXCHANGES_PER_SESSION = 5  # about: 1,000,000 exchanges make about 200,000 sessions
BATCH = 20_000  # rows per executemany / COPY
TABLES = ("sessions", "requests", "responses")

MODELS = ("qwen-max", "qwen-plus", "qwen-turbo", "qwen3-coder-plus", "qwen-vl-max", "qwen-long")
MODEL_WEIGHTS = (40, 25, 15, 10, 6, 4)
TEAMS = ("search", "support", "billing", "research", "growth", "infra")
# Arrivals per hour of the day (UTC), relative: quiet nights, busy afternoons.
HOURLY = (3, 2, 2, 2, 2, 3, 4, 6, 8, 9, 10, 10, 9, 10, 10, 10, 9, 8, 7, 6, 5, 5, 4, 3)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a terse senior engineer. Answer in at most three sentences.",
    "You are a support agent for an online shop. Be polite and precise.",
    "You translate between English and French. Keep the tone of the original.",
    "You are a code reviewer. Point out bugs first, style last.",
)
_VOCABULARY = (
    "the a an of to in for on with at by from about into over after under between through during "
    "system data model query index table page cursor session request response stream token error "
    "latency cache memory disk network server client proxy upstream retry timeout limit offset order "
    "build test deploy release migrate schema column row key value store write read scan sort merge "
    "python rust sql json http socket thread process loop queue batch commit rollback lock wait fast "
    "slow small large simple clear short long first last next new old good bad best why how what when "
    "explain compare describe list summarize translate fix improve check measure count find show keep "
    "user team plan price order invoice refund account address delivery product review answer "
    "question"
)
WORDS = _VOCABULARY.split()

REQUEST_COLUMNS = (
    "id", "session_id", "request_id", "capture_id", "timestamp", "created_at", "method", "path",
    "openai_request", "qwen_request", "model", "stream", "user", "metadata", "provider",
)  # fmt: skip
RESPONSE_COLUMNS = (
    "id", "request_id", "session_id", "response_id", "upstream_id", "timestamp", "created_at",
    "status_code", "openai_response", "qwen_response", "parent_id", "prompt_tokens", "completion_tokens",
    "total_tokens", "finish_reason", "error", "duration_ms", "first_byte_ms", "headers",
)  # fmt: skip
SESSION_COLUMNS = (
    "id", "chat_id", "parent_id", "first_user_message", "message_count", "created_at", "updated_at",
    "last_accessed", "expires_at", "ids_updated_at",
)  # fmt: skip

# Outcomes of an exchange.
OK, LENGTH, TOOLS, RATE_LIMITED, FAILED, DISCONNECTED, TOO_LONG = range(7)
RATE_LIMIT_BODY = {
    "message": "Rate limit reached for requests. Please retry after a short wait.",
    "type": "requests",
    "code": "rate_limit_exceeded",
}
TOO_LONG_BODY = {
    "message": "This model's maximum context length is 32768 tokens. Please reduce the messages.",
    "type": "invalid_request_error",
    "code": "context_length_exceeded",
}
FAILURE_BODY = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "code": "internal_error",
}


@dataclass
class Generated:
    """What a generation produced, and how long its parts took."""

    exchanges: int
    sessions: int
    responses: int
    end_ms: int
    plan_seconds: float  # deciding every exchange, in memory
    build_seconds: float  # making the rows (bodies, ids) — shared by the backends written at once
    write_seconds: dict[str, float]  # per backend: its driver's inserts, then building the indexes
    finish_seconds: dict[str, float]  # per backend: after the load (VACUUM ANALYZE, sequences, WAL)

    def rate(self, backend: str) -> float:
        """Exchanges per second for ``backend``: planning, building and its own writing."""
        total = self.plan_seconds + self.build_seconds + self.write_seconds[backend]
        return self.exchanges / total if total else float("nan")


class Sink:
    """Where generated rows go: one migrated, empty database, through its raw driver.

    The secondary indexes (and on PostgreSQL the unique and foreign-key constraints) are dropped before
    the load and made again after it from their own definitions, read back from the database: building
    an index once over a million rows is several times faster than keeping it up to date row by row.
    The schema afterwards is the migrated one, name for name.
    """

    backend: str

    def write(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def rebuild(self) -> None:
        """Make again what was dropped for the load."""
        raise NotImplementedError

    def finish(self) -> None:
        """Leave the database as a live one would be, and close."""
        raise NotImplementedError


class SqliteSink(Sink):
    """Plain ``sqlite3`` executemany in one transaction per batch, without a journal while it loads (a
    failed generation leaves a file that is thrown away, never used), then back to WAL. The indexes of
    the tables' own UNIQUE constraints cannot be dropped and are kept up to date as rows come."""

    backend = "sqlite"

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("PRAGMA cache_size=-1000000")  # 1 GB: the indexes being filled stay in memory
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.indexes = self.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            " AND tbl_name IN ('sessions', 'requests', 'responses')"
        ).fetchall()
        for name, _ in self.indexes:
            self.conn.execute(f'DROP INDEX "{name}"')

    def write(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        names = ", ".join(f'"{name}"' for name in columns)
        marks = ", ".join("?" * len(columns))
        self.conn.execute("BEGIN")
        self.conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
        self.conn.execute("COMMIT")

    def rebuild(self) -> None:
        for _, sql in self.indexes:
            self.conn.execute(sql)

    def finish(self) -> None:
        # The library's engine opens every connection in WAL mode; the file is left as it would find it.
        # No ANALYZE: nothing in the library runs it, so a real store has no statistics either.
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.close()


class PostgresSink(Sink):
    """psycopg ``COPY … FROM STDIN``, a transaction per batch, asynchronous commits; at the end the
    sequences are moved past the ids written and the tables are vacuumed and analysed (what autovacuum
    would do on its own shortly after a load this size)."""

    backend = "postgresql"

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        self.conn.execute("SET synchronous_commit = off")
        self.conn.execute("SET maintenance_work_mem = '256MB'")  # index builds sort in memory
        tables = "ARRAY['sessions', 'requests', 'responses']"
        # Unique constraints before foreign keys: a foreign key is added back after the key it refers to.
        self.constraints = self.conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            f" WHERE contype IN ('u', 'f') AND conrelid::regclass::text = ANY({tables})"
            " ORDER BY contype DESC, conname"
        ).fetchall()
        self.indexes = self.conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes i WHERE tablename = ANY("
            f"{tables}) AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
        ).fetchall()
        for table, name, _ in reversed(self.constraints):
            self.conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _ in self.indexes:
            self.conn.execute(f'DROP INDEX "{name}"')
        self.conn.commit()

    def write(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        names = ", ".join(f'"{name}"' for name in columns)
        with self.conn.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        self.conn.commit()

    def rebuild(self) -> None:
        for _, definition in self.indexes:
            self.conn.execute(definition)
        for table, name, definition in self.constraints:
            self.conn.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        self.conn.commit()

    def finish(self) -> None:
        for table in ("requests", "responses"):
            self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 1)) FROM {table}"
            )
        self.conn.commit()
        self.conn.autocommit = True
        for table in TABLES:
            self.conn.execute(f"VACUUM (ANALYZE) {table}")
        self.conn.close()


@dataclass
class _Session:
    id: str
    first: str
    model: str
    stream: bool
    system: str
    user: str | None
    metadata: dict[str, str] | None
    created: int = 0
    last_arrival: int = 0
    updated: int = 0
    messages: int = 0


def request_messages(turn: int) -> int:
    """Messages in the body of a session's ``turn``-th request: the system prompt and the first question,
    then (later turns) the previous answer and the new question."""
    return 2 if turn == 0 else 4


class _Plan:
    """Every exchange decided, in compact arrays indexed by exchange number (arrival order)."""

    def __init__(self, exchanges: int, days: int, seed: int, end_ms: int) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.end_ms = end_ms
        begin = end_ms - days * DAY_MS
        sessions: list[_Session] = []
        arrival = array("q")
        owner = array("l")
        turn = array("l")
        outcome = array("b")
        duration = array("l")
        first_byte = array("l")
        completion = array("l")
        model_cum = list(itertools.accumulate(MODEL_WEIGHTS))
        left = exchanges
        while left > 0:
            size = min(left, MAX_SESSION, int(rng.paretovariate(1.15)))
            left -= size
            s = len(sessions)
            model = MODELS[bisect.bisect(model_cum, rng.random() * model_cum[-1])]
            client = rng.random()
            team = TEAMS[s % len(TEAMS)] if client < 0.25 else None
            session_stream = rng.random() < 0.3
            first = f"{_sentence(rng, 6, 18).rstrip('.')}? (ticket {s})"
            body = {"messages": [{"role": "user", "content": first}]}
            user = f"user-{rng.randrange(5000)}" if client > 0.8 else None
            if user is not None:
                body["user"] = user  # type: ignore[assignment]
            session_id, first_text = resolve_session_id(
                body, header_value=None, key_fingerprint=None, request_id=""
            )
            session = _Session(
                session_id,
                first_text,
                model,
                session_stream,
                SYSTEM_PROMPTS[s % len(SYSTEM_PROMPTS)],
                user,
                {"team": team} if team else None,
            )
            sessions.append(session)
            # Think time between turns: a median of 45 s, some a few seconds, some many minutes.
            gaps = [int(rng.lognormvariate(10.7, 1.0)) + 2_000 for _ in range(size - 1)]
            span = sum(gaps)
            while True:  # a start at a busy hour is likelier than one at night
                start = begin + int(rng.random() * max(1, days * DAY_MS - span - 1_000))
                if rng.random() * max(HOURLY) < HOURLY[(start // 3_600_000) % 24]:
                    break
            at = start
            for k in range(size):
                if k:
                    at += gaps[k - 1]
                arrival.append(at)
                owner.append(s)
                turn.append(k)
                kind, tokens, took, ttfb = _outcome(rng, session_stream)
                outcome.append(kind)
                completion.append(tokens)
                duration.append(took)
                first_byte.append(ttfb)
        order = sorted(range(len(arrival)), key=arrival.__getitem__)
        self.sessions = sessions
        self.arrival = array("q", (arrival[i] for i in order))
        self.owner = array("l", (owner[i] for i in order))
        self.turn = array("l", (turn[i] for i in order))
        self.outcome = array("b", (outcome[i] for i in order))
        self.duration = array("l", (duration[i] for i in order))
        self.first_byte = array("l", (first_byte[i] for i in order))
        self.completion = array("l", (completion[i] for i in order))
        ends = [self.arrival[i] + self.duration[i] for i in range(len(order))]
        # Responses are stored when they end; those still running at the store's end are pending.
        self.answered = sorted((i for i in range(len(order)) if ends[i] <= end_ms), key=ends.__getitem__)
        # Each session as the writer leaves it: message_count is the most messages a request carried,
        # plus the answer once it is stored; updated_at moves with every request and response.
        for i in range(len(order)):
            session = sessions[self.owner[i]]
            at, answered = self.arrival[i], ends[i] <= end_ms
            if self.turn[i] == 0:
                session.created = at
            session.last_arrival = max(session.last_arrival, at)
            session.updated = max(session.updated, ends[i] if answered else at)
            session.messages = max(session.messages, request_messages(self.turn[i]) + answered)
        self.sentences = [_sentence(rng, 4, 30) for _ in range(4096)]


def _sentence(rng: random.Random, low: int, high: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + "."


def _outcome(rng: random.Random, stream: bool) -> tuple[int, int, int, int]:
    """(outcome, completion tokens, duration ms, first byte ms) of one exchange."""
    roll = rng.random()
    if roll < 0.0002:  # a rare status: a prompt over the context window, refused at once
        took = int(rng.lognormvariate(4.0, 0.5)) + 5
        return TOO_LONG, 0, took, max(1, took - 2)
    if roll < 0.02:
        took = int(rng.lognormvariate(4.5, 0.5)) + 5  # a 429 comes back fast (~90 ms)
        return RATE_LIMITED, 0, took, max(1, took - 2)
    if roll < 0.03:
        took = int(rng.lognormvariate(7.8, 0.8)) + 20  # a failure after ~2.4 s of trying
        return FAILED, 0, took, max(1, took - 2)
    if stream and roll < 0.033:
        ttfb = int(rng.lognormvariate(6.0, 0.6)) + 50
        return DISCONNECTED, 0, ttfb + int(rng.lognormvariate(7.0, 1.0)), ttfb
    kind = LENGTH if roll < 0.043 else TOOLS if roll < 0.063 else OK
    tokens = 1024 if kind == LENGTH else min(1023, int(rng.lognormvariate(5.0, 0.9)) + 1)
    ttfb = int(rng.lognormvariate(6.0, 0.6)) + 50  # ~450 ms to the first token
    took = ttfb + int(tokens * rng.lognormvariate(2.7, 0.3))  # ~15 ms per token after it
    return kind, tokens, took, (ttfb if stream else max(1, took - 3))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class _Builder:
    """Rows from the plan: the bodies and ids the middleware would have stored."""

    def __init__(self, plan: _Plan, seed: int) -> None:
        self.plan = plan
        self.rng = random.Random(seed + 1)
        self.capture_token = ""
        self.prompt_tokens = array("l", bytes(8 * len(plan.arrival)))

    def _text(self, i: int, parts: int) -> str:
        sentences = self.plan.sentences
        return " ".join(sentences[(i * 7919 + p * 104729) % len(sentences)] for p in range(parts))

    def request_row(self, i: int) -> tuple[Any, ...]:
        plan, rng = self.plan, self.rng
        session = plan.sessions[plan.owner[i]]
        k = plan.turn[i]
        if i % 10_000 == 0:  # a replica restarts now and then: capture ids get a new token
            self.capture_token = f"{rng.getrandbits(64):016x}"
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": session.system},
            {"role": "user", "content": session.first},
        ]
        if k:
            messages.append({"role": "assistant", "content": self._text(i + 1, 2)})
            messages.append({"role": "user", "content": self._text(i, 1)})
        body: dict[str, Any] = {"model": session.model, "messages": messages}
        if session.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if i % 3 == 0:
            body["temperature"] = 0.7
        if session.user is not None:
            body["user"] = session.user
        if session.metadata is not None:
            body["metadata"] = session.metadata
        text = _dumps(body)
        self.prompt_tokens[i] = len(text) // 4
        at = plan.arrival[i]
        return (
            i + 1,
            session.id,
            _uuid(rng),
            f"{self.capture_token}-{i + 1:x}",
            at,
            at,
            "POST",
            "/v1/chat/completions",
            text,
            None,
            session.model,
            session.stream,
            session.user,
            _dumps(session.metadata) if session.metadata is not None else None,
            None,
        )

    def response_row(self, number: int, i: int) -> tuple[Any, ...]:
        plan, rng = self.plan, self.rng
        session = plan.sessions[plan.owner[i]]
        kind, tokens = plan.outcome[i], plan.completion[i]
        took, ttfb = plan.duration[i], plan.first_byte[i]
        end = plan.arrival[i] + took
        prompt = self.prompt_tokens[i]
        upstream: str | None = None
        error: str | None = None
        finish: str | None = None
        usage: tuple[int | None, int | None, int | None] = (None, None, None)
        if kind in (RATE_LIMITED, FAILED, TOO_LONG):
            status, detail = {
                RATE_LIMITED: (429, RATE_LIMIT_BODY),
                FAILED: (500, FAILURE_BODY),
                TOO_LONG: (400, TOO_LONG_BODY),
            }[kind]
            body: dict[str, Any] = {"error": detail}
            error = str(detail["message"])
        else:
            status = 200
            upstream = f"chatcmpl-{_uuid(rng)}"
            message: dict[str, Any] = {"role": "assistant", "content": self._text(i, 1 + tokens // 200)}
            if kind == TOOLS:
                arguments = _dumps({"query": self._text(i + 3, 1)[:60]})
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": f"call_{rng.getrandbits(64):016x}",
                            "type": "function",
                            "function": {"name": "search", "arguments": arguments},
                        }
                    ],
                }
            finish = {OK: "stop", LENGTH: "length", TOOLS: "tool_calls", DISCONNECTED: None}[kind]
            body = {
                "id": upstream,
                "object": "chat.completion",
                "created": end // 1000,
                "model": session.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            }
            if kind == DISCONNECTED:
                error = "client_disconnected"  # the stream was cut: no usage came
            else:
                usage = (prompt, tokens, prompt + tokens)
                body["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": tokens,
                    "total_tokens": usage[2],
                }
        return (
            number,
            i + 1,
            session.id,
            f"resp-{_uuid(rng)}",
            upstream,
            end,
            end,
            status,
            _dumps(body),
            None,
            None,
            *usage,
            finish,
            error,
            took,
            ttfb,
            None,
        )

    def session_rows(self) -> Iterator[tuple[Any, ...]]:
        for session in self.plan.sessions:
            yield (
                session.id,
                None,
                None,
                session.first,
                session.messages,
                session.created,
                session.updated,
                session.last_arrival,
                session.last_arrival + SESSION_TTL_MS,
                None,
            )


def _batches(rows: Iterable[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, BATCH)):
        yield batch


def generate(
    sinks: Sequence[Sink],
    exchanges: int,
    *,
    seed: int = 1,
    days: int = 30,
    end_ms: int | None = None,
    progress: Callable[[str], None] = print,
) -> Generated:
    """Write the same generated store into every sink (databases migrated and empty) and close them.

    Sessions (in their final state) first, then requests in arrival order, then responses in completion
    order, then the indexes and constraints dropped for the load (PostgreSQL checks every foreign key
    when it is added back).
    """
    end = end_ms if end_ms is not None else time.time_ns() // 1_000_000
    began = time.perf_counter()
    plan = _Plan(exchanges, days, seed, end)
    plan_seconds = time.perf_counter() - began
    progress(f"  planned {exchanges:,} exchanges in {len(plan.sessions):,} sessions ({plan_seconds:.1f} s)")
    builder = _Builder(plan, seed)
    build = 0.0
    writes = dict.fromkeys((sink.backend for sink in sinks), 0.0)

    def send(table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]], label: str) -> None:
        nonlocal build
        done = 0
        last_report = time.perf_counter()
        mark = time.perf_counter()
        for batch in _batches(rows):
            build += time.perf_counter() - mark
            for sink in sinks:
                started = time.perf_counter()
                sink.write(table, columns, batch)
                writes[sink.backend] += time.perf_counter() - started
            done += len(batch)
            if time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                progress(f"  {label}: {done:,}")
            mark = time.perf_counter()
        build += time.perf_counter() - mark

    send("sessions", SESSION_COLUMNS, builder.session_rows(), "sessions")
    send("requests", REQUEST_COLUMNS, (builder.request_row(i) for i in range(exchanges)), "requests")
    send(
        "responses",
        RESPONSE_COLUMNS,
        (builder.response_row(n + 1, i) for n, i in enumerate(plan.answered)),
        "responses",
    )
    for sink in sinks:
        started = time.perf_counter()
        progress(f"  {sink.backend}: building the indexes")
        sink.rebuild()
        writes[sink.backend] += time.perf_counter() - started
    finishes = {}
    for sink in sinks:
        started = time.perf_counter()
        sink.finish()
        finishes[sink.backend] = time.perf_counter() - started
    return Generated(
        exchanges, len(plan.sessions), len(plan.answered), end, plan_seconds, build, writes, finishes
    )


def schema_fingerprint(url: str) -> str:
    """A short hash of the tables and indexes a migrated SQLite database has (its ``sqlite_master``): a
    cached store made under other migrations is not reused. Each statement's lines are compared as a
    set: Alembic's batch rebuild of a table writes its constraints in an order that varies from run to
    run."""
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        statements = [sql for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")]
    conn.close()
    ddl = sorted(
        "\n".join(sorted(line.strip().rstrip(",").strip() for line in sql.splitlines()))
        for sql in statements
        if "sqlite_" not in sql
    )
    return hashlib.sha256("\n".join(ddl).encode()).hexdigest()[:16]
