"""Sessions: reading, listing, renewing and deleting conversations.

`SessionManager` (the app-facing, event-loop-safe API of the original's phase 3) and the writer's upsert
(`writes.upsert_sessions`) both go through here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import ColumnElement, Connection, case, func, select, update

from ..models import requests_table, sessions_table
from ..sessions import SessionInfo, now_ms, session_row
from .base import Repository, few_matches, in_thread, lookup_key, paginate
from .pruning import PruningRepository
from .queries import Pagination, SessionFilter
from .rows import Page, SessionDetail
from .writes import upsert_sessions

# Deleting a session: exchanges per transaction, and the rest the writer gets between two of them.
DELETE_BATCH_SIZE = 500
DELETE_PAUSE = 0.01
SESSION_ORDER = ("last_accessed", "created_at", "updated_at", "expires_at")
_s = sessions_table.c


def _info(row: Any) -> SessionInfo:
    return SessionInfo(**row._mapping)


def select_session(conn: Connection, session_id: str) -> SessionInfo | None:
    row = conn.execute(select(sessions_table).where(_s.id == session_id)).first()
    return _info(row) if row is not None else None


def _session_terms(f: SessionFilter, now: int, *, walk: bool = False) -> list[ColumnElement[bool]]:
    """The WHERE terms for ``f``. ``walk``: the expiry spelled as an expression over the column, so that
    SQLite walks the order's index instead of driving the query from the expiry's."""
    expires = _s.expires_at + 0 if walk else _s.expires_at
    terms: list[ColumnElement[bool]] = []
    if f.active is not None:
        terms.append(expires > now if f.active else expires <= now)
    if f.since is not None:
        terms.append(_s.created_at >= f.since)
    if f.until is not None:
        terms.append(_s.created_at <= f.until)
    return terms


class SessionRepository(Repository):
    """Sessions. Expiry governs continuation only: nothing here deletes history unless asked to."""

    def get(self, session_id: str) -> SessionInfo | None:
        """The session as stored, expired or not, without touching it."""
        with self.engine.connect() as conn:
            return select_session(conn, session_id)

    def detail(self, session_id: str) -> SessionDetail | None:
        """The session with its request count."""
        with self.engine.connect() as conn:
            info = select_session(conn, session_id)
            if info is None:
                return None
            count = conn.execute(
                select(func.count()).where(requests_table.c.session_id == session_id)
            ).scalar_one()
        return SessionDetail(info, int(count))

    def list(self, filter: SessionFilter | None = None, page: Pagination | None = None) -> Page[SessionInfo]:
        """Sessions, most recently used first unless ``page`` says otherwise; the cursor is a session
        id."""
        f, p = filter or SessionFilter(), page or Pagination()
        key = sessions_table.c[p.column(SESSION_ORDER)]
        query = select(sessions_table)
        now = now_ms()
        after = None if p.after is None else str(p.after)
        with self.engine.connect() as conn:
            terms = _session_terms(f, now)
            if f.active is not None and key.name != "expires_at" and conn.dialect.name == "sqlite":
                # No index serves both the expiry and the order: SQLite is told which to use. With 78 of
                # 200,000 sessions active it walked them all in last_accessed order (0.35 s a page).
                # (A created_at range is left to it: those matches lie anywhere in the order, so
                # counting them cannot tell how far a walk would go.)
                if few_matches(conn, sessions_table, terms, p):
                    query = query.where(_s.id.in_(select(_s.id).where(*terms)))
                else:
                    query = query.where(*_session_terms(f, now, walk=True))
            else:
                query = query.where(*terms)
            rows, more, total = paginate(
                conn,
                query,
                key=key,
                tiebreak=_s.id,
                page=p if after is None else dataclasses.replace(p, after=after),
                after_key=lookup_key(key, _s.id),
            )
        return Page(
            [_info(row) for row in rows],
            limit=p.limit,
            has_more=more,
            offset=p.offset if after is None else None,
            after=after,
            total=total,
        )

    def create(
        self, session_id: str, first_user_message: str, ttl_ms: int, *, chat_id: str | None = None
    ) -> SessionInfo:
        """Create the session, or renew it if it exists (expired ones lose chat_id and parent_id)."""
        now = now_ms()
        with self.engine.begin() as conn:
            upsert_sessions(conn, [session_row(session_id, first_user_message, 0, now, ttl_ms)])
            if chat_id is not None:
                conn.execute(
                    update(sessions_table)
                    .where(_s.id == session_id)
                    .values(chat_id=chat_id, ids_updated_at=now)
                )
            info = select_session(conn, session_id)
        assert info is not None
        return info

    def touch(self, session_id: str, ttl_ms: int) -> SessionInfo | None:
        """The live session with its expiry slid forward; None if missing or expired."""
        now = now_ms()
        with self.engine.begin() as conn:
            touched = conn.execute(
                update(sessions_table)
                .where(_s.id == session_id, _s.expires_at > now)
                .values(last_accessed=now, expires_at=now + ttl_ms)
            ).rowcount
            return select_session(conn, session_id) if touched else None

    def set_ids(self, session_id: str, ttl_ms: int, values: dict[str, str | None]) -> bool:
        """Set ``chat_id`` and/or ``parent_id`` (the keys of ``values``) as the app reports them now,
        renewing the session."""
        now = now_ms()
        # Setting one upstream id on an expired session starts a new conversation under the old id: the
        # other id belongs to the old conversation and is cleared, as a renewal would.
        assignments: dict[str, Any] = dict(values)
        for name in ("chat_id", "parent_id"):
            if name not in assignments:
                assignments[name] = case((_s.expires_at <= now, None), else_=_s[name])
        with self.engine.begin() as conn:
            result = conn.execute(
                update(sessions_table)
                .where(_s.id == session_id)
                .values(
                    updated_at=now,
                    last_accessed=now,
                    expires_at=now + ttl_ms,
                    ids_updated_at=now,  # set by the app now: newer than any exchange before
                    **assignments,
                )
            )
        return bool(result.rowcount)

    def delete(
        self, session_id: str, *, batch_size: int = DELETE_BATCH_SIZE, pause: float = DELETE_PAUSE
    ) -> bool:
        """Delete a session with all its requests and responses; False when there is no such session.

        However long the session, the work is done in short transactions of ``batch_size`` exchanges with
        ``pause`` seconds between them, so the proxy's writer is never held off for long (see
        `PruningRepository.delete_session`, also for a request stored in the session meanwhile)."""
        pruning = PruningRepository(self.engine)
        return bool(pruning.delete_session(session_id, batch_size=batch_size, pause=pause).sessions)

    def purge_expired(
        self, *, batch_size: int = 1000, pause: float = DELETE_PAUSE, now: int | None = None
    ) -> int:
        """Delete expired sessions with their history, ``batch_size`` rows per short transaction with
        ``pause`` seconds between them; returns how many sessions were deleted (see
        `PruningRepository.delete_expired`)."""
        pruning = PruningRepository(self.engine)
        return pruning.delete_expired(batch_size=batch_size, pause=pause, now=now).sessions

    def metrics(self) -> dict[str, int]:
        """``active`` (not expired) and ``total`` sessions."""
        with self.engine.connect() as conn:
            total, active = conn.execute(
                select(func.count(), func.coalesce(func.sum(case((_s.expires_at > now_ms(), 1), else_=0)), 0))
            ).one()
        return {"active": int(active), "total": int(total)}

    aget = in_thread(get)
    adetail = in_thread(detail)
    alist = in_thread(list)
    acreate = in_thread(create)
    atouch = in_thread(touch)
    aset_ids = in_thread(set_ids)
    adelete = in_thread(delete)
    apurge_expired = in_thread(purge_expired)
    ametrics = in_thread(metrics)
