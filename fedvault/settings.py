"""The one settings object of a fedvault process.

Built once at start-up from the environment (``FEDVAULT_*``) and CLI options,
frozen, and passed down: no other module reads ``os.environ`` for
configuration. Secrets are never values here, only paths to 0600 files (or the
name of the env var that holds them), so a settings dump cannot leak a key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedvault.database import location_problem, url_has_password
from fedvault.errors import ConfigError, FedvaultError


class FedvaultSettings(BaseSettings):
    """Where state lives and how the federation's processes are reached."""

    model_config = SettingsConfigDict(env_prefix="FEDVAULT_", frozen=True, extra="forbid")

    home: Path = Field(
        default=Path(".fedvault"),
        description="State directory: federation DB, registry, PKI, partner data.",
    )
    superlink_host: str = Field(default="127.0.0.1", description="SuperLink bind/connect host.")
    superlink_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    connect_retries: int = Field(default=5, ge=1, le=100)
    connect_backoff_s: float = Field(default=0.5, gt=0, le=30)
    model_key_env: str = Field(
        default="FEDVAULT_MODEL_KEY",
        description="Env var that may hold the base64 AES-256 model key instead of a key file.",
    )

    audit_store: str | None = Field(
        default=None,
        description=(
            "Audit log storage: a PostgreSQL URL without password (e.g. "
            "postgresql://fedvault@db/fedvault?sslmode=verify-full&sslrootcert=ca.crt) or a "
            "SQLite path; default HOME/audit.db."
        ),
    )
    audit_store_password_file: Path | None = Field(
        default=None, description="File holding the audit database password (a mounted secret)."
    )
    audit_previous_key: str | None = Field(
        default=None,
        description=(
            "Rotating the audit signing key: the *old* verifier key line "
            "(name+hexid+base64, public; `fedvault audit keygen` printed it and "
            "/v2/audit/public-key serves it). The gateway then accepts the store's "
            "checkpoints signed by it until the new key has signed one; unset afterwards."
        ),
    )
    audit_scrub_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the gateway's background scrub re-hashes a batch of audit entries.",
    )
    audit_scrub_entries: int = Field(
        default=1000,
        ge=0,
        description=(
            "Audit entries the scrub re-hashes per interval (its cost bound; 0: no background "
            "scrub — the start-up check of the entries since the last verified point still runs)."
        ),
    )
    audit_verifier_state: Path | None = Field(
        default=None,
        description=(
            "Where `fedvault audit verify` keeps the last checkpoint it verified, one directory "
            "per log and key; default the user's data directory: "
            "$XDG_DATA_HOME/fedvault/audit-verifier (~/.local/share/fedvault/audit-verifier)."
        ),
    )
    federation_store: str | None = Field(
        default=None,
        description=(
            "Runs, federation ledger, checkpoints and the model registry (with the sealed "
            "artifacts): a PostgreSQL URL without password, shared by the coordinator and every "
            "gateway replica, or a SQLite path; default HOME/federation.db (artifacts in "
            "HOME/registry)."
        ),
    )
    federation_store_password_file: Path | None = Field(
        default=None, description="File holding the federation database password."
    )
    gateway_store: str | None = Field(
        default=None,
        description=(
            "Gateway API keys and default model versions: a PostgreSQL URL without password "
            "(shared by the replicas) or a SQLite path; default HOME/gateway.db."
        ),
    )
    gateway_store_password_file: Path | None = Field(
        default=None, description="File holding the gateway database password."
    )

    gateway_host: str = Field(default="127.0.0.1", description="Gateway bind address.")
    gateway_http_port: int = Field(default=8080, ge=0, le=65535, description="REST (OIP v2).")
    gateway_grpc_port: int = Field(default=8081, ge=0, le=65535, description="gRPC (OIP v2).")
    gateway_tls_cert: Path | None = Field(default=None, description="Server certificate (PEM).")
    gateway_tls_key: Path | None = Field(default=None, description="Server key (PEM, 0600).")
    gateway_client_ca: Path | None = Field(
        default=None, description="CA for client certificates: set, mTLS is required."
    )
    gateway_rate_limit_per_s: float = Field(
        default=100.0, ge=0, description="Sustained requests/s per API key (0: unlimited)."
    )
    gateway_rate_burst: float = Field(default=200.0, ge=1)
    gateway_max_body_bytes: int = Field(default=64 * 1024**2, ge=1024)
    gateway_request_timeout_s: float = Field(default=30.0, gt=0)
    gateway_audit_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A request's audit record must be durable within this, else 503.",
    )
    # Connection guards of every fedvault HTTP server (gateway REST, `he serve`,
    # `audit serve`) and of the gateway's gRPC door: server.http_serving.ConnectionLimits.
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A request's headers must arrive in full within this (gRPC: the handshake).",
    )
    http_idle_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="Longest wait for a client's next bytes: keep-alive, or a stalled body.",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Open connections per server (REST, gRPC each); one more is refused.",
    )
    grpc_idle_timeout_s: float = Field(
        default=300.0, gt=0, description="A gRPC connection with no call for this long closes."
    )
    http_send_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest a client may leave an answer unread (the send buffer full).",
    )

    @property
    def gateway_db(self) -> Path:
        return self.home / "gateway.db"

    @property
    def audit_db(self) -> Path:
        return self.home / "audit.db"

    @property
    def audit_location(self) -> str:
        """Where the audit log lives: ``audit_store`` if set, else ``HOME/audit.db``."""
        return self.audit_store or str(self.audit_db)

    @property
    def federation_location(self) -> str:
        """Where the federation store lives: ``federation_store``, else ``HOME/federation.db``."""
        return self.federation_store or str(self.federation_db)

    @property
    def gateway_location(self) -> str:
        """Where the gateway's keys live: ``gateway_store``, else ``HOME/gateway.db``."""
        return self.gateway_store or str(self.gateway_db)

    @field_validator("audit_store", "federation_store", "gateway_store")
    @classmethod
    def _no_password_in_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The message names the field, never the value: the value holds the secret.
        if value and url_has_password(value):
            env = f"FEDVAULT_{str(info.field_name).upper()}_PASSWORD_FILE"
            raise ValueError(
                f"{info.field_name} must not contain a password; put it in the file named by {env}"
            )
        problem = location_problem(value) if value else None
        if problem is not None:
            raise ValueError(f"{info.field_name} {problem}")
        return value

    @field_validator("audit_previous_key")
    @classmethod
    def _verifier_key_line(cls, value: str | None) -> str | None:
        if value is not None:
            from secure.signed_note import NoteVerifier

            try:
                NoteVerifier.parse(value)
            except FedvaultError as exc:
                raise ValueError(f"not a verifier key line: {exc}") from None
        return value

    @property
    def audit_key_file(self) -> Path:
        return self.keys_dir / "gateway-audit.key"

    @property
    def audit_scrub_state(self) -> Path:
        """The gateway's audit scrub progress (verified point), beside its key files."""
        return self.home / "audit-scrub.json"

    @property
    def audit_verifier_dir(self) -> Path:
        """The verifier's state root: ``audit_verifier_state``, else the user's data directory.

        The auditor's memory, not the federation's: it must survive a change
        of working directory (HOME defaults to ``./.fedvault``) and belongs to
        the person verifying, who often has no federation HOME at all.
        """
        return self.audit_verifier_state or user_data_dir() / "audit-verifier"

    @property
    def federation_db(self) -> Path:
        return self.home / "federation.db"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"


def user_data_dir() -> Path:
    """``$XDG_DATA_HOME/fedvault``, else ``~/.local/share/fedvault`` (XDG Base Directory).

    A relative or empty ``XDG_DATA_HOME`` is ignored, as the specification says.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "fedvault"


def load_settings(**overrides: Any) -> FedvaultSettings:
    """The process's settings, from ``FEDVAULT_*`` and ``overrides`` (CLI options).

    A bad value becomes a :class:`ConfigError` naming the field, never a
    traceback: pydantic's own message echoes the input, and an input here may
    be a URL someone put a password in.
    """
    from fedvault.training_config import format_validation_error

    try:
        return FedvaultSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "settings")) from None
