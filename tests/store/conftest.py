"""Every store test runs on SQLite and on a real PostgreSQL server started here, on loopback.

The PostgreSQL server is a throwaway cluster (initdb in a temporary directory, trust authentication,
listening on 127.0.0.1 only), started once per session. `make test` installs the `postgresql` package
when it is missing; where it cannot be installed, the PostgreSQL half of these tests is skipped with a
reason that `make test` prints (pytest -rs).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tertulia.store.conversations import Store
from tertulia.store.database import Database
from tests.server.conftest import free_port


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server as the 'postgres' user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL IS NOT INSTALLED: store tests ran on SQLite only (apt-get install postgresql)"
        )
    root = Path(tempfile.mkdtemp(prefix="tertulia-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_postgres([initdb, "-D", str(data), "-U", "tertulia", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL COULD NOT START: {exc.stderr.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://tertulia@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh, migrated database of each kind."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        server = request.getfixturevalue("postgres_server")
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        db = Database(f"{server}/{name}")
    db.migrate()
    yield db
    db.close()


@pytest.fixture
def store(database: Database) -> Store:
    return Store(database)
