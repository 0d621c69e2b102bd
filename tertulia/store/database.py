"""Opening the store: the URL, connection settings, and migrations applied on start.

SQLite (the default, one file under TERTULIA_HOME) runs in WAL mode so readers never block the writer
(a reply being saved as it streams while the sidebar reloads), with foreign keys enforced and a busy
timeout so two processes wait for each other instead of failing. Before migrating an existing SQLite
file, a copy is taken with SQLite's online backup API, so a failed upgrade loses nothing.
PostgreSQL is reached with psycopg 3 (`postgresql://...` URLs are mapped to it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tertulia import config as settings
from tertulia.errors import TertuliaError

MIGRATIONS = Path(__file__).parent / "migrations"


def default_url() -> str:
    return f"sqlite:///{settings.home() / 'tertulia.db'}"


def _normalize(url: str) -> str:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TertuliaError(
            f"Cannot read the database URL {url!r}.",
            "Use sqlite:///path/to/file.db or postgresql://user:password@host/dbname.",
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise TertuliaError(
            f"Unsupported database {parsed.get_backend_name()!r}.", "Use SQLite or PostgreSQL."
        )
    return parsed.render_as_string(hide_password=False)


def _sqlite_settings(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, never corrupt
    cursor.close()


class Database:
    def __init__(self, url: str | None = None) -> None:
        self.url = _normalize(url or default_url())
        parsed = make_url(self.url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.path = Path(parsed.database) if self.is_sqlite and parsed.database else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Conversations are private: the file (and the WAL files SQLite creates beside it with the
            # same permissions) is readable by its owner only.
            self.path.touch(mode=0o600, exist_ok=True)
            self.path.chmod(0o600)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_settings)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self.sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # --- migrations ---------------------------------------------------------------------------
    def _alembic(self) -> Config:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        return config

    def revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def head(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic()).get_current_head()

    def migrate(self) -> Path | None:
        """Bring the schema to the latest revision; return the backup taken first, if any."""
        try:
            current = self.revision()
        except OperationalError as exc:
            raise TertuliaError(
                f"Cannot open the database: {exc.orig}", "Check --database-url and that the server is up."
            ) from None
        if current == self.head():
            return None
        backup = self._backup(current) if current is not None else None
        config = self._alembic()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return backup

    def _backup(self, revision: str) -> Path | None:
        if self.path is None or not self.path.exists():
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.{revision}.{stamp}.bak")
        source = sqlite3.connect(self.path)
        try:
            copy = sqlite3.connect(target)
            with copy:
                source.backup(copy)
            copy.close()
        finally:
            source.close()
        return target


def open_store(url: str | None = None) -> Database:
    """The store, migrated: what `tertulia serve` and the other interfaces call on start."""
    database = Database(url)
    database.migrate()
    return database
