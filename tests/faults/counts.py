"""Counting what survived: rows in the database, records in the spill/journal directory, SQLite's own
integrity check, and the verdict of a scenario (with its one-line summary for the README table)."""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from qwen_persist.engine import make_engine
from qwen_persist.models import requests_table, responses_table

from .load import TOKEN_RE, Outcome, Vanished

# -- the database --------------------------------------------------------------------------------------


def _engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        return make_engine(database_url)
    # Counting must work while a scenario has set a statement timeout on the cluster, and must not wait
    # long for a server that is down.
    return make_engine(
        database_url,
        connect_args={"options": "-c statement_timeout=0", "connect_timeout": 5},
        pool_pre_ping=False,
    )


@dataclass(frozen=True, slots=True)
class StoredExchange:
    """One stored request and what is stored with it."""

    request_id: str
    client_request_id: str | None  # requests.metadata.client_request_id: stored under a new id
    session_id: str
    token: str | None  # the load driver's token found in the request's last user message
    has_response: bool
    status_code: int | None
    error: str | None
    reply: str | None  # the stored reply's text (choice 0)


def _last_user_text(body: Any) -> str:
    if isinstance(body, dict):
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else ""
    return ""


def _reply_text(body: Any) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def stored_exchanges(database_url: str) -> list[StoredExchange]:
    """Every stored request, with its response's outcome, in id order."""
    engine = _engine(database_url)
    query = (
        select(
            requests_table.c.request_id,
            requests_table.c.metadata,
            requests_table.c.session_id,
            requests_table.c.openai_request,
            responses_table.c.id,
            responses_table.c.status_code,
            responses_table.c.error,
            responses_table.c.openai_response,
        )
        .outerjoin(responses_table, responses_table.c.request_id == requests_table.c.id)
        .order_by(requests_table.c.id)
    )
    try:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    finally:
        engine.dispose()
    result = []
    for request_id, metadata, session_id, request, response_pk, status, error, response in rows:
        match = TOKEN_RE.search(_last_user_text(request))
        client_id = metadata.get("client_request_id") if isinstance(metadata, dict) else None
        result.append(
            StoredExchange(
                request_id=request_id,
                client_request_id=client_id,
                session_id=session_id,
                token=match.group(0) if match else None,
                has_response=response_pk is not None,
                status_code=status,
                error=error,
                reply=_reply_text(response),
            )
        )
    return result


def row_counts(database_url: str, request_ids: Collection[str] | None = None) -> tuple[int, int]:
    """(rows in requests, rows in responses), of the given request ids only if ``request_ids`` is set."""
    engine = _engine(database_url)
    requests = select(func.count()).select_from(requests_table)
    responses = select(func.count()).select_from(
        responses_table.join(requests_table, responses_table.c.request_id == requests_table.c.id)
    )
    if request_ids is not None:
        wanted = list(request_ids)
        requests = requests.where(requests_table.c.request_id.in_(wanted))
        responses = responses.where(requests_table.c.request_id.in_(wanted))
    try:
        with engine.connect() as conn:
            return int(conn.execute(requests).scalar_one()), int(conn.execute(responses).scalar_one())
    finally:
        engine.dispose()


def by_token(stored: Iterable[StoredExchange]) -> dict[str, list[StoredExchange]]:
    found: dict[str, list[StoredExchange]] = defaultdict(list)
    for row in stored:
        if row.token is not None:
            found[row.token].append(row)
    return found


def wait_stored(
    database_url: str, tokens: Collection[str], timeout: float, quiet: float = 7.0
) -> list[StoredExchange]:
    """Poll until every token has a stored request with its response; what is stored then. Gives up
    after ``timeout`` seconds, or once nothing has changed for ``quiet`` seconds (longer than the
    writer's longest retry backoff, 5 s: a writer that is still catching up changes something sooner).
    A database that cannot be read yet counts as nothing stored."""
    deadline = time.monotonic() + timeout
    stored: list[StoredExchange] = []
    last_change, last_count = time.monotonic(), -1
    while True:
        try:
            stored = stored_exchanges(database_url)
        except SQLAlchemyError:
            stored = []
        found = by_token(stored)
        if all(any(row.has_response for row in found.get(token, ())) for token in tokens):
            return stored
        now = time.monotonic()
        count = sum(1 for row in stored if row.has_response)
        if count != last_count:
            last_change, last_count = now, count
        if now >= deadline or now - last_change >= quiet:
            return stored
        time.sleep(0.25)


def sqlite_integrity(database_url: str) -> str:
    """``PRAGMA integrity_check`` of a SQLite database: ``"ok"``, or the problems it lists."""
    path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path, timeout=10) as conn:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    conn.close()
    return "; ".join(str(row[0]) for row in rows)


# -- the spill / journal directory ---------------------------------------------------------------------
# The on-disk format is being redesigned (spill files today, a journal next); only this block knows it.

JOURNAL_GLOBS = ("*.jsonl", "*.log")


def journal_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted({path for pattern in JOURNAL_GLOBS for path in directory.rglob(pattern) if path.is_file()})


def journal_records(directory: Path) -> int:
    """Records waiting in the journal: the checksummed records of its segments (``journal-*.log``), and
    the lines of dead-letter files (records set aside for a human)."""
    from qwen_persist.replay import ReplayOutcome, read_ops

    count = 0
    for path in journal_files(directory):
        if path.name.startswith("journal-") and path.name.endswith(".log"):
            count += sum(1 for _ in read_ops(path, ReplayOutcome()))
        else:
            with path.open("rb") as handle:
                count += sum(1 for line in handle if line.strip())
    return count


def journal_tokens(directory: Path) -> set[str]:
    """The load driver's tokens that appear anywhere in the journal: the exchanges it holds."""
    found: set[str] = set()
    for path in journal_files(directory):
        found.update(TOKEN_RE.findall(path.read_text(encoding="utf-8", errors="replace")))
    return found


# -- the verdict ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What a scenario's clients saw against what is stored; ``problems()`` empty means it passed."""

    scenario: str
    sent: int
    failures: list[str]
    stored: int  # request rows of this scenario's tokens
    journal: int  # records left in the spill/journal directories
    lost: list[str]  # accepted exchanges with no stored request
    duplicated: list[str] = field(default_factory=list)  # stored more than once
    unanswered: list[str] = field(default_factory=list)  # stored without a response row
    crosstalk: list[str] = field(default_factory=list)  # stored with another request's reply
    wrong_id: list[str] = field(default_factory=list)  # filed under an id the client never received
    wrong_session: list[str] = field(default_factory=list)  # not in the session the client named
    notes: list[str] = field(default_factory=list)  # scenario-specific problems

    def line(self) -> str:
        return (
            f"{self.scenario} | {self.sent} | {len(self.failures)} | {self.stored} | {self.journal} | "
            f"{len(self.lost)}"
        )

    def problems(self) -> list[str]:
        problems = []
        for label, items in (
            ("client failures", self.failures),
            ("lost (accepted, not stored)", self.lost),
            ("stored more than once", self.duplicated),
            ("stored without a response row", self.unanswered),
            ("stored with another request's reply", self.crosstalk),
            ("stored under an id the client never saw", self.wrong_id),
            ("stored outside the session the client named", self.wrong_session),
        ):
            if items:
                problems.append(f"{label}: {len(items)}, e.g. {items[:3]}")
        return problems + self.notes

    @property
    def ok(self) -> bool:
        return not self.problems()

    def explain(self) -> str:
        return f"{self.scenario}: " + "; ".join(self.problems())


def judge(
    scenario: str,
    outcomes: Sequence[Outcome],
    stored: Sequence[StoredExchange],
    journal_dirs: Sequence[Path] = (),
    *,
    must_store: Collection[str] | None = None,
    failures: Collection[Outcome] | None = None,
) -> Verdict:
    """Hold the stored rows against the outcomes. ``must_store`` (tokens) defaults to every exchange the
    proxy accepted; ``failures`` to every sent call that did not fully succeed. Each token must be
    stored exactly once, with a response, with its own reply, under the id its client received, in
    the session its client named."""
    tokens = {outcome.call.token for outcome in outcomes}
    found = by_token(row for row in stored if row.token in tokens)
    accepted = {outcome.call.token: outcome for outcome in outcomes if outcome.accepted}
    sessions = {outcome.call.token: outcome.call.session_id for outcome in outcomes}
    wanted = set(accepted) if must_store is None else set(must_store)
    failed = [o for o in outcomes if o.failed] if failures is None else list(failures)
    verdict = Verdict(
        scenario=scenario,
        sent=sum(1 for outcome in outcomes if outcome.sent),
        failures=[outcome.describe() for outcome in failed],
        stored=sum(len(rows) for rows in found.values()),
        journal=sum(journal_records(directory) for directory in journal_dirs),
        lost=sorted(token for token in wanted if token not in found),
    )
    for token, rows in sorted(found.items()):
        if len(rows) > 1:
            verdict.duplicated.append(token)
        for row in rows:
            named = sessions.get(token)
            if named is not None and row.session_id != named:
                verdict.wrong_session.append(f"{token}: {row.session_id} instead of {named}")
            if not row.has_response:
                if token in wanted:
                    verdict.unanswered.append(token)
                continue
            if row.error is None and row.status_code == 200 and (row.reply is None or token not in row.reply):
                verdict.crosstalk.append(f"{token}: {str(row.reply)[:80]!r}")
            outcome = accepted.get(token)
            if outcome is not None and outcome.request_id not in (row.request_id, row.client_request_id):
                verdict.wrong_id.append(f"{token}: client got {outcome.request_id}, row has {row.request_id}")
    return verdict


def judge_vanished(
    vanished: Sequence[Vanished], stored: Sequence[StoredExchange], *, disconnected: set[str]
) -> list[str]:
    """Problems with the exchanges of clients that vanished: each must have exactly one request row and
    one response row under its X-Request-Id, with ``error='client_disconnected'`` for the phases in
    ``disconnected``."""
    rows: dict[str, list[StoredExchange]] = defaultdict(list)
    for row in stored:
        rows[row.request_id].append(row)
    problems = []
    for client in vanished:
        mine = rows.get(client.request_id, [])
        if len(mine) != 1:
            problems.append(f"{client.phase} {client.request_id}: {len(mine)} request rows")
            continue
        row = mine[0]
        if not row.has_response:
            problems.append(f"{client.phase} {client.request_id}: no response row")
        elif client.phase in disconnected and "client_disconnected" not in (row.error or "").split("; "):
            # A capture problem (a body cut short is not JSON) comes first in the error, by design.
            problems.append(
                f"{client.phase} {client.request_id}: error={row.error!r}, status={row.status_code}"
            )
    return problems
