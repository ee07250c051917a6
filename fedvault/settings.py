"""The one settings object of a fedvault process.

Built once at start-up from the environment (``FEDVAULT_*``) and CLI options,
frozen, and passed down: no other module reads ``os.environ`` for
configuration. Secrets are never values here, only paths to 0600 files (or the
name of the env var that holds them), so a settings dump cannot leak a key.
"""

from __future__ import annotations

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
