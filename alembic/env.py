"""Alembic environment for qwen_persist.

Used from a checkout (`alembic upgrade head` beside alembic.ini), from an installed wheel
(`script_location = qwen_persist:migrations`), and programmatically through `qwen_persist.migrate`.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, event, inspect, pool, text

from qwen_persist.engine import DATABASE_URL_ENV, DEFAULT_DATABASE_URL, make_engine
from qwen_persist.migrate import URL_ATTRIBUTE, VERSION_TABLE
from qwen_persist.models import TABLE_NAMES, metadata

# Any fixed 64-bit key works; it only has to be the same in every process that migrates this database.
PG_MIGRATION_LOCK_KEY = 0x7177656E5F6D6967  # "qwen_mig"

config = context.config
# A user's two-line alembic.ini has no logging sections; fileConfig would fail on it.
if config.config_file_name is not None and config.file_config.has_section("loggers"):
    # Keep the host application's loggers alive when it runs migrations in-process.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """The URL from `qwen_persist.migrate`, else `-x database_url=`, else the environment, else the ini."""
    passed = config.attributes.get(URL_ATTRIBUTE)
    if passed:
        return str(passed)
    x_url = context.get_x_argument(as_dictionary=True).get("database_url")
    return (
        x_url
        or os.environ.get(DATABASE_URL_ENV)
        or config.get_main_option("sqlalchemy.url")
        or DEFAULT_DATABASE_URL
    )


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    # A host database's own tables are none of our business: never report them as drift.
    if type_ == "table":
        return name in TABLE_NAMES
    return True


def _make_sqlite_transactional(engine: Any) -> None:
    # pysqlite opens transactions lazily and only for DML, so DDL would autocommit statement by statement
    # and a failed data conversion would leave a half-migrated file. Take over BEGIN ourselves; IMMEDIATE
    # takes the write lock up front, so concurrent upgraders queue on busy_timeout instead of deadlocking.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # With foreign keys on, dropping a referenced table (as batch mode's copy-and-rename does) silently
        # cascades deletes into the referencing tables; integrity is checked before commit instead.
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    present = set(inspect(connection).get_table_names()) & set(TABLE_NAMES)
    for table in sorted(present):
        violations = connection.exec_driver_sql(f'PRAGMA foreign_key_check("{table}")').fetchall()
        if violations:
            raise RuntimeError(f"migration left {len(violations)} foreign key violation(s) in {table}")


def run_migrations_online() -> None:
    engine = make_engine(database_url(), poolclass=pool.NullPool)
    is_sqlite = engine.dialect.name == "sqlite"
    if is_sqlite:
        _make_sqlite_transactional(engine)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=VERSION_TABLE,
                include_name=include_name,
                compare_type=True,
                render_as_batch=is_sqlite,
                # All revisions of one run commit together or not at all, on SQLite too (see above).
                transactional_ddl=True,
            )
            with context.begin_transaction():
                if engine.dialect.name == "postgresql":
                    # Several replicas may auto-upgrade at once: the second waits, then finds the work done.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
                if is_sqlite:
                    _check_sqlite_foreign_keys(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "qwen_persist migrations inspect and convert existing rows, so offline (--sql) mode is not supported"
    )
run_migrations_online()
