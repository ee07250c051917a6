"""A PostgreSQL database not in UTF8 is refused at open, for every store.

``SQL_ASCII`` used to crash the open with a ``TypeError`` traceback from
inside SQLAlchemy's dialect (psycopg hands text back as bytes there); a
``LATIN1`` database opened and would have refused some writes later, mid-run.
Both are now a configuration error that names the store, the database and
the fix, before any table is created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedvault.errors import ConfigError
from server.audit.storage import open_storage
from server.gateway.keys import GatewayStore
from server.store import FederationStore
from tests.audit_support import fetch_value, run_sql

ENCODINGS = ["SQL_ASCII", "LATIN1"]


def _database(admin: str, encoding: str, use: str) -> str:
    # One database per use: a refused open may leave its pooled connection behind.
    name = f"enc_{encoding.lower()}_{use}"
    run_sql(admin, f'DROP DATABASE IF EXISTS "{name}"')
    run_sql(
        admin,
        f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0",
    )
    return admin.rsplit("/", 1)[0] + f"/{name}"


def _tables(url: str) -> object:
    return fetch_value(
        url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
    )


def _open(kind: str, url: str) -> Any:
    if kind == "federation":
        return FederationStore(url)
    if kind == "gateway":
        return GatewayStore(url)
    return open_storage(url)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["federation", "gateway", "audit"])
def test_a_database_not_in_utf8_is_refused_before_any_table(
    pg_admin: str, kind: str, encoding: str
) -> None:
    url = _database(pg_admin, encoding, kind)
    with pytest.raises(ConfigError) as info:
        _open(kind, url)
    message = str(info.value)
    assert f"is a {encoding} database" in message
    assert "ENCODING 'UTF8'" in message
    assert _tables(url) == 0


def test_the_cli_says_so_with_exit_2_and_no_traceback(pg_admin: str, tmp_path: Path) -> None:
    url = _database(pg_admin, "SQL_ASCII", "cli").replace("postgresql+psycopg://", "postgresql://")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    env["FEDVAULT_GATEWAY_STORE"] = url
    done = subprocess.run(
        [sys.executable, "-m", "fedvault", "keys", "list", "--home", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "is a SQL_ASCII database; fedvault's stores need UTF8" in done.stderr
    assert "Traceback" not in done.stderr
