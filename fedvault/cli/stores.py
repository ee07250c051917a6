"""``fedvault store migrate``: bring a HOME's SQLite stores to the PostgreSQL deployment.

The destinations are the settings every other command reads
(``FEDVAULT_FEDERATION_STORE``, ``FEDVAULT_GATEWAY_STORE``,
``FEDVAULT_AUDIT_STORE``, each with its ``…_PASSWORD_FILE``); a store whose
setting is unset is skipped. What is copied and checked is in
:mod:`server.migrate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedvault.cli.options import HomeOpt
from fedvault.errors import FedvaultError, mapping_for
from fedvault.settings import load_settings

if TYPE_CHECKING:
    from server.migrate import StoreReport

store_app = typer.Typer(
    help="The federation, gateway and audit stores: move them to PostgreSQL.",
    no_args_is_help=True,
)


# markup=False: messages carry paths and URLs, which Rich would parse as tags.
_err = Console(stderr=True, soft_wrap=True, markup=False)
_out = Console(soft_wrap=True, markup=False)


@store_app.command("migrate")
def migrate(
    home: HomeOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check everything and count the rows; write nothing."),
    ] = False,
    audit_key: Annotated[
        Path | None,
        typer.Option(
            "--audit-key",
            help=(
                "The audit log's signing key file, to check its signed checkpoints before "
                "and after the copy (default: HOME/keys/gateway-audit.key)."
            ),
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable JSON on stdout.")
    ] = False,
) -> None:
    """Copy HOME's SQLite stores (federation.db + registry/, gateway.db, audit.db) into the
    PostgreSQL databases named by FEDVAULT_FEDERATION_STORE, FEDVAULT_GATEWAY_STORE and
    FEDVAULT_AUDIT_STORE (with their _PASSWORD_FILE).

    Every store is checked before any is written: every row of every table (types,
    NUL characters, NULL keys, dangling references), model artifacts and training
    checkpoints against their SHA-256, the source audit log, and destinations that
    already hold data are refused. Each store is then copied in one transaction and
    read back. The SQLite files stay write-locked until the end, so stop the
    coordinator and the gateways first (their writes would wait, then fail).
    """
    from server.migrate import migrate_home

    settings = load_settings(home=home)

    def done(report: StoreReport) -> None:
        total = sum(report.rows.values())
        _err.print(f"{report.store}: {total} rows copied to {report.destination}", highlight=False)

    reports: list[StoreReport] = []
    try:
        migrate_home(
            settings, dry_run=dry_run, audit_key=audit_key, on_store=done, progress=reports
        )
    except FedvaultError as exc:
        # Which stores were committed before the failure, for whoever runs it again.
        committed = [r for r in reports if r.status in ("migrated", "failed after commit")]
        if as_json:
            typer.echo(json.dumps(_json(dry_run, reports, exc)))
        elif committed:
            _err.print(
                "committed before this failure: "
                + ", ".join(f"{r.store} ({r.setting})" for r in committed)
                + "; unset those settings to skip them when running it again",
                highlight=False,
            )
        raise
    if as_json:
        typer.echo(json.dumps(_json(dry_run, reports, None)))
        return
    _out.print(_table(reports, dry_run))
    for report in reports:
        if report.reason:
            _out.print(f"{report.store}: {report.status} ({report.reason})", highlight=False)
            continue
        _out.print(f"{report.store}: {report.status} → {report.destination}", highlight=False)
        for note in report.notes:
            _out.print(f"  {note}", highlight=False)
    if dry_run:
        _out.print("dry run: nothing was written")


def _json(
    dry_run: bool, reports: list[StoreReport], error: FedvaultError | None
) -> dict[str, object]:
    """The report on stdout, also when the migration failed part-way (``error`` then)."""
    return {
        "dry_run": dry_run,
        "ok": error is None,
        "stores": [r.to_json() for r in reports],
        "error": None
        if error is None
        else {"message": str(error), "exit_code": mapping_for(error).exit_code},
    }


def _table(reports: list[StoreReport], dry_run: bool) -> Table:
    title = "store migrate (dry run)" if dry_run else "store migrate"
    table = Table("store", "table", "rows", "result", title=title)
    for report in reports:
        if not report.rows:
            table.add_row(report.store, "", "", report.status)
            continue
        for i, (name, rows) in enumerate(report.rows.items()):
            first = i == 0
            table.add_row(
                report.store if first else "", name, str(rows), report.status if first else ""
            )
    return table
