"""The coordinator: a Flower ServerApp driving DP federated training.

Runs inside the ``flwr-serverapp`` process that the SuperLink starts for a run.
Everything durable goes through :class:`server.store.FederationStore`; each
round ends in one transaction (ledger + metrics + checkpoint), so a ``kill -9``
at any point loses at most the round in flight, and a resume
(``resume = true`` in the run config) replays it: nodes answer a replayed
(run, round) from their reply cache, so no charge is lost or counted twice.

Flow: stats (round 0: schema check + DP standardisation sums) → per-partner
noise calibration → rounds of (budget check → train+evaluate message →
aggregate → commit) → final evaluation → signed model in the registry.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler
from numpy.typing import NDArray

from fedvault import logs, wire
from fedvault.encoding import encoding_for
from fedvault.errors import CheckpointError, FedvaultError
from fedvault.metrics import combine, summarise, sums_length
from fedvault.modelspec import FloatArray, ModelSpec, init_parameters
from fedvault.privacy import GaussianEvent, calibrate_noise_multiplier, epsilon, poisson_sample_rate
from fedvault.schema import DataSchema, builtin_schema, from_json, schema_hash, to_json
from fedvault.stats import NoisySums, Scaler, scaler_from_sums, sums_noise_std
from fedvault.training_config import validate_training_config
from server.aggregation import aggregate
from server.audit.training import Charge, TrainingAudit
from server.registry import ModelRegistry, load_model_keys
from server.store import (
    FAILED,
    FINISHED,
    STOPPED,
    FederationStore,
    LedgerRow,
    epsilon_by_partner,
)

log = logging.getLogger("fedvault.coordinator")
_INTERRUPTION_WRITE_S = 3.0
"""How long Flower's exit handler waits for the run's status write (see below)."""

app = ServerApp()


@dataclass
class PartnerState:
    """What the coordinator knows of one partner in this run."""

    name: str
    node_id: int
    n_train: int
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    active: bool = True
    reason: str = ""


@dataclass
class RunState:
    """Everything a checkpoint must restore."""

    round: int
    params: list[FloatArray]
    scaler: Scaler
    partners: dict[str, PartnerState]
    rng_state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        meta = {
            "round": self.round,
            "partners": {n: p.__dict__ for n, p in self.partners.items()},
            "rng_state": self.rng_state,
            "history": self.history,
        }
        arrays: dict[str, NDArray[Any]] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "scaler_mean": self.scaler.mean,
            "scaler_std": self.scaler.std,
            **{f"param_{i}": p for i, p in enumerate(self.params)},
        }
        buf = io.BytesIO()
        wire.save_arrays(buf, arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, n_params: int) -> RunState:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                params = [npz[f"param_{i}"] for i in range(n_params)]
                scaler = Scaler(mean=npz["scaler_mean"], std=npz["scaler_std"])
            partners = {n: PartnerState(**p) for n, p in meta["partners"].items()}
            return cls(meta["round"], params, scaler, partners, meta["rng_state"], meta["history"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint cannot be decoded ({exc}); refusing to resume"
            ) from None


def _model_message(state: RunState, run: ConfigRecord, node_id: int, message_type: str) -> Message:
    """A message carrying the current global model and standardisation."""
    content = RecordDict(
        {
            wire.RUN: run,
            wire.MODEL: ArrayRecord(numpy_ndarrays=state.params),
            wire.SCALER: ArrayRecord(numpy_ndarrays=[state.scaler.mean, state.scaler.std]),
        }
    )
    return Message(content, dst_node_id=node_id, message_type=message_type)


def _optional_path(value: object) -> Path | None:
    return Path(str(value)) if value else None


def _charges(rows: list[LedgerRow]) -> list[Charge]:
    return [
        Charge(r.partner, r.charge.round, r.charge.mechanism, r.charge.epsilon_after) for r in rows
    ]


def exchange(grid: Grid, messages: list[Message], timeout_s: float, poll_s: float) -> list[Message]:
    """Push, then poll at our own interval until every reply or the timeout.

    ``Grid.send_and_receive`` polls every 3 s; pulling ourselves through the
    same public API cuts that idle wait per round.
    """
    ids = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(ids)):
            ids.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if ids:
            time.sleep(poll_s)
    if ids:
        log.warning("round timed out waiting for %d reply(ies)", len(ids))
    return replies


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float, poll_s: float) -> list[int]:
    """The connected nodes once ``minimum`` are there, or whoever is at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(poll_s)


class RunAborted(FedvaultError):
    """The run cannot continue (too few partners, budget, failures)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    state_dir = Path(str(run_config["state-dir"]))
    run_id = str(run_config["fedvault-run-id"])
    logs.run_id.set(run_id)  # every record of this run carries it (fedvault.logs)
    # The federation store (runs, ledger, checkpoints, registry) comes like the
    # audit store: a URL without password plus a password-file path, or "" for
    # the state directory's SQLite file. On PostgreSQL the sealed model lands
    # in the database, where gateway replicas on other hosts load it.
    with (
        FederationStore(
            str(run_config.get("federation-store", "")) or state_dir / "federation.db",
            password_file=_optional_path(run_config.get("federation-store-password-file", "")),
        ) as store,
        TrainingAudit.open(
            str(run_config.get("audit-store", "")) or state_dir / "audit.db",
            run_id,
            password_file=_optional_path(run_config.get("audit-store-password-file", "")),
        ) as audit,
    ):
        if str(run_config.get("job", "")) == "dp-bounds":
            from server.bounds_job import BoundsQuery

            BoundsQuery(grid, store, audit, run_id, run_config).run()
            return
        Coordinator(grid, store, state_dir, run_id, run_config, audit).run()


class Coordinator:
    def __init__(
        self,
        grid: Grid,
        store: FederationStore,
        state_dir: Path,
        run_id: str,
        run_config: Any,
        audit: TrainingAudit,
    ) -> None:
        self.grid = grid
        self.store = store
        self.audit = audit
        self.state_dir = state_dir
        self.run_id = run_id
        self.resume = bool(run_config.get("resume", False))
        self.poll_interval = float(run_config.get("poll-interval", 0.2))
        # Partners that declined a request: name → "code: reason" (status, audit).
        self.refusals: dict[str, str] = {}
        self._ended = False
        self._ending = threading.Lock()
        self._recorder: threading.Thread | None = None
        self.schema: DataSchema
        if self.resume:
            record = store.run(run_id)
            self.config = validate_training_config(record.config, source=f"run {run_id}")
            # The schema the run started with, as stored: a schema file edited
            # since must not change a run half-way.
            self.schema = from_json(json.dumps(record.schema))
        else:
            self.config = validate_training_config(
                json.loads(str(run_config["training"])), source="run config"
            )
            # A schema file was read by the operator's CLI and travels as JSON:
            # the ServerApp process never reads the operator's files.
            text = str(run_config.get("schema", ""))
            self.schema = from_json(text) if text else builtin_schema(self.config.dataset)
        self.encoding = encoding_for(self.schema)
        regression = self.schema.is_regression
        self.spec = ModelSpec(
            kind=self.config.model,
            n_features=self.encoding.width,
            n_classes=self.schema.n_outputs,
            task="regression" if regression else "classification",
            loss=self.config.loss if regression else "cross-entropy",
            huber_delta=self.config.huber_delta,
            hidden=self.config.hidden,
            activation=self.config.activation,
            quad_alpha=self.config.quad_alpha
            if self.config.model == "mlp" and self.config.activation == "quad"
            else None,
        )

    # -- top level ----------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        if not self.resume:
            self.store.create_run(
                self.run_id, cfg.model_dump(), json.loads(self.schema.model_dump_json())
            )
        # When the SuperExec above this process goes (the SuperLink died) or
        # the run is stopped, Flower's signal handler runs its exit handlers
        # and then force-exits: control may never come back here to say why.
        add_exit_handler(self._record_interruption_bounded, run_before_force_exit=True)
        try:
            # Inside the try: an audit log that cannot be written ends the run
            # as failed, with the reason, before any partner is asked anything.
            if self.resume:
                self.audit.seed_epsilon(_charges(self.store.ledger(self.run_id)))
                self.audit.run_event("train.resume", "resumed")
            else:
                self.audit.run_event("train.start", "started")
            state = self._start_or_resume()
            while state.round < cfg.rounds:
                self._round(state)
            final = self._final_evaluation(state)
            model_id = self._register(state, final)
            self.audit.model_registered(model_id)
            self._end(FINISHED, f"model {model_id}" + self._refusal_note())
            log.info("run %s finished: model %s", self.run_id, model_id)
        except RunAborted as exc:
            self._end(STOPPED, str(exc) + self._refusal_note())
            log.error("run %s stopped: %s", self.run_id, exc)
        except FedvaultError as exc:
            self._end(FAILED, str(exc))
            log.error("run %s failed: %s", self.run_id, exc)
            raise
        except BaseException as exc:
            # Anything else (an interrupt, a bug) ends the run unfinished but
            # resumable from its last committed round: say so, or whoever
            # follows the run waits on a run that nothing drives any more.
            signalled = isinstance(exc, KeyboardInterrupt | SystemExit)
            if self._recorder is not None:
                # The exit handler's write waited on a transaction of this thread,
                # now unwound: it can finish (Flower's force-exit bounds the wait).
                self._recorder.join()
            # The type only: an unexpected error's text may quote data.
            self._interrupted(None if signalled else f"it raised {type(exc).__name__}")
            raise

    def _record_interruption_bounded(self) -> None:
        """Flower's exit handler: :meth:`_interrupted`, given at most a few seconds.

        It runs inside a signal handler, on the main thread, wherever that
        thread was — possibly inside a store transaction, whose lock the
        status write would then wait on forever (a PostgreSQL row lock) or
        for the busy timeout (SQLite). So the write runs on a thread of its
        own and is abandoned after the bound; the SystemExit that follows
        unwinds that transaction, and the ``except`` in :meth:`run` records
        the interruption if this could not, after this write finishes.
        """
        self._recorder = threading.Thread(
            target=self._interrupted, name="record-interruption", daemon=True
        )
        self._recorder.start()
        self._recorder.join(timeout=_INTERRUPTION_WRITE_S)

    def _interrupted(self, why: str | None = None) -> None:
        """Mark the run failed-but-resumable, once (whichever path gets here first)."""
        with self._ending:  # the exit handler's thread and the ``except`` path
            if self._ended:
                return
            why = why or "its SuperLink or SuperExec went away, or it was stopped"
            try:
                done = self.store.run(self.run_id).current_round
                message = (
                    f"interrupted after round {done}: the coordinator stopped before the run "
                    f"finished ({why}); once the federation is up again, "
                    f"`fedvault train --resume {self.run_id}` goes on from there"
                )
                # The status only: the audit writer may be half-way through an
                # append of its own.
                self.store.set_status(self.run_id, FAILED, message)
                self._ended = True
                log.error("run %s %s", self.run_id, message)
            except Exception:
                # Best effort on the way out: the interrupt is what must propagate.
                log.exception("run %s: could not record the interruption", self.run_id)

    def _refusal_note(self) -> str:
        if not self.refusals:
            return ""
        return "; refused: " + "; ".join(f"{n} ({r})" for n, r in sorted(self.refusals.items()))

    def _end(self, status: str, message: str) -> None:
        self._ended = True
        try:
            self.audit.run_event("train.end", status)
        finally:
            self.store.set_status(self.run_id, status, message)

    def _commit(
        self,
        round_: int,
        charges: list[LedgerRow],
        metrics: dict[str, Any] | None,
        state: RunState,
        *,
        outcome: str = "committed",
        audit_round: int | None = None,
    ) -> None:
        """Audit, then commit: the log may repeat a redone round, never miss one."""
        self.audit.round_committed(
            round_ if audit_round is None else audit_round, _charges(charges), outcome
        )
        self.store.commit_round(self.run_id, round_, charges, metrics, state.to_bytes())

    def _start_or_resume(self) -> RunState:
        nodes = self._wait_for_nodes()
        checkpoint = None
        if self.resume:
            checkpoint = self.store.checkpoint(self.run_id)
        # Round 0 is replayed on resume too: nodes answer from their reply
        # cache, which also maps partner names to this run's node ids.
        partners, total = self._stats_round(nodes)
        if checkpoint is not None:
            round_, blob = checkpoint
            state = RunState.from_bytes(blob, len(self.spec.shapes()))
            if state.round != round_:
                raise CheckpointError("checkpoint round does not match its record")
            for name, p in state.partners.items():
                if name in partners:
                    p.node_id = partners[name].node_id
            log.info("run %s resumed after round %d", self.run_id, state.round)
            return state
        # Nodes always noise their sums (even in a non-private run), so the
        # shrinkage always knows the noise level: it is public, from σ_stats.
        scaler = scaler_from_sums(
            total,
            self.encoding,
            noise_std=sums_noise_std(
                [self.config.stats_noise_multiplier] * len(partners), self.encoding.width
            ),
        )
        self._calibrate(partners)
        rng = np.random.default_rng(self.config.seed)
        state = RunState(
            round=0,
            params=init_parameters(self.spec, self.config.seed),
            scaler=scaler,
            partners=partners,
            rng_state=dict(rng.bit_generator.state),
        )
        # Round 0's checkpoint carries the stats charges: from here on the
        # ledger alone is the record of what each partner has spent.
        self._commit(0, self._stats_charges, None, state)
        return state

    # -- phases -------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        cfg = self.config
        nodes = wait_for_nodes(self.grid, cfg.min_partners, cfg.round_timeout_s, self.poll_interval)
        if len(nodes) < self.config.min_partners:
            raise RunAborted(
                f"only {len(nodes)} partner node(s) connected, "
                f"{self.config.min_partners} required (min_partners)"
            )
        return nodes

    def _run_record(self, round_: int, **extra: Any) -> ConfigRecord:
        cfg = self.config
        return ConfigRecord(
            {
                "run-id": self.run_id,
                "round": round_,
                "schema": to_json(self.schema),
                "model-spec": self.spec.model_dump_json(),
                "delta": cfg.delta,
                "seed": cfg.seed,
                "secure-mode": cfg.secure_mode,
                "private": cfg.private,
                **extra,
            }
        )

    def _exchange(self, messages: list[Message]) -> list[Message]:
        return exchange(self.grid, messages, self.config.round_timeout_s, self.poll_interval)

    def _stats_round(self, nodes: list[int]) -> tuple[dict[str, PartnerState], NoisySums]:
        run = self._run_record(0, **{"stats-noise-multiplier": self.config.stats_noise_multiplier})
        messages = [
            Message(RecordDict({wire.RUN: run}), dst_node_id=n, message_type=wire.QUERY_STATS)
            for n in nodes
        ]
        partners: dict[str, PartnerState] = {}
        charges: list[LedgerRow] = []
        total: NoisySums | None = None
        for reply in self._exchange(messages):
            ok = self._ok(reply, "stats", round_=0)
            if ok is None:
                continue
            info = ok.config_records[wire.PARTNER]
            name = wire.config_str(info, "name")
            n_train = wire.config_int(info, "n-train")
            # Its charge is recorded whatever follows: its own ledger has it.
            charges.append(
                LedgerRow(name, wire.charge_from_record(dict(ok.config_records[wire.CHARGE])))
            )
            s, s2, count = ok.array_records[wire.SUMS].to_numpy_ndarrays()
            if s.shape != (self.encoding.width,) or s2.shape != s.shape or count.shape != (1,):
                log.warning("stats: partner %s sent sums of the wrong shape; ignored", name)
                continue
            partners[name] = PartnerState(name, reply.metadata.src_node_id, n_train)
            sums = NoisySums(s, s2, float(count[0]))
            total = sums if total is None else total + sums
        if total is None or len(partners) < self.config.min_partners:
            raise RunAborted(
                f"{len(partners)} partner(s) passed data validation, "
                f"{self.config.min_partners} required"
            )
        for name in partners:
            self.refusals.pop(name, None)
        self._stats_charges = charges
        return partners, total

    def _calibrate(self, partners: dict[str, PartnerState]) -> None:
        """Per partner sigma: target ε over all planned rounds, stats release included."""
        cfg = self.config
        for p in partners.values():
            p.sample_rate = poisson_sample_rate(cfg.batch_size, p.n_train)
            if not cfg.private:
                p.noise_multiplier = 0.0
                continue
            planned = [GaussianEvent(1.0, p.sample_rate, cfg.local_steps)] * cfg.rounds
            prior = [GaussianEvent(cfg.stats_noise_multiplier, 1.0, 1)]
            p.noise_multiplier = calibrate_noise_multiplier(
                cfg.target_epsilon, cfg.delta, planned, prior=prior
            )
            log.info(
                "partner %s: q=%.4f \N{GREEK SMALL LETTER SIGMA}=%.3f",
                p.name,
                p.sample_rate,
                p.noise_multiplier,
            )

    def _projected_epsilon(self, p: PartnerState, history: list[GaussianEvent | None]) -> float:
        """ε of partner ``p`` in this run if it takes part in one more round."""
        nxt = GaussianEvent(p.noise_multiplier, p.sample_rate, self.config.local_steps)
        return epsilon([*history, nxt], self.config.delta)

    def _select(self, state: RunState) -> list[PartnerState]:
        cfg = self.config
        history: dict[str, list[GaussianEvent | None]] = {}
        for row in self.store.ledger(self.run_id):  # read once per round, not per partner
            history.setdefault(row.partner, []).append(row.charge.event)
        selected = []
        for p in state.partners.values():
            if not p.active:
                continue
            if cfg.private:
                projected = self._projected_epsilon(p, history.get(p.name, []))
                if projected > cfg.epsilon_budget:
                    p.active = False
                    p.reason = (
                        f"round {state.round + 1} would bring ε to {projected:.3f}, past the "
                        f"federation budget {cfg.epsilon_budget}"
                    )
                    log.warning("dropping partner %s: %s", p.name, p.reason)
                    continue
            selected.append(p)
        if len(selected) < cfg.min_partners:
            reasons = "; ".join(
                f"{p.name}: {p.reason}" for p in state.partners.values() if p.reason
            )
            raise RunAborted(
                f"only {len(selected)} partner(s) can take part in round {state.round + 1}, "
                f"{cfg.min_partners} required (min_partners). {reasons}"
            )
        return selected

    def _round(self, state: RunState) -> None:
        cfg = self.config
        round_ = state.round + 1
        selected = self._select(state)
        messages = []
        for p in selected:
            run = self._run_record(
                round_,
                **{
                    "learning-rate": cfg.learning_rate,
                    "momentum": cfg.momentum,
                    "batch-size": cfg.batch_size,
                    "local-steps": cfg.local_steps,
                    "noise-multiplier": p.noise_multiplier if cfg.private else 0.0,
                    "max-grad-norm": cfg.max_grad_norm,
                },
            )
            messages.append(_model_message(state, run, p.node_id, wire.TRAIN))
        by_node = {p.node_id: p for p in selected}
        updates: list[list[FloatArray]] = []
        weights: list[float] = []
        charges: list[LedgerRow] = []
        eval_sums: list[list[float]] = []
        failed: list[str] = []
        for reply in self._exchange(messages):
            sender = by_node.get(reply.metadata.src_node_id)
            if sender is None:
                continue
            ok = self._ok(reply, f"round {round_}", partner=sender, round_=round_)
            if ok is None:
                failed.append(sender.name)
                continue
            charge = wire.charge_from_record(dict(ok.config_records[wire.CHARGE]))
            charges.append(LedgerRow(sender.name, charge))
            if cfg.private and not self._charge_matches_plan(sender, charge):
                failed.append(sender.name)
                continue
            m = ok.metric_records[wire.METRICS]
            updates.append(
                [
                    np.asarray(a, dtype=np.float32)
                    for a in ok.array_records[wire.MODEL].to_numpy_ndarrays()
                ]
            )
            weights.append(wire.metric_float(m, "num-examples"))
            eval_sums.append(wire.metric_floats(m, "eval-sums", sums_length(self.spec)))
        # Partners that were sent this round but never reported a charge for it.
        charged = {r.partner for r in charges if r.charge.round == round_}
        missing = [p.name for p in selected if p.name not in charged]
        dropped = set(failed + missing)
        if len(updates) < cfg.min_partners:
            # Commit the charges that did happen before stopping: a partner's
            # spend is real even if the round cannot be completed.
            self._commit(state.round, charges, None, state, outcome="aborted", audit_round=round_)
            raise RunAborted(
                f"round {round_}: only {len(updates)} usable update(s), {cfg.min_partners} "
                f"required; failed: {sorted(dropped)}"
            )
        state.params = aggregate(
            updates, weights, rule=cfg.aggregation, trim_fraction=cfg.trim_fraction
        )
        state.round = round_
        metrics = {
            # Evaluation rides in the train message, so it measures the model
            # each partner *received*: the aggregate of the previous round.
            "evaluated_round": round_ - 1,
            **summarise(self.spec, combine(eval_sums)),
            "partners": sorted(p.name for p in by_node.values() if p.name not in dropped),
            "failed": sorted(dropped),
            "epsilon": {
                r.partner: r.charge.epsilon_after for r in charges if r.charge.round == round_
            },
        }
        state.history.append({"round": round_, **metrics})
        self._commit(round_, charges, metrics, state)
        log.info("round %d committed: %s", round_, metrics)

    def _charge_matches_plan(self, p: PartnerState, charge: Any) -> bool:
        planned = (p.noise_multiplier, self.config.local_steps)
        if (charge.noise_multiplier, charge.steps) != planned or charge.run_id != self.run_id:
            log.error(
                "partner %s reported a charge that differs from its plan; update rejected", p.name
            )
            return False
        return True

    def _ok(
        self,
        reply: Message,
        what: str,
        partner: PartnerState | None = None,
        *,
        round_: int | None = None,
    ) -> RecordDict | None:
        """The reply's content, or None after recording why it is unusable."""
        name = partner.name if partner else str(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("%s: node %s failed: %s", what, name, reply.error.reason)
            return None
        content = reply.content
        if wire.REFUSAL in content.config_records:
            refusal = content.config_records[wire.REFUSAL]
            code = wire.config_str(refusal, "code")
            text = wire.config_str(refusal, "message")
            log.warning("%s: partner %s refused (%s): %s", what, name, code, text)
            if partner is not None:
                partner.active = False
                partner.reason = f"refused ({code}): {text}"
            sender = partner.name if partner else str(refusal.get("partner", "")) or name
            if round_ is not None and sender not in self.refusals:
                self.refusals[sender] = f"{code}: {text}"
                self.audit.partner_refused(sender, round_, code)
            return None
        return content

    def _final_evaluation(self, state: RunState) -> dict[str, Any]:
        run = self._run_record(state.round)
        messages = [
            _model_message(state, run, p.node_id, wire.EVALUATE) for p in state.partners.values()
        ]
        parts: list[list[float]] = []
        for reply in self._exchange(messages):
            ok = self._ok(reply, "final evaluation")
            if ok is None:
                continue
            m = ok.metric_records[wire.METRICS]
            parts.append(wire.metric_floats(m, "eval-sums", sums_length(self.spec)))
        final = {"evaluated_round": state.round, **summarise(self.spec, combine(parts))}
        self.store.set_final_metrics(self.run_id, final)
        return final

    def _register(self, state: RunState, final: dict[str, Any]) -> str:
        cfg = self.config
        ledger = self.store.ledger(self.run_id)
        eps = epsilon_by_partner(ledger)
        lineage = {
            "run_id": self.run_id,
            "dataset": cfg.dataset,
            "task": self.schema.task,
            "schema_hash": schema_hash(self.schema),
            # The schema itself: the gateway, the HE plan and the console read
            # raw columns through it (public: bounds, categories, classes).
            "schema": json.loads(to_json(self.schema)),
            "partners": sorted(state.partners),
            "rounds_planned": cfg.rounds,
            "rounds_completed": state.round,
            "hyperparameters": cfg.model_dump(),
            "metrics": {"final": final, "rounds": state.history},
            "private": cfg.private,
            "epsilon": eps,
            "delta": cfg.delta,
            "accountant": ledger[0].charge.accountant + " " + ledger[0].charge.accountant_version
            if ledger
            else "none",
            "scaler": "federated noisy sums (Gaussian mechanism), see privacy statement",
        }
        keys = load_model_keys(self.state_dir / "keys")
        registry = ModelRegistry(self.store, self.state_dir / "registry", keys)
        return registry.register(
            name=f"{cfg.dataset}-{cfg.model}",
            run_id=self.run_id,
            spec=self.spec,
            params=state.params,
            scaler=state.scaler,
            lineage=lineage,
        )
