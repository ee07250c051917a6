"""Session fixtures shared by the store tests: one throwaway PostgreSQL for all of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

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
