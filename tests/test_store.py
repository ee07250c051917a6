"""server.store.FederationStore: runs, atomic round commits, ledger, checkpoints, models.

Every test runs against both backends (``db_location`` in conftest.py): a
SQLite file and a real PostgreSQL database, with the same expectations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fedvault.errors import CheckpointError, ConflictError, NotFoundError, UnavailableError
from fedvault.privacy import (
    MECHANISM_GAUSSIAN_SUMS,
    non_private_charge,
)
from server.store import FINISHED, RUNNING, FederationStore, LedgerRow
from tests.audit_support import fresh_database, run_sql
from tests.ledger_support import charge as _charge
from tests.store_support import reflected_schema, sqlite_file_details

CONFIG = {"rounds": 3, "dataset": "digits"}
SCHEMA = {"name": "digits", "features": []}


@pytest.fixture
def db_path(db_location: str) -> str:
    return db_location


@pytest.fixture
def store(db_path: str) -> Iterator[FederationStore]:
    s = FederationStore(db_path)
    yield s
    s.close()


def _pg(location: str) -> bool:
    return location.startswith("postgresql")


def _raw_execute(location: str, sql: str) -> None:
    run_sql(location, sql)


def test_runs(store: FederationStore) -> None:
    assert store.runs() == []
    store.create_run("run-1", CONFIG, SCHEMA)
    store.create_run("run-2", {"rounds": 1}, SCHEMA)
    rec = store.run("run-1")
    assert (rec.run_id, rec.status, rec.message, rec.current_round) == ("run-1", RUNNING, "", 0)
    assert (rec.config, rec.schema, rec.model_id, rec.final_metrics) == (CONFIG, SCHEMA, None, None)
    assert rec.created_at.endswith("Z")
    assert sorted(r.run_id for r in store.runs()) == ["run-1", "run-2"]
    store.set_status("run-1", FINISHED, "done")
    store.set_final_metrics("run-1", {"eval_accuracy": 0.9})
    rec = store.run("run-1")
    assert (rec.status, rec.message, rec.final_metrics) == (
        FINISHED,
        "done",
        {"eval_accuracy": 0.9},
    )
    assert store.run("run-2").status == RUNNING


def test_duplicate_run_is_refused(store: FederationStore) -> None:
    store.create_run("run-1", CONFIG, SCHEMA)
    with pytest.raises(ConflictError):
        store.create_run("run-1", {}, SCHEMA)
    assert store.run("run-1").config == CONFIG


def test_unknown_run_and_model(store: FederationStore) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        store.run("nope")
    with pytest.raises(NotFoundError, match="ghost"):
        store.model("ghost")


def test_commit_round_writes_everything(store: FederationStore) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    stats = LedgerRow("p1", _charge("r", 0, mechanism=MECHANISM_GAUSSIAN_SUMS))
    rows = [stats, LedgerRow("p1", _charge("r", 1)), LedgerRow("p2", _charge("r", 1))]
    store.commit_round("r", 1, rows, {"loss": 1.5}, b"state-1")
    assert store.ledger("r") == rows
    assert store.rounds("r") == [(1, {"loss": 1.5})]
    assert store.checkpoint("r") == (1, b"state-1")
    assert store.run("r").current_round == 1

    baseline = LedgerRow("p1", non_private_charge("r", 2, 0.1, 20, 1e-5))
    store.commit_round("r", 2, [baseline], None, b"state-2")
    assert store.ledger("r")[-1] == baseline  # inf epsilon round-trips
    assert store.rounds("r") == [(1, {"loss": 1.5})]  # no metrics given for round 2
    assert store.checkpoint("r") == (2, b"state-2")
    assert store.run("r").current_round == 2


def test_ledger_filters_by_run(store: FederationStore) -> None:
    store.create_run("a", CONFIG, SCHEMA)
    store.create_run("b", CONFIG, SCHEMA)
    store.commit_round("a", 1, [LedgerRow("p", _charge("a", 1))], {}, b"a")
    store.commit_round("b", 1, [LedgerRow("p", _charge("b", 1))], {}, b"b")
    assert [r.charge.run_id for r in store.ledger()] == ["a", "b"]
    assert [r.charge.run_id for r in store.ledger("b")] == ["b"]
    assert store.ledger("c") == []


def test_conflicting_charge_rolls_back_the_whole_round(store: FederationStore) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    first = [LedgerRow("p1", _charge("r", 1, epsilon_after=0.5))]
    store.commit_round("r", 1, first, {"loss": 2.0}, b"state-1")

    new_ok = LedgerRow("p2", _charge("r", 2))
    conflicting = LedgerRow("p1", _charge("r", 1, epsilon_after=0.7))
    with pytest.raises(CheckpointError, match="different charge"):
        store.commit_round("r", 2, [new_ok, conflicting], {"loss": 1.0}, b"state-2")

    assert store.ledger("r") == first
    assert store.rounds("r") == [(1, {"loss": 2.0})]
    assert store.checkpoint("r") == (1, b"state-1")
    assert store.run("r").current_round == 1


def test_identical_replayed_charge_is_accepted(store: FederationStore) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    row1 = LedgerRow("p1", _charge("r", 1))
    store.commit_round("r", 1, [row1], {"loss": 2.0}, b"state-1")
    row2 = LedgerRow("p1", _charge("r", 2, epsilon_after=0.8))
    # After a resume, round 1 is re-committed and a node replays its cached reply.
    store.commit_round("r", 1, [row1], {"loss": 2.0}, b"state-1")
    store.commit_round("r", 2, [row1, row2], {"loss": 1.0}, b"state-2")
    assert store.ledger("r") == [row1, row2]
    assert store.rounds("r") == [(1, {"loss": 2.0}), (2, {"loss": 1.0})]
    assert store.checkpoint("r") == (2, b"state-2")


def test_missing_checkpoint(store: FederationStore) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.checkpoint("r")
    with pytest.raises(CheckpointError):
        store.checkpoint("never-created")


# (SQLite, PostgreSQL) spellings of each tampering.
_TAMPER = {
    # One byte flipped (the CAST keeps the column a BLOB; || alone yields TEXT).
    "flipped": (
        "UPDATE checkpoints SET state = CAST(x'01' || substr(state, 2) AS BLOB)",
        "UPDATE checkpoints SET state = '\\x01'::bytea || substring(state from 2)",
    ),
    "truncated": (
        "UPDATE checkpoints SET state = substr(state, 1, 10)",
        "UPDATE checkpoints SET state = substring(state from 1 for 10)",
    ),
    "digest": ("UPDATE checkpoints SET sha256 = '00' || substr(sha256, 3)",) * 2,
}


@pytest.mark.parametrize("tampering", sorted(_TAMPER))
def test_corrupt_checkpoint_is_refused(
    store: FederationStore, db_path: str, tampering: str
) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    store.commit_round("r", 4, [], {"loss": 1.0}, bytes(range(64)))
    _raw_execute(db_path, _TAMPER[tampering][_pg(db_path)])
    with pytest.raises(CheckpointError, match="corrupt"):
        store.checkpoint("r")


def test_checkpoint_with_text_state_is_reported_corrupt(
    store: FederationStore, db_path: str
) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    store.commit_round("r", 4, [], None, b"state")
    _raw_execute(db_path, "UPDATE checkpoints SET state = 'garbage'")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.checkpoint("r")


def test_checkpoint_survives_reopen(db_path: str) -> None:
    first = FederationStore(db_path)
    try:
        first.create_run("r", CONFIG, SCHEMA)
        first.commit_round("r", 3, [LedgerRow("p", _charge("r", 3))], {"m": 1}, b"blob")
    finally:
        first.close()
    second = FederationStore(db_path)
    try:
        assert second.checkpoint("r") == (3, b"blob")
        assert second.ledger("r") == [LedgerRow("p", _charge("r", 3))]
        assert second.run("r").current_round == 3
    finally:
        second.close()


@pytest.mark.parametrize(
    "statement",
    ["UPDATE ledger SET epsilon_after = 0", "DELETE FROM ledger WHERE true", "TRUNCATE ledger"],
)
def test_ledger_is_append_only(store: FederationStore, db_path: str, statement: str) -> None:
    if statement.startswith("TRUNCATE") and not _pg(db_path):
        pytest.skip("SQLite has no TRUNCATE (DELETE covers it)")
    store.create_run("r", CONFIG, SCHEMA)
    rows = [LedgerRow("p", _charge("r", 1))]
    store.commit_round("r", 1, rows, None, b"s")
    with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
        _raw_execute(db_path, statement)
    assert store.ledger("r") == rows


def _add(store: FederationStore, name: str, run_id: str, model_id: str) -> int:
    version = store.next_model_version(name)
    store.add_model(
        model_id=model_id,
        name=name,
        version=version,
        run_id=run_id,
        artifact=f"{model_id}.fvar",
        artifact_sha256="ab" * 32,
        signing_key_id="0123456789abcdef",
        lineage={"run_id": run_id, "epsilon": {"p": 1.0}},
    )
    return version


def test_models_index(store: FederationStore) -> None:
    store.create_run("r1", CONFIG, SCHEMA)
    store.create_run("r2", CONFIG, SCHEMA)
    assert store.models() == []
    assert store.next_model_version("digits-logreg") == 1
    assert _add(store, "digits-logreg", "r1", "m1") == 1
    assert _add(store, "digits-logreg", "r2", "m2") == 2
    assert _add(store, "digits-mlp", "r2", "m3") == 1
    assert store.next_model_version("digits-logreg") == 3
    assert store.next_model_version("digits-mlp") == 2
    assert sorted(m["model_id"] for m in store.models()) == ["m1", "m2", "m3"]
    m2 = store.model("m2")
    assert (m2["name"], m2["version"], m2["run_id"], m2["artifact"]) == (
        "digits-logreg",
        2,
        "r2",
        "m2.fvar",
    )
    assert m2["lineage"] == {"run_id": "r2", "epsilon": {"p": 1.0}}
    assert store.run("r1").model_id == "m1"
    assert store.run("r2").model_id == "m3"


def test_duplicate_model_version_is_refused(store: FederationStore) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    store.add_model(
        model_id="a",
        name="n",
        version=1,
        run_id="r",
        artifact="a.fvar",
        artifact_sha256="00",
        signing_key_id="k",
        lineage={},
    )
    with pytest.raises(ConflictError):
        store.add_model(
            model_id="b",
            name="n",
            version=1,
            run_id="r",
            artifact="b.fvar",
            artifact_sha256="00",
            signing_key_id="k",
            lineage={},
        )
    assert store.run("r").model_id == "a"
    assert [m["model_id"] for m in store.models()] == ["a"]


def test_two_instances_share_one_database(db_path: str) -> None:
    """Gateway replicas and the coordinator: what one writes, another reads at once."""
    with FederationStore(db_path) as writer, FederationStore(db_path) as reader:
        writer.create_run("r", CONFIG, SCHEMA)
        writer.commit_round("r", 1, [LedgerRow("p", _charge("r", 1))], {"loss": 1.0}, b"s1")
        _add(writer, "digits-logreg", "r", "m1")
        assert reader.run("r").current_round == 1
        assert reader.checkpoint("r") == (1, b"s1")
        assert [m["model_id"] for m in reader.models()] == ["m1"]
        assert reader.next_model_version("digits-logreg") == 2


def test_model_rows_do_not_carry_the_artifact(store: FederationStore) -> None:
    """The index stays JSON-printable (``fedvault models list --json``); blobs load apart."""
    store.create_run("r", CONFIG, SCHEMA)
    _add(store, "n", "r", "file-backed")
    store.add_model(
        model_id="db-backed",
        name="n",
        version=2,
        run_id="r",
        artifact="db-backed.fvar",
        artifact_sha256="00",
        signing_key_id="k",
        lineage={},
        artifact_blob=b"\x00sealed\xff",
    )
    assert all("artifact_blob" not in m for m in store.models())
    assert "artifact_blob" not in store.model("db-backed")
    assert store.model_artifact("db-backed") == b"\x00sealed\xff"
    assert store.model_artifact("file-backed") is None
    with pytest.raises(NotFoundError):
        store.model_artifact("ghost")


def test_a_sqlite_file_from_before_the_blob_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE models (model_id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "version INTEGER NOT NULL, run_id TEXT NOT NULL, created_at TEXT NOT NULL, "
        "artifact TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, signing_key_id TEXT NOT NULL, "
        "lineage TEXT NOT NULL, UNIQUE (name, version));"
        "INSERT INTO models VALUES ('old', 'n', 1, 'r', '2025-01-01T00:00:00.000Z', "
        "'old.fvar', '00', 'k', '{}');"
    )
    conn.close()
    with FederationStore(path) as store:
        assert store.model("old")["artifact"] == "old.fvar"
        assert store.model_artifact("old") is None
        assert store.next_model_version("n") == 2


def test_an_unreachable_postgres_is_unavailable_without_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("correct-horse-battery\n")
    url = "postgresql://fedvault@127.0.0.1:1/fedvault?connect_timeout=2"
    with pytest.raises(UnavailableError) as info:
        FederationStore(url, password_file=secret)
    assert "correct-horse-battery" not in str(info.value)
    assert "federation" in str(info.value)


def test_sqlite_and_postgres_get_the_same_schema(tmp_path: Path, pg_admin: str) -> None:
    """One declaration serves both dialects: a column, key or trigger cannot be on one only."""
    lite, pg = str(tmp_path / "federation.db"), fresh_database(pg_admin, "federation_schema")
    for location in (lite, pg):
        FederationStore(location).close()
    schema = reflected_schema(lite)
    assert sorted(schema["tables"]) == ["checkpoints", "ledger", "models", "rounds", "runs"]
    assert schema["append_only"] == ["ledger"]
    assert reflected_schema(pg) == schema


# What SQLite federation stores were created with while the schema was written
# out twice (raw DDL beside the SQLAlchemy tables), frozen here: such files
# must keep opening, with the schema a new file gets.
LEGACY_SQLITE_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    status TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,
    schema TEXT NOT NULL,
    current_round INTEGER NOT NULL DEFAULT 0,
    model_id TEXT,
    final_metrics TEXT
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, round)
);
CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partner TEXT NOT NULL,
    run_id TEXT NOT NULL, round INTEGER NOT NULL, mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
    accountant_version TEXT NOT NULL, epsilon_after REAL NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, partner, round, mechanism)
);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TABLE checkpoints (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    state BLOB NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE models (
    model_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    artifact TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    signing_key_id TEXT NOT NULL,
    lineage TEXT NOT NULL,
    UNIQUE (name, version)
);
"""


def test_a_sqlite_file_from_the_raw_ddl_days_keeps_working(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    conn = sqlite3.connect(old)
    conn.executescript(LEGACY_SQLITE_SCHEMA)
    conn.close()
    FederationStore(new).close()
    with FederationStore(old) as store:
        store.create_run("r", CONFIG, SCHEMA)
        rows = [LedgerRow("p", _charge("r", 1))]
        store.commit_round("r", 1, rows, {"acc": 0.5}, b"s")
        assert (store.ledger("r"), store.checkpoint("r")) == (rows, (1, b"s"))
    assert reflected_schema(str(old)) == reflected_schema(str(new))
    assert sqlite_file_details(old) == sqlite_file_details(new)
    assert sqlite_file_details(new)["autoincrement"] == ["ledger"]
    assert sqlite_file_details(new)["defaults"]["runs.created_at"].startswith("strftime(")
    for statement in ("UPDATE ledger SET epsilon_after = 0", "DELETE FROM ledger WHERE true"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            _raw_execute(str(old), statement)
