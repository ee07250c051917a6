"""Wire one gateway process: repository, keys, auth, audit, metrics, HE and audit routers.

The CLI (``fedvault gateway start``), the tests and the benchmark all build
the gateway here, so the object graph they exercise is the one that ships.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.audit.log import AuditLog, AuditSink
from server.gateway.audit import AuditGate
from server.gateway.auth import Authenticator, RateLimiter
from server.gateway.keys import GatewayStore, KeyVerifier
from server.gateway.metrics import GatewayMetrics
from server.gateway.repository import ModelRepository
from server.gateway.rest import GatewayApp, Limits
from server.gateway.service import InferenceService
from server.registry import ModelKeys, ModelRegistry
from server.store import FederationStore

__all__ = ["GatewayConfig", "build_gateway"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway's state lives and how it serves.

    ``federation_db`` and ``gateway_db`` are SQLite paths or PostgreSQL URLs
    (without password; the ``*_password_file`` fields name the secrets). On
    PostgreSQL, replicas share keys, defaults and the registry — artifacts
    included — and ``registry_dir`` is only read for rows written before.
    """

    federation_db: str | Path
    registry_dir: Path
    model_keys: ModelKeys
    gateway_db: str | Path
    rate_limit_per_s: float = 0.0  # 0: unlimited
    rate_burst: float = 100.0
    key_cache_ttl_s: float = 30.0
    limits: Limits = field(default_factory=Limits)
    enable_he: bool = True
    he_context_ttl_s: float = 3600.0
    enable_console: bool = True
    federation_password_file: Path | None = None
    gateway_password_file: Path | None = None


def build_gateway(
    config: GatewayConfig, audit_log: AuditLog | None, sink: AuditSink | None = None
) -> GatewayApp:
    """Everything both front doors share; loads (and verifies) every model now.

    ``sink`` defaults to ``audit_log``; the audit API is mounted when a log is given.
    """
    sink = sink if sink is not None else audit_log
    if sink is None:
        raise ValueError("the gateway needs an audit sink: it never serves unaudited")

    def open_federation() -> FederationStore:
        return FederationStore(config.federation_db, password_file=config.federation_password_file)

    def open_registry() -> tuple[FederationStore, ModelRegistry]:
        store = open_federation()
        return store, ModelRegistry(store, config.registry_dir, config.model_keys)

    store = GatewayStore(config.gateway_db, password_file=config.gateway_password_file)
    metrics = GatewayMetrics()
    repository = ModelRepository(open_registry, store, on_load_failure=metrics.load_failed)
    metrics.repository = repository
    failures = repository.load_all()
    if failures:
        _log.error("%d model version(s) refused at load", len(failures))
    audit = AuditGate(
        sink, observe=metrics.observe_audit, append_timeout_s=config.limits.audit_timeout_s
    )

    def audit_healthy() -> bool:
        # Appends work, and no stored entry was found altered (server.audit.scrub).
        return audit.healthy and (audit_log is None or audit_log.integrity.intact)

    service = InferenceService(repository, metrics, audit_healthy=audit_healthy)
    authenticator = Authenticator(
        KeyVerifier(store, cache_ttl_s=config.key_cache_ttl_s),
        RateLimiter(config.rate_limit_per_s, config.rate_burst),
    )
    gw = GatewayApp(
        service=service,
        authenticator=authenticator,
        audit=audit,
        metrics=metrics,
        store=store,
        open_federation=open_federation,
        limits=config.limits,
    )
    if audit_log is not None:
        from server.audit.api import create_audit_router, require_auditor
        from server.audit.scrub import integrity_collector

        gw.audit_router = create_audit_router(audit_log)
        metrics.registry.register(integrity_collector(audit_log.integrity))
        gw.audit_dependency = require_auditor
        gw.audit_log = audit_log
    if config.enable_he:
        from secure.he.service import HEService
        from server.he_api import build_router, caller_identity

        gw.he_service = HEService(
            he_model_source(repository), context_ttl_s=config.he_context_ttl_s
        )
        gw.he_router = build_router(
            gw.he_service, lambda ref: repository.by_reference(ref).model_id
        )
        gw.he_owner_dependency = caller_identity
    if config.enable_console:
        from server.console import create_console_router

        gw.console_router = create_console_router(gw)
    return gw


def he_model_source(repository: ModelRepository) -> Callable[[str], Any]:
    """HE models from the gateway's already-verified repository (no second decrypt).

    The HE routes resolve a name to its current default's model id before
    asking (``ModelRepository.by_reference``), so the service caches compiled
    models by id.
    """

    def load(ref: str) -> Any:
        from secure.he.service import HEModel

        served = repository.by_reference(ref)
        # The schema the plaintext endpoints serve raw columns with: under HE the
        # caller encodes its rows with it (one-hot, imputation) on its own side.
        schema = None if served.raw is None else served.raw.schema
        return HEModel.build(served.model_id, served.spec, served.params, served.scaler, schema)

    return load
