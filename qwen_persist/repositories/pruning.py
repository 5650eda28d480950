"""Deleting history in batches: what ``qwen-persist cleanup`` and the ``retention`` option run.

Two selections, each with a dry-run count that matches what the deletion would remove:

* **older than a cutoff**: exchanges (a request with its response) whose request arrived before the
  cutoff, then the sessions left without any request that have expired and were last used before the
  cutoff. A live session keeps its recent exchanges and itself; only its old exchanges go.
* **expired**: sessions whose expiry has passed, with all their exchanges.
* **one session** (`delete_session`, what deleting a session through the API or `SessionManager` runs):
  all its exchanges, answered or not, then the session itself.

Every batch is one short transaction that deletes responses before their requests, so no row is ever
left without its partner (see `exchanges.delete_exchanges`). A request still waiting for its response is
only deleted once it is a day old (`PENDING_GRACE_MS`): until then its response may still be on its way
(a long stream, or the writer's journal after an outage), and it would find no request to belong to.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, exists, func, not_, or_, select

from ..models import requests_table, responses_table, sessions_table
from ..sessions import now_ms
from .base import Repository, in_thread
from .exchanges import delete_exchanges

PENDING_GRACE_MS = 86_400_000  # a request without a response is kept this long whatever the cutoff
DEFAULT_BATCH_SIZE = 500

_req = requests_table.c
_resp = responses_table.c
_s = sessions_table.c
_exchanges = requests_table.outerjoin(responses_table, _resp.request_id == _req.id)


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """Rows deleted (or, for a dry run, that would be)."""

    requests: int = 0
    responses: int = 0
    sessions: int = 0

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(
            self.requests + other.requests, self.responses + other.responses, self.sessions + other.sessions
        )

    @property
    def total(self) -> int:
        return self.requests + self.responses + self.sessions

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "responses": self.responses, "sessions": self.sessions}


def _settled(now: int) -> ColumnElement[bool]:
    """An exchange that can go without leaving a response with nowhere to land: answered, or long
    unanswered (needs the responses table joined)."""
    return or_(_resp.id.is_not(None), _req.timestamp < now - PENDING_GRACE_MS)


def _old_exchange(cutoff: int, now: int) -> ColumnElement[bool]:
    return and_(_req.timestamp < cutoff, _settled(now))


def _expired_exchange(now: int) -> ColumnElement[bool]:
    expired_session = select(_s.id).where(_s.expires_at <= now).scalar_subquery()
    return and_(_req.session_id.in_(expired_session), _settled(now))


def _has_requests(where: ColumnElement[bool] | None = None) -> ColumnElement[bool]:
    query = select(_req.id).select_from(_exchanges).where(_req.session_id == _s.id)
    return exists(query.where(where) if where is not None else query)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class PruningRepository(Repository):
    """Deletes old or expired history in batches, and counts what a deletion would remove."""

    def count_older_than(self, cutoff: int, *, now: int | None = None) -> PruneCounts:
        """What `delete_older_than` would delete now."""
        at = now_ms() if now is None else now
        old = _old_exchange(cutoff, at)
        sessions = and_(_s.expires_at <= at, _s.last_accessed < cutoff, not_(_has_requests(not_(old))))
        return self._count(old, sessions)

    def delete_older_than(
        self,
        cutoff: int,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pause: float = 0.0,
        now: int | None = None,
        stop: threading.Event | None = None,
    ) -> PruneCounts:
        """Delete exchanges whose request arrived before ``cutoff`` (ms), ``batch_size`` per transaction
        with ``pause`` seconds between transactions, then the sessions left empty that have expired and
        were last used before ``cutoff``. ``stop`` ends the work between two batches."""
        _check_batch_size(batch_size)
        at = now_ms() if now is None else now
        counts = self._delete_exchanges(_old_exchange(cutoff, at), batch_size, pause, stop)
        empty = and_(_s.expires_at <= at, _s.last_accessed < cutoff, not_(_has_requests()))
        return counts + self._delete_sessions(empty, batch_size, pause, stop)

    def count_expired(self, *, now: int | None = None) -> PruneCounts:
        """What `delete_expired` would delete now."""
        at = now_ms() if now is None else now
        unsettled = and_(_resp.id.is_(None), _req.timestamp >= at - PENDING_GRACE_MS)
        return self._count(_expired_exchange(at), and_(_s.expires_at <= at, not_(_has_requests(unsettled))))

    def delete_expired(
        self,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pause: float = 0.0,
        now: int | None = None,
        stop: threading.Event | None = None,
    ) -> PruneCounts:
        """Delete the sessions whose expiry has passed, with their exchanges, ``batch_size`` rows per
        transaction. A session is deleted once it holds no request; one renewed meanwhile is kept."""
        _check_batch_size(batch_size)
        at = now_ms() if now is None else now
        counts = self._delete_exchanges(_expired_exchange(at), batch_size, pause, stop)
        empty = and_(_s.expires_at <= at, not_(_has_requests()))
        return counts + self._delete_sessions(empty, batch_size, pause, stop)

    def delete_session(
        self,
        session_id: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        pause: float = 0.0,
        stop: threading.Event | None = None,
    ) -> PruneCounts:
        """Delete the session ``session_id`` with every exchange of it, ``batch_size`` exchanges per
        transaction, then the session row; ``counts.sessions`` is 1 when it was deleted, 0 when there was
        no such session (or ``stop`` ended the work first).

        The session row goes last, and only in a statement that finds it without requests: a request the
        proxy stores in the session meanwhile is never left without its session. Such a request is deleted
        too (the session was asked to go), by another round of batches until the session is gone; should
        the client send more after that, the proxy starts the session afresh, as for any new id. Unlike
        the other selections this one does not spare a request still waiting for its response: the
        response, when it comes, finds no request and is kept aside by the writer as for any deleted
        request.
        """
        _check_batch_size(batch_size)
        counts = PruneCounts()
        empty = and_(_s.id == session_id, not_(_has_requests()))
        while not _stopped(stop):
            counts += self._delete_exchanges(_req.session_id == session_id, batch_size, pause, stop)
            if _stopped(stop):
                break
            deleted = self._delete_sessions(empty, 1, 0.0, None)
            if deleted.sessions:
                return counts + deleted
            with self.engine.connect() as conn:
                if conn.execute(select(_s.id).where(_s.id == session_id)).first() is None:
                    break  # no such session (or deleted by someone else meanwhile)
            _rest(pause, stop)  # requests stored since the last batch: another round
        return counts

    # -- the batches -------------------------------------------------------------------------------

    def _count(self, exchanges: ColumnElement[bool], sessions: ColumnElement[bool]) -> PruneCounts:
        with self.engine.connect() as conn:
            requests, responses = conn.execute(
                select(func.count(_req.id), func.count(_resp.id)).select_from(_exchanges).where(exchanges)
            ).one()
            count = conn.execute(
                select(func.count()).select_from(sessions_table).where(sessions)
            ).scalar_one()
        return PruneCounts(int(requests), int(responses), int(count))

    def _delete_exchanges(
        self, where: ColumnElement[bool], batch_size: int, pause: float, stop: threading.Event | None
    ) -> PruneCounts:
        pick: Select[Any] = select(_req.id, _resp.id).select_from(_exchanges).where(where).limit(batch_size)
        counts = PruneCounts()
        while not _stopped(stop):
            with self.engine.begin() as conn:
                rows = conn.execute(pick).all()
                deleted = delete_exchanges(conn, [request for request, _ in rows])
            counts += PruneCounts(deleted, sum(1 for _, response in rows if response is not None))
            if len(rows) < batch_size:
                break
            _rest(pause, stop)
        return counts

    def _delete_sessions(
        self, where: ColumnElement[bool], batch_size: int, pause: float, stop: threading.Event | None
    ) -> PruneCounts:
        pick = select(_s.id).where(where).limit(batch_size)
        deleted = 0
        while not _stopped(stop):
            with self.engine.begin() as conn:
                ids = list(conn.execute(pick).scalars())
                # The condition again: a request stored since the pick renewed its session, or is in it.
                if ids:
                    deleted += conn.execute(delete(sessions_table).where(_s.id.in_(ids), where)).rowcount
            if len(ids) < batch_size:
                break
            _rest(pause, stop)
        return PruneCounts(sessions=deleted)

    acount_older_than = in_thread(count_older_than)
    adelete_older_than = in_thread(delete_older_than)
    acount_expired = in_thread(count_expired)
    adelete_expired = in_thread(delete_expired)
    adelete_session = in_thread(delete_session)


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _rest(pause: float, stop: threading.Event | None) -> None:
    """Leave the database to the writer for a moment between two batches."""
    if pause <= 0:
        return
    if stop is not None:
        stop.wait(pause)
    else:
        time.sleep(pause)
