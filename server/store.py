"""The coordinator's durable state: runs, rounds, the federation's privacy
ledger, checkpoints and the model registry index (with the sealed artifacts
themselves where the database is shared), in SQLite or PostgreSQL.

A round is committed in *one* transaction — its ledger rows, its metrics and
the checkpoint (model, round, RNG state) — so after ``kill -9`` the database
holds either the whole round or none of it, and a resumed run can neither lose
nor double-count a privacy charge.

Why SQLAlchemy Core: one set of statements serves the embedded default (a
SQLite file, unchanged schema and durability, see :mod:`fedvault.sqlite`) and
PostgreSQL, where the coordinator and several gateway replicas on other hosts
share one registry. The ledger is append-only in both (SQLite triggers,
PostgreSQL row and TRUNCATE triggers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa

from fedvault.database import (
    FLOAT64,
    INT64,
    SQLITE_NOW,
    add_columns,
    append_only,
    create_tables,
    describe,
    key_column,
    open_database,
    sqlite_default,
)
from fedvault.errors import CheckpointError, NotFoundError
from fedvault.privacy import PrivacyCharge
from fedvault.sqlite import CHARGE_COLUMNS

# The schema, for both dialects (see fedvault.database: on SQLite it is the DDL
# the files have always had — INTEGER/REAL columns, TEXT PRIMARY KEYs,
# strftime timestamp defaults, the ledger's append-only triggers).
_SQL_TYPES: dict[str, Any] = {"TEXT": sa.Text, "INTEGER": INT64, "REAL": FLOAT64}
_NOW = sqlite_default(SQLITE_NOW)
_meta = sa.MetaData()
_runs = sa.Table(
    "runs",
    _meta,
    key_column("run_id", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False, info=_NOW),
    sa.Column("updated_at", sa.Text, nullable=False, info=_NOW),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("schema", sa.Text, nullable=False),
    sa.Column("current_round", INT64, nullable=False, server_default="0"),
    sa.Column("model_id", sa.Text),
    sa.Column("final_metrics", sa.Text),
)
_rounds = sa.Table(
    "rounds",
    _meta,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("round", INT64, primary_key=True, autoincrement=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("committed_at", sa.Text, nullable=False, info=_NOW),
)
_CHARGE_FIELDS = [f.name for f in fields(PrivacyCharge)]
# The charge columns are shared with the nodes' own (SQLite-only) ledger.
_charge_columns = [
    sa.Column(name, _SQL_TYPES[sql_type], nullable=False)
    for name, sql_type, *_ in (c.split() for c in CHARGE_COLUMNS.split(","))
]
if [c.name for c in _charge_columns] != _CHARGE_FIELDS:  # pragma: no cover - import-time guard
    raise RuntimeError("CHARGE_COLUMNS and PrivacyCharge's fields have drifted apart")
_ledger = append_only(
    sa.Table(
        "ledger",
        _meta,
        # SQLite: INTEGER PRIMARY KEY AUTOINCREMENT (a seq is never reused).
        sa.Column("seq", INT64, sa.Identity(), primary_key=True),
        sa.Column("partner", sa.Text, nullable=False),
        *_charge_columns,
        sa.Column("recorded_at", sa.Text, nullable=False, info=_NOW),
        sa.UniqueConstraint("run_id", "partner", "round", "mechanism"),
        sqlite_autoincrement=True,
    )
)
_checkpoints = sa.Table(
    "checkpoints",
    _meta,
    key_column("run_id", sa.Text, sa.ForeignKey("runs.run_id")),
    sa.Column("round", INT64, nullable=False),
    sa.Column("state", sa.LargeBinary, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
)
_models = sa.Table(
    "models",
    _meta,
    key_column("model_id", sa.Text),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("version", INT64, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False, info=_NOW),
    sa.Column("artifact", sa.Text, nullable=False),
    sa.Column("artifact_sha256", sa.Text, nullable=False),
    sa.Column("signing_key_id", sa.Text, nullable=False),
    sa.Column("lineage", sa.Text, nullable=False),
    # The sealed artifact itself where replicas share the database (NULL: a file).
    sa.Column("artifact_blob", sa.LargeBinary),
    sa.UniqueConstraint("name", "version"),
)
_MODEL_COLUMNS = [c for c in _models.c if c.name != "artifact_blob"]
# Added after the first release: SQLite files created before gain them on open
# (PostgreSQL support came later, with them).
_ADDED_SQLITE_COLUMNS = [_models.c.artifact_blob]


def _schema(conn: sa.Connection) -> None:
    create_tables(conn, _meta)
    if conn.dialect.name == "sqlite":
        add_columns(conn, _ADDED_SQLITE_COLUMNS)


def tables() -> list[sa.Table]:
    """The store's tables, each before the tables whose foreign keys point at it.

    Public for tools that copy the store row for row (``fedvault store
    migrate``, :mod:`server.migrate`): copying through the store's own
    declarations, not a second description of its schema, keeps the copy in
    step with the store.
    """
    return list(_meta.sorted_tables)


def _now() -> str:
    """The timestamp format SQLite's ``strftime('%Y-%m-%dT%H:%M:%fZ')`` writes."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


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
    """Runs, rounds, ledger, checkpoints and the registry index.

    ``location`` is a SQLite file path (the default, ``HOME/federation.db``)
    or a PostgreSQL URL without password; ``password_file`` holds the
    PostgreSQL password.
    """

    def __init__(self, location: str | Path, *, password_file: Path | None = None) -> None:
        self.path = location if isinstance(location, Path) else Path(str(location))
        self.location = str(location)
        self._db = open_database(
            location,
            what="federation",
            password_file=password_file,
            schema=_schema,
        )

    @property
    def shared(self) -> bool:
        """Whether other hosts may open this store (PostgreSQL), so artifacts live in it."""
        return self._db.postgres

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs ---------------------------------------------------------------
    def create_run(self, run_id: str, config: dict[str, Any], schema: dict[str, Any]) -> None:
        now = _now()
        with self._db.write() as conn:
            conn.execute(
                _runs.insert().values(
                    run_id=run_id,
                    created_at=now,
                    updated_at=now,
                    status=RUNNING,
                    message="",
                    config=json.dumps(config),
                    schema=json.dumps(schema),
                    current_round=0,
                )
            )

    def set_status(self, run_id: str, status: str, message: str = "") -> None:
        with self._db.write() as conn:
            conn.execute(
                _runs.update()
                .where(_runs.c.run_id == run_id)
                .values(status=status, message=message, updated_at=_now())
            )

    def set_final_metrics(self, run_id: str, metrics: dict[str, Any]) -> None:
        with self._db.write() as conn:
            conn.execute(
                _runs.update()
                .where(_runs.c.run_id == run_id)
                .values(final_metrics=json.dumps(metrics))
            )

    def run(self, run_id: str) -> RunRecord:
        with self._db.read() as conn:
            row = conn.execute(sa.select(_runs).where(_runs.c.run_id == run_id)).first()
        if row is None:
            raise NotFoundError(f"no run {run_id!r} in {describe(self.location)}")
        return _run_record(row._mapping)

    def runs(self) -> list[RunRecord]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(_runs).order_by(_runs.c.created_at)).all()
        return [_run_record(r._mapping) for r in rows]

    def rounds(self, run_id: str) -> list[tuple[int, dict[str, Any]]]:
        query = (
            sa.select(_rounds.c.round, _rounds.c.metrics)
            .where(_rounds.c.run_id == run_id)
            .order_by(_rounds.c.round)
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [(int(r.round), json.loads(r.metrics)) for r in rows]

    # -- ledger -------------------------------------------------------------
    def ledger(self, run_id: str | None = None) -> list[LedgerRow]:
        query = sa.select(_ledger.c.partner, *(_ledger.c[f] for f in _CHARGE_FIELDS))
        if run_id is not None:
            query = query.where(_ledger.c.run_id == run_id)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(_ledger.c.seq)).all()
        return [LedgerRow(r.partner, _charge(r._mapping)) for r in rows]

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
        now = _now()
        with self._db.write() as conn:
            for row in charges:
                _insert_charge(conn, row, now)
            if metrics is not None:
                conn.execute(
                    self._db.insert_or_update(
                        _rounds,
                        {
                            "run_id": run_id,
                            "round": round_,
                            "metrics": json.dumps(metrics),
                            "committed_at": now,
                        },
                        ["run_id", "round"],
                    )
                )
            conn.execute(
                self._db.insert_or_update(
                    _checkpoints,
                    {
                        "run_id": run_id,
                        "round": round_,
                        "state": state,
                        "sha256": hashlib.sha256(state).hexdigest(),
                    },
                    ["run_id"],
                )
            )
            conn.execute(
                _runs.update()
                .where(_runs.c.run_id == run_id)
                .values(current_round=round_, updated_at=now)
            )

    def checkpoint(self, run_id: str) -> tuple[int, bytes]:
        """The last committed (round, state), verified against its digest."""
        # Untyped: SQLite hands back whatever a tamperer stored (even TEXT), which
        # the digest check below must see rather than a conversion error.
        raw_state = sa.type_coerce(_checkpoints.c.state, sa.types.NullType()).label("state")
        query = sa.select(_checkpoints.c.round, raw_state, _checkpoints.c.sha256).where(
            _checkpoints.c.run_id == run_id
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise CheckpointError(f"run {run_id} has no checkpoint to resume from")
        state = row.state
        if isinstance(state, memoryview):
            state = state.tobytes()
        if not isinstance(state, bytes) or hashlib.sha256(state).hexdigest() != row.sha256:
            raise CheckpointError(
                f"checkpoint of run {run_id} (round {row.round}) is corrupt: its SHA-256 "
                "does not match the recorded digest; refusing to resume"
            )
        return int(row.round), state

    # -- registry index -----------------------------------------------------
    def next_model_version(self, name: str) -> int:
        query = sa.select(sa.func.coalesce(sa.func.max(_models.c.version), 0)).where(
            _models.c.name == name
        )
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one()) + 1

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
        artifact_blob: bytes | None = None,
    ) -> None:
        """Index a model version; ``artifact_blob`` stores the sealed artifact itself."""
        with self._db.write() as conn:
            conn.execute(
                _models.insert().values(
                    model_id=model_id,
                    name=name,
                    version=version,
                    run_id=run_id,
                    created_at=_now(),
                    artifact=artifact,
                    artifact_sha256=artifact_sha256,
                    signing_key_id=signing_key_id,
                    lineage=json.dumps(lineage),
                    artifact_blob=artifact_blob,
                )
            )
            conn.execute(_runs.update().where(_runs.c.run_id == run_id).values(model_id=model_id))

    def models(self) -> list[dict[str, Any]]:
        with self._db.read() as conn:
            rows = conn.execute(sa.select(*_MODEL_COLUMNS).order_by(_models.c.created_at)).all()
        return [_model_row(r._mapping) for r in rows]

    def model(self, model_id: str) -> dict[str, Any]:
        query = sa.select(*_MODEL_COLUMNS).where(_models.c.model_id == model_id)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no model {model_id!r} in the registry")
        return _model_row(row._mapping)

    def model_artifact(self, model_id: str) -> bytes | None:
        """The sealed artifact stored in the database, or None (it is a file)."""
        query = sa.select(_models.c.artifact_blob).where(_models.c.model_id == model_id)
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no model {model_id!r} in the registry")
        blob = row.artifact_blob
        return None if blob is None else bytes(blob)


def _charge(row: sa.RowMapping) -> PrivacyCharge:
    return PrivacyCharge(**{f: row[f] for f in _CHARGE_FIELDS})


def _insert_charge(conn: sa.Connection, row: LedgerRow, now: str) -> None:
    c = row.charge
    existing = conn.execute(
        sa.select(*(_ledger.c[f] for f in _CHARGE_FIELDS)).where(
            _ledger.c.run_id == c.run_id,
            _ledger.c.partner == row.partner,
            _ledger.c.round == c.round,
            _ledger.c.mechanism == c.mechanism,
        )
    ).first()
    if existing is not None:
        if _charge(existing._mapping) != c:
            raise CheckpointError(
                f"partner {row.partner} reported a different charge for run {c.run_id} "
                f"round {c.round} than the one already recorded"
            )
        return
    values = {f: getattr(c, f) for f in _CHARGE_FIELDS}
    conn.execute(_ledger.insert().values(partner=row.partner, recorded_at=now, **values))


def _run_record(row: sa.RowMapping) -> RunRecord:
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


def _model_row(row: sa.RowMapping) -> dict[str, Any]:
    out = dict(row)
    out["version"] = int(out["version"])
    out["lineage"] = json.loads(out["lineage"])
    return out
