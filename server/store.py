"""The coordinator's durable state: runs, rounds, the federation's privacy
ledger, checkpoints and the model registry index, in one SQLite database.

A round is committed in *one* transaction — its ledger rows, its metrics and
the checkpoint (model, round, RNG state) — so after ``kill -9`` the database
holds either the whole round or none of it, and a resumed run can neither lose
nor double-count a privacy charge.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

from fedvault.errors import CheckpointError, NotFoundError
from fedvault.privacy import PrivacyCharge
from fedvault.sqlite import CHARGE_COLUMNS, append_only_triggers, connect, transaction

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
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
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    committed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partner TEXT NOT NULL,
    {CHARGE_COLUMNS},
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, partner, round, mechanism)
);
{append_only_triggers("ledger")}
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    state BLOB NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
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

_CHARGE_FIELDS = [f.name for f in fields(PrivacyCharge)]
_COLUMNS = ", ".join(_CHARGE_FIELDS)
_PLACEHOLDERS = ", ".join("?" for _ in _CHARGE_FIELDS)
# Only PrivacyCharge's field names (constants) are interpolated; values are "?" parameters.
_SELECT_LEDGER = f"SELECT partner, {_COLUMNS} FROM ledger"  # noqa: S608
_CHARGE_KEY = "run_id=? AND partner=? AND round=? AND mechanism=?"
_SELECT_CHARGE = f"SELECT {_COLUMNS} FROM ledger WHERE {_CHARGE_KEY}"  # noqa: S608
_INSERT_CHARGE = f"INSERT INTO ledger (partner, {_COLUMNS}) VALUES (?, {_PLACEHOLDERS})"  # noqa: S608

RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    created_at: str
    updated_at: str
    status: str
    message: str
    config: dict[str, Any]
    schema: dict[str, Any]
    current_round: int
    model_id: str | None
    final_metrics: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class LedgerRow:
    partner: str
    charge: PrivacyCharge


def epsilon_by_partner(rows: Iterable[LedgerRow]) -> dict[str, float]:
    """Each partner's ε after its latest charge (ε only grows within a run)."""
    eps: dict[str, float] = {}
    for row in rows:
        eps[row.partner] = max(eps.get(row.partner, 0.0), row.charge.epsilon_after)
    return eps


class FederationStore:
    """Runs, rounds, ledger, checkpoints and the registry index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------
    def create_run(self, run_id: str, config: dict[str, Any], schema: dict[str, Any]) -> None:
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO runs (run_id, status, config, schema) VALUES (?, ?, ?, ?)",
                (run_id, RUNNING, json.dumps(config), json.dumps(schema)),
            )

    def set_status(self, run_id: str, status: str, message: str = "") -> None:
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE runs SET status=?, message=?, "
                "updated_at=strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id=?",
                (status, message, run_id),
            )

    def set_final_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        with transaction(self._conn):
            self._conn.execute(
                "UPDATE runs SET final_metrics=? WHERE run_id=?", (json.dumps(metrics), run_id)
            )

    def run(self, run_id: str) -> RunRecord:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in {self.path}")
        return _run_record(row)

    def runs(self) -> list[RunRecord]:
        rows = self._conn.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [_run_record(r) for r in rows]

    def rounds(self, run_id: str) -> list[tuple[int, dict[str, Any]]]:
        rows = self._conn.execute(
            "SELECT round, metrics FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        ).fetchall()
        return [(int(r["round"]), json.loads(r["metrics"])) for r in rows]

    # -- ledger -------------------------------------------------------------
    def ledger(self, run_id: str | None = None) -> list[LedgerRow]:
        sql = _SELECT_LEDGER
        args: tuple[str, ...] = ()
        if run_id is not None:
            sql += " WHERE run_id=?"
            args = (run_id,)
        rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [
            LedgerRow(r["partner"], PrivacyCharge(**{f: r[f] for f in _CHARGE_FIELDS}))
            for r in rows
        ]

    # -- checkpoints --------------------------------------------------------
    def commit_round(
        self,
        run_id: str,
        round_: int,
        charges: list[LedgerRow],
        metrics: dict[str, Any] | None,
        state: bytes,
    ) -> None:
        """Ledger rows + round metrics + checkpoint, all or nothing.

        A charge already present (a node replayed a cached reply after resume)
        is skipped only if identical; a different one is an error.
        """
        with transaction(self._conn):
            for row in charges:
                self._insert_charge(row)
            if metrics is not None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO rounds (run_id, round, metrics) VALUES (?, ?, ?)",
                    (run_id, round_, json.dumps(metrics)),
                )
            self._conn.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, round, state, sha256) "
                "VALUES (?, ?, ?, ?)",
                (run_id, round_, state, hashlib.sha256(state).hexdigest()),
            )
            self._conn.execute(
                "UPDATE runs SET current_round=?, "
                "updated_at=strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE run_id=?",
                (round_, run_id),
            )

    def _insert_charge(self, row: LedgerRow) -> None:
        c = row.charge
        existing = self._conn.execute(
            _SELECT_CHARGE, (c.run_id, row.partner, c.round, c.mechanism)
        ).fetchone()
        if existing is not None:
            if PrivacyCharge(**{f: existing[f] for f in _CHARGE_FIELDS}) != c:
                raise CheckpointError(
                    f"partner {row.partner} reported a different charge for run {c.run_id} "
                    f"round {c.round} than the one already recorded"
                )
            return
        self._conn.execute(_INSERT_CHARGE, (row.partner, *(getattr(c, f) for f in _CHARGE_FIELDS)))

    def checkpoint(self, run_id: str) -> tuple[int, bytes]:
        """The last committed (round, state), verified against its digest."""
        row = self._conn.execute(
            "SELECT round, state, sha256 FROM checkpoints WHERE run_id=?", (run_id,)
        ).fetchone()
        if row is None:
            raise CheckpointError(f"run {run_id} has no checkpoint to resume from")
        state = row["state"]
        if not isinstance(state, bytes) or hashlib.sha256(state).hexdigest() != row["sha256"]:
            raise CheckpointError(
                f"checkpoint of run {run_id} (round {row['round']}) is corrupt: its SHA-256 "
                "does not match the recorded digest; refusing to resume"
            )
        return int(row["round"]), state

    # -- registry index -----------------------------------------------------
    def next_model_version(self, name: str) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM models WHERE name=?", (name,)
        ).fetchone()
        return int(row[0]) + 1

    def add_model(
        self,
        *,
        model_id: str,
        name: str,
        version: int,
        run_id: str,
        artifact: str,
        artifact_sha256: str,
        signing_key_id: str,
        lineage: dict[str, Any],
    ) -> None:
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO models (model_id, name, version, run_id, artifact, artifact_sha256, "
                "signing_key_id, lineage) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model_id,
                    name,
                    version,
                    run_id,
                    artifact,
                    artifact_sha256,
                    signing_key_id,
                    json.dumps(lineage),
                ),
            )
            self._conn.execute("UPDATE runs SET model_id=? WHERE run_id=?", (model_id, run_id))

    def models(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM models ORDER BY created_at").fetchall()
        return [_model_row(r) for r in rows]

    def model(self, model_id: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT * FROM models WHERE model_id=?", (model_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no model {model_id!r} in the registry")
        return _model_row(row)


def _run_record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        status=row["status"],
        message=row["message"],
        config=json.loads(row["config"]),
        schema=json.loads(row["schema"]),
        current_round=int(row["current_round"]),
        model_id=row["model_id"],
        final_metrics=json.loads(row["final_metrics"]) if row["final_metrics"] else None,
    )


def _model_row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["lineage"] = json.loads(out["lineage"])
    return out
