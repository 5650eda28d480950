"""Store an allow-listed set of response headers with each response.

Revision ID: 0004_response_headers
Revises: 0003_adopt_node_v2
Create Date: 2026-11-24

``responses.headers`` holds the response headers named by the middleware's ``response_headers`` option
(the upstream's ``x-request-id``, ``x-litellm-call-id``, rate-limit headers, ...): what links a row to
the upstream's own records. NULL when none of them was sent. Downgrade drops the column.

Revisions are frozen in time: keep every helper they need in this file, never import it from the
qwen_persist package, which keeps changing after this revision ships.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_response_headers"
down_revision: str | Sequence[str] | None = "0003_adopt_node_v2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    json_type = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
    with op.batch_alter_table("responses") as batch:
        batch.add_column(sa.Column("headers", json_type, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("headers")
