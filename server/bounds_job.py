"""The coordinator's DP bounds query: noisy histograms in, public bounds out.

A run of its own (``job = "dp-bounds"`` in the run config, submitted by
``fedvault schema draft --dp-bounds``), so that its privacy cost is recorded
like any training run's: every partner's charge is in the federation ledger
and the audit log under this run's id, and in the partner's own ledger
(which also enforces the partner's lifetime cap, as for training). The
mechanism and the bounds' derivation are in :mod:`fedvault.bounds`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedvault import wire
from fedvault.bounds import N_BINS, bounds_from_counts, summed_noise_std
from fedvault.errors import ConfigError, FedvaultError
from fedvault.schema import DataSchema, from_json, to_json
from server.audit.training import Charge, TrainingAudit
from server.coordinator import exchange, wait_for_nodes
from server.store import FAILED, FINISHED, STOPPED, FederationStore, LedgerRow

log = logging.getLogger("fedvault.bounds")


class BoundsJob(BaseModel):
    """What the operator asked: which columns, at which privacy cost."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    columns: list[str] = Field(min_length=1)
    target_epsilon: float = Field(gt=0, le=100)
    delta: float = Field(gt=0, lt=0.01)
    noise_multiplier: float = Field(gt=0)
    min_partners: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=120.0, gt=0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    secure_mode: bool = False


@dataclass
class _Reply:
    partner: str
    counts: Any
    charge: Any


class BoundsQuery:
    def __init__(
        self,
        grid: Grid,
        store: FederationStore,
        audit: TrainingAudit,
        run_id: str,
        run_config: Any,
    ) -> None:
        self.grid = grid
        self.store = store
        self.audit = audit
        self.run_id = run_id
        self.poll_interval = float(run_config.get("poll-interval", 0.2))
        try:
            self.job = BoundsJob.model_validate_json(str(run_config["bounds"]))
        except (KeyError, ValidationError) as exc:
            raise ConfigError(f"dp-bounds job: invalid request ({type(exc).__name__})") from None
        self.schema: DataSchema = from_json(str(run_config["schema"]))
        self.refusals: dict[str, str] = {}

    def run(self) -> None:
        job = self.job
        self.store.create_run(
            self.run_id,
            {"job": "dp-bounds", **job.model_dump()},
            json.loads(self.schema.model_dump_json()),
        )
        self.charges: list[LedgerRow] = []
        try:
            self.audit.run_event("bounds.start", "started")
            replies = self._ask()
            # Every charge a partner reported is recorded, usable reply or not:
            # its own ledger has it, so the federation's must too.
            self._commit()
            if len(replies) < job.min_partners:
                raise _Stopped(
                    f"{len(replies)} partner(s) answered the bounds query, "
                    f"{job.min_partners} required"
                )
            noise = summed_noise_std([job.noise_multiplier] * len(replies), len(job.columns))
            result = self._bounds(sum(r.counts for r in replies), noise)
            self.store.set_final_metrics(
                self.run_id,
                {"bounds": result, "partners": sorted(r.partner for r in replies)},
            )
            self._end(FINISHED, f"dp bounds for {len(result)} column(s)" + self._note())
        except _Stopped as exc:
            self._end(STOPPED, str(exc) + self._note())
        except FedvaultError as exc:
            self._end(FAILED, str(exc))
            raise
        except Exception as exc:
            # Never leave the run "running": the CLI waits on its status.
            log.exception("bounds query %s failed", self.run_id)
            self._end(FAILED, f"bounds query failed ({type(exc).__name__})")
            raise

    def _commit(self) -> None:
        rows = self.charges
        self.audit.round_committed(
            0,
            [Charge(r.partner, 0, r.charge.mechanism, r.charge.epsilon_after) for r in rows],
            "committed",
        )
        self.store.commit_round(self.run_id, 0, rows, None, b"")

    def _note(self) -> str:
        if not self.refusals:
            return ""
        return "; refused: " + "; ".join(f"{n} ({r})" for n, r in sorted(self.refusals.items()))

    def _end(self, status: str, message: str) -> None:
        try:
            self.audit.run_event("bounds.end", status)
        finally:
            self.store.set_status(self.run_id, status, message)

    def _ask(self) -> list[_Reply]:
        job = self.job
        record = ConfigRecord(
            {
                "run-id": self.run_id,
                "round": 0,
                "schema": to_json(self.schema),
                "columns": json.dumps(job.columns),
                "noise-multiplier": job.noise_multiplier,
                "delta": job.delta,
                "seed": job.seed,
                "secure-mode": job.secure_mode,
            }
        )
        messages = [
            Message(RecordDict({wire.RUN: record}), dst_node_id=n, message_type=wire.QUERY_BOUNDS)
            for n in wait_for_nodes(
                self.grid, job.min_partners, job.round_timeout_s, self.poll_interval
            )
        ]
        replies: list[_Reply] = []
        for reply in exchange(self.grid, messages, job.round_timeout_s, self.poll_interval):
            got = self._usable(reply)
            if got is not None:
                replies.append(got)
        return replies

    def _usable(self, reply: Message) -> _Reply | None:
        node = str(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("bounds: node %s failed: %s", node, reply.error.reason)
            return None
        content = reply.content
        if wire.REFUSAL in content.config_records:
            refusal = content.config_records[wire.REFUSAL]
            partner = str(refusal.get("partner", "")) or node
            code = wire.config_str(refusal, "code")
            self.refusals[partner] = f"{code}: {wire.config_str(refusal, 'message')}"
            self.audit.partner_refused(partner, 0, code)
            return None
        try:
            partner = wire.config_str(content.config_records[wire.PARTNER], "name")
            charge = wire.charge_from_record(dict(content.config_records[wire.CHARGE]))
        except (KeyError, FedvaultError) as exc:
            log.warning("bounds: node %s sent a malformed reply (%s)", node, type(exc).__name__)
            return None
        self.charges.append(LedgerRow(partner, charge))
        if charge.noise_multiplier != self.job.noise_multiplier or charge.run_id != self.run_id:
            log.error("bounds: partner %s reported a charge that differs from the plan", partner)
            return None
        try:
            (counts,) = content.array_records[wire.HISTOGRAMS].to_numpy_ndarrays()
        except (KeyError, ValueError, TypeError):
            counts = None
        expected = (len(self.job.columns), N_BINS)
        if counts is None or counts.shape != expected or not np.isfinite(counts).all():
            log.warning("bounds: partner %s sent counts of the wrong shape; ignored", partner)
            return None
        return _Reply(partner, counts.astype(np.float64), charge)

    def _bounds(self, total: Any, noise_std: float) -> dict[str, list[float]]:
        integer = {f.name for f in self.schema.features if f.type == "int"}
        out: dict[str, list[float]] = {}
        for name, counts in zip(self.job.columns, total, strict=True):
            found = bounds_from_counts(counts, noise_std, integer=name in integer)
            if found is not None:
                out[name] = [found.min, found.max, found.count]
        return out


class _Stopped(FedvaultError):
    """Too few partners answered."""
