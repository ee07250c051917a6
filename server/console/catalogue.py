"""The models page's data: registry rows joined with what the gateway loaded and serves.

Each version also carries its data schema in raw columns and its task's
held-out metrics (:mod:`server.console.modelview`).

Signature status comes from the repository's own load: a version is READY
only after its Ed25519 signature and AES-GCM tag verified at load; a refused
version carries the error type (never the artifact's bytes or key material).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.console.budgets import statement_for
from server.console.modelview import MetricsView, SchemaView, metrics_view, schema_view
from server.console.policy import ConsoleUser
from server.gateway.repository import ModelRepository
from server.store import FederationStore

__all__ = ["ModelEntry", "ModelVersionView", "load_models"]

_LINEAGE_KEYS = (
    "run_id",
    "dataset",
    "rounds_planned",
    "rounds_completed",
    "private",
    "delta",
    "accountant",
)


@dataclass(frozen=True, slots=True)
class ModelVersionView:
    version: str
    model_id: str
    state: str  # READY or UNAVAILABLE
    is_default: bool
    signature: str
    signing_key_id: str
    artifact_sha256: str
    created_at: str
    lineage: list[tuple[str, str]]
    partners: list[str]
    epsilon: list[tuple[str, float]]
    metrics: MetricsView
    schema: SchemaView | None
    schema_note: str | None  # why no schema is shown
    statement: str | None


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    default_version: str | None
    versions: list[ModelVersionView]

    @property
    def rollback_choices(self) -> list[str]:
        return [v.version for v in self.versions if v.state == "READY" and not v.is_default]


def load_models(
    open_store: Callable[[], FederationStore], repository: ModelRepository, user: ConsoleUser
) -> list[ModelEntry]:
    store = open_store()
    try:
        rows = {r["model_id"]: r for r in store.models()}
    finally:
        store.close()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for item in repository.index():
        by_name.setdefault(item["name"], []).append(item)
    out: list[ModelEntry] = []
    for name, items in sorted(by_name.items()):
        versions: list[ModelVersionView] = []
        default: str | None = None
        for item in items:
            row = rows.get(item["model_id"], {})
            lineage: dict[str, Any] = row.get("lineage", {})
            partners = frozenset(str(p) for p in lineage.get("partners", ()))
            if not user.sees_model(name, partners):
                continue
            ready = item["state"] == "READY"
            if item.get("default"):
                default = item["version"]
            eps = sorted(lineage.get("epsilon", {}).items())
            shown_partners = sorted(partners)
            if user.role == "partner":  # its own share, not the other partners'
                eps = [(p, e) for p, e in eps if p == user.partner]
                others = len(partners) - 1
                shown_partners = [f"{user.partner} (you)"] + (
                    [f"and {others} other partner(s)"] if others > 0 else []
                )
            schema, schema_note = schema_view(lineage)
            versions.append(
                ModelVersionView(
                    version=item["version"],
                    model_id=item["model_id"],
                    state=item["state"],
                    is_default=bool(item.get("default")),
                    signature="verified at load (Ed25519 + AES-256-GCM)"
                    if ready
                    else f"refused at load: {item.get('reason', 'unknown')}",
                    signing_key_id=str(row.get("signing_key_id", "")),
                    artifact_sha256=str(row.get("artifact_sha256", "")),
                    created_at=str(row.get("created_at", "")),
                    lineage=[(k, str(lineage[k])) for k in _LINEAGE_KEYS if k in lineage],
                    partners=shown_partners,
                    epsilon=[(str(p), float(e)) for p, e in eps],
                    metrics=metrics_view(lineage, schema),
                    schema=schema,
                    schema_note=schema_note,
                    statement=statement_for(user, lineage) if lineage else None,
                )
            )
        if versions:
            out.append(ModelEntry(name, default, versions))
    return out
