"""Durable identity: a capture id per request, and the time of a session's upstream ids.

Revision ID: 0005_capture_identity
Revises: 0004_response_headers
Create Date: 2026-11-24

``requests.capture_id`` is made by the middleware when a request arrives (a per-process random token and
a counter), so a replayed record is recognised by something no fresh request can share: unlike the
client's ``X-Request-Id`` or a millisecond timestamp, it never repeats across replicas or restarts. Rows
from before this revision have none (NULL; a unique index allows any number of NULLs on both backends).

``sessions.ids_updated_at`` is the arrival time (ms) of the exchange whose ``chat_id``/``parent_id`` the
row holds, so those ids only ever move forward to a newer exchange's, whatever order replicas or a
replayed journal deliver them in. NULL means unknown (rows from before this revision, or no ids yet).

Downgrade drops both columns (and the index).

Revisions are frozen in time: keep every helper they need in this file, never import it from the
qwen_persist package, which keeps changing after this revision ships.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_capture_identity"
down_revision: str | Sequence[str] | None = "0004_response_headers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("capture_id", sa.Text(), nullable=True))
        batch.create_unique_constraint("uq_requests_capture_id", ["capture_id"])
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("ids_updated_at", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("ids_updated_at")
    with op.batch_alter_table("requests") as batch:
        batch.drop_constraint("uq_requests_capture_id", type_="unique")
        batch.drop_column("capture_id")
