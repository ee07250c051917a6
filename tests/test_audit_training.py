"""server.audit.training: the coordinator's entries in the audit log."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvault.errors import ConfigError, UnavailableError
from server.audit.records import decode_entry
from server.audit.storage import open_storage
from server.audit.training import Charge, TrainingAudit


def _entries(path: Path) -> list[dict[str, object]]:
    storage = open_storage(path)
    try:
        return [decode_entry(e).to_json_dict() for _, e in storage.entries(0, storage.size())]
    finally:
        storage.close()


def test_a_run_is_recorded_with_marginal_epsilons_that_sum_to_the_total(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with TrainingAudit.open(db, "run-1") as audit:
        audit.run_event("train.start", "started")
        audit.round_committed(0, [Charge("alpha", 0, "gaussian-sums", 0.4)], "committed")
        audit.round_committed(1, [Charge("alpha", 1, "dp-sgd", 1.1)], "committed")
        audit.round_committed(2, [Charge("alpha", 2, "dp-sgd", 1.5)], "committed")
        audit.model_registered("digits-logreg-v1-abc")
        audit.run_event("train.end", "finished")
    entries = _entries(db)
    assert [e["action"] for e in entries] == [
        "train.start",
        "privacy.charge.gaussian-sums",
        "train.round",
        "privacy.charge.dp-sgd",
        "train.round",
        "privacy.charge.dp-sgd",
        "train.round",
        "model.register",
        "train.end",
    ]
    charges = [e for e in entries if str(e["action"]).startswith("privacy.charge")]
    assert [e["epsilon_charged"] for e in charges] == pytest.approx([0.4, 0.7, 0.4])
    assert sum(float(e["epsilon_charged"]) for e in charges) == pytest.approx(1.5)  # type: ignore[arg-type]
    assert all(e["run_id"] == "run-1" and e["actor"] == "coordinator" for e in entries)
    assert entries[-1]["outcome"] == "finished"
    assert entries[-2]["resource"] == "model/digits-logreg-v1-abc"


def test_a_resumed_run_continues_the_marginals_from_the_committed_ledger(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with TrainingAudit.open(db, "run-2") as audit:
        audit.seed_epsilon(
            [Charge("beta", 0, "gaussian-sums", 0.3), Charge("beta", 1, "dp-sgd", 1.0)]
        )
        audit.round_committed(2, [Charge("beta", 2, "dp-sgd", 1.6)], "committed")
    charge = next(e for e in _entries(db) if e["action"] == "privacy.charge.dp-sgd")
    assert charge["epsilon_charged"] == pytest.approx(0.6)
    assert charge["round"] == 2
    assert charge["partner"] == "beta"


def test_an_append_that_cannot_be_made_durable_stops_training(tmp_path: Path) -> None:
    audit = TrainingAudit.open(tmp_path / "audit.db", "run-3")
    audit.close()  # the store is gone: appends must fail loudly, not vanish
    with pytest.raises(UnavailableError, match="audit"):
        audit.run_event("train.start", "started")


def test_an_unopenable_audit_store_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    # a file where the store's directory should be is the setup's mistake, named as such
    with pytest.raises(ConfigError, match="not-a-dir is a file, not a directory"):
        TrainingAudit.open(blocker / "audit.db", "run-4")


def test_an_audit_store_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "audit.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a"):
        TrainingAudit.open(garbage, "run-5")
