"""The coordinator's entries in the audit log: runs, privacy charges, models.

Why the coordinator writes here and not only to its federation DB: that DB is
the operator's to edit, while the audit log is the tamper-evident record a
compliance officer verifies without trusting the operator. Every privacy charge
a partner reports, every round's outcome, every registered model and every
run's end goes in.

Ordering: entries are appended *before* the state they describe is committed
to the federation DB. A crash in between then leaves an entry for a round that
is redone on resume (the node answers from its reply cache, so nothing is
charged twice) — the log may say a thing twice, never omit it. A failing
append raises :class:`~fedvault.errors.UnavailableError`, so the run stops
rather than continue unaudited.

``epsilon_charged`` is the *marginal* ε of the charge: the partner's ε after
it minus its ε before it in this run. RDP composition is not additive per
step, but the marginals telescope, so their sum over a run is exactly the
partner's final ε for that run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from fedvault.errors import FedvaultError, UnavailableError
from server.audit.records import AuditRecord, encode_record
from server.audit.storage import AuditStorage, open_storage

ACTOR = "coordinator"
ROLE = "system"


@dataclass(frozen=True, slots=True)
class Charge:
    """What the audit trail needs of one ledger row."""

    partner: str
    round: int
    mechanism: str
    epsilon_after: float


class TrainingAudit:
    """Appends the coordinator's events for one run to an audit store."""

    def __init__(self, storage: AuditStorage, run_id: str) -> None:
        self._storage = storage
        self.run_id = run_id
        self._epsilon: dict[str, float] = {}

    @classmethod
    def open(cls, location: str | Path, run_id: str, *, password_file: Path | None = None) -> Self:
        try:
            return cls(open_storage(location, password_file=password_file), run_id)
        except FedvaultError:
            raise
        except Exception as exc:  # storage drivers raise their own types
            raise UnavailableError(f"cannot open the audit log: {type(exc).__name__}") from None

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def seed_epsilon(self, charges: Iterable[Charge]) -> None:
        """Start marginals from charges already committed (a resumed run)."""
        for c in charges:
            self._epsilon[c.partner] = max(self._epsilon.get(c.partner, 0.0), c.epsilon_after)

    def run_event(self, action: str, outcome: str) -> None:
        self._append([self._record(action, f"run/{self.run_id}", outcome)])

    def round_committed(self, round_: int, charges: Iterable[Charge], outcome: str) -> None:
        """One entry per charge (with its marginal ε), then the round's outcome."""
        records = []
        for c in charges:
            before = self._epsilon.get(c.partner, 0.0)
            marginal = max(0.0, c.epsilon_after - before)
            self._epsilon[c.partner] = max(before, c.epsilon_after)
            records.append(
                self._record(
                    f"privacy.charge.{c.mechanism}",
                    f"run/{self.run_id}",
                    "charged",
                    round_=c.round,
                    partner=c.partner,
                    epsilon_charged=marginal,
                )
            )
        records.append(self._record("train.round", f"run/{self.run_id}", outcome, round_=round_))
        self._append(records)

    def partner_refused(self, partner: str, round_: int, code: str) -> None:
        """A partner declined a round (its data, its budget, the request): who, when, why."""
        self._append(
            [
                self._record(
                    "train.partner.refused",
                    f"run/{self.run_id}",
                    code,
                    round_=round_,
                    partner=partner,
                )
            ]
        )

    def model_registered(self, model_id: str) -> None:
        self._append([self._record("model.register", f"model/{model_id}", "registered")])

    def _record(
        self,
        action: str,
        resource: str,
        outcome: str,
        *,
        round_: int | None = None,
        partner: str | None = None,
        epsilon_charged: float | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            time=datetime.now(UTC),
            actor=ACTOR,
            role=ROLE,
            action=action,
            resource=resource,
            outcome=outcome,
            run_id=self.run_id,
            round=round_,
            partner=partner,
            epsilon_charged=epsilon_charged,
        )

    def _append(self, records: list[AuditRecord]) -> None:
        try:
            self._storage.append([encode_record(r) for r in records])
        except FedvaultError:
            raise
        except Exception as exc:  # a database error must not pass silently
            raise UnavailableError(
                f"audit log append failed ({type(exc).__name__}); training stops rather "
                "than continue unaudited"
            ) from None
