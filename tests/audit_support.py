"""Shared helpers for the audit-log tests: a throwaway PostgreSQL, records, keys.

The PostgreSQL server is real (Debian's packages, installed by ``.ci/run``):
``initdb`` into a temporary directory, started on a free loopback port, as the
``postgres`` account when running as root (PostgreSQL refuses to run as root).
Where the binaries are missing the tests are skipped — except in CI
(``FEDVAULT_REQUIRE_POSTGRES=1`` or ``CI``), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedvault.cli.processes import free_port
from server.audit.log import AuditLog
from server.audit.records import AuditRecord

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def record(i: int, **over: object) -> AuditRecord:
    fields: dict[str, object] = {
        "time": T0 + timedelta(seconds=i),
        "actor": f"user{i % 3}",
        "role": "analyst",
        "action": "infer" if i % 2 else "model.read",
        "resource": f"models/m{i % 4}",
        "outcome": "ok" if i % 5 else "denied",
        "request_id": f"req-{i}",
    }
    fields.update(over)
    return AuditRecord.model_validate(fields)


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin URL (``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``)."""
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("FEDVAULT_REQUIRE_POSTGRES") == "1" or os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing but CI requires the PostgreSQL tests")
        pytest.skip("PostgreSQL binaries (pg_ctl, initdb) are not installed")
    base = Path(tempfile.mkdtemp(prefix="fedvault-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        shutil.chown(base, user)
        prefix = ["runuser", "-u", user, "--"]
    data, port = base / "data", free_port()
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        start = ["-o", options, "-w", "-t", "60", "-l", str(base / "log"), "start"]
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), *start],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(admin_url: str, name: str) -> str:
    """Create database ``name`` and return its URL."""
    import psycopg

    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def serve_log(log: object, *, token: str | None = None) -> Iterator[str]:
    """Serve ``log`` (an AuditLog) with a real uvicorn on a free loopback port; yield the URL."""
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from server.audit.api import bearer_token_auth, create_audit_router, require_auditor
    from server.audit.log import AuditLog
    from server.problem import install_problem_handlers

    assert isinstance(log, AuditLog)
    app = FastAPI()
    install_problem_handlers(app)
    app.include_router(create_audit_router(log))
    app.dependency_overrides[require_auditor] = bearer_token_auth(token)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_sql(location: str | Path, statement: str, params: tuple[object, ...] = ()) -> None:
    """Run one raw statement as the operator could (bypassing the stores), then commit.

    ``location`` is a SQLite path or a PostgreSQL URL; errors are the driver's own.
    """
    text = str(location)
    if text.startswith("postgresql"):
        import psycopg

        plain = "postgresql://" + text.split("://", 1)[1]
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(statement.encode(), params)
        return
    import sqlite3

    lite = sqlite3.connect(text, isolation_level=None)
    try:
        lite.execute(statement.replace("%s", "?"), params)
    finally:
        lite.close()


def fetch_value(location: str | Path, statement: str, params: tuple[object, ...] = ()) -> object:
    """First column of the first row of a raw query (``%s`` placeholders)."""
    text = str(location)
    if text.startswith("postgresql"):
        import psycopg

        plain = "postgresql://" + text.split("://", 1)[1]
        with psycopg.connect(plain, autocommit=True) as conn:
            row = conn.execute(statement.encode(), params).fetchone()
    else:
        import sqlite3

        lite = sqlite3.connect(text, isolation_level=None)
        try:
            row = lite.execute(statement.replace("%s", "?"), params).fetchone()
        finally:
            lite.close()
    return None if row is None else row[0]


def append_concurrently(log: AuditLog, threads: int, per_thread: int) -> list[int]:
    """``threads`` threads released together, each appending ``per_thread`` records.

    Returns every acknowledged index; the committer under test (thread or
    process) must have group-committed them into one gap-free tree.
    """
    barrier = threading.Barrier(threads)
    got: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            idx = log.append(record(t * 100 + j))
            with lock:
                got.append(idx)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return got


@dataclass
class PostgresInstance:
    """A private PostgreSQL that a fault test may stop and start again (same port and data).

    Not the session's shared server (``pg_admin``): stopping that one would
    fail every other test using it. With ``password``, TCP connections need
    it (SCRAM), so a test can check the secret never reaches a log or answer.
    """

    bindir: Path
    base: Path
    port: int
    prefix: list[str]
    password: str | None = None

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL without the password (it goes in a password file)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1"
        start = ["-o", options, "-w", "-t", "60", "-l", str(self.base / "log"), "start"]
        subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), *start],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            [*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )


@contextmanager
def postgres_instance(password: str | None = None) -> Iterator[PostgresInstance]:
    """Like :func:`postgres_server`, but the test holds the server to stop and restart it."""
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("FEDVAULT_REQUIRE_POSTGRES") == "1" or os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing but CI requires the PostgreSQL tests")
        pytest.skip("PostgreSQL binaries (pg_ctl, initdb) are not installed")
    base = Path(tempfile.mkdtemp(prefix="fedvault-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        shutil.chown(base, user)
        prefix = ["runuser", "-u", user, "--"]
    server = PostgresInstance(bindir, base, free_port(), prefix, password)
    auth = ["-A", "trust"]
    if password is not None:
        pwfile = base / "pwfile"
        pwfile.write_text(password + "\n")
        shutil.chown(pwfile, base.owner())
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    try:
        init = [str(bindir / "initdb"), "-D", str(server.data), *auth, "-U", "postgres"]
        subprocess.run([*prefix, *init], check=True, capture_output=True, timeout=120)
        if password is not None:
            (base / "pwfile").unlink()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
