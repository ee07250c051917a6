"""server.store.FederationStore: runs, atomic round commits, ledger, checkpoints, models."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault.errors import CheckpointError, ConflictError, NotFoundError
from fedvault.privacy import (
    ACCOUNTANT_NAME,
    MECHANISM_DP_SGD,
    MECHANISM_GAUSSIAN_SUMS,
    PrivacyCharge,
    non_private_charge,
)
from server.store import FINISHED, RUNNING, FederationStore, LedgerRow

CONFIG = {"rounds": 3, "dataset": "digits"}
SCHEMA = {"name": "digits", "features": []}


def _charge(
    run_id: str, round_: int, *, epsilon_after: float = 0.5, mechanism: str = MECHANISM_DP_SGD
) -> PrivacyCharge:
    return PrivacyCharge(
        run_id=run_id,
        round=round_,
        mechanism=mechanism,
        noise_multiplier=1.1,
        sample_rate=0.05,
        steps=20,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant=ACCOUNTANT_NAME,
        accountant_version="opacus-test",
        epsilon_after=epsilon_after,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coordinator" / "federation.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[FederationStore]:
    s = FederationStore(db_path)
    yield s
    s.close()


def _raw_execute(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()


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


@pytest.mark.parametrize(
    "statement",
    [
        # One byte flipped (the CAST keeps the column a BLOB; || alone yields TEXT).
        "UPDATE checkpoints SET state = CAST(x'01' || substr(state, 2) AS BLOB)",
        "UPDATE checkpoints SET state = substr(state, 1, 10)",  # truncated
        "UPDATE checkpoints SET sha256 = '00' || substr(sha256, 3)",  # digest altered
    ],
)
def test_corrupt_checkpoint_is_refused(
    store: FederationStore, db_path: Path, statement: str
) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    store.commit_round("r", 4, [], {"loss": 1.0}, bytes(range(64)))
    _raw_execute(db_path, statement)
    with pytest.raises(CheckpointError, match="corrupt"):
        store.checkpoint("r")


def test_checkpoint_with_text_state_is_reported_corrupt(
    store: FederationStore, db_path: Path
) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    store.commit_round("r", 4, [], None, b"state")
    _raw_execute(db_path, "UPDATE checkpoints SET state = 'garbage'")
    with pytest.raises(CheckpointError, match="corrupt"):
        store.checkpoint("r")


def test_checkpoint_survives_reopen(db_path: Path) -> None:
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
    "statement", ["UPDATE ledger SET epsilon_after = 0", "DELETE FROM ledger WHERE 1"]
)
def test_ledger_is_append_only(store: FederationStore, db_path: Path, statement: str) -> None:
    store.create_run("r", CONFIG, SCHEMA)
    rows = [LedgerRow("p", _charge("r", 1))]
    store.commit_round("r", 1, rows, None, b"s")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
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
