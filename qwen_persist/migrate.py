"""Programmatic access to the Alembic migrations (used by the CLI and by ``auto_upgrade=True``)."""

from __future__ import annotations

import threading

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory

from qwen_persist._bundled import bundled_dir
from qwen_persist.engine import make_engine, resolve_database_url

# Our own version table, so the library can share a host database that has its own Alembic history.
VERSION_TABLE = "qwen_persist_alembic_version"

# Config.attributes key through which an explicit URL reaches env.py; it outranks the environment
# variable there, so ``upgrade(url)`` always migrates ``url``.
URL_ATTRIBUTE = "qwen_persist.database_url"

# Alembic's `context` and `op` are module-level proxies, so two migrations may not run at once in one
# process (across processes, env.py serializes them in the database).
_RUN_LOCK = threading.Lock()


def script_location() -> str:
    """The migrations directory: packaged in an installed wheel, else the checkout's ``alembic/``."""
    return str(bundled_dir("migrations"))


def make_config(database_url: str | None = None) -> Config:
    """An Alembic config for our migrations; without a URL, env.py resolves it (environment, default)."""
    config = Config()
    # Config values go through configparser interpolation.
    config.set_main_option("script_location", script_location().replace("%", "%%"))
    if database_url is not None:
        config.attributes[URL_ATTRIBUTE] = database_url
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database to ``revision``; concurrent callers are serialized (see env.py)."""
    with _RUN_LOCK:
        command.upgrade(make_config(database_url), revision)


def downgrade(database_url: str | None, revision: str) -> None:
    """Downgrade the database to ``revision`` (``"base"`` removes everything the migrations created)."""
    with _RUN_LOCK:
        command.downgrade(make_config(database_url), revision)


def current(database_url: str | None = None) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    engine = make_engine(resolve_database_url(database_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The newest revision."""
    revision = ScriptDirectory.from_config(make_config()).get_current_head()
    if revision is None:
        raise RuntimeError("no migrations found")
    return revision


def history() -> list[Script]:
    """Every revision, oldest first."""
    scripts = list(ScriptDirectory.from_config(make_config()).walk_revisions())
    scripts.reverse()
    return scripts
