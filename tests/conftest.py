"""Session fixtures: one throwaway PostgreSQL for the store tests, each test's own
XDG data home, and a scan for leaked secrets in what the whole session wrote."""

from __future__ import annotations

import itertools
import os
import re
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


# A whole API key (prefix, key id and secret): the key id alone is public.
_API_TOKEN = re.compile(rb"fvk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,128}")
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# What processes leave behind that must never hold a secret: logs, stores
# (audit entries, key hashes, ledgers) and exports. Token and key *files* that
# tests write on purpose have other names (.token, .key, .pem).
_SCANNED = {".log", ".jsonl", ".json", ".db", ".sqlite", ".txt", ".out", ".err"}
_SCAN_LIMIT = 64 << 20


@pytest.fixture(scope="session", autouse=True)
def _no_secrets_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session: no log, store or export any test produced holds a whole
    API token, and no log holds a private key (issue 16's secrets check).

    Servers in tests log into their HOME under the session's base temp
    directory; audit entries, gateway key tables and ledgers live there too.
    ``FEDVAULT_SECRET_SCAN=0`` turns it off (e.g. when debugging one test).
    """
    yield
    if os.environ.get("FEDVAULT_SECRET_SCAN", "1") == "0":
        return
    found: list[str] = []
    for path in tmp_path_factory.getbasetemp().rglob("*"):
        if path.suffix not in _SCANNED or not path.is_file() or path.is_symlink():
            continue
        try:
            if path.stat().st_size > _SCAN_LIMIT:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if _API_TOKEN.search(data):
            found.append(f"{path}: an API token")
        if path.suffix != ".db" and _PRIVATE_KEY.search(data):
            found.append(f"{path}: a private key")
    if found:
        pytest.fail("secrets left in what the tests wrote:\n" + "\n".join(found[:20]))
