"""``fedvault partner add|revoke|list``, ``federation fleet-proxy`` and ``node start --kit``.

The operator issues one startup kit per partner and can revoke it; partner IT
runs one command with the kit. See :mod:`fedvault.cli.kits` for what a kit
holds and why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedvault.addresses import check_address, check_host, check_port
from fedvault.cli.options import HomeOpt
from fedvault.settings import load_settings
from fedvault.training_config import DatasetName

from . import federation as fed
from . import kits
from .processes import ProcessGroup

if TYPE_CHECKING:
    from server.http_serving import ConnectionLimits

partner_app = typer.Typer(
    help="Operator: issue and revoke partners' startup kits.", no_args_is_help=True
)

console = Console(stderr=True, soft_wrap=True, markup=False)
out = Console(soft_wrap=True, markup=False)


def _paths(home: Path | None) -> fed.FederationPaths:
    settings = load_settings(home=home)
    return fed.FederationPaths(
        settings.home,
        connect_retries=settings.connect_retries,
        connect_backoff_s=settings.connect_backoff_s,
    )


@partner_app.command("add")
def partner_add(
    name: Annotated[str, typer.Argument(help="Partner name (letters, digits, '-', '_').")],
    superlink: Annotated[
        str, typer.Option(help="host:port of the Fleet API as partners reach it.")
    ],
    home: HomeOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Kit directory (default HOME/kits/NAME).")
    ] = None,
    dataset: Annotated[
        DatasetName, typer.Option(help="Built-in table the partner's data must match.")
    ] = "digits",
    schema_file: Annotated[
        Path | None,
        typer.Option("--schema", help="The federation's schema.toml (copied into the kit)."),
    ] = None,
    epsilon_cap: Annotated[
        float, typer.Option(help="Default local lifetime ε cap in the node config.")
    ] = 10.0,
    metrics_host: Annotated[
        list[str] | None,
        typer.Option(help="Extra host names/IPs for the node's metrics certificate."),
    ] = None,
) -> None:
    """Issue a startup kit for NAME and register its node key with the SuperLink.

    If the SuperLink is not running, the key is registered at the next
    `fedvault federation up`.
    """
    from fedvault.schema import load_schema, to_toml

    paths = _paths(home)
    target = out_dir if out_dir is not None else paths.home / "kits" / name
    schema = load_schema(schema_file) if schema_file is not None else None
    _, registered = kits.add_partner(
        paths,
        name,
        out=target,
        superlink=superlink,
        dataset=schema.name if schema is not None else dataset,
        epsilon_cap=epsilon_cap,
        metrics_hosts=metrics_host or [],
        schema_text=to_toml(schema) if schema is not None else None,
    )
    when = "registered now" if registered else "registered at the next `fedvault federation up`"
    out.print(f"kit for {name} in {target} (node key {when}); hand it to the partner privately")


@partner_app.command("revoke")
def partner_revoke(
    name: Annotated[str, typer.Argument(help="Partner to revoke.")],
    home: HomeOpt = None,
) -> None:
    """Revoke NAME's kit: its node is disconnected and refused from now on."""
    paths = _paths(home)
    record = kits.revoke_partner(paths, name)
    if record.unregistered:
        out.print(f"{name} revoked and unregistered from the SuperLink")
    else:
        out.print(f"{name} revoked; it is unregistered at the next `fedvault federation up`")


@partner_app.command("list")
def partner_list(home: HomeOpt = None) -> None:
    """Partners with kits: status and Flower node id."""
    table = Table("partner", "status", "node id", "created", "revoked")
    for rec in kits.load_partners(_paths(home)).values():
        table.add_row(
            rec.name,
            rec.status,
            str(rec.node_id or ""),
            rec.created_at,
            rec.revoked_at or "",
        )
    out.print(table)


def fleet_proxy(
    home: Path | None,
    listen: str,
    upstream: str,
    limits: ConnectionLimits | None = None,
) -> None:
    """Run the Fleet-only proxy in the foreground (see :mod:`server.fleet_proxy`)."""
    from server.fleet_proxy import serve

    paths = _paths(home)
    host, port = check_address(listen, "--listen")
    check_address(upstream, "--upstream")
    serve(
        listen_host=host,
        listen_port=port,
        upstream=upstream,
        ca_cert=paths.ca_cert,
        certfile=paths.server_cert,
        keyfile=paths.server_key,
        limits=limits,
    )


def run_node_from_kit(kit_dir: Path, config: Path | None, overrides: kits.NodeOverrides) -> None:
    """What partner IT runs: check kit, validate data, check the SuperLink, run, report."""
    from clients.data import CsvFormat, count_valid_rows
    from clients.node_health import HealthServer, NodeMonitor, NodeWatch

    kit = kits.load_kit(kit_dir, config)
    node = kit.config.node
    console.print(
        f"kit ok: partner {node.partner}, federation {kit.config.federation.name}, "
        f"SuperLink {kit.config.federation.superlink}"
    )
    health = kit.config.health
    health_host = check_host(overrides.health_host or health.host, "--health-host / [health] host")
    health_port = check_port(
        overrides.health_port if overrides.health_port is not None else health.port,
        "--health-port / [health] port",
        allow_zero=True,
    )
    settings = kits.node_settings(kit, overrides)
    schema = kits.kit_schema(kit)
    fmt = CsvFormat(node.csv_delimiter, node.csv_encoding)
    train, test = Path(settings["train-csv"]), Path(settings["test-csv"])
    for path in (train, test):
        rows = count_valid_rows(path, schema, fmt)
        console.print(f"{path}: {rows} rows valid against schema {schema.name!r}")
    address = kit.config.federation.superlink
    if kits.check_superlink_certificate(address, kit.ca_cert):
        console.print(f"SuperLink at {address}: certificate issued by this federation's CA")
    else:
        console.print(f"SuperLink at {address} not reachable yet; the node keeps retrying")
    ledger = Path(settings["ledger"])
    # The node writes its ledger and log there: a node that cannot must not join a run.
    fed.check_writable_dir(ledger.parent, "the node's state directory")
    with ProcessGroup() as group:
        proc = kits.start_kit_supernode(group, kit, settings, ledger.parent / "supernode.log")
        monitor = NodeMonitor(
            NodeWatch(
                partner=node.partner,
                schema=schema,
                csv_format=fmt,
                train_csv=train,
                test_csv=test,
                ledger=ledger,
                epsilon_cap=node.epsilon_cap,
                cap_delta=node.cap_delta,
            ),
            alive=proc.alive,
            connected=lambda: kits.supernode_accepted(proc),
        )
        server = HealthServer(
            monitor, health_host, health_port, tls=kit.tls if health.tls else None
        )
        server.start()
        console.print(
            f"node {node.partner} started (log: {proc.log_path}); health on "
            f"{server.scheme}://{health_host}:{server.port}/healthz; "
            "Ctrl-C to stop"
        )
        announced = False
        try:
            while True:
                if not proc.alive():
                    kits.raise_for_exit(proc)
                if not announced and kits.supernode_accepted(proc):
                    console.print(f"node {node.partner} accepted by the SuperLink")
                    announced = True
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            server.stop()
