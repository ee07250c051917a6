"""Which console page each gateway role may open: one table, read by routes and tests.

Why a separate table and not :data:`server.gateway.auth.ROLE_ACTIONS`: the
console's pages are views over several API actions (the audit page reads the
log, the budgets page the ledger), and the issue fixes who sees what in
those terms — auditors the audit views, admins everything, partners only
their own ledger and models. Analysts see the models their key is granted
(what the API's model metadata already shows them). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["PAGE_ROLES", "ConsoleUser", "Page", "may_open"]


class Page(StrEnum):
    AUDIT = "audit"
    BUDGETS = "budgets"
    MODELS = "models"
    MONITORING = "monitoring"
    ROLLBACK = "rollback"


PAGE_ROLES: Final[dict[Page, frozenset[str]]] = {
    Page.AUDIT: frozenset({"admin", "auditor"}),
    # Auditors review budgets (compliance); partners see their own rows only.
    Page.BUDGETS: frozenset({"admin", "auditor", "partner"}),
    # Analysts: models granted to their key; partners: models they helped train.
    Page.MODELS: frozenset({"admin", "analyst", "partner"}),
    Page.MONITORING: frozenset({"admin", "auditor"}),
    Page.ROLLBACK: frozenset({"admin"}),
}

NAV: Final[tuple[tuple[Page, str], ...]] = (
    (Page.AUDIT, "Audit log"),
    (Page.BUDGETS, "Privacy budgets"),
    (Page.MODELS, "Models"),
    (Page.MONITORING, "Monitoring"),
)


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The signed-in key's facts (never its secret), re-read from the key store each request."""

    key_id: str
    role: str
    partner: str | None
    models: frozenset[str]

    def may(self, page: Page) -> bool:
        return may_open(self.role, page)

    def sees_model(self, name: str, partners: frozenset[str]) -> bool:
        """Row-level rule of the models page (the gateway's MODEL_METADATA scoping)."""
        if self.role == "admin":
            return True
        if self.role == "analyst":
            return "*" in self.models or name in self.models
        if self.role == "partner":
            return self.partner is not None and self.partner in partners
        return False

    @property
    def nav(self) -> list[tuple[str, str]]:
        return [(page.value, label) for page, label in NAV if self.may(page)]


def may_open(role: str, page: Page) -> bool:
    return role in PAGE_ROLES[page]
