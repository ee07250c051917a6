"""The partner node's Flower ClientApp.

Runs inside ``flwr-clientapp`` processes that the partner's own
``flower-supernode`` starts for each message. Everything it needs to know
about the site (data files, ledger, privacy cap) comes from the SuperNode's
``--node-config``; everything about the run comes in the message and is
validated here, because a partner trusts its own config, not the coordinator.

A node never crashes on a bad request: it answers with a typed ``refusal``
record (see :mod:`fedvault.wire`) that the coordinator acts on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.data import CsvFormat, PartnerData, load_partner_data, without_cells
from clients.ledger import NodeLedger, request_digest
from clients.rows import NODE_MEMORY_BYTES, Storage
from fedvault import wire
from fedvault.encoding import Encoding, encoding_for
from fedvault.errors import ConfigError, ConflictError, DataError, FedvaultError
from fedvault.metrics import combine, partner_sums
from fedvault.modelspec import ModelSpec, check_parameters
from fedvault.privacy import (
    ACCOUNTANT_NAME,
    MECHANISM_DP_SGD,
    MECHANISM_GAUSSIAN_SUMS,
    GaussianEvent,
    PrivacyCharge,
    accountant_version,
    epsilon,
    non_private_charge,
)
from fedvault.schema import DataSchema, from_json
from fedvault.stats import Scaler, clipped_sums_of, release_std, with_gaussian_noise

log = logging.getLogger("fedvault.node")

app = ClientApp()


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """This site's configuration, from ``flower-supernode --node-config``."""

    partner: str
    train_csv: Path
    test_csv: Path
    ledger: Path
    epsilon_cap: float
    cap_delta: float
    allow_non_private: bool
    csv_format: CsvFormat = field(default_factory=CsvFormat)
    dataset: str = ""  # the table this site holds ("" = not configured: no check)
    memory_bytes: int = NODE_MEMORY_BYTES  # per encoded table, before it spills

    @property
    def storage(self) -> Storage:
        """Encoded tables past the node's memory budget spill into its state
        directory (beside the ledger, on the site's own disk; see clients.rows)."""
        return Storage(memory_bytes=self.memory_bytes, spill_dir=self.ledger.parent)

    @classmethod
    def from_node_config(cls, config: dict[str, Any]) -> NodeSettings:
        try:
            settings = cls(
                partner=str(config["partner"]),
                train_csv=Path(str(config["train-csv"])),
                test_csv=Path(str(config["test-csv"])),
                ledger=Path(str(config["ledger"])),
                epsilon_cap=float(config["epsilon-cap"]),
                cap_delta=float(config.get("cap-delta", 1e-5)),
                allow_non_private=str(config.get("allow-non-private", "false")).lower() == "true",
                csv_format=CsvFormat(
                    delimiter=str(config["csv-delimiter"]) if config.get("csv-delimiter") else None,
                    encoding=str(config.get("csv-encoding") or "utf-8"),
                ),
                dataset=str(config.get("dataset", "")),
                memory_bytes=_memory_bytes(config.get("memory-mb", NODE_MEMORY_BYTES >> 20)),
            )
        except KeyError as exc:
            raise ConfigError(f"node config lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node config is malformed: {exc}") from None
        if not settings.epsilon_cap > 0 or not 0 < settings.cap_delta < 1:
            raise ConfigError("node config: epsilon-cap must be > 0 and cap-delta in (0, 1)")
        return settings

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        """A deployed site's node config, or a simulated partner's derived settings.

        Flower's simulation engine gives each virtual node only
        ``partition-id``/``num-partitions``. For many-partner experiments the
        run config then names a ``fedvault data split`` directory
        (``sim-data-dir``) and the nodes' cap (``sim-epsilon-cap``); virtual
        partner ``i`` reads ``partner-{i}/`` there and keeps its ledger in
        ``ledgers/partner-{i}.db`` beside it. Deployed nodes never take this
        path: their node config always names their partner.
        """
        node = dict(context.node_config)
        if "partner" in node or "partition-id" not in node:
            return cls.from_node_config(node)
        run = dict(context.run_config)
        data_dir = str(run.get("sim-data-dir", ""))
        if not data_dir:
            raise ConfigError(
                "simulated node: the run config must set sim-data-dir "
                "(a `fedvault data split` directory) and sim-epsilon-cap"
            )
        try:
            partner = f"partner-{int(node['partition-id'])}"
        except (TypeError, ValueError):
            raise ConfigError("simulated node: partition-id is not an integer") from None
        root = Path(data_dir)
        return cls.from_node_config(
            {
                "partner": partner,
                "train-csv": str(root / partner / "train.csv"),
                "test-csv": str(root / partner / "test.csv"),
                "ledger": str(root / "ledgers" / f"{partner}.db"),
                "epsilon-cap": run.get("sim-epsilon-cap", 0.0),
            }
        )


def _memory_bytes(value: Any) -> int:
    """The node config's ``memory-mb`` (MiB per encoded table) in bytes."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
        raise ConfigError(
            f"node config: memory-mb must be a whole number of MiB from 1 to 1048576, got {value!r}"
        )
    return value << 20


class Refusal(FedvaultError):
    """Raised inside a handler to answer with a typed refusal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _refusal(message: Message, code: str, text: str, partner: str) -> Message:
    log.warning("refusing %s: %s (%s)", message.metadata.message_type, code, text)
    record = ConfigRecord({"code": code, "message": text, "partner": partner})
    content = RecordDict({wire.REFUSAL: record})
    return Message(content, reply_to=message)


def _handle(message: Message, context: Context, handler: Any) -> Message:
    """Run ``handler`` and turn every expected failure into a typed refusal."""
    partner = ""
    try:
        settings = NodeSettings.from_context(context)
        partner = settings.partner
        return handler(message, settings)  # type: ignore[no-any-return]
    except Refusal as exc:
        return _refusal(message, exc.code, str(exc), partner)
    except DataError as exc:
        # The cell's value stays here: the coordinator learns where and what kind.
        return _refusal(message, wire.REFUSE_DATA, without_cells(str(exc)), partner)
    except ConflictError as exc:
        return _refusal(message, wire.REFUSE_CONFLICT, str(exc), partner)
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        return _refusal(message, wire.REFUSE_REQUEST, f"malformed request: {exc}", partner)


def _run_record(message: Message) -> ConfigRecord:
    try:
        return message.content.config_records[wire.RUN]
    except KeyError:
        raise Refusal(wire.REFUSE_REQUEST, "message has no run record") from None


def _load(settings: NodeSettings, schema: DataSchema) -> tuple[PartnerData, PartnerData]:
    fmt, storage = settings.csv_format, settings.storage
    return (
        load_partner_data(settings.train_csv, schema, fmt, storage),
        load_partner_data(settings.test_csv, schema, fmt, storage),
    )


def _run_schema(run: ConfigRecord, settings: NodeSettings) -> DataSchema:
    """The run's schema, if it is for the table this site holds.

    The node's ledger and lifetime cap are kept per table name, and the name
    comes with the run: a site that knows its table (a kit's ``dataset``)
    refuses a run under any other name, so no coordinator can start a fresh
    budget on the same data by renaming it.
    """
    schema = from_json(wire.config_str(run, "schema"))
    if settings.dataset and schema.name != settings.dataset:
        raise Refusal(
            wire.REFUSE_REQUEST,
            f"this site holds table {settings.dataset!r}; the run is for {schema.name!r}",
        )
    return schema


def _schema(run: ConfigRecord, settings: NodeSettings) -> tuple[DataSchema, Encoding]:
    schema = _run_schema(run, settings)
    return schema, encoding_for(schema)


def _eval_sums(
    spec: ModelSpec, encoding: Encoding, params: list[Any], scaler: Scaler, data: PartnerData
) -> list[float]:
    """The held-out split's metric sums, block by block (they add up)."""
    targets = encoding.encode_target(data.labels)
    parts: list[list[float]] = []
    start = 0
    for block in data.rows.blocks():
        stop = start + len(block)
        parts.append(
            partner_sums(
                spec,
                params,
                scaler.apply(block),
                targets[start:stop],
                target_scale=encoding.target_scale,
            )
        )
        start = stop
    return combine(parts)


def _seed(run: ConfigRecord, partner: str, round_: int) -> int:
    digest = hashlib.sha256(f"{wire.config_int(run, 'seed')}:{partner}:{round_}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _digest(message: Message) -> str:
    run = dict(_run_record(message))
    parts = [json.dumps(run, sort_keys=True, default=str).encode()]
    for name in (wire.MODEL, wire.SCALER):
        if name in message.content.array_records:
            parts.extend(
                a.tobytes() for a in message.content.array_records[name].to_numpy_ndarrays()
            )
    return request_digest(*parts)


def _charge(
    ledger: NodeLedger,
    settings: NodeSettings,
    schema: DataSchema,
    run: ConfigRecord,
    round_: int,
    mechanism: str,
    event: GaussianEvent,
    max_grad_norm: float,
) -> PrivacyCharge:
    """Check the site's lifetime cap, then return the charge this release costs.

    Two ε are computed: the lifetime ε of this dataset across *all* runs at the
    site's δ (enforced against the site's cap), and this run's ε at the run's δ
    (recorded, and recomputed by the coordinator from the same charges).
    """
    lifetime = ledger.lifetime_epsilon(schema.name, settings.cap_delta, [event])
    if lifetime > settings.epsilon_cap:
        raise Refusal(
            wire.REFUSE_BUDGET,
            f"partner {settings.partner}: this release would bring the lifetime ε of dataset "
            f"{schema.name!r} to {lifetime:.3f}, past this site's cap of {settings.epsilon_cap}",
        )
    run_id = wire.config_str(run, "run-id")
    delta = wire.config_float(run, "delta")
    prior = [c.event for c in ledger.charges(schema.name, run_id)]
    return PrivacyCharge(
        run_id=run_id,
        round=round_,
        mechanism=mechanism,
        noise_multiplier=event.noise_multiplier,
        sample_rate=event.sample_rate,
        steps=event.steps,
        max_grad_norm=max_grad_norm,
        delta=delta,
        accountant=ACCOUNTANT_NAME,
        accountant_version=accountant_version(),
        epsilon_after=epsilon([*prior, event], delta),
    )


def _reply_from_cache(message: Message, blob: bytes) -> Message:
    arrays, meta = wire.unpack_payload(blob)
    content = RecordDict()
    for name, values in arrays.items():
        content[name] = ArrayRecord(numpy_ndarrays=values)
    for name, record in meta.get("configs", {}).items():
        content[name] = ConfigRecord(record)
    for name, record in meta.get("metrics", {}).items():
        content[name] = MetricRecord(record)
    return Message(content, reply_to=message)


def _cache_and_reply(
    message: Message,
    ledger: NodeLedger,
    dataset: str,
    charge: PrivacyCharge,
    digest: str,
    arrays: dict[str, list[Any]],
    configs: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
) -> Message:
    blob = wire.pack_payload(arrays, {"configs": configs, "metrics": metrics})
    ledger.record(
        dataset, [charge], run_id=charge.run_id, round_=charge.round, digest=digest, reply=blob
    )
    return _reply_from_cache(message, blob)


@app.query("stats")
def stats(message: Message, context: Context) -> Message:
    """Validate local data against the federation's schema; release DP sums."""
    return _handle(message, context, _stats)


def _stats(message: Message, settings: NodeSettings) -> Message:
    run = _run_record(message)
    schema, encoding = _schema(run, settings)
    train, test = _load(settings, schema)
    with NodeLedger(settings.ledger) as ledger:
        digest = _digest(message)
        cached = ledger.cached_reply(schema.name, wire.config_str(run, "run-id"), 0, digest)
        if cached is not None:
            return _reply_from_cache(message, cached)
        sigma = wire.config_float(run, "stats-noise-multiplier")
        event = GaussianEvent(sigma, 1.0, 1)
        charge = _charge(ledger, settings, schema, run, 0, MECHANISM_GAUSSIAN_SUMS, event, 1.0)
        if wire.config_bool(run, "secure-mode"):
            # The OS CSPRNG: a seeded generator's noise is known to whoever
            # knows the run's seed, the coordinator included.
            from secure import csprng

            noise = csprng.hardened_normal(
                release_std(sigma, encoding.width), 2 * encoding.width + 1
            )
            sums = clipped_sums_of(train.rows.blocks(), encoding).plus(noise)
        else:
            rng = np.random.default_rng(_seed(run, settings.partner, 0))
            exact = clipped_sums_of(train.rows.blocks(), encoding)
            sums = with_gaussian_noise(exact, encoding, sigma, rng)
        partner = {"name": settings.partner, "n-train": train.n_rows, "n-test": test.n_rows}
        return _cache_and_reply(
            message,
            ledger,
            schema.name,
            charge,
            digest,
            {wire.SUMS: [sums.sum, sums.sum_sq, np.array([sums.count])]},
            {wire.PARTNER: partner, wire.CHARGE: wire.charge_to_record(charge)},
            {},
        )


@app.query("bounds")
def bounds(message: Message, context: Context) -> Message:
    """Release noisy histograms of numeric columns, for DP bounds (charged)."""
    return _handle(message, context, _bounds)


def _bounds(message: Message, settings: NodeSettings) -> Message:
    from clients.data import column_histograms
    from fedvault.bounds import MECHANISM_DP_HISTOGRAM, summed_noise_std

    run = _run_record(message)
    schema = _run_schema(run, settings)  # a draft: bounds are what is asked
    columns = json.loads(wire.config_str(run, "columns"))
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise Refusal(wire.REFUSE_REQUEST, "columns must be a list of column names")
    numeric = {f.name for f in schema.features if f.numeric} | (
        {schema.label} if schema.is_regression else set()
    )
    if not columns or not set(columns) <= numeric:
        raise Refusal(wire.REFUSE_REQUEST, "the bounds query names columns the schema has not")
    histograms = column_histograms(
        settings.train_csv, columns, schema.missing_values, settings.csv_format
    )
    with NodeLedger(settings.ledger) as ledger:
        digest = _digest(message)
        cached = ledger.cached_reply(schema.name, wire.config_str(run, "run-id"), 0, digest)
        if cached is not None:
            return _reply_from_cache(message, cached)
        sigma = wire.config_float(run, "noise-multiplier")
        if not sigma > 0:
            raise Refusal(wire.REFUSE_REQUEST, "the bounds query must be noised (σ > 0)")
        event = GaussianEvent(sigma, 1.0, 1)
        charge = _charge(ledger, settings, schema, run, 0, MECHANISM_DP_HISTOGRAM, event, 1.0)
        # Always the OS CSPRNG: nothing here needs to be reproducible, and a
        # seeded generator's noise is known to whoever knows the seed.
        from secure import csprng

        counts = histograms + csprng.hardened_normal(
            summed_noise_std([sigma], len(columns)), histograms.size
        ).reshape(histograms.shape)
        return _cache_and_reply(
            message,
            ledger,
            schema.name,
            charge,
            digest,
            {wire.HISTOGRAMS: [counts]},
            {wire.PARTNER: {"name": settings.partner}, wire.CHARGE: wire.charge_to_record(charge)},
            {},
        )


def _model_and_scaler(message: Message, spec: ModelSpec) -> tuple[list[Any], Scaler]:
    params = [
        np.asarray(a, dtype=np.float32)
        for a in message.content.array_records[wire.MODEL].to_numpy_ndarrays()
    ]
    check_parameters(spec, params)
    mean, std = message.content.array_records[wire.SCALER].to_numpy_ndarrays()
    if not (np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ConfigError("scaler std must be finite and positive")
    return params, Scaler(mean=mean.astype(np.float64), std=std.astype(np.float64))


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round: evaluate the incoming global model, then DP-SGD from it.

    Evaluation of the received model rides in the same message as training, so
    a round costs one message per partner instead of two.
    """
    return _handle(message, context, _train)


def _train(message: Message, settings: NodeSettings) -> Message:
    run = _run_record(message)
    schema, encoding = _schema(run, settings)
    spec = ModelSpec.model_validate_json(wire.config_str(run, "model-spec"))
    if spec.n_features != encoding.width or spec.n_classes != schema.n_outputs:
        raise Refusal(wire.REFUSE_REQUEST, "the model does not fit the run's schema")
    round_ = wire.config_int(run, "round")
    private = wire.config_bool(run, "private")
    if not private and not settings.allow_non_private:
        raise Refusal(wire.REFUSE_REQUEST, "this site does not train without differential privacy")
    train_data, test_data = _load(settings, schema)
    with NodeLedger(settings.ledger) as ledger:
        digest = _digest(message)
        cached = ledger.cached_reply(schema.name, wire.config_str(run, "run-id"), round_, digest)
        if cached is not None:
            return _reply_from_cache(message, cached)
        from clients.training import LocalPlan, model_input, sample_rate, train_local

        plan = LocalPlan(
            learning_rate=wire.config_float(run, "learning-rate"),
            momentum=wire.config_float(run, "momentum"),
            batch_size=wire.config_int(run, "batch-size"),
            steps=wire.config_int(run, "local-steps"),
            noise_multiplier=wire.config_float(run, "noise-multiplier"),
            max_grad_norm=wire.config_float(run, "max-grad-norm"),
            private=private,
            secure_mode=wire.config_bool(run, "secure-mode"),
        )
        q = sample_rate(plan.batch_size, train_data.n_rows)
        if private:
            event = GaussianEvent(plan.noise_multiplier, q, plan.steps)
            charge = _charge(
                ledger, settings, schema, run, round_, MECHANISM_DP_SGD, event, plan.max_grad_norm
            )
        else:
            # Recorded, never skipped: a ledger must not hide that data was used.
            # ε = ∞ poisons every later lifetime check on this dataset.
            charge = non_private_charge(
                wire.config_str(run, "run-id"),
                round_,
                q,
                plan.steps,
                wire.config_float(run, "delta"),
            )
        params, scaler = _model_and_scaler(message, spec)
        sums = _eval_sums(spec, encoding, params, scaler, test_data)
        result = train_local(
            spec,
            params,
            model_input(train_data.rows, scaler),
            encoding.encode_target(train_data.labels),
            plan,
            seed=_seed(run, settings.partner, round_),
        )
        metrics = {
            "num-examples": train_data.n_rows,
            "num-test": test_data.n_rows,
            "eval-sums": sums,
        }
        return _cache_and_reply(
            message,
            ledger,
            schema.name,
            charge,
            digest,
            {wire.MODEL: result.params},
            {wire.CHARGE: wire.charge_to_record(charge), wire.PARTNER: {"name": settings.partner}},
            {wire.METRICS: metrics},
        )


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    """Evaluate a model on this site's held-out split (no privacy charge: only
    aggregate loss/accuracy of a held-out split leave, as in every round)."""
    return _handle(message, context, _evaluate)


def _evaluate(message: Message, settings: NodeSettings) -> Message:
    run = _run_record(message)
    schema, encoding = _schema(run, settings)
    spec = ModelSpec.model_validate_json(wire.config_str(run, "model-spec"))
    test_data = load_partner_data(settings.test_csv, schema, settings.csv_format, settings.storage)
    params, scaler = _model_and_scaler(message, spec)
    sums = _eval_sums(spec, encoding, params, scaler, test_data)
    metrics = MetricRecord({"num-test": test_data.n_rows, "eval-sums": sums})
    content = RecordDict(
        {wire.METRICS: metrics, wire.PARTNER: ConfigRecord({"name": settings.partner})}
    )
    return Message(content, reply_to=message)
