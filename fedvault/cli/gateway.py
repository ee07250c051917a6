"""``fedvault gateway start`` and ``fedvault keys create|list|revoke``.

The gateway serves the registry's verified models over OIP v2 (REST and
gRPC), authenticates API keys, authorises by role and appends every request
to the audit log before answering. Keys are managed offline here (the store
is the gateway's SQLite file) or online by an admin key over REST.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

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
from fedvault.errors import ConfigError
from fedvault.logs import LogFormat, configure_logging, json_logging_enabled
from fedvault.settings import FedvaultSettings, load_settings

if TYPE_CHECKING:
    from server.audit.log import Committer
    from server.gateway.keys import GatewayStore

gateway_app = typer.Typer(help="The audited inference gateway (OIP v2).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the gateway.", no_args_is_help=True)


def _settings(home: Path | None, **overrides: object) -> FedvaultSettings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home
    return load_settings(**values)


def _gateway_store(settings: FedvaultSettings, *, existing: bool = False) -> GatewayStore:
    """The key store the settings name (``FEDVAULT_GATEWAY_STORE`` or HOME's gateway.db).

    ``existing``: a command that only reads or changes keys must not create
    a new, empty store under a mistyped ``--home``.
    """
    from server.gateway.keys import GatewayStore

    if existing:
        require_store(settings.gateway_location, "gateway key store", "create a key first")
    return GatewayStore(
        settings.gateway_location, password_file=settings.gateway_store_password_file
    )


def audit_committer(
    writer: str, location: str | Path, password_file: Path | None
) -> Committer | None:
    """The gateway's audit committer: a writer process unless ``writer`` is ``thread``.

    Why a process by default: the writer thread competes with the event loop
    (and grpc.aio's poller) for the GIL on every SQLite call; see
    :mod:`server.audit.writer` and the README's gateway benchmark.
    """
    if writer == "thread":
        return None
    from server.audit.writer import ProcessCommitter

    return ProcessCommitter(location, password_file=password_file)


def _say(line: str) -> None:
    """A start/stop line on stderr: a log record under ``--log-format json``.

    Why not always a record: in text mode these lines are the interface
    scripts and tests read, unchanged; in JSON mode every line must parse.
    """
    if json_logging_enabled():
        logging.getLogger("fedvault.gateway").info(line)
    else:
        typer.echo(line, err=True)


@gateway_app.command("start")
def start(
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    http_port: Annotated[int | None, typer.Option(help="REST port.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    client_ca: Annotated[
        Path | None, typer.Option(help="Require client certificates from this CA (mTLS).")
    ] = None,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests/s per API key (0: unlimited).")
    ] = None,
    no_he: Annotated[bool, typer.Option("--no-he", help="Do not serve the HE extension.")] = False,
    audit_writer: Annotated[
        str,
        typer.Option(
            help="Where audit entries are committed: 'process' (a writer process, off the "
            "server's GIL) or 'thread'. Both commit durably before the answer leaves."
        ),
    ] = "process",
    header_timeout: HeaderTimeoutOpt = None,
    idle_timeout: IdleTimeoutOpt = None,
    max_connections: MaxConnectionsOpt = None,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Serve REST and gRPC until Ctrl-C / SIGTERM, then drain in-flight requests and stop."""
    from secure.signed_note import (
        NoteVerifier,
        generate_note_key,
        load_note_signer,
        save_note_signer,
    )
    from server.audit.log import AuditLog
    from server.audit.storage import open_storage
    from server.gateway.build import GatewayConfig, build_gateway
    from server.gateway.rest import Limits
    from server.gateway.runner import Listen, check_listen, run
    from server.registry import load_model_keys

    configure_logging(log_format)
    settings = _settings(
        home,
        gateway_host=host,
        gateway_http_port=http_port,
        gateway_grpc_port=grpc_port,
        gateway_tls_cert=tls_cert,
        gateway_tls_key=tls_key,
        gateway_client_ca=client_ca,
        gateway_rate_limit_per_s=rate_limit,
        **connection_overrides(header_timeout, idle_timeout, max_connections),
    )
    if (settings.gateway_tls_cert is None) != (settings.gateway_tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    if settings.gateway_client_ca is not None and settings.gateway_tls_cert is None:
        raise ConfigError("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if settings.federation_store is None and not settings.federation_db.exists():
        raise ConfigError(f"{settings.home} has no federation database; train a model first")
    if audit_writer not in ("process", "thread"):
        raise ConfigError("--audit-writer is 'process' or 'thread'")
    listen = Listen(
        settings.gateway_host,
        settings.gateway_http_port,
        settings.gateway_grpc_port,
        settings.gateway_tls_cert,
        settings.gateway_tls_key,
        settings.gateway_client_ca,
        connections=connection_limits(settings),
    )
    check_listen(listen)  # ports and TLS files, before any store or model is opened
    if not settings.audit_key_file.exists():
        signer = generate_note_key("fedvault/gateway-audit")
        save_note_signer(settings.audit_key_file, signer)
        _say(f"created audit signing key; verifier key: {signer.verifier.line}")
    storage = open_storage(
        settings.audit_location, password_file=settings.audit_store_password_file
    )
    log = AuditLog(
        storage,
        load_note_signer(settings.audit_key_file),
        previous_key=(
            NoteVerifier.parse(settings.audit_previous_key) if settings.audit_previous_key else None
        ),
        committer=audit_committer(
            audit_writer, settings.audit_location, settings.audit_store_password_file
        ),
    )
    try:
        # Entries since the last verified point are re-hashed now, the rest in the
        # background: a tampered entry makes the gateway unready, not refuse to start.
        log.start_integrity_checks(
            state_file=settings.audit_scrub_state,
            interval_s=settings.audit_scrub_interval_s,
            entries_per_interval=settings.audit_scrub_entries,
        )
        keys = load_model_keys(
            settings.keys_dir,
            encryption_key_b64=os.environ.get(settings.model_key_env),
            signing=False,
        )
        gw = build_gateway(
            GatewayConfig(
                federation_db=settings.federation_location,
                federation_password_file=settings.federation_store_password_file,
                registry_dir=settings.registry_dir,
                model_keys=keys,
                gateway_db=settings.gateway_location,
                gateway_password_file=settings.gateway_store_password_file,
                rate_limit_per_s=settings.gateway_rate_limit_per_s,
                rate_burst=settings.gateway_rate_burst,
                limits=Limits(
                    max_body_bytes=settings.gateway_max_body_bytes,
                    request_timeout_s=settings.gateway_request_timeout_s,
                    audit_timeout_s=settings.gateway_audit_timeout_s,
                ),
                enable_he=not no_he,
            ),
            log,
        )
        log.start_checkpointing()
        scheme = "https" if listen.tls_cert else "http"

        def announce() -> None:
            _say(
                json.dumps(
                    {
                        "event": "gateway_started",
                        "rest": f"{scheme}://{listen.host}:{listen.http_port}",
                        "grpc": f"{listen.host}:{listen.grpc_port}",
                        "models": gw.service.repository.index(),
                    }
                )
            )

        run(gw, listen, on_started=announce)
        _say(json.dumps({"event": "gateway_stopped"}))
    finally:
        log.close()


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option("--role", help="admin, analyst, partner or auditor.")],
    home: HomeOpt = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Model name this key may use ('*': all).")
    ] = None,
    partner: Annotated[
        str | None, typer.Option("--partner", help="Partner name (role partner).")
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="30d, 12h, 90m or an ISO 8601 instant.")
    ] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key and print its token ONCE (only a slow hash is stored)."""
    from server.gateway.keys import parse_expiry

    store = _gateway_store(_settings(home))
    try:
        token, key = store.create_key(
            role,
            models=frozenset(model or ()),
            partner=partner,
            expires_at=parse_expiry(expires),
            description=description,
        )
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({**key.public(), "token": token}))
        return
    typer.echo(f"key {key.key_id} ({key.role}) created; the token is shown only now:")
    typer.echo(token)


@keys_app.command("list")
def keys_list(home: HomeOpt = None) -> None:
    """Every key's id, role, grants, expiry and revocation (never tokens)."""

    store = _gateway_store(_settings(home), existing=True)
    try:
        keys = store.keys()
    finally:
        store.close()
    typer.echo(json.dumps([k.public() for k in keys], indent=2))


@keys_app.command("revoke")
def keys_revoke(key_id: str, home: HomeOpt = None) -> None:
    """Revoke a key (running gateways refuse it from their next request)."""

    store = _gateway_store(_settings(home), existing=True)
    try:
        key = store.revoke(key_id)
    finally:
        store.close()
    typer.echo(f"key {key.key_id} revoked")
