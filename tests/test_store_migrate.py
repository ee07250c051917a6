"""``fedvault store migrate``: a demo HOME's SQLite stores moved into a real PostgreSQL.

The source HOME is made by the real code: a federation store with two runs,
their rounds, ledger rows and checkpoints, a model registered through
``ModelRegistry`` (a sealed artifact file in ``HOME/registry``), node ledgers
agreeing with the federation's, API keys (one revoked) and a default version
in the gateway store, and an audit log with a signed checkpoint plus entries
beyond it. The migration runs through the CLI (``python -m fedvault store
migrate``) with the settings a PostgreSQL deployment uses (URLs without
password plus password files). Afterwards: the ledgers are equal and still
agree with the nodes', the model loads from the database with no registry
directory, a key made before the migration authorises inference on a gateway
configured with only the URL, the audit log verifies end to end with the
original verifier key and against the checkpoint an auditor verified before,
and it, the ledger and the key store all take new writes. Refusals — a
non-empty destination, a tampered or missing artifact, a damaged audit log,
the wrong audit key — write nothing, and ``--dry-run`` writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from clients.ledger import NodeLedger
from fedvault.privacy import PrivacyCharge
from secure.signed_note import NoteSigner, generate_note_key, save_note_signer
from server.audit.log import AuditLog
from server.audit.storage import open_storage
from server.gateway.keys import GatewayStore
from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
from server.store import FederationStore, LedgerRow
from tests.audit_support import fetch_value, fresh_database, record, run_sql, serve_log
from tests.gateway_support import LINEAGE, database_replica
from tests.he_support import trained

MODEL = "bc-migrated"
DATASET = "breast-cancer"
SECRET = "pw-never-printed-7f3a"  # noqa: S105 - the password file (the test server trusts all)
INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [0] * 30}]}
FEDERATION_TABLES = ("runs", "rounds", "ledger", "checkpoints", "models")
AUDIT_TABLES = ("audit_entries", "audit_nodes", "audit_checkpoints")
GATEWAY_TABLES = ("api_keys", "key_revocations", "model_defaults")


def _charge(run_id: str, round_: int, eps: float) -> PrivacyCharge:
    return PrivacyCharge(run_id, round_, "dp-sgd", 1.1, 0.1, 10, 1.0, 1e-5, "rdp", "1.6", eps)


@dataclass
class Source:
    """What the pristine HOME holds, beside the files themselves."""

    home: Path
    model_id: str
    token: str  # an analyst key for MODEL
    revoked_token: str
    signer: NoteSigner


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """A HOME as the demo and a local gateway leave it, every store in SQLite."""
    home = tmp_path_factory.mktemp("pristine") / "home"
    keys = home / "keys"
    ensure_model_keys(keys)
    with FederationStore(home / "federation.db") as store:
        for run_id, rounds in (("run-a", 3), ("run-b", 1)):
            store.create_run(run_id, {"rounds": rounds}, {"name": DATASET})
            for round_ in range(1, rounds + 1):
                charges = [
                    LedgerRow(partner, _charge(run_id, round_, eps * round_))
                    for partner, eps in (("alpha", 0.5), ("beta", 0.75))
                ]
                store.commit_round(run_id, round_, charges, {"round": round_}, b"state-%d" % round_)
                for row in charges:  # each node's own ledger, as its ClientApp records it
                    with NodeLedger(home / "nodes" / row.partner / "ledger.db") as node:
                        node.record(
                            DATASET,
                            [row.charge],
                            run_id=run_id,
                            round_=round_,
                            digest=f"{run_id}-{round_}",
                            reply=b"reply",
                        )
        store.set_status("run-a", "finished")
        registry = ModelRegistry(store, home / "registry", load_model_keys(keys))
        spec, params, scaler = trained(DATASET, "logreg")
        model_id = registry.register(
            name=MODEL, run_id="run-a", spec=spec, params=params, scaler=scaler, lineage=LINEAGE
        )
    assert (home / "registry" / f"{model_id}.fvar").is_file()
    gateway = GatewayStore(home / "gateway.db")
    try:
        token, _ = gateway.create_key("analyst", models=frozenset({MODEL}))
        revoked_token, revoked = gateway.create_key("analyst", models=frozenset({MODEL}))
        gateway.revoke(revoked.key_id)
        gateway.set_default_version(MODEL, "1", actor="admin")
    finally:
        gateway.close()
    signer = generate_note_key("fedvault/gateway-audit")
    save_note_signer(keys / "gateway-audit.key", signer)
    log = AuditLog(open_storage(home / "audit.db"), signer)
    try:
        for i in range(40):
            log.append(record(i))
        log.checkpoint(force=True)
        for i in range(40, 43):  # beyond the signed checkpoint: copied all the same
            log.append(record(i))
    finally:
        log.close()
    return Source(home, model_id, token, revoked_token, signer)


def _copy_home(source: Source, tmp: Path) -> Path:
    home = tmp / "home"
    shutil.copytree(source.home, home)
    return home


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _env(tmp: Path, urls: dict[str, str | None]) -> dict[str, str]:
    """The settings of a PostgreSQL deployment: a URL without password plus a password file."""
    password = tmp / "db-password"
    password.write_text(SECRET + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    for store, url in urls.items():
        if url is not None:
            env[f"FEDVAULT_{store.upper()}_STORE"] = _plain(url)
            env[f"FEDVAULT_{store.upper()}_STORE_PASSWORD_FILE"] = str(password)
    return env


def _cli(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "fedvault", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert SECRET not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done


def _migrate(env: dict[str, str], home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli(env, "store", "migrate", "--home", home, *extra)


def _tables(url: str) -> int:
    value = fetch_value(
        url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
    )
    assert isinstance(value, int)
    return value


def _count(location: str | Path, table: str) -> int:
    value = fetch_value(location, f"SELECT count(*) FROM {table}")  # noqa: S608 - our names
    assert isinstance(value, int)
    return value


def _by_store(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return {s["store"]: s for s in json.loads(done.stdout)["stores"]}


def _source_counts(home: Path) -> dict[str, dict[str, int]]:
    return {
        "federation": {t: _count(home / "federation.db", t) for t in FEDERATION_TABLES},
        "gateway": {t: _count(home / "gateway.db", t) for t in GATEWAY_TABLES},
        "audit": {t: _count(home / "audit.db", t) for t in AUDIT_TABLES},
    }


# ----------------------------------------------------------------- the happy path
@dataclass
class Migrated:
    source: Source
    home: Path  # the migrated copy of the pristine HOME
    url: str  # one PostgreSQL database holding all three stores, as in compose
    env: dict[str, str]
    counts: dict[str, dict[str, int]]  # the source's rows per store and table
    copied: dict[str, int]  # the destination's rows per table, right after the migration
    reports: dict[str, dict[str, Any]]
    state: Path  # the auditor's verifier state, last written before the migration
    tmp: Path
    outputs: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def migrated(pristine: Source, pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Migrated:
    tmp = tmp_path_factory.mktemp("migrated")
    home = _copy_home(pristine, tmp)
    url = fresh_database(pg_admin, "migrate_main")
    env = _env(tmp, {"federation": url, "gateway": url, "audit": url})
    # An auditor verifies the SQLite log before the move (and keeps its checkpoint).
    state = tmp / "auditor-state"
    log = AuditLog(open_storage(home / "audit.db"), pristine.signer)
    try:
        with serve_log(log) as base:
            done = _cli(
                env,
                "audit",
                "verify",
                "--url",
                base,
                "--key",
                _key_line(pristine),
                "--state",
                state,
            )
        assert done.returncode == 0, done.stderr
        log.append(record(99))  # and one more entry lands after that checkpoint
    finally:
        log.close()
    counts = _source_counts(home)
    done = _migrate(env, home, "--json")
    reports = _by_store(done)
    copied = {t: _count(url, t) for t in FEDERATION_TABLES + GATEWAY_TABLES + AUDIT_TABLES}
    return Migrated(pristine, home, url, env, counts, copied, reports, state, tmp, [done.stdout])


def _key_line(source: Source) -> str:
    return source.signer.verifier.line


def test_every_store_is_migrated_with_every_row(migrated: Migrated) -> None:
    for store, counts in migrated.counts.items():
        report = migrated.reports[store]
        assert report["status"] == "migrated", report
        assert report["destination"].startswith("postgresql://127.0.0.1:")
        assert report["rows"] == counts
        for table, rows in counts.items():
            assert migrated.copied[table] == rows, table
    assert migrated.counts["federation"]["ledger"] == 8
    assert migrated.counts["audit"]["audit_entries"] == 44
    assert migrated.counts["audit"]["audit_checkpoints"] == 2


def test_the_ledger_is_equal_and_still_agrees_with_the_nodes(migrated: Migrated) -> None:
    with (
        FederationStore(migrated.home / "federation.db") as before,
        FederationStore(_plain(migrated.url)) as after,
    ):
        assert after.ledger() == before.ledger()
        assert [r.run_id for r in after.runs()] == [r.run_id for r in before.runs()]
        assert after.run("run-a") == before.run("run-a")
        assert after.rounds("run-a") == before.rounds("run-a")
        assert after.checkpoint("run-a") == before.checkpoint("run-a")
    for run_id in ("run-a", "run-b"):
        done = _cli(migrated.env, "ledger", "show", run_id, "--home", migrated.home, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        assert report["agree"] is True
        assert len(report["rows"]) == (6 if run_id == "run-a" else 2)
    seqs = fetch_value(
        migrated.url,
        "SELECT string_agg(seq::text, ',' ORDER BY seq) FROM ledger "
        "WHERE run_id IN ('run-a', 'run-b')",
    )
    assert seqs == ",".join(str(i) for i in range(1, 9))  # the SQLite seq values, kept


def test_the_ledger_takes_new_rows_after_the_migration(migrated: Migrated) -> None:
    """The identity sequence was moved past the copied ``seq`` values."""
    with FederationStore(_plain(migrated.url)) as store:
        store.create_run("run-after", {"rounds": 1}, {"name": DATASET})
        store.commit_round(
            "run-after", 1, [LedgerRow("alpha", _charge("run-after", 1, 0.3))], None, b"s"
        )
        assert [r.charge.run_id for r in store.ledger()][-1] == "run-after"
    top = fetch_value(migrated.url, "SELECT max(seq) FROM ledger WHERE run_id = 'run-after'")
    assert top == 9


def test_the_model_loads_from_the_database_alone(migrated: Migrated) -> None:
    keys = load_model_keys(migrated.home / "keys", signing=False)
    model_id = migrated.source.model_id
    with FederationStore(_plain(migrated.url)) as store:
        blob = store.model_artifact(model_id)
        assert blob == (migrated.home / "registry" / f"{model_id}.fvar").read_bytes()
        loaded = ModelRegistry(store, None, keys).load(model_id)
    with FederationStore(migrated.home / "federation.db") as store:
        original = ModelRegistry(store, migrated.home / "registry", keys).load(model_id)
    assert loaded.lineage == original.lineage
    for a, b in zip(loaded.params, original.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_gateway_on_the_migrated_stores_serves_with_old_keys(migrated: Migrated) -> None:
    """Only the URL and the model keys (no registry directory); keys made before the move."""
    infer = f"/v2/models/{MODEL}/infer"
    with ExitStack() as stack:
        log = AuditLog(open_storage(_plain(migrated.url)), migrated.source.signer)
        stack.callback(log.close)
        gw, base = database_replica(
            _plain(migrated.url), migrated.home / "keys", migrated.tmp, log, stack
        )
        assert gw.store.default_version(MODEL) == "1"
        client = stack.enter_context(httpx.Client(base_url=base, timeout=30))
        token, revoked = migrated.source.token, migrated.source.revoked_token
        answer = client.post(infer, json=INFER, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        refused = client.post(infer, json=INFER, headers={"Authorization": f"Bearer {revoked}"})
        assert refused.status_code == 401
        # the key store takes new keys: its revocation counter came along (generation 1)
        new_token, _ = gw.store.create_key("analyst", models=frozenset({MODEL}))
        assert gw.store.revocation_generation() == 1
        answer = client.post(infer, json=INFER, headers={"Authorization": f"Bearer {new_token}"})
        assert answer.status_code == 200
    assert not (migrated.tmp / "no-such-registry").exists()


def test_the_audit_log_verifies_with_the_original_key_and_grows(migrated: Migrated) -> None:
    """The auditor's state from before the move: the PostgreSQL log extends that history."""
    key = _key_line(migrated.source)
    log = AuditLog(open_storage(_plain(migrated.url)), migrated.source.signer)
    try:
        assert log.verify_store() == log.size()
        with serve_log(log) as base:
            args = ("audit", "verify", "--url", base, "--key", key, "--state", migrated.state)
            done = _cli(migrated.env, *args)
            assert done.returncode == 0, done.stderr
            assert "consistent with the checkpoint of size 43 seen before" in done.stdout
            log.append(record(100))
            log.checkpoint(force=True)
            done = _cli(migrated.env, *args)
            assert done.returncode == 0, done.stderr
            size = log.size()
            assert f"verified {size} entries" in done.stdout
    finally:
        log.close()
    # a stranger's key does not open it
    other = generate_note_key("fedvault/gateway-audit").verifier.line
    log = AuditLog(open_storage(_plain(migrated.url)), migrated.source.signer)
    try:
        with serve_log(log) as base:
            stranger = ("--state", migrated.tmp / "stranger")
            done = _cli(migrated.env, "audit", "verify", "--url", base, "--key", other, *stranger)
    finally:
        log.close()
    assert done.returncode == 6


def test_a_second_run_is_refused_and_writes_nothing(migrated: Migrated) -> None:
    before = {t: _count(migrated.url, t) for t in FEDERATION_TABLES + GATEWAY_TABLES}
    done = _migrate(migrated.env, migrated.home)
    assert done.returncode == 8, done.stderr
    assert "federation store" in done.stderr
    assert "already holds data" in done.stderr
    assert {t: _count(migrated.url, t) for t in before} == before


def test_the_human_summary_and_no_secret(migrated: Migrated, pg_admin: str) -> None:
    """The rich table, on a store of its own; nothing of the password or the keys printed."""
    url = fresh_database(pg_admin, "migrate_table")
    env = _env(migrated.tmp, {"gateway": url})
    done = _migrate(env, _copy_home(migrated.source, migrated.tmp / "table"))
    assert done.returncode == 0, done.stderr
    assert "api_keys" in done.stdout
    assert "migrated" in done.stdout
    assert "federation: skipped (FEDVAULT_FEDERATION_STORE is not set)" in done.stdout
    printed = done.stdout + done.stderr + "".join(migrated.outputs)
    assert migrated.source.signer.private_text() not in printed
    assert migrated.source.token not in printed


# ---------------------------------------------------------------------- refusals
def _expect_nothing_written(urls: list[str]) -> None:
    for url in urls:
        assert _tables(url) == 0


def test_dry_run_reports_counts_and_writes_nothing(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    fed, audit = fresh_database(pg_admin, "dry_fed"), fresh_database(pg_admin, "dry_audit")
    env = _env(tmp_path, {"federation": fed, "audit": audit})  # gateway: unset
    home = _copy_home(pristine, tmp_path)
    reports = _by_store(_migrate(env, home, "--dry-run", "--json"))
    counts = _source_counts(home)
    assert reports["federation"]["status"] == "would migrate"
    assert reports["federation"]["rows"] == counts["federation"]
    assert reports["audit"]["rows"] == counts["audit"]
    assert reports["gateway"]["status"] == "skipped"
    assert reports["gateway"]["reason"] == "FEDVAULT_GATEWAY_STORE is not set"
    _expect_nothing_written([fed, audit])
    done = _migrate(env, home, "--dry-run")
    assert done.returncode == 0
    assert "dry run: nothing was written" in done.stdout
    _expect_nothing_written([fed, audit])


def test_a_destination_holding_data_is_refused_and_nothing_written(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    fed, gw, audit = (fresh_database(pg_admin, f"busy_{s}") for s in ("fed", "gw", "audit"))
    keys = GatewayStore(_plain(gw))
    try:
        keys.create_key("admin")
    finally:
        keys.close()
    env = _env(tmp_path, {"federation": fed, "gateway": gw, "audit": audit})
    done = _migrate(env, _copy_home(pristine, tmp_path))
    assert done.returncode == 8
    assert "gateway store" in done.stderr
    assert "api_keys: 1 row(s)" in done.stderr
    assert "nothing was written" in done.stderr
    _expect_nothing_written([fed, audit])  # checked before any store was written
    assert _count(gw, "api_keys") == 1


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_a_tampered_or_missing_artifact_is_refused(
    pristine: Source, pg_admin: str, tmp_path: Path, damage: str
) -> None:
    fed, audit = fresh_database(pg_admin, "art_fed"), fresh_database(pg_admin, "art_audit")
    home = _copy_home(pristine, tmp_path)
    artifact = home / "registry" / f"{pristine.model_id}.fvar"
    if damage == "missing":
        artifact.unlink()
    else:
        blob = bytearray(artifact.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        artifact.write_bytes(bytes(blob))
    env = _env(tmp_path, {"federation": fed, "audit": audit})
    for extra in ((), ("--dry-run",)):
        done = _migrate(env, home, *extra)
        assert done.returncode == 6, done.stderr
        assert f"model {pristine.model_id}" in done.stderr
        assert ("missing" if damage == "missing" else "does not match the SHA-256") in done.stderr
    _expect_nothing_written([fed, audit])


@pytest.mark.parametrize(
    ("table", "edit", "says"),
    [
        # an entry past the signed checkpoint, rewritten: its leaf no longer matches
        ("audit_entries", "SET entry = CAST('{}' AS BLOB) WHERE idx = 41", "entry 41"),
        # the stored subtree over entries 0-31: the tree no longer matches the signed root
        ("audit_nodes", "SET hash = zeroblob(32) WHERE level = 5 AND idx = 0", "signed checkpoint"),
    ],
)
def test_a_damaged_audit_log_is_refused(
    pristine: Source, pg_admin: str, tmp_path: Path, table: str, edit: str, says: str
) -> None:
    audit = fresh_database(pg_admin, "damaged_audit")
    home = _copy_home(pristine, tmp_path)
    db = home / "audit.db"
    run_sql(db, f"DROP TRIGGER {table}_no_update")  # what an operator could do
    run_sql(db, f"UPDATE {table} {edit}")
    env = _env(tmp_path, {"audit": audit})
    done = _migrate(env, home)
    assert done.returncode == 6, done.stderr
    assert "audit store" in done.stderr
    assert "is damaged" in done.stderr
    assert says in done.stderr
    _expect_nothing_written([audit])
    # The source is only read: no schema script ran on it, so the trigger stays dropped.
    trigger = "SELECT count(*) FROM sqlite_master WHERE name = %s"
    assert fetch_value(db, trigger, (f"{table}_no_update",)) == 0


def test_the_audit_log_needs_the_key_that_signed_it(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    audit = fresh_database(pg_admin, "wrong_key_audit")
    home = _copy_home(pristine, tmp_path)
    env = _env(tmp_path, {"audit": audit})
    other = tmp_path / "other.key"
    save_note_signer(other, generate_note_key("fedvault/gateway-audit"))
    done = _migrate(env, home, "--audit-key", other)
    assert done.returncode == 5, done.stderr
    assert "audit store" in done.stderr
    assert f"--audit-key {other}" in done.stderr
    (home / "keys" / "gateway-audit.key").unlink()
    done = _migrate(env, home)
    assert done.returncode == 2, done.stderr
    assert "--audit-key" in done.stderr
    _expect_nothing_written([audit])


def test_a_sqlite_destination_or_no_destination_is_a_config_error(
    pristine: Source, tmp_path: Path
) -> None:
    home = _copy_home(pristine, tmp_path)
    env = _env(tmp_path, {})
    done = _migrate(env, home)
    assert done.returncode == 2
    assert "nothing to migrate" in done.stderr
    env["FEDVAULT_GATEWAY_STORE"] = str(tmp_path / "elsewhere.db")
    done = _migrate(env, home)
    assert done.returncode == 2
    assert "FEDVAULT_GATEWAY_STORE is not a postgresql:// URL" in done.stderr
    assert not (tmp_path / "elsewhere.db").exists()


def test_the_command_is_listed() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    done = _cli(env, "store", "--help")
    assert done.returncode == 0
    assert "migrate" in done.stdout


# Values PostgreSQL would refuse at insert time, and sources this release cannot
# copy whole: found by the plan (so by --dry-run too) before any store is written.
# With all three destinations set, the federation store (copied first) must not be
# committed when the gateway store holds the bad row.
@pytest.mark.parametrize(
    ("db", "edit", "code", "says"),
    [
        # PostgreSQL text cannot hold NUL
        (
            "federation",
            "UPDATE runs SET message = 'a' || char(0) || 'b' WHERE run_id = 'run-b'",
            6,
            "source row runs (run_id='run-b'): runs.message holds a NUL character",
        ),
        (
            "gateway",
            "UPDATE api_keys SET description = 'a' || char(0) || 'b'",
            6,
            "api_keys.description holds a NUL character",
        ),
        # an old SQLite TEXT PRIMARY KEY takes NULL
        (
            "gateway",
            "UPDATE model_defaults SET name = NULL",
            6,
            "source row model_defaults (name=None): model_defaults.name is NULL",
        ),
        # SQLite keeps text in a BLOB column; the copy refuses to convert it
        (
            "federation",
            "UPDATE checkpoints SET state = 'text' WHERE run_id = 'run-a'",
            6,
            "checkpoints.state holds a str",
        ),
        # a training checkpoint altered: it could not resume from PostgreSQL either
        (
            "federation",
            "UPDATE checkpoints SET state = x'00' WHERE run_id = 'run-a'",
            6,
            "training checkpoint of run 'run-a'",
        ),
        # a foreign key pointing nowhere (SQLite enforces them only when asked)
        (
            "federation",
            "INSERT INTO rounds VALUES ('ghost', 1, '{}', 'now')",
            6,
            "rounds.run_id refers to a runs row that does not exist",
        ),
        # text that is not UTF-8: named without showing it
        (
            "gateway",
            "UPDATE api_keys SET partner = CAST(x'ff00ff' AS TEXT)",
            6,
            "api_keys.partner holds <text that is not UTF-8>",
        ),
        # a table this release does not declare would not be copied
        (
            "gateway",
            "CREATE TABLE notes (body TEXT)",
            2,
            "tables this fedvault does not know (notes)",
        ),
    ],
)
def test_a_row_postgresql_would_refuse_is_found_before_anything_is_written(
    pristine: Source, pg_admin: str, tmp_path: Path, db: str, edit: str, code: int, says: str
) -> None:
    fed, gw, audit = (fresh_database(pg_admin, f"refuse_{s}") for s in ("fed", "gw", "audit"))
    home = _copy_home(pristine, tmp_path)
    run_sql(home / f"{db}.db", edit)
    env = _env(tmp_path, {"federation": fed, "gateway": gw, "audit": audit})
    for extra in (("--dry-run",), ()):
        done = _migrate(env, home, *extra)
        assert done.returncode == code, done.stderr
        assert f"{db} store" in done.stderr
        assert says in done.stderr
        assert "\\x00" not in done.stderr  # never the value
        assert "\\xff" not in done.stderr
        if code == 6:
            assert "nothing was written" in done.stderr
    _expect_nothing_written([fed, gw, audit])


# A coordinator still running: it writes a new run while the migration is under way.
_LATE_WRITER = """
import sys
from server.store import FederationStore
with FederationStore(sys.argv[1]) as store:
    store.create_run("run-late", {"rounds": 1}, {"name": "breast-cancer"})
"""


def test_a_writer_still_running_waits_for_the_migration_and_loses_nothing(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    """The source is write-locked from the plan to the end: a late write waits, then lands
    in the SQLite file only, never half in the copy.

    Deterministic: the test holds a PostgreSQL lock on the destination's ``runs`` table,
    so the migration stops in its plan (counting the destination's rows) — after it took
    the source's lock — for as long as the test wants; the writer starts only then.
    """
    import psycopg

    fed = fresh_database(pg_admin, "held_fed")
    FederationStore(_plain(fed)).close()  # empty tables are an empty destination
    home = _copy_home(pristine, tmp_path)
    source = home / "federation.db"
    runs = _count(source, "runs")
    env = _env(tmp_path, {"federation": fed})
    blocker = psycopg.connect(_plain(fed))
    blocker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
    command = [sys.executable, "-m", "fedvault", "store", "migrate", "--home", str(home), "--json"]
    migration = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    writer: subprocess.Popen[str] | None = None
    try:
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        deadline = time.monotonic() + 120
        while fetch_value(fed, waiting) == 0:  # the migration reached the destination
            assert migration.poll() is None, migration.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        writer = subprocess.Popen(
            [sys.executable, "-c", _LATE_WRITER, str(source)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with pytest.raises(subprocess.TimeoutExpired):  # the source is locked: it waits
            writer.wait(timeout=3)
    finally:
        blocker.rollback()
        blocker.close()
        out, err = migration.communicate(timeout=120)
        problem = "" if writer is None else writer.communicate(timeout=60)[1]
    assert migration.returncode == 0, err
    assert writer.returncode == 0, problem  # it waited (well within its busy timeout)
    report = {s["store"]: s for s in json.loads(out)["stores"]}["federation"]
    assert report["status"] == "migrated"
    assert report["rows"]["runs"] == runs  # what the plan counted is what was copied
    assert _count(fed, "runs") == runs
    assert fetch_value(fed, "SELECT count(*) FROM runs WHERE run_id = 'run-late'") == 0
    assert _count(source, "runs") == runs + 1  # the late run: in the old file, after the copy


# ------------------------------------------------------------------ in process
def _federation_tables() -> dict[str, sa.Table]:
    from server import store

    return {t.name: t for t in store.tables()}


def test_large_rows_move_a_few_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are bounded in bytes as well as rows: training checkpoints of 1 MiB each
    go one per batch under a 1 MiB budget, and are fetched back one at a time."""
    from server import migrate

    path = tmp_path / "federation.db"
    state = os.urandom(2**20)
    with FederationStore(path) as store:
        for i in range(3):
            store.create_run(f"run-{i}", {"rounds": 1}, {"name": DATASET})
            store.commit_round(f"run-{i}", 1, [], None, state)
    monkeypatch.setattr(migrate, "BATCH_BYTES", 2**20, raising=False)
    checkpoints = _federation_tables()["checkpoints"]
    with migrate._held(path) as source:
        batches = list(migrate._source_rows(source, checkpoints, list(checkpoints.c), tmp_path))
    assert [len(batch) for batch in batches] == [1, 1, 1]
    assert migrate._fetch_size(len(state) + 100) == 1
    assert migrate._fetch_size(100) == migrate.BATCH


def test_the_digest_hashes_a_blob_where_it_lies() -> None:
    """No text copy of a row (a repr is about 4x a blob's size): memory stays flat."""
    import tracemalloc

    from server import migrate

    blob = bytes(8 * 2**20)
    digest = migrate._Digest(_federation_tables()["checkpoints"])
    tracemalloc.start()
    try:
        digest.add({"run_id": "run-a", "round": 1, "state": blob, "sha256": "0" * 64})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(blob) // 8
    other = migrate._Digest(_federation_tables()["checkpoints"])
    other.add({"run_id": "run-a", "round": 1, "state": blob + b"\0", "sha256": "0" * 64})
    assert other.value != digest.value


def test_an_unknown_column_type_is_refused_not_copied_as_text() -> None:
    from fedvault.errors import FedvaultError
    from server import migrate

    table = sa.Table(
        "flags",
        sa.MetaData(),
        sa.Column("k", sa.Text, primary_key=True),
        sa.Column("on", sa.Boolean),
    )
    with pytest.raises(FedvaultError, match=r"flags\.on is a Boolean"):
        migrate._Digest(table)


# ---------------------------------------------------------- HOME, skips, sequences
def test_a_home_without_any_store_is_not_found(pg_admin: str, tmp_path: Path) -> None:
    """A wrong --home migrates nothing: an error, not every store 'skipped'."""
    url = fresh_database(pg_admin, "no_home")
    env = _env(tmp_path, {"federation": url, "gateway": url, "audit": url})
    wrong = tmp_path / "not-the-home"
    done = _migrate(env, wrong, "--json")
    assert done.returncode == 7, done.stderr
    assert f"nothing to migrate in HOME {wrong}" in done.stderr
    for name in ("federation.db", "gateway.db", "audit.db"):
        assert str(wrong / name) in done.stderr
    assert json.loads(done.stdout)["error"]["exit_code"] == 7
    _expect_nothing_written([url])


def test_a_missing_store_is_skipped_and_a_log_without_checkpoint_needs_no_key(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    """A demo HOME: no gateway.db (skipped, the others migrate), and a coordinator-only
    audit log that was never checkpointed (copied and rehashed without any key)."""
    fed, gw, audit = (fresh_database(pg_admin, f"partial_{s}") for s in ("fed", "gw", "audit"))
    home = _copy_home(pristine, tmp_path)
    for path in [*home.glob("gateway.db*"), *home.glob("audit.db*")]:
        path.unlink()
    (home / "keys" / "gateway-audit.key").unlink()
    log = AuditLog(open_storage(home / "audit.db"), generate_note_key("fedvault/coordinator"))
    try:
        for i in range(5):
            log.append(record(i))
    finally:
        log.close()
    env = _env(tmp_path, {"federation": fed, "gateway": gw, "audit": audit})
    reports = _by_store(_migrate(env, home, "--json"))
    assert reports["gateway"]["status"] == "skipped"
    assert reports["gateway"]["reason"] == f"no source: {home / 'gateway.db'} does not exist"
    assert reports["federation"]["status"] == "migrated"
    assert reports["audit"]["status"] == "migrated"
    assert reports["audit"]["rows"] == {
        "audit_entries": 5,
        "audit_nodes": _count(home / "audit.db", "audit_nodes"),
        "audit_checkpoints": 0,
    }
    assert "5 audit entries verified; no signed checkpoint yet" in reports["audit"]["notes"]
    assert _count(audit, "audit_entries") == 5
    assert _count(fed, "ledger") == 8
    _expect_nothing_written([gw])


def test_the_ledger_never_reuses_a_seq_sqlite_handed_out(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    """AUTOINCREMENT: SQLite's counter may be past the largest seq (rows gone from the end)."""
    fed = fresh_database(pg_admin, "seq_fed")
    home = _copy_home(pristine, tmp_path)
    run_sql(home / "federation.db", "UPDATE sqlite_sequence SET seq = 20 WHERE name = 'ledger'")
    done = _migrate(_env(tmp_path, {"federation": fed}), home)
    assert done.returncode == 0, done.stderr
    with FederationStore(_plain(fed)) as store:
        store.create_run("run-after", {"rounds": 1}, {"name": DATASET})
        store.commit_round(
            "run-after", 1, [LedgerRow("alpha", _charge("run-after", 1, 0.3))], None, b"s"
        )
    assert fetch_value(fed, "SELECT max(seq) FROM ledger") == 21


def test_a_destination_not_in_utf8_is_refused(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    run_sql(pg_admin, 'DROP DATABASE IF EXISTS "latin1_gw"')
    run_sql(
        pg_admin,
        "CREATE DATABASE latin1_gw ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0",
    )
    url = pg_admin.rsplit("/", 1)[0] + "/latin1_gw"
    done = _migrate(_env(tmp_path, {"gateway": url}), _copy_home(pristine, tmp_path), "--dry-run")
    assert done.returncode == 2, done.stderr
    assert "is a LATIN1 database; fedvault's stores need UTF8" in done.stderr
    _expect_nothing_written([url])


# ------------------------------------------------------------ failing part-way
def _specs(home: Path) -> dict[str, Any]:
    from fedvault.settings import load_settings
    from server.migrate import store_specs

    return {spec.name: spec for spec in store_specs(load_settings(home=home))}


def test_a_failure_part_way_reports_what_was_committed_and_how_to_go_on(
    pristine: Source, pg_admin: str, tmp_path: Path
) -> None:
    """The audit destination's role may not create tables: the federation store is
    committed, then the audit store fails (exit 10). --json still reports both; a
    re-run refuses the copied store and says to unset its setting; the DROP statement
    the docs give removes a copied store despite its append-only triggers."""
    fed, audit = fresh_database(pg_admin, "part_fed"), fresh_database(pg_admin, "part_audit")
    run_sql(
        pg_admin,
        "DO $$ BEGIN CREATE ROLE migrate_limited LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    run_sql(audit, "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    limited = audit.replace("://postgres@", "://migrate_limited@")
    home = _copy_home(pristine, tmp_path)
    env = _env(tmp_path, {"federation": fed, "audit": limited})
    done = _migrate(env, home, "--json")
    assert done.returncode == 10, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["error"]["exit_code"] == 10
    assert "audit store" in report["error"]["message"]
    stores = {s["store"]: s for s in report["stores"]}
    assert stores["federation"]["status"] == "migrated"
    assert stores["federation"]["rows"]["ledger"] == 8
    assert stores["gateway"]["status"] == "skipped"
    assert stores["audit"]["status"] == "failed"
    assert stores["audit"]["error"] == report["error"]["message"]
    assert _count(fed, "ledger") == 8
    _expect_nothing_written([audit])

    # The human form says the same on stderr (after the copied store is removed).
    from server.migrate import drop_statement

    run_sql(fed, drop_statement(_specs(home)["federation"]))
    _expect_nothing_written([fed])
    done = _migrate(env, home)
    assert done.returncode == 10, done.stderr
    assert "committed before this failure: federation (FEDVAULT_FEDERATION_STORE)" in done.stderr

    # Fixed, run again: the copied store is refused with the way to skip it ...
    run_sql(audit, "GRANT CREATE ON SCHEMA public TO migrate_limited")
    done = _migrate(env, home)
    assert done.returncode == 8, done.stderr
    assert "unset FEDVAULT_FEDERATION_STORE for this run to skip it" in done.stderr
    # ... and without it the rest goes through.
    reports = _by_store(_migrate(_env(tmp_path, {"audit": limited}), home, "--json"))
    assert reports["audit"]["status"] == "migrated"
    assert _count(audit, "audit_entries") == _count(home / "audit.db", "audit_entries")


def test_a_copied_log_that_does_not_verify_names_the_drop_statement(
    pristine: Source, pg_admin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the commit the copy is rehashed; damaged in between (a stand-in for a
    misbehaving database), it is reported committed-but-failed with the exact statement
    that removes it — DELETE and TRUNCATE are refused by the append-only triggers."""
    from fedvault.errors import IntegrityError
    from fedvault.settings import load_settings
    from server import migrate

    for name in [k for k in os.environ if k.startswith("FEDVAULT_")]:
        monkeypatch.delenv(name)
    audit = fresh_database(pg_admin, "post_audit")
    home = _copy_home(pristine, tmp_path)
    password = tmp_path / "db-password"
    password.write_text(SECRET)
    settings = load_settings(
        home=home, audit_store=_plain(audit), audit_store_password_file=password
    )
    checked = migrate._check_copied_log

    def damaged_after_commit(spec: Any, key: Any) -> str:
        run_sql(audit, "ALTER TABLE audit_entries DISABLE TRIGGER USER")
        run_sql(audit, "UPDATE audit_entries SET entry = '\\x7b7d'::bytea WHERE idx = 41")
        return checked(spec, key)

    monkeypatch.setattr(migrate, "_check_copied_log", damaged_after_commit)
    reports: list[migrate.StoreReport] = []
    with pytest.raises(IntegrityError) as failed:
        migrate.migrate_home(settings, progress=reports)
    statement = "DROP TABLE audit_checkpoints, audit_nodes, audit_entries;"
    assert statement in str(failed.value)
    assert "was committed" in str(failed.value)
    assert [r.status for r in reports] == ["skipped", "skipped", "failed after commit"]
    run_sql(audit, statement)
    _expect_nothing_written([audit])
