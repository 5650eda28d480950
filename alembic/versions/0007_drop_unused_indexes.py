"""Drop the index no query uses: every index costs the writer on every insert, so each must serve a read.

Revision ID: 0007_drop_unused_indexes
Revises: 0006_read_indexes
Create Date: 2026-11-25

Each index of ``sessions``, ``requests`` and ``responses`` was matched with the queries that use it (the
read side's lists, filters, lookups, stats, stored completions, pruning and retention; the writer's
lookups; the foreign keys' cascades), on SQLite's ``EXPLAIN QUERY PLAN`` and PostgreSQL's ``EXPLAIN``
over a generated store of 100,000 exchanges. One index appears in no plan:

- ``sessions(chat_id)`` (from the original's schema): nothing looks a session up by its upstream chat
  id; the column is only written (the writer's upsert and ``set_ids``). Every exchange renews its session,
  so the index is written on each one: on PostgreSQL a renewal moves ``last_accessed`` and
  ``expires_at``, both indexed, so the new row version needs an entry in every index of the table.

The original's other redundant indexes (``requests.request_id``, ``responses.request_id`` and
``responses.response_id`` beside their UNIQUE constraints; ``requests.session_id``, ``requests.model`` and
``responses.session_id`` beside a composite index they lead) were never created (0002) or were replaced
(0006).

Downgrade creates the index again.

Revisions are frozen in time: keep every helper they need in this file, never import it from the
qwen_persist package, which keeps changing after this revision ships.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_drop_unused_indexes"
down_revision: str | Sequence[str] | None = "0006_read_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROPPED = (("ix_sessions_chat_id", "sessions", ["chat_id"]),)


def upgrade() -> None:
    for name, table, _ in DROPPED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, columns in DROPPED:
        op.create_index(name, table, columns)
