"""Session fixtures: one throwaway PostgreSQL for the store tests, each test's own
XDG data home, and a scan for leaked secrets in what the whole session wrote."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import secret_scan
from tests.audit_support import fresh_database, postgres_server

_databases = itertools.count()


@pytest.fixture(autouse=True)
def _user_data_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test's own XDG data home (inherited by the CLIs it starts).

    ``fedvault audit verify`` keeps its state in the user's data directory;
    without this, tests would share it (and write into the real
    ``~/.local/share``), and one test's verified checkpoint would meet another's log.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """Admin URL of a real PostgreSQL started once per session (skipped where absent)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store location: a SQLite file path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "store.sqlite")
    admin = request.getfixturevalue("pg_admin")
    return fresh_database(admin, f"store_{next(_databases)}")


@pytest.fixture(scope="session", autouse=True)
def _no_secrets_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session: no log, store, export or error answer any test produced
    holds a whole API token, a private key, or a private-key file's content
    (issue 16's secrets check; see tests/secret_scan.py).

    Servers in tests log into their HOME under the session's base temp
    directory; audit entries, gateway key tables and ledgers live there too;
    error answers are collected there as they arrive.
    ``FEDVAULT_SECRET_SCAN=0`` turns it off (e.g. when debugging one test).
    """
    if os.environ.get("FEDVAULT_SECRET_SCAN", "1") == "0":
        yield
        return
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        secret_scan.install(patch, base)
        yield
    found = secret_scan.scan(base)
    if found:
        pytest.fail("secrets left in what the tests wrote:\n" + "\n".join(found[:20]))
