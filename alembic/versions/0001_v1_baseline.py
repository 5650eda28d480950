"""v1 baseline: the original Node.js proxy's ``request_logs`` table.

Revision ID: 0001_v1_baseline
Revises:
Create Date: 2025-11-23

A legacy database already has ``request_logs`` and no version table yet; this revision adopts that table
as it is, so ``alembic upgrade head`` simply works on it. Otherwise it creates the table with the original
DDL (SQLite, verbatim) or its PostgreSQL translation. The original's ``settings`` table is not ours and is
never touched.

Downgrade drops ``request_logs`` only when it is empty. Rows in it are either legacy data this revision
adopted or rows that revision 0002's downgrade put back; both are user data, so the table stays (with a
warning). That leaves the database exactly as a legacy database looks before its first upgrade, which
upgrading again adopts.

Revisions are frozen in time: every helper they need lives in their own file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_v1_baseline"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

TABLE = "request_logs"
COLUMNS = (
    "id",
    "request_id",
    "provider",
    "endpoint",
    "method",
    "request_body",
    "response_body",
    "status_code",
    "duration_ms",
    "error",
    "created_at",
)

# The original's DDL, character for character, so a recreated table is indistinguishable from a legacy one.
SQLITE_DDL = (
    """CREATE TABLE request_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    request_body TEXT,  -- JSON
    response_body TEXT, -- JSON
    status_code INTEGER,
    duration_ms INTEGER,
    error TEXT,
    created_at INTEGER NOT NULL DEFAULT (strftime('%s', 'now'))
)""",
    "CREATE INDEX idx_request_logs_provider ON request_logs(provider)",
    "CREATE INDEX idx_request_logs_created_at ON request_logs(created_at DESC)",
    "CREATE INDEX idx_request_logs_request_id ON request_logs(request_id)",
)

# SQLite INTEGER is 64-bit, hence BIGINT for the id and the seconds timestamp.
POSTGRESQL_DDL = (
    """CREATE TABLE request_logs (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    request_body TEXT,
    response_body TEXT,
    status_code INTEGER,
    duration_ms INTEGER,
    error TEXT,
    created_at BIGINT NOT NULL DEFAULT (EXTRACT(EPOCH FROM now())::bigint)
)""",
    "CREATE INDEX idx_request_logs_provider ON request_logs (provider)",
    "CREATE INDEX idx_request_logs_created_at ON request_logs (created_at DESC)",
    "CREATE INDEX idx_request_logs_request_id ON request_logs (request_id)",
)


def create_request_logs(bind: sa.Connection) -> None:
    """Create ``request_logs`` and its indexes as the original did."""
    for statement in SQLITE_DDL if bind.dialect.name == "sqlite" else POSTGRESQL_DDL:
        bind.exec_driver_sql(statement)


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table(TABLE):
        create_request_logs(bind)
        return
    # Fail here, with a clear message, rather than halfway through the conversion in 0002.
    present = {column["name"] for column in inspector.get_columns(TABLE)}
    missing = [name for name in COLUMNS if name not in present]
    if missing:
        raise RuntimeError(f"existing {TABLE} table lacks the original columns {missing}; cannot adopt it")


def downgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table(TABLE):
        return
    rows = bind.execute(sa.text(f"SELECT COUNT(*) FROM {TABLE}")).scalar_one()
    if rows:
        log.warning("keeping %s: it holds %d row(s) of user data", TABLE, rows)
        return
    op.drop_table(TABLE)
