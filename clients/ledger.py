"""A partner's own privacy ledger: append-only, on the partner's disk.

Every release of information derived from the partner's data is one row,
written in the same transaction as the reply it paid for. That reply is kept,
so if the coordinator asks again for the same (run, round) — after a crash and
resume, say — the node returns the *same* release instead of a new one: a
repeated identical answer costs no extra privacy, a fresh one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Self

from fedvault.errors import ConflictError
from fedvault.privacy import GaussianEvent, PrivacyCharge, epsilon
from fedvault.sqlite import CHARGE_COLUMNS, append_only_triggers, connect, transaction

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS charges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    {CHARGE_COLUMNS},
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (dataset, run_id, round, mechanism)
);
CREATE TABLE IF NOT EXISTS replies (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    request_digest TEXT NOT NULL,
    reply BLOB NOT NULL,
    PRIMARY KEY (dataset, run_id, round)
);
{append_only_triggers("charges")}
{append_only_triggers("replies")}
"""

_CHARGE_FIELDS = [f.name for f in fields(PrivacyCharge)]

_COLUMNS = ", ".join(_CHARGE_FIELDS)
_PLACEHOLDERS = ", ".join("?" for _ in _CHARGE_FIELDS)
# Only PrivacyCharge's field names (constants) are interpolated; values are "?" parameters.
_SELECT_CHARGES = f"SELECT {_COLUMNS} FROM charges WHERE dataset = ?"  # noqa: S608
_INSERT_CHARGE = f"INSERT INTO charges (dataset, {_COLUMNS}) VALUES (?, {_PLACEHOLDERS})"  # noqa: S608


def request_digest(*parts: bytes) -> str:
    """Identify a request by content, so a replay can be told from a new ask."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


class NodeLedger:
    """The node-side ledger of one partner (all its datasets, all runs)."""

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

    def charges(self, dataset: str, run_id: str | None = None) -> list[PrivacyCharge]:
        sql = _SELECT_CHARGES
        args: tuple[str, ...] = (dataset,)
        if run_id is not None:
            sql += " AND run_id = ?"
            args = (dataset, run_id)
        rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [PrivacyCharge(**dict(row)) for row in rows]

    def datasets(self) -> list[str]:
        rows = self._conn.execute("SELECT DISTINCT dataset FROM charges ORDER BY dataset")
        return [r[0] for r in rows]

    def rounds_answered(self, dataset: str) -> int:
        """How many training rounds (round > 0, all runs) this node has answered.

        Read by the node's health endpoint: a reply row is written in the same
        transaction as its charge, so this counts releases actually made.
        """
        row = self._conn.execute(
            "SELECT COUNT(*) FROM replies WHERE dataset = ? AND round > 0", (dataset,)
        ).fetchone()
        return int(row[0])

    def lifetime_epsilon(
        self, dataset: str, delta: float, extra: list[GaussianEvent | None]
    ) -> float:
        """ε at ``delta`` of every charge ever made on ``dataset``, plus ``extra``."""
        return epsilon([c.event for c in self.charges(dataset)] + extra, delta)

    def cached_reply(self, dataset: str, run_id: str, round_: int, digest: str) -> bytes | None:
        """The reply already released for this (run, round), if any.

        A *different* request for a round already answered is refused: answering
        it would be a second, separately charged release of the same round.
        """
        row = self._conn.execute(
            "SELECT request_digest, reply FROM replies WHERE dataset=? AND run_id=? AND round=?",
            (dataset, run_id, round_),
        ).fetchone()
        if row is None:
            return None
        if row["request_digest"] != digest:
            raise ConflictError(
                f"run {run_id} round {round_} was already answered for a different request"
            )
        return bytes(row["reply"])

    def record(
        self,
        dataset: str,
        charges: list[PrivacyCharge],
        *,
        run_id: str,
        round_: int,
        digest: str,
        reply: bytes,
    ) -> None:
        """Append ``charges`` and the reply they paid for, atomically."""
        with transaction(self._conn):
            for c in charges:
                self._conn.execute(
                    _INSERT_CHARGE, (dataset, *(getattr(c, f) for f in _CHARGE_FIELDS))
                )
            self._conn.execute(
                "INSERT INTO replies (dataset, run_id, round, request_digest, reply) "
                "VALUES (?, ?, ?, ?, ?)",
                (dataset, run_id, round_, digest, reply),
            )
