"""Session fixtures shared by the store tests: one throwaway PostgreSQL for all of them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit_support import fresh_database, postgres_server

_databases = itertools.count()


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
