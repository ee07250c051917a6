"""PostgreSQL password authentication (SCRAM-SHA-256) for the three fedvault stores.

The session PostgreSQL of ``conftest.pg_admin`` trusts every loopback
connection, so a password sent there is never checked. This module starts a
second throwaway cluster (the same ``postgres_server`` helper) and rewrites its
``pg_hba.conf`` so that over TCP only the ``postgres`` admin is trusted and
every other role must authenticate with ``scram-sha-256``; the application
role's password is stored as a SCRAM verifier. Against it, for the federation
store, the gateway key store and the audit store alike:

- the right password file opens the store, and a write reads back;
- a wrong password is :class:`~fedvault.errors.UnavailableError` saying
  "password authentication failed", naming the store, with neither password
  in the message, its exception chain, the logs or the process's output;
- a missing, unreadable (a directory), empty or non-UTF-8 password file is a
  clear :class:`~fedvault.errors.ConfigError` naming the file;
- a password in the URL (userinfo — base64 ``/`` and ``+`` included — or a
  ``password=`` query parameter) is a :class:`~fedvault.errors.ConfigError`
  before any connection, and the settings refuse it naming the setting.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fedvault.errors import ConfigError, UnavailableError
from fedvault.settings import load_settings
from server.audit.records import encode_record
from server.audit.storage import open_storage
from server.gateway.keys import GatewayStore
from server.store import FederationStore
from tests.audit_support import fresh_database, postgres_server, record

ROLE = "fedvault_app"
STORES = ("federation", "gateway", "audit")
# Only the admin is trusted over TCP; every other role needs its SCRAM password.
HBA = (
    "local all all trust\n"
    "host all postgres 127.0.0.1/32 trust\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)


@dataclass(frozen=True)
class ScramServer:
    admin: str  # postgresql://postgres@127.0.0.1:PORT/postgres (trusted)
    password: str  # ROLE's password
    urls: dict[str, str]  # store kind -> postgresql://ROLE@127.0.0.1:PORT/DB (no password)


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="module")
def scram() -> Iterator[ScramServer]:
    """A second throwaway PostgreSQL that really checks ROLE's password (SCRAM-SHA-256)."""
    with postgres_server() as admin_url:
        admin = _plain(admin_url)
        # base64-like, with the characters that trip URL parsing (/ and +).
        password = secrets.token_urlsafe(18) + "/+x"
        with psycopg.connect(admin, autocommit=True) as conn:
            hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
            hba.write_text(HBA)
            conn.execute("SELECT pg_reload_conf()")
            errors = conn.execute(
                "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"
            ).fetchone()
            assert errors == (0,)
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    psycopg.sql.Identifier(ROLE), psycopg.sql.Literal(password)
                )
            )
            stored = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (ROLE,)
            ).fetchone()
            assert stored is not None
            assert str(stored[0]).startswith("SCRAM-SHA-256$")
        urls = {}
        for kind in STORES:
            db = fresh_database(admin_url, f"pw_{kind}")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "pw_{kind}" OWNER TO {ROLE}')
            urls[kind] = _plain(db).replace("postgres@", f"{ROLE}@")
        yield ScramServer(admin, password, urls)


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """libpq must not find a password anywhere but in the file the store is given."""
    for name in ("PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE", "PGUSER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


def _open(kind: str, url: str, password_file: Path | None) -> Any:
    if kind == "federation":
        return FederationStore(url, password_file=password_file)
    if kind == "gateway":
        return GatewayStore(url, password_file=password_file)
    return open_storage(url, password_file=password_file)


def _write_and_read_back(kind: str, store: Any) -> None:
    if kind == "federation":
        run_id = f"run-{secrets.token_hex(4)}"
        store.create_run(run_id, {"rounds": 2}, {"columns": []})
        assert store.run(run_id).config == {"rounds": 2}
    elif kind == "gateway":
        token, key = store.create_key("analyst", models=frozenset({"m"}))
        assert store.check_token(token).key_id == key.key_id
    else:
        entry = encode_record(record(7))
        index = store.append([entry])
        assert store.entries(index, index + 1) == [(index, entry)]


def _chain(exc: BaseException) -> str:
    """Every message in ``exc``'s cause/context chain (suppressed ones included)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 20:
        parts.append(f"{type(seen).__name__}: {seen} {seen.args!r}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_the_server_really_requires_the_scram_password(scram: ScramServer) -> None:
    """Without this, every test below would pass against a trusting server."""
    url = scram.urls["federation"]
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(url, connect_timeout=5).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(url, password=secrets.token_hex(8), connect_timeout=5).close()
    with psycopg.connect(url, password=scram.password, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)


@pytest.mark.parametrize("kind", STORES)
def test_the_right_password_file_opens_the_store(
    scram: ScramServer, tmp_path: Path, kind: str
) -> None:
    secret = _secret_file(tmp_path / "pw", scram.password)
    store = _open(kind, scram.urls[kind], secret)
    try:
        _write_and_read_back(kind, store)
    finally:
        store.close()
    # Reopened (a fresh process would do the same), the row is still there.
    again = _open(kind, scram.urls[kind], secret)
    try:
        if kind == "audit":
            assert again.size() >= 1
    finally:
        again.close()


@pytest.mark.parametrize("kind", STORES)
def test_a_wrong_password_is_unavailable_and_leaks_nothing(
    scram: ScramServer,
    tmp_path: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wr0ng/" + secrets.token_urlsafe(12)
    secret = _secret_file(tmp_path / "pw", wrong)
    with pytest.raises(UnavailableError) as info:
        _open(kind, scram.urls[kind], secret)
    message = str(info.value)
    assert type(info.value) is UnavailableError
    assert "password authentication failed" in message
    assert f'user "{ROLE}"' in message
    assert f"cannot open the {kind} database" in message
    out, err = capfd.readouterr()
    for leak in (wrong, scram.password):
        assert leak not in _chain(info.value)
        assert leak not in caplog.text
        assert leak not in out + err


@pytest.mark.parametrize("kind", STORES)
def test_no_password_file_is_refused_by_the_server(
    scram: ScramServer, tmp_path: Path, kind: str
) -> None:
    with pytest.raises(UnavailableError, match="no password supplied"):
        _open(kind, scram.urls[kind], None)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("missing", "No such file or directory"),
        ("directory", "Is a directory"),
        ("empty", "is empty"),
        ("binary", "is not UTF-8 text"),
    ],
)
def test_a_bad_password_file_is_a_clear_error(
    scram: ScramServer, tmp_path: Path, kind: str, problem: str, expected: str
) -> None:
    path = tmp_path / "pw"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("\n")
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe" + scram.password.encode())
    with pytest.raises(ConfigError) as info:
        _open(kind, scram.urls[kind], path)
    message = str(info.value)
    assert "password file" in message
    assert str(path) in message
    assert expected in message
    assert scram.password not in _chain(info.value)


def _urls_with_the_password(url: str, password: str) -> list[str]:
    head, rest = url.split("://", 1)
    return [
        f"{head}://{rest.replace('@', ':' + password + '@', 1)}",  # user:secret@host
        f"{url}?password={password}",
        f"{url}?sslmode=prefer&password={password}",
        f"{url}?sslpassword={password}",
    ]


@pytest.mark.parametrize("kind", STORES)
def test_a_password_in_the_url_is_refused_before_connecting(
    scram: ScramServer,
    tmp_path: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Even the right password (which the server would accept) is refused in a URL."""
    caplog.set_level(logging.DEBUG)
    secret = _secret_file(tmp_path / "pw", scram.password)
    for url in _urls_with_the_password(scram.urls[kind], scram.password):
        with pytest.raises(ConfigError, match="must not contain a password") as info:
            _open(kind, url, secret)
        assert scram.password not in _chain(info.value)
    out, err = capfd.readouterr()
    assert scram.password not in caplog.text + out + err


@pytest.mark.parametrize("field", ["federation_store", "gateway_store", "audit_store"])
def test_the_settings_refuse_every_spelling_of_a_url_password(
    scram: ScramServer, tmp_path: Path, field: str
) -> None:
    for url in _urls_with_the_password(scram.urls["audit"], scram.password):
        with pytest.raises(ConfigError) as info:
            load_settings(home=tmp_path, **{field: url})
        assert f"{field} must not contain a password" in str(info.value)
        assert f"FEDVAULT_{field.upper()}_PASSWORD_FILE" in str(info.value)
        assert scram.password not in _chain(info.value)


def test_the_audit_writer_process_authenticates_with_the_file(
    scram: ScramServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The gateway's default committer opens its own connection in a child process."""
    from secure.signed_note import generate_note_key
    from server.audit.log import AuditLog
    from server.audit.writer import ProcessCommitter

    url = scram.urls["audit"]
    secret = _secret_file(tmp_path / "pw", scram.password)
    log = AuditLog(
        open_storage(url, password_file=secret),
        generate_note_key("test/pw-audit"),
        committer=ProcessCommitter(url, password_file=secret),
    )
    try:
        index = log.append(record(11))
        assert log.entries(index, index + 1) == [(index, encode_record(record(11)))]
        assert log.verify_store() == log.size()
    finally:
        log.close()
    wrong = _secret_file(tmp_path / "wrong", "Wr0ng/" + secrets.token_urlsafe(12))
    with pytest.raises(UnavailableError, match="could not open the audit store"):
        ProcessCommitter(url, password_file=wrong)
    out, err = capfd.readouterr()
    assert "password authentication failed" in err  # the child's one line, no traceback
    assert "Traceback" not in err
    assert scram.password not in out + err
    assert wrong.read_text().strip() not in out + err


@pytest.mark.parametrize(
    ("kind", "argv", "env"),
    [
        ("federation", ["runs", "list"], "FEDVAULT_FEDERATION_STORE"),
        ("gateway", ["keys", "list"], "FEDVAULT_GATEWAY_STORE"),
    ],
)
def test_the_cli_with_a_wrong_password_exits_10_without_secrets(
    scram: ScramServer, tmp_path: Path, kind: str, argv: list[str], env: str
) -> None:
    def cli(password: str) -> subprocess.CompletedProcess[str]:
        secret = _secret_file(tmp_path / f"pw-{len(password)}", password)
        environ = {
            **os.environ,
            env: scram.urls[kind],
            f"{env}_PASSWORD_FILE": str(secret),
            "PGPASSFILE": str(tmp_path / "no-pgpass"),
        }
        return subprocess.run(
            [sys.executable, "-m", "fedvault", *argv, "--home", str(tmp_path / "home")],
            capture_output=True,
            text=True,
            env=environ,
            timeout=120,
            check=False,
        )

    wrong = "Wr0ng/" + secrets.token_urlsafe(12)
    bad = cli(wrong)
    assert bad.returncode == 10, bad.stderr
    assert "password authentication failed" in bad.stderr
    assert "Traceback" not in bad.stderr
    for leak in (wrong, scram.password):
        assert leak not in bad.stdout + bad.stderr
    good = cli(scram.password)
    assert good.returncode == 0, good.stderr
    assert scram.password not in good.stdout + good.stderr


def test_audit_checkpoint_cli_takes_a_password_file(scram: ScramServer, tmp_path: Path) -> None:
    """`fedvault audit checkpoint --db URL --password-file F`: signs with the right
    password; a wrong one exits 10 naming the failure, never the password."""
    key = tmp_path / "audit.key"
    keygen = ["audit", "keygen", "--name", "test/pw-audit", "--out", str(key)]
    env = {**os.environ, "PGPASSFILE": str(tmp_path / "no-pgpass")}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedvault", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    assert cli(*keygen).returncode == 0
    url = scram.urls["audit"]
    wrong = "Wr0ng/" + secrets.token_urlsafe(12)
    checkpoint = ["audit", "checkpoint", "--db", url, "--key", str(key)]
    bad = cli(*checkpoint, "--password-file", str(_secret_file(tmp_path / "bad", wrong)))
    assert bad.returncode == 10, bad.stderr
    assert "password authentication failed" in bad.stderr
    assert "Traceback" not in bad.stderr
    for leak in (wrong, scram.password):
        assert leak not in bad.stdout + bad.stderr
    right = _secret_file(tmp_path / "good", scram.password)
    good = cli(*checkpoint, "--password-file", str(right))
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("test/pw-audit")  # a signed tlog checkpoint note
    assert scram.password not in good.stdout + good.stderr
