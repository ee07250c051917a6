"""``fedvault``: one command line for every role in a federation.

Every failure a user can cause surfaces as a :class:`~fedvault.errors.FedvaultError`
and leaves with the exit code of :data:`~fedvault.errors.ERROR_TABLE` and a
one-paragraph message — never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedvault.cli.options import (
    HeaderTimeoutOpt,
    HomeOpt,
    IdleTimeoutOpt,
    LogFormatOpt,
    MaxConnectionsOpt,
    connection_limits,
    connection_overrides,
)
from fedvault.database import require_store
from fedvault.errors import ConfigError, FedvaultError, UnavailableError, mapping_for
from fedvault.logs import LogFormat, configure_logging
from fedvault.settings import FedvaultSettings, load_settings
from fedvault.training_config import DatasetName, load_training_config

from . import federation as fed
from .audit import audit_app
from .gateway import gateway_app, keys_app
from .he import he_app
from .partners import partner_app
from .processes import ProcessGroup, free_port
from .schemas import data_check, schema_app
from .stores import store_app

if TYPE_CHECKING:
    from server.store import FederationStore

app = typer.Typer(
    name="fedvault",
    help="Privacy-preserving federated learning: train with DP across partners, sign and serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
federation_app = typer.Typer(
    help="Operate the federation (SuperLink + coordinator).", no_args_is_help=True
)
node_app = typer.Typer(help="Run a partner's node (SuperNode + ClientApp).", no_args_is_help=True)
runs_app = typer.Typer(help="List and inspect training runs.", no_args_is_help=True)
models_app = typer.Typer(help="List and inspect registered models.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare partner data files.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Privacy ledgers: the federation's and each node's.", no_args_is_help=True
)
for sub, name in (
    (federation_app, "federation"),
    (node_app, "node"),
    (runs_app, "runs"),
    (models_app, "models"),
    (data_app, "data"),
    (ledger_app, "ledger"),
):
    app.add_typer(sub, name=name)
app.add_typer(audit_app, name="audit")
app.add_typer(he_app, name="he")
app.add_typer(gateway_app, name="gateway")
app.add_typer(keys_app, name="keys")
app.add_typer(partner_app, name="partner")
app.add_typer(store_app, name="store")
app.add_typer(schema_app, name="schema")
data_app.command("check")(data_check)

# soft_wrap: messages name files and paths; never break them mid-word.
# markup=False: messages carry user text (ids, paths, names), and Rich would
# read "[/x]" in a run id as a closing tag and crash. Styling is explicit.
console = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(markup=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
PARTNERS = ["alpha", "beta", "gamma"]


def _settings(home: Path | None) -> FedvaultSettings:
    return load_settings(home=home)


def _federation_store(settings: FedvaultSettings, *, existing: bool = False) -> FederationStore:
    """The federation store the settings name (``FEDVAULT_FEDERATION_STORE`` or HOME's file).

    ``existing``: for commands that only read. Opening a SQLite file creates
    it, so a mistyped ``--home`` would otherwise become a new, empty
    federation that lists nothing, instead of an error.
    """
    from server.store import FederationStore

    if existing:
        require_store(
            settings.federation_location, "federation store", "run `fedvault demo` or train first"
        )
    return FederationStore(
        settings.federation_location, password_file=settings.federation_store_password_file
    )


def _paths(settings: FedvaultSettings, home: Path | None = None) -> fed.FederationPaths:
    return fed.FederationPaths(
        home if home is not None else settings.home,
        connect_retries=settings.connect_retries,
        connect_backoff_s=settings.connect_backoff_s,
    )


def _print_json(value: Any) -> None:
    out.print_json(json.dumps(value, default=str))


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    home: HomeOpt = None,
    dataset: Annotated[
        str,
        typer.Option(help="Built-in table: digits, breast-cancer, flchain, diamonds or penguins."),
    ] = "digits",
    model: Annotated[str, typer.Option(help="logreg or mlp")] = "logreg",
    rounds: Annotated[int | None, typer.Option(help="Training rounds.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target ε per partner for the run.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML training config.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a TLS federation of 3 partners on 127.0.0.1, train with DP, print a summary.

    Everything runs as real processes (flower-superlink, 3 flower-supernodes);
    all of them stop when the demo ends, fails or is interrupted.
    """
    from fedvault.datasets import DEMO_PRESETS, split_dataset

    settings = _settings(home)
    preset = {} if config is not None else DEMO_PRESETS.get(dataset, {})
    cfg = load_training_config(
        config,
        **{**preset, "dataset": dataset, "model": model},
        **({"rounds": rounds} if rounds is not None else {}),
        target_epsilon=epsilon,
    )
    demo_home = settings.home / "demo"
    if demo_home.exists():
        import shutil

        shutil.rmtree(demo_home)  # demo state only: a fresh federation every time
    paths = _paths(settings, demo_home)
    console.print(Text.assemble(("fedvault demo", "bold"), f" — state in {demo_home}"))
    fed.init_federation(paths, PARTNERS, ["127.0.0.1", "localhost"])
    split_dataset(cfg.dataset, demo_home / "data", partners=len(PARTNERS), alpha=1.0, seed=cfg.seed)
    with ProcessGroup() as group:
        port = free_port()
        fed.start_superlink(group, paths, "127.0.0.1", port)
        console.print(f"SuperLink up on 127.0.0.1:{port} (TLS, SuperNode authentication on)")
        for i, partner in enumerate(PARTNERS):
            fed.register_node(paths, partner)
            data = demo_home / "data" / f"partner-{i}"
            fed.start_supernode(
                group,
                paths,
                partner,
                superlink=f"127.0.0.1:{port}",
                node_config=_node_config(
                    paths, partner, data / "train.csv", data / "test.csv", 10.0, cfg.dataset
                ),
                port=free_port(),
            )
        console.print(f"{len(PARTNERS)} SuperNodes started: {', '.join(PARTNERS)}")
        summary = _train_and_watch(paths, cfg, resume=None, group=group, as_json=as_json)
    if summary["status"] != "finished":
        raise typer.Exit(code=1)


def _node_config(
    paths: fed.FederationPaths,
    partner: str,
    train: Path,
    test: Path,
    cap: float,
    dataset: str = "",
) -> dict[str, Any]:
    return {
        "partner": partner,
        "dataset": dataset,
        "train-csv": str(train.resolve()),
        "test-csv": str(test.resolve()),
        "ledger": str((paths.node_dir(partner) / "ledger.db").resolve()),
        "epsilon-cap": cap,
    }


def _train_and_watch(
    paths: fed.FederationPaths,
    cfg: Any,
    *,
    resume: str | None,
    group: ProcessGroup | None,
    as_json: bool,
    settings: FedvaultSettings | None = None,
) -> dict[str, Any]:
    from server.store import FederationStore

    from .watch import run_summary, wait_for_run

    run_id = resume or fed.new_run_id()
    fed.submit_run(
        paths,
        run_id=run_id,
        config=None if resume else cfg,
        resume=resume is not None,
        audit_store=settings.audit_store if settings else None,
        audit_store_password_file=settings.audit_store_password_file if settings else None,
        federation_store=settings.federation_store if settings else None,
        federation_store_password_file=(
            settings.federation_store_password_file if settings else None
        ),
    )
    console.print(f"submitted run {run_id}" + (" (resume)" if resume else ""))
    shared = settings is not None and settings.federation_store is not None
    # Wait for the coordinator to create the database file before opening it
    # (a PostgreSQL store exists already; wait_for_run waits for the run row).
    deadline = time.monotonic() + 60
    while not shared and not paths.db.exists() and time.monotonic() < deadline:
        if group is not None:
            group.check_alive()
        time.sleep(0.2)
    opened = _federation_store(settings) if shared and settings else FederationStore(paths.db)
    with opened as store:
        planned = cfg.rounds if cfg is not None else store.run(run_id).config["rounds"]
        record = wait_for_run(
            store,
            run_id,
            rounds=planned,
            console=console,
            show_progress=not as_json and sys.stderr.isatty(),
            quiet=as_json,
            liveness=group.check_alive if group is not None else lambda: None,
        )
        summary = run_summary(store, record)
    _show_summary(summary, as_json)
    return summary


def _show_summary(summary: dict[str, Any], as_json: bool) -> None:
    from .watch import summary_table

    if as_json:
        _print_json(summary)
    else:
        out.print(summary_table(summary))


# --------------------------------------------------------------------- federation
@federation_app.command("init")
def federation_init(
    name: Annotated[str, typer.Argument(help="Federation name (in its CA and kits).")] = "fedvault",
    home: HomeOpt = None,
    partners: Annotated[str, typer.Option(help="Comma-separated partner names.")] = ",".join(
        PARTNERS
    ),
    host: Annotated[
        list[str] | None, typer.Option(help="SuperLink host names/IPs for its cert.")
    ] = None,
    kits_dir: Annotated[
        Path | None,
        typer.Option(help="Issue startup kits for --partners here (DIR/NAME) instead of keys."),
    ] = None,
    superlink: Annotated[
        str | None, typer.Option(help="Fleet API host:port written into the kits.")
    ] = None,
    service: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME[=HOST,...]: a server certificate of its own for another TLS service "
            "(pki/services/NAME; hosts default to NAME). Repeatable."
        ),
    ] = None,
) -> None:
    """Create the federation's CA (key 0600), config, SuperLink certificate and model keys.

    Without --kits-dir, partners' node keys are kept in HOME/nodes (one machine,
    as the demo). With it, each partner gets a startup kit (`fedvault partner add`).
    """
    from . import kits

    names = [p for p in partners.split(",") if p]
    paths = _paths(_settings(home))
    kits.init_federation_and_kits(
        paths,
        name,
        names,
        host or ["127.0.0.1", "localhost"],
        services=fed.parse_service_specs(service or []),
        kits_dir=kits_dir,
        superlink=superlink,
    )
    where = f"; kits in {kits_dir}" if kits_dir is not None else ""
    out.print(
        f"federation {name} initialised in {paths.home} for partners: {', '.join(names)}{where}"
    )


@federation_app.command("up")
def federation_up(
    home: HomeOpt = None,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = a free one).")] = 0,
    fleet_host: Annotated[
        str | None,
        typer.Option(help="Serve only the Fleet API here, for partners (TLS proxy)."),
    ] = None,
    fleet_port: Annotated[int, typer.Option(help="Port of the Fleet-only proxy.")] = 9092,
    metrics_host: Annotated[
        str | None, typer.Option(help="Bind address of /metrics (default: --host).")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="Serve the federation's Prometheus metrics (TLS) here; 0 = off.")
    ] = 0,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Run the SuperLink (TLS + SuperNode auth) and register every partner's node key.

    The SuperLink serves Fleet, Control and Runtime APIs on one address, and
    the Control API has no authentication: keep --host on loopback or a private
    operator network and give partners --fleet-host, a proxy that forwards only
    /v1/fleet/. The coordinator runs as the SuperLink's ServerApp for each
    `fedvault train`. Stops on Ctrl-C.
    """
    from . import kits

    configure_logging(log_format, export=True)
    paths = _paths(_settings(home))
    if not paths.ca_cert.exists():
        raise ConfigError(f"{paths.home} has no federation; run `fedvault federation init` first")
    fed.check_up_options(
        host,
        port,
        fleet_host=fleet_host,
        fleet_port=fleet_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
    )
    with ProcessGroup() as group:
        port = port or free_port(host)
        proc = fed.start_superlink(group, paths, host, port)
        registered, unregistered = kits.sync_registrations(paths)
        out.print(f"SuperLink on {host}:{port}; registered nodes: {', '.join(registered)}")
        if unregistered:
            out.print(f"unregistered revoked nodes: {', '.join(unregistered)}")
        procs = [proc]
        if fleet_host is not None:
            procs.append(kits.start_fleet_proxy(group, paths, fleet_host, fleet_port, host, port))
            out.print(f"Fleet API for partners on {fleet_host}:{fleet_port} (Fleet only)")
        if metrics_port:
            from server.federation_metrics import serve_federation_metrics

            bind = metrics_host or host
            settings = _settings(home)
            serve_federation_metrics(
                settings.federation_location if settings.federation_store else paths.db,
                bind,
                metrics_port,
                certfile=paths.server_cert,
                keyfile=paths.server_key,
                password_file=settings.federation_store_password_file,
            )
            out.print(f"federation metrics on https://{bind}:{metrics_port}/metrics")
        out.print("Ctrl-C to stop.")
        try:
            while True:
                for p in procs:
                    p.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")


@federation_app.command("fleet-proxy")
def federation_fleet_proxy(
    listen: Annotated[str, typer.Option(help="host:port partners reach.")],
    upstream: Annotated[str, typer.Option(help="host:port of the SuperLink (private).")],
    home: HomeOpt = None,
    header_timeout: HeaderTimeoutOpt = None,
    idle_timeout: IdleTimeoutOpt = None,
    max_connections: MaxConnectionsOpt = None,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Serve only the SuperLink's Fleet API (TLS in and out); `federation up --fleet-host`."""
    from .partners import fleet_proxy

    configure_logging(log_format)
    settings = load_settings(
        home=home, **connection_overrides(header_timeout, idle_timeout, max_connections)
    )
    fleet_proxy(home, listen, upstream, connection_limits(settings))


# --------------------------------------------------------------------------- node
@node_app.command("start")
def node_start(
    partner: Annotated[str | None, typer.Option(help="This partner's name.")] = None,
    train_csv: Annotated[Path | None, typer.Option(help="Local training CSV.")] = None,
    test_csv: Annotated[Path | None, typer.Option(help="Local held-out CSV.")] = None,
    kit: Annotated[
        Path | None, typer.Option(help="Startup kit directory (all a partner needs).")
    ] = None,
    kit_config: Annotated[
        Path | None, typer.Option(help="node.toml to use instead of the kit's.")
    ] = None,
    ledger: Annotated[Path | None, typer.Option(help="With --kit: ledger path.")] = None,
    health_host: Annotated[str | None, typer.Option(help="With --kit: health bind.")] = None,
    health_port: Annotated[int | None, typer.Option(help="With --kit: health port.")] = None,
    home: HomeOpt = None,
    superlink: Annotated[str | None, typer.Option(help="host:port of the SuperLink.")] = None,
    epsilon_cap: Annotated[float, typer.Option(help="Lifetime ε cap for this dataset.")] = 10.0,
    dataset: Annotated[
        str, typer.Option(help="Built-in table to validate against before starting.")
    ] = "digits",
    schema_file: Annotated[
        Path | None,
        typer.Option("--schema", help="The federation's schema.toml (instead of --dataset)."),
    ] = None,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Validate local data, then run this partner's SuperNode until Ctrl-C.

    With --kit: check the kit, validate the data, check the SuperLink's
    certificate against the kit's CA, run the node and serve /healthz and
    /metrics; --train-csv/--test-csv/--ledger override the kit's node.toml.
    """
    from clients.data import count_valid_rows
    from fedvault.schema import builtin_schema, load_schema

    configure_logging(log_format, export=True)
    if kit is not None:
        from .kits import NodeOverrides
        from .partners import run_node_from_kit

        run_node_from_kit(
            kit,
            kit_config,
            NodeOverrides(train_csv, test_csv, ledger, health_host, health_port),
        )
        return
    if partner is None or train_csv is None or test_csv is None:
        raise ConfigError("give --kit DIR, or --partner, --train-csv and --test-csv")
    schema = load_schema(schema_file) if schema_file else builtin_schema(dataset)
    for path in (train_csv, test_csv):
        rows = count_valid_rows(path, schema)
        out.print(f"{path}: {rows} rows valid against schema {schema.name!r}")
    paths = _paths(_settings(home))
    if not paths.node_key(partner).exists():
        raise ConfigError(f"no node key for partner {partner!r} in {paths.node_dir(partner)}")
    address = superlink or fed.read_address(paths)
    with ProcessGroup() as group:
        proc = fed.start_supernode(
            group,
            paths,
            partner,
            superlink=address,
            node_config=_node_config(paths, partner, train_csv, test_csv, epsilon_cap, schema.name),
            port=free_port(),
        )
        out.print(f"node {partner} connecting to {address} (log: {proc.log_path}); Ctrl-C to stop")
        try:
            while True:
                proc.check_alive()
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")


# -------------------------------------------------------------------------- train
@app.command()
def train(
    home: HomeOpt = None,
    config: Annotated[Path | None, typer.Option(help="TOML training config.")] = None,
    dataset: Annotated[DatasetName | None, typer.Option()] = None,
    model: Annotated[str | None, typer.Option()] = None,
    rounds: Annotated[int | None, typer.Option()] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target ε per partner.")] = None,
    resume: Annotated[
        str | None, typer.Option(help="Resume RUN_ID from its last checkpoint.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a training run to a running federation and follow it."""
    settings = _settings(home)
    paths = _paths(settings)
    fed.read_address(paths)
    cfg = None
    if resume is None:
        cfg = load_training_config(
            config, dataset=dataset, model=model, rounds=rounds, target_epsilon=epsilon
        )
    else:
        with _federation_store(settings, existing=True) as store:
            record = store.run(resume)
            if record.status == "finished":
                raise ConfigError(f"run {resume} already finished; nothing to resume")
            store.checkpoint(resume)  # refuse early on a corrupt checkpoint
    summary = _train_and_watch(
        paths, cfg, resume=resume, group=None, as_json=as_json, settings=settings
    )
    if summary["status"] != "finished":
        raise typer.Exit(code=1)


# ---------------------------------------------------------------- runs and models
@runs_app.command("list")
def runs_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """All runs, oldest first."""

    with _federation_store(_settings(home), existing=True) as store:
        runs = store.runs()
    if as_json:
        _print_json(
            [
                {
                    "run_id": r.run_id,
                    "status": r.status,
                    "round": r.current_round,
                    "model_id": r.model_id,
                    "created_at": r.created_at,
                }
                for r in runs
            ]
        )
        return
    table = Table("run", "status", "round", "model", "created")
    for r in runs:
        table.add_row(r.run_id, r.status, str(r.current_round), r.model_id or "", r.created_at)
    out.print(table)


@runs_app.command("show")
def runs_show(run_id: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """One run: status, accuracy per round, ε per partner, model."""

    from .watch import run_summary

    with _federation_store(_settings(home), existing=True) as store:
        summary = run_summary(store, store.run(run_id))
    _show_summary(summary, as_json)


def _registry(home: Path | None) -> Any:
    import os

    from server.registry import ModelRegistry, load_model_keys

    settings = _settings(home)
    keys = load_model_keys(  # first: a missing key is the fault to report, not an empty store
        settings.keys_dir, encryption_key_b64=os.environ.get(settings.model_key_env), signing=False
    )
    store = _federation_store(settings, existing=True)
    return store, ModelRegistry(store, settings.registry_dir, keys)


@models_app.command("list")
def models_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Registered model versions."""

    from fedvault.metrics import headline

    with _federation_store(_settings(home), existing=True) as store:
        models = store.models()
    if as_json:
        _print_json([{k: v for k, v in m.items() if k != "lineage"} for m in models])
        return
    table = Table("model", "name", "version", "run", "task", "final metric", "created")
    for m in models:
        final = m["lineage"].get("metrics", {}).get("final", {})
        task = str(m["lineage"].get("task", "classification"))
        table.add_row(
            m["model_id"],
            m["name"],
            str(m["version"]),
            m["run_id"],
            task,
            headline(final),
            m["created_at"],
        )
    out.print(table)


@models_app.command("show")
def models_show(model_id: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """A model's lineage and privacy statement, after verifying its artifact."""
    store, registry = _registry(home)
    try:
        loaded = registry.load(model_id)  # verifies signature + decrypts; refuses tampering
        row = store.model(model_id)
    finally:
        store.close()
    info = {
        "model_id": model_id,
        "name": row["name"],
        "version": row["version"],
        "signature": "verified",
        "signing_key_id": row["signing_key_id"],
        "spec": loaded.spec.model_dump(),
        "lineage": loaded.lineage,
    }
    if as_json:
        _print_json(info)
        return
    table = Table(title=f"model {model_id}", show_header=False)
    table.add_row("signature", f"verified (Ed25519 key {row['signing_key_id']})")
    table.add_row("architecture", loaded.spec.model_dump_json())
    lineage = loaded.lineage
    for key in (
        "run_id",
        "dataset",
        "schema_hash",
        "partners",
        "rounds_completed",
        "delta",
        "accountant",
    ):
        table.add_row(key, str(lineage.get(key)))
    schema = lineage.get("schema") or {}
    if schema:
        table.add_row("task", _schema_task(schema))
        table.add_row("inputs", _schema_inputs(schema))
    table.add_row("epsilon", json.dumps(lineage.get("epsilon")))
    table.add_row("final metrics", json.dumps(lineage.get("metrics", {}).get("final")))
    table.add_row("privacy statement", lineage.get("privacy_statement", ""))
    out.print(table)


def _schema_task(schema: dict[str, Any]) -> str:
    """``multiclass: label species (Adelie, Chinstrap, Gentoo)`` and the like."""
    task, label = str(schema.get("task")), schema.get("label")
    if task == "regression":
        target = schema.get("target") or {}
        return f"regression: label {label} in [{target.get('min')}, {target.get('max')}]"
    classes = ", ".join(str(c) for c in schema.get("classes") or [])
    return f"{task}: label {label}" + (f" ({classes})" if classes else "")


def _schema_inputs(schema: dict[str, Any]) -> str:
    """The raw columns a caller sends, with their types (what the gateway takes)."""
    features = schema.get("features") or []
    columns = ", ".join(f"{f.get('name')} ({f.get('type')})" for f in features)
    return f"{len(features)} columns: {columns}"


# --------------------------------------------------------------------------- data
@data_app.command("split")
def data_split(
    dataset: Annotated[
        DatasetName,
        typer.Option(help="Built-in table: digits, breast-cancer, flchain, diamonds or penguins."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    partners: int = 3,
    alpha: Annotated[float, typer.Option(help="Dirichlet α (smaller = more non-IID).")] = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    as_json: JsonOpt = False,
) -> None:
    """Split a shipped dataset into per-partner train/test CSVs (non-IID, seeded)."""
    from fedvault.datasets import split_dataset

    manifest = split_dataset(
        dataset,
        out_dir,
        partners=partners,
        alpha=alpha,
        test_fraction=test_fraction,
        seed=seed,
        overwrite=overwrite,
    )
    if as_json:
        _print_json(manifest.model_dump(mode="json"))
        return
    out.print(f"wrote {partners} partner splits of {dataset} to {out_dir}")


# ------------------------------------------------------------------------- ledger
@ledger_app.command("show")
def ledger_show(
    run_id: str,
    home: HomeOpt = None,
    node_ledger: Annotated[
        list[str] | None,
        typer.Option(help="PARTNER=PATH of a node's ledger.db (default: the home's nodes/)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The federation's ledger of a run beside each node's own, and whether they agree."""
    from .ledgers import compare_ledgers

    settings = _settings(home)
    paths = _paths(settings)
    node_paths: dict[str, Path] = {}
    for item in node_ledger or []:
        name, _, path = item.partition("=")
        if not path:
            raise ConfigError(f"--node-ledger expects PARTNER=PATH, got {item!r}")
        node_paths[name] = Path(path)
    if not node_paths and (paths.home / "nodes").exists():
        for d in sorted((paths.home / "nodes").iterdir()):
            if (d / "ledger.db").exists():
                node_paths[d.name] = d / "ledger.db"
    location = settings.federation_location if settings.federation_store else paths.db
    require_store(location, "federation store", "run `fedvault demo` or train first")
    report = compare_ledgers(
        location,
        run_id,
        node_paths,
        password_file=settings.federation_store_password_file,
    )
    if as_json:
        _print_json(report)
    else:
        table = Table(
            "partner",
            "round",
            "mechanism",
            "σ",
            "q",
            "steps",
            "ε after (coordinator)",
            "ε after (node)",
        )
        for row in report["rows"]:
            table.add_row(
                row["partner"],
                str(row["round"]),
                row["mechanism"],
                f"{row['noise_multiplier']:.4f}",
                f"{row['sample_rate']:.4f}",
                str(row["steps"]),
                _fmt_eps(row["coordinator_epsilon"]),
                _fmt_eps(row["node_epsilon"]),
            )
        out.print(table)
        out.print(
            "views agree"
            if report["agree"]
            else Text.assemble(("views DISAGREE", "red"), f": {report['problems']}")
        )
    if not report["agree"]:
        raise typer.Exit(code=1)


def _fmt_eps(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------- entrypoint
def _error(message: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)


def _undecodable_argument() -> int | None:
    """Position of the first argument that is not valid UTF-8 (Python keeps such bytes
    as lone surrogates, which fail only later, deep inside, when printed or encoded)."""
    for position, arg in enumerate(sys.argv[1:], start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return position
    return None


def run() -> None:
    """Console-script entry point: map fedvault errors to exit codes and messages."""
    bad = _undecodable_argument()
    if bad is not None:
        _error(f"argument {bad} is not valid UTF-8 text")
        sys.exit(mapping_for(ConfigError()).exit_code)
    try:
        # Without standalone mode click *returns* the code of a typer.Exit.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except FedvaultError as exc:
        _error(str(exc))
        sys.exit(mapping_for(exc).exit_code)
    except (ConnectionError, TimeoutError) as exc:
        # A safety net: the service layers translate these; one that slipped
        # through still gets a line, not a traceback.
        _error(f"cannot connect: {exc.strerror or type(exc).__name__}")
        sys.exit(mapping_for(UnavailableError()).exit_code)
    except OSError as exc:
        # A local file or directory the user named (or their HOME) cannot be
        # used: a configuration fault, reported with the path and the reason.
        where = f" ({exc.filename})" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        sys.exit(mapping_for(ConfigError()).exit_code)
    except KeyboardInterrupt:
        console.print("interrupted; all processes stopped")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


__all__ = ["UnavailableError", "app", "run"]
