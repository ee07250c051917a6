"""Gateway replicas on one PostgreSQL audit store: one signing key, or a clear refusal.

Two complete gateways (``build_gateway`` over HTTP, each with the writer
process the CLI uses and background checkpointing) append the records of real
inference requests to one PostgreSQL audit store and both sign checkpoints.
With the same key — loaded from copies of one key file, as two hosts would —
an auditor's verification passes end to end whichever replica answers, and
stays consistent when the next run lands on the other one (``fedvault audit
verify`` itself, with its state directory).

A replica with another key used to start silently and sign checkpoints of its
own: an auditor holding the real verifier key then saw "note is not signed"
— a tampering verdict — for every answer from that replica. Now it is refused
at start-up (``SigningKeyMismatchError``, exit 5 from ``fedvault gateway
start``, naming the key file and no key material), and a replica started
beside it on an empty store refuses to sign once the other key's checkpoint
is there. Rotation stays possible, explicitly (``previous_key``).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from fedvault.errors import (
    IntegrityError,
    KeyFileError,
    error_for_problem_type,
    mapping_for,
    problem_type,
)
from secure.signed_note import (
    NoteSigner,
    generate_note_key,
    load_note_signer,
    open_note,
    parse_checkpoint,
    save_note_signer,
)
from server.audit.log import AuditLog, SigningKeyMismatchError
from server.audit.records import decode_entry
from server.audit.storage import AuditStorage, CheckpointCheck, SQLiteStorage, open_storage
from server.audit.verifier import HttpSource, VerifierState, verify_log
from server.audit.writer import ProcessCommitter
from server.gateway.rest import GatewayApp
from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
from server.store import FederationStore
from tests.audit_support import fresh_database, record
from tests.gateway_support import LINEAGE, MODEL, database_replica
from tests.he_support import trained

ORIGIN = "fedvault/gateway-audit"  # the name `fedvault gateway start` gives its key
INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
_dbs = itertools.count()


@dataclass
class Replica:
    gw: GatewayApp
    log: AuditLog
    client: httpx.Client
    base: str


@pytest.fixture(scope="module")
def registry_db(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A PostgreSQL federation store holding one sealed model, and its model keys."""
    url = fresh_database(pg_admin, "audit_replicas_registry")
    keys_dir = tmp_path_factory.mktemp("model-keys") / "keys"
    ensure_model_keys(keys_dir)
    with FederationStore(url) as store:
        store.create_run("run-gw", {}, {})
        spec, params, scaler = trained("breast-cancer", "logreg")
        ModelRegistry(store, None, load_model_keys(keys_dir)).register(
            name=MODEL, run_id="run-gw", spec=spec, params=params, scaler=scaler, lineage=LINEAGE
        )
    return url, keys_dir


@pytest.fixture
def audit_url(pg_admin: str) -> str:
    """A fresh, empty PostgreSQL audit store for each test."""
    return fresh_database(pg_admin, f"audit_replicas_{next(_dbs)}")


def _key_file(path: Path, signer: NoteSigner) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_note_signer(path, signer)
    return path


def _replica(
    stack: ExitStack,
    registry: tuple[str, Path],
    audit_url: str,
    signer: NoteSigner,
    tmp: Path,
    *,
    background: bool = True,
) -> Replica:
    """What `fedvault gateway start` wires: writer process, checkpointing, audit routes."""
    url, keys_dir = registry
    log = AuditLog(
        open_storage(audit_url),
        signer,
        committer=ProcessCommitter(audit_url),
        checkpoint_interval=0.2,
    )
    stack.callback(log.close)
    if background:
        log.start_checkpointing()
    gw, base = database_replica(url, keys_dir, tmp, log, stack)
    client = stack.enter_context(httpx.Client(base_url=base, timeout=30))
    return Replica(gw, log, client, base)


def _infer(replicas: list[Replica], token: str, count: int) -> int:
    """``count`` inferences spread over the replicas from 4 threads; all must answer 200."""
    headers = {"Authorization": f"Bearer {token}"}

    def one(i: int) -> int:
        client = replicas[i % len(replicas)].client
        return client.post(f"/v2/models/{MODEL}/infer", json=INFER, headers=headers).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(count)))
    assert codes == [200] * count
    return count


def _stored_notes(audit_url: str) -> list[str]:
    plain = audit_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as conn:
        rows = conn.execute("SELECT note FROM audit_checkpoints ORDER BY size").fetchall()
    return [str(r[0]) for r in rows]


def _key_material(*signers: NoteSigner, public: bool = True) -> list[str]:
    """The keys' private text and seed (and public key bytes) that a message must not hold."""
    out: list[str] = []
    for s in signers:
        private = s.private_text()
        # PRIVATE+KEY+<name>+<id>+<base64 seed>, <name>+<id>+<base64 key> (base64 has + too)
        out += [private, private.split("+", 4)[4]]
        if public:  # a refusal names keys by id only
            out.append(s.verifier.line.split("+", 2)[2])
    return out


def test_two_replicas_with_one_key_write_a_log_that_verifies_end_to_end(
    registry_db: tuple[str, Path], audit_url: str, tmp_path: Path
) -> None:
    key = _key_file(tmp_path / "host-a" / "keys" / "gateway-audit.key", generate_note_key(ORIGIN))
    copy = tmp_path / "host-b" / "keys" / "gateway-audit.key"
    copy.parent.mkdir(parents=True)
    shutil.copy2(key, copy)  # the operator copies the key file to the second host
    verifier = load_note_signer(key).verifier
    with ExitStack() as stack:
        a = _replica(stack, registry_db, audit_url, load_note_signer(key), tmp_path)
        b = _replica(stack, registry_db, audit_url, load_note_signer(copy), tmp_path)
        auditor, _ = a.gw.store.create_key("auditor")
        analyst, _ = b.gw.store.create_key("analyst", models=frozenset({MODEL}))
        sent = _infer([a, b], analyst, 24)

        # Both replicas publish the one verifier key.
        auth = {"Authorization": f"Bearer {auditor}"}
        for r in (a, b):
            answer = r.client.get("/v2/audit/public-key", headers=auth)
            assert answer.text.strip() == verifier.line

        # The auditor's first run lands on replica A ...
        first_note = a.log.checkpoint(force=True)
        first = verify_log(HttpSource(a.base, token=auditor), verifier, None)
        assert first.note == first_note
        infers = [decode_entry(e) for _, e in a.log.entries(0, first.checkpoint.size)]
        assert sum(r.action.endswith("infer") and r.outcome == "ok" for r in infers) == sent
        state = VerifierState(first.note, first.checkpoint, first.leaves)

        # ... more traffic on both, and the next run lands on replica B: consistent.
        sent += _infer([b, a], analyst, 16)
        b.log.checkpoint(force=True)
        second = verify_log(HttpSource(b.base, token=auditor), verifier, state)
        assert second.previous_size == first.checkpoint.size
        assert second.checkpoint.size > first.checkpoint.size

        # Every checkpoint either replica stored verifies with the one key, and the
        # store rehashes to the same tree from both sides.
        notes = _stored_notes(audit_url)
        assert len(notes) >= 2
        sizes = [parse_checkpoint(open_note(n, verifier)).size for n in notes]
        assert sizes == sorted(set(sizes))
        assert a.log.verify_store() == b.log.verify_store()

        # `fedvault audit verify` itself, alternating replicas with one state directory.
        token_file = tmp_path / "auditor.token"
        token_file.write_text(auditor + "\n")
        token_file.chmod(0o600)
        state_dir = tmp_path / "verifier-state"
        for r in (a, b):
            signed = parse_checkpoint(open_note(r.log.checkpoint(force=True), verifier)).size
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fedvault",
                    "audit",
                    "verify",
                    "--url",
                    r.base,
                    "--key",
                    verifier.line,
                    "--token-file",
                    str(token_file),
                    "--state",
                    str(state_dir),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            # The audit API's own reads are audited too: the log only grows meanwhile.
            verified = re.search(rf"verified (\d+) entries of {ORIGIN} ", done.stdout)
            assert verified is not None, done.stdout
            assert int(verified.group(1)) >= signed
        assert "consistent with the checkpoint" in done.stdout


def test_a_replica_with_another_key_is_refused_at_start(
    registry_db: tuple[str, Path], audit_url: str, tmp_path: Path
) -> None:
    good = generate_note_key(ORIGIN)
    other = generate_note_key(ORIGIN)  # what a new host generates when the file was not copied
    with ExitStack() as stack:
        a = _replica(stack, registry_db, audit_url, good, tmp_path)
        analyst, _ = a.gw.store.create_key("analyst", models=frozenset({MODEL}))
        _infer([a], analyst, 4)
        a.log.checkpoint(force=True)

        committer = ProcessCommitter(audit_url)
        with pytest.raises(SigningKeyMismatchError) as info:
            AuditLog(open_storage(audit_url), other, committer=committer)
        with pytest.raises(ProcessLookupError):  # its writer process was stopped
            os.kill(committer.pid, 0)
        message = str(info.value)
        assert isinstance(info.value, KeyFileError)
        assert mapping_for(info.value).exit_code == 5
        mismatch = problem_type(SigningKeyMismatchError)
        assert error_for_problem_type(mismatch) is SigningKeyMismatchError
        assert message.startswith("refusing to start:")
        assert "gateway-audit.key" in message
        assert "FEDVAULT_HOME" in message
        assert f"{ORIGIN}+{good.verifier.key_id:08x}" in message  # the store's key, by id
        assert f"{ORIGIN}+{other.verifier.key_id:08x}" in message  # ours, by id
        for secret in _key_material(good, other):
            assert secret not in message

        # The running replica is unaffected and still verifiable with its key.
        _infer([a], analyst, 2)
        signed = parse_checkpoint(open_note(a.log.checkpoint(force=True), good.verifier)).size
        verified = verify_log(
            HttpSource(a.base, token=a.gw.store.create_key("auditor")[0]), good.verifier, None
        )
        assert verified.checkpoint.size >= signed


def test_gateway_start_with_another_key_exits_5_naming_the_key_file(
    registry_db: tuple[str, Path], audit_url: str, tmp_path: Path
) -> None:
    """A second host started without the copied key file: the CLI refuses to serve."""
    good = generate_note_key(ORIGIN)
    log = AuditLog(open_storage(audit_url), good)
    try:
        log.append(record(1))
        log.checkpoint(force=True)
    finally:
        log.close()
    home = tmp_path / "second-host"
    env = {
        **os.environ,
        "FEDVAULT_AUDIT_STORE": audit_url.replace("+psycopg", ""),
        "FEDVAULT_FEDERATION_STORE": registry_db[0].replace("+psycopg", ""),
        "FEDVAULT_GATEWAY_STORE": registry_db[0].replace("+psycopg", ""),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedvault",
            "gateway",
            "start",
            "--home",
            str(home),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 5, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "must use the same signing key" in done.stderr
    assert "gateway-audit.key" in done.stderr
    # (The CLI announces the verifier key it generated — public — and nothing else.)
    generated = load_note_signer(home / "keys" / "gateway-audit.key")
    for secret in [*_key_material(good), *_key_material(generated, public=False)]:
        assert secret not in done.stdout + done.stderr


def test_replicas_started_together_on_an_empty_store_sign_with_one_key_only(
    registry_db: tuple[str, Path],
    audit_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No checkpoint yet, so both start; the first key to sign wins, the other refuses."""
    good, other = generate_note_key(ORIGIN), generate_note_key(ORIGIN)
    with ExitStack() as stack:
        a = _replica(stack, registry_db, audit_url, good, tmp_path, background=False)
        b = _replica(stack, registry_db, audit_url, other, tmp_path, background=False)
        analyst, _ = a.gw.store.create_key("analyst", models=frozenset({MODEL}))
        auditor, _ = a.gw.store.create_key("auditor")
        _infer([a, b], analyst, 8)  # appends work on both: one tree, whatever the key
        a.log.checkpoint(force=True)
        with caplog.at_level(logging.ERROR, logger="server.audit.log"):
            with pytest.raises(SigningKeyMismatchError, match="same signing key"):
                b.log.checkpoint(force=True)
            with pytest.raises(SigningKeyMismatchError):
                b.log.checkpoint(force=True)
        assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1  # logged once

        # Auditors asking B get a typed error, not a checkpoint they cannot verify.
        answer = b.client.get(
            "/v2/audit/checkpoint", headers={"Authorization": f"Bearer {auditor}"}
        )
        assert answer.status_code == 503  # another replica may sign: a balancer retries
        assert answer.json()["type"] == "urn:fedvault:problem:signing-key-mismatch"
        for secret in _key_material(good, other):
            assert secret not in answer.text

        _infer([a, b], analyst, 4)
        a.log.checkpoint(force=True)
        assert verify_log(HttpSource(a.base, token=auditor), good.verifier, None)
        for note in _stored_notes(audit_url):
            open_note(note, good.verifier)  # nothing signed by the other key was stored


class _DeferredSaves:
    """A real storage whose checkpoint saves wait until :meth:`release` (the race's pause)."""

    def __init__(self, storage: AuditStorage) -> None:
        self.storage = storage
        self.pending: list[tuple[int, str, CheckpointCheck | None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        self.pending.append((size, note, check))

    def release(self) -> None:
        for size, note, check in self.pending:
            self.storage.save_checkpoint(size, note, check=check)
        self.pending.clear()


class _SavesAfter:
    """A real storage that lets ``first`` save just before its own checkpoint save."""

    def __init__(self, storage: AuditStorage, first: _DeferredSaves) -> None:
        self.storage, self.first = storage, first

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def save_checkpoint(
        self, size: int, note: str, *, check: CheckpointCheck | None = None
    ) -> None:
        self.first.release()
        self.storage.save_checkpoint(size, note, check=check)


def test_two_keys_signing_in_the_same_moment_leave_no_stray_checkpoint(
    db_location: str,
) -> None:
    """The race the start-up check cannot see: B signs size 3 and A size 4 on an empty
    store, each having checked that no checkpoint existed; B's save lands first. A's
    save re-checks inside its transaction and refuses, so every stored note is B's
    (before, A's note at size 4 was kept: the latest, unverifiable with B's key)."""
    good, other = generate_note_key(ORIGIN), generate_note_key(ORIGIN)
    b_storage = _DeferredSaves(open_storage(db_location))
    b = AuditLog(b_storage, other, checkpoint_interval=0)  # type: ignore[arg-type]
    a = AuditLog(
        _SavesAfter(open_storage(db_location), b_storage),  # type: ignore[arg-type]
        good,
        checkpoint_interval=0,
    )
    try:
        for i in range(3):
            b.append(record(i))
        b.checkpoint(force=True)  # signed at size 3, save held back
        a.append(record(3))
        with pytest.raises(SigningKeyMismatchError, match="same signing key"):
            a.checkpoint(force=True)  # checked (none yet), signed size 4, B saves, A refuses
        stored = open_storage(db_location)
        try:
            latest = stored.latest_checkpoint()
            assert latest is not None
            assert latest[0] == 3
            open_note(latest[1], other.verifier)
        finally:
            stored.close()
        assert parse_checkpoint(open_note(b.checkpoint(force=True), other.verifier)).size == 4
    finally:
        a.close()
        b.close()


def test_rotation_names_the_previous_key(tmp_path: Path) -> None:
    old, new = generate_note_key(ORIGIN), generate_note_key(ORIGIN)
    path = tmp_path / "audit.db"
    log = AuditLog(SQLiteStorage(path), old)
    log.append(record(1))
    log.checkpoint(force=True)
    log.close()

    with pytest.raises(SigningKeyMismatchError):
        AuditLog(SQLiteStorage(path), new)  # swapping the file alone is refused
    with pytest.raises(SigningKeyMismatchError):  # a previous key that did not sign it
        AuditLog(SQLiteStorage(path), new, previous_key=generate_note_key(ORIGIN).verifier)
    rotated = AuditLog(SQLiteStorage(path), new, previous_key=old.verifier)
    rotated.append(record(2))
    note = rotated.checkpoint(force=True)
    # Entry 1 is the rotation's own record (the new key signed it at start), entry 2 ours.
    assert parse_checkpoint(open_note(note, new.verifier)).size == 3
    rotated.close()

    # From now on the new key alone: the old one, and the rotation option, are refused.
    with pytest.raises(SigningKeyMismatchError):
        AuditLog(SQLiteStorage(path), old)
    with pytest.raises(SigningKeyMismatchError):
        AuditLog(SQLiteStorage(path), old, previous_key=old.verifier)
    AuditLog(SQLiteStorage(path), new).close()


def test_a_forged_signature_by_our_key_is_tampering_not_a_key_mismatch(tmp_path: Path) -> None:
    """A stored note that claims our key id but does not verify stays an IntegrityError."""
    signer = generate_note_key(ORIGIN)
    path = tmp_path / "audit.db"
    log = AuditLog(SQLiteStorage(path), signer)
    log.append(record(1))
    log.append(record(2))
    note = log.checkpoint(force=True)
    log.close()
    forged = note.replace(f"{ORIGIN}\n2\n", f"{ORIGIN}\n3\n", 1)  # our signature, other text
    assert forged != note
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO audit_checkpoints VALUES (?, ?)", (3, forged))
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(IntegrityError, match="does not verify") as info:
        AuditLog(SQLiteStorage(path), signer)
    assert not isinstance(info.value, SigningKeyMismatchError)


def test_rotation_from_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedvault audit checkpoint`: a new key is refused (exit 5, told how to rotate),
    accepted once with --previous-key, then alone; a malformed key line is exit 2."""
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    db = str(tmp_path / "audit.db")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedvault", "audit", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    old_line = cli("keygen", "--name", ORIGIN, "--out", str(old)).stdout.strip()
    assert cli("keygen", "--name", ORIGIN, "--out", str(new)).returncode == 0
    log = AuditLog(SQLiteStorage(Path(db)), load_note_signer(old))
    log.append(record(1))
    log.close()
    assert cli("checkpoint", "--db", db, "--key", str(old)).returncode == 0

    refused = cli("checkpoint", "--db", db, "--key", str(new))
    assert refused.returncode == 5, refused.stderr
    assert "--previous-key" in refused.stderr
    assert "FEDVAULT_AUDIT_PREVIOUS_KEY" in refused.stderr
    assert f"--key {new}" in refused.stderr  # where this process's key came from
    for secret in _key_material(load_note_signer(new), public=False):
        assert secret not in refused.stdout + refused.stderr
    bad = cli("checkpoint", "--db", db, "--key", str(new), "--previous-key", "not+a+key")
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr

    rotated = cli("checkpoint", "--db", db, "--key", str(new), "--previous-key", old_line)
    assert rotated.returncode == 0, rotated.stderr
    # The rotation is itself an entry, and the new key signed the tree that holds it.
    assert parse_checkpoint(open_note(rotated.stdout, load_note_signer(new).verifier)).size == 2
    storage = SQLiteStorage(Path(db))
    ((_, entry),) = storage.entries(1, 2)
    storage.close()
    rotation = decode_entry(entry)
    assert rotation.action == "audit.signing-key-rotated"
    old_id = old_line.split("+")[1]
    new_id = load_note_signer(new).verifier.line.split("+")[1]
    assert rotation.resource == f"signing-key:{ORIGIN}+{old_id} -> {ORIGIN}+{new_id}"
    assert cli("checkpoint", "--db", db, "--key", str(new)).returncode == 0  # new key alone now
    assert cli("checkpoint", "--db", db, "--key", str(old)).returncode == 5


def test_the_previous_key_setting_must_be_a_verifier_key_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedvault.errors import ConfigError
    from fedvault.settings import load_settings

    line = generate_note_key(ORIGIN).verifier.line
    monkeypatch.setenv("FEDVAULT_AUDIT_PREVIOUS_KEY", line)
    assert load_settings().audit_previous_key == line
    monkeypatch.setenv("FEDVAULT_AUDIT_PREVIOUS_KEY", line[:-4] + "AAAA")
    with pytest.raises(ConfigError, match="audit_previous_key"):
        load_settings()
