"""End to end: `fedvault audit verify` against a served log, tampered in the database."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure.signed_note import NoteSigner, generate_note_key, open_note, parse_checkpoint
from server.audit import merkle
from server.audit.log import AuditLog
from server.audit.records import encode_record
from server.audit.storage import SQLiteStorage
from tests.audit_support import record, serve_log

ORIGIN = "fedvault.test/audit"
N = 40


def _cli(*args: str | Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FEDVAULT_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "fedvault", "audit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return generate_note_key(ORIGIN)


def _make_log(path: Path, signer: NoteSigner, n: int = N) -> None:
    log = AuditLog(SQLiteStorage(path), signer)
    try:
        for i in range(n):
            log.append(record(i))
        log.checkpoint(force=True)
    finally:
        log.close()


@pytest.fixture
def served(tmp_path: Path, signer: NoteSigner) -> Iterator[tuple[str, Path]]:
    db = tmp_path / "audit.db"
    _make_log(db, signer)
    log = AuditLog(SQLiteStorage(db), signer)
    with serve_log(log) as url:
        yield url, db
    log.close()


def _unlock(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    for trigger in ("audit_entries_no_update", "audit_entries_no_delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    return conn


def _entry(i: int) -> bytes:
    return encode_record(record(i))


def test_verify_export_and_offline_bundle(
    served: tuple[str, Path], signer: NoteSigner, tmp_path: Path
) -> None:
    url, _ = served
    key = signer.verifier.line
    bundle = tmp_path / "bundle"
    result = _cli("verify", "--url", url, "--key", key, "--export", bundle, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"verified {N} entries" in result.stdout
    offline = _cli("verify", "--bundle", bundle, "--key", key, home=tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert f"verified {N} entries" in offline.stdout
    # The bundle is evidence: alter one entry and the offline check fails.
    lines = (bundle / "entries.jsonl").read_text().splitlines()
    item = json.loads(lines[9])
    item["entry"] = base64.b64encode(_entry(99)).decode()
    lines[9] = json.dumps(item)
    (bundle / "entries.jsonl").write_text("\n".join(lines) + "\n")
    broken = _cli("verify", "--bundle", bundle, "--key", key, home=tmp_path)
    assert broken.returncode == 6
    assert "FAILED" in broken.stderr
    # A key file works as well as a key line; a different key fails.
    (tmp_path / "vkey").write_text(key + "\n")
    again = _cli("verify", "--url", url, "--key", tmp_path / "vkey", home=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "consistent with the checkpoint of size" in again.stdout
    other = generate_note_key(ORIGIN).verifier.line
    wrong = _cli("verify", "--url", url, "--key", other, home=tmp_path / "h2")
    assert wrong.returncode == 6
    assert "not signed by" in wrong.stderr


def _change(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = 17", (_entry(1017),))
    return 17


def _delete(conn: sqlite3.Connection) -> int:
    conn.execute("DELETE FROM audit_entries WHERE idx = 23")
    return 23


def _reorder(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = 11", (_entry(12),))
    conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = 12", (_entry(11),))
    return 11


def _insert(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE audit_entries SET idx = -idx - 1 WHERE idx >= 30")
    conn.execute("UPDATE audit_entries SET idx = -idx WHERE idx < 0")
    conn.execute("INSERT INTO audit_entries VALUES (30, ?)", (_entry(5000),))
    return 30


def _noncanonical(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = 3", (_entry(3) + b" ",))
    return 3


@pytest.mark.parametrize("tamper", [_change, _delete, _reorder, _insert, _noncanonical])
def test_tampering_names_the_index(
    served: tuple[str, Path], signer: NoteSigner, tmp_path: Path, tamper: object
) -> None:
    url, db = served
    conn = _unlock(db)
    index = tamper(conn)  # type: ignore[operator]
    conn.close()
    result = _cli("verify", "--url", url, "--key", signer.verifier.line, home=tmp_path)
    assert result.returncode == 6, result.stdout + result.stderr
    assert f"FAILED at index {index}:" in result.stderr


def test_fork_and_rollback_are_caught_by_the_saved_checkpoint(
    tmp_path: Path, signer: NoteSigner
) -> None:
    key, home = signer.verifier.line, tmp_path / "home"
    honest = tmp_path / "honest.db"
    _make_log(honest, signer)
    log = AuditLog(SQLiteStorage(honest), signer)
    with serve_log(log) as url:
        assert _cli("verify", "--url", url, "--key", key, home=home).returncode == 0
    log.close()

    # The operator (who holds the key) rewrites entry 4 and re-signs a longer log.
    forked = tmp_path / "forked.db"
    flog = AuditLog(SQLiteStorage(forked), signer)
    for i in range(N + 5):
        flog.append(record(i, actor="mallory") if i == 4 else record(i))
    flog.checkpoint(force=True)
    with serve_log(flog) as url:
        result = _cli("verify", "--url", url, "--key", key, home=home)
    flog.close()
    assert result.returncode == 6
    assert "FAILED at index 4:" in result.stderr
    assert "forked" in result.stderr

    # ... or serves an older, shorter history.
    short = tmp_path / "short.db"
    _make_log(short, signer, n=N - 10)
    slog = AuditLog(SQLiteStorage(short), signer)
    with serve_log(slog) as url:
        result = _cli("verify", "--url", url, "--key", key, home=home)
    slog.close()
    assert result.returncode == 6
    assert f"FAILED at index {N - 10}:" in result.stderr
    assert "shrank" in result.stderr


def test_search_and_export(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    result = _cli("search", "--url", url, "--actor", "user1", "--outcome", "denied", home=tmp_path)
    assert result.returncode == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert hits
    assert all(h["actor"] == "user1" and h["outcome"] == "denied" for h in hits)
    assert [h["index"] for h in hits] == [i for i in range(N) if i % 3 == 1 and i % 5 == 0]
    timed = _cli(
        "search",
        "--url",
        url,
        "--since",
        "2026-11-23T12:00:10Z",
        "--until",
        "2026-11-23T12:00:12Z",
        home=tmp_path,
    )
    assert [json.loads(line)["index"] for line in timed.stdout.splitlines()] == [10, 11]
    by_id = _cli("search", "--url", url, "--request-id", "req-7", home=tmp_path)
    assert [json.loads(line)["index"] for line in by_id.stdout.splitlines()] == [7]
    out = tmp_path / "all.jsonl"
    exported = _cli("export", "--url", url, "--out", out, home=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == N
    assert rows[7]["request_id"] == "req-7"


def test_search_filters_on_request_fields(tmp_path: Path, signer: NoteSigner) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(SQLiteStorage(db), signer)
    rows = [
        record(0),  # a training-style entry without request fields
        record(1, protocol="rest", peer="10.0.0.7:4431", status="200", latency_ms=3.5),
        record(
            2,
            protocol="grpc",
            peer="ipv4:10.0.0.8:5000",
            mtls_subject="CN=analytics-app,O=clinic",
            status="RESOURCE_EXHAUSTED",
            error_type="urn:fedvault:problem:rate-limited",
            outcome="error",
            latency_ms=250.0,
        ),
        record(3, protocol="rest", peer="192.168.1.2:80", status="503", latency_ms=40.0),
    ]
    for r in rows:
        log.append(r)
    with serve_log(log) as url:

        def hits(*args: str) -> list[int]:
            result = _cli("search", "--url", url, *args, home=tmp_path)
            assert result.returncode == 0, result.stderr
            return [json.loads(line)["index"] for line in result.stdout.splitlines()]

        assert hits("--protocol", "rest", "--peer", "10.0.0.") == [1]
        assert hits("--error-type", "rate-limited", "--mtls-subject", "analytics-app") == [2]
        assert hits("--min-latency-ms", "30", "--status", "503") == [3]
    log.close()


def test_keygen_writes_a_private_key_0600(tmp_path: Path) -> None:
    result = _cli("keygen", "--name", "org.example/audit", "--out", tmp_path / "k", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("org.example/audit+")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE" not in result.stdout
    assert _cli("keygen", "--name", "x", "--out", tmp_path / "k", home=tmp_path).returncode == 2


WRITER = """
import sys, threading
from secure.signed_note import load_note_signer
from server.audit.log import AuditLog
from server.audit.storage import SQLiteStorage
from tests.audit_support import record

log = AuditLog(SQLiteStorage(__import__("pathlib").Path(sys.argv[1])),
               load_note_signer(__import__("pathlib").Path(sys.argv[2])),
               checkpoint_interval=0.05)
log.start_checkpointing()
lock = threading.Lock()

def work(t):
    for j in range(100000):
        n = t * 1000000 + j
        index = log.append(record(n))
        with lock:
            sys.stdout.write(f"{index} {n}\\n")
            sys.stdout.flush()

for t in range(16):
    threading.Thread(target=work, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def test_kill_9_during_concurrent_appends_loses_no_acknowledged_entry(
    tmp_path: Path, signer: NoteSigner
) -> None:
    from secure.signed_note import save_note_signer

    db, keyfile = tmp_path / "crash.db", tmp_path / "audit.key"
    save_note_signer(keyfile, signer)
    (tmp_path / "writer.py").write_text(WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "writer.py"), str(db), str(keyfile)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )
    assert proc.stdout is not None
    acked: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(acked) < 1500 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        index, n = map(int, line.split())
        acked[index] = n
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 1500, "writer produced too few acknowledgements"

    old = SQLiteStorage(db).latest_checkpoint()
    assert old is not None, "no checkpoint was signed before the kill"
    log = AuditLog(SQLiteStorage(db), signer)  # refuses to open if the tree broke
    try:
        size = log.size()
        got = {i: e for start in range(0, size, 1000) for i, e in log.entries(start, start + 1000)}
        for index, n in acked.items():
            assert got[index] == encode_record(record(n))
        assert log.verify_store() == size
        log.append(record(10**8))
        new = parse_checkpoint(open_note(log.checkpoint(force=True), signer.verifier))
        old_cp = parse_checkpoint(open_note(old[1], signer.verifier))
        proof = log.consistency_proof(old_cp.size, new.size)
        merkle.verify_consistency(old_cp.size, new.size, old_cp.root, new.root, proof)
        with serve_log(log) as url:
            result = _cli("verify", "--url", url, "--key", signer.verifier.line, home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"verified {size + 1} entries" in result.stdout
    finally:
        log.close()
