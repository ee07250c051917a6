"""Privacy budgets per run and partner, from the federation store's ledger.

The cap of a run is the coordinator's per-partner budget
(``federation_epsilon_budget``, else ``target_epsilon`` — as
:attr:`fedvault.training_config.TrainingConfig.epsilon_budget`), read from the
run's stored config, falling back to the registered model's lineage.
Partners see only their own rows, and a privacy statement rebuilt from their
own ε alone: the model's stored statement names every partner's spend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedvault.errors import FedvaultError
from server.console.charts import Chart, epsilon_chart
from server.console.policy import ConsoleUser
from server.registry import privacy_statement
from server.store import FederationStore, LedgerRow

__all__ = ["RunBudget", "load_budgets", "statement_for"]


@dataclass(frozen=True, slots=True)
class RunBudget:
    run_id: str
    status: str
    current_round: int
    cap: float | None
    deltas: list[float]
    accountants: list[str]
    mechanisms: list[str]
    statement: str | None
    rows: list[LedgerRow]
    chart: Chart
    spent: dict[str, float] = field(default_factory=dict)


def _cap(config: dict[str, Any], lineage: dict[str, Any] | None) -> float | None:
    for source in (config, (lineage or {}).get("hyperparameters", {})):
        for key in ("federation_epsilon_budget", "target_epsilon"):
            value = source.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return None


def statement_for(user: ConsoleUser, lineage: dict[str, Any]) -> str | None:
    """The model's privacy statement, restricted to the partner's own ε for partners."""
    if user.role != "partner":
        stored = lineage.get("privacy_statement")
        return str(stored) if stored else None
    own = {k: v for k, v in lineage.get("epsilon", {}).items() if k == user.partner}
    try:
        return privacy_statement({**lineage, "epsilon": own})
    except (KeyError, TypeError, ValueError):
        return None


def load_budgets(open_store: Callable[[], FederationStore], user: ConsoleUser) -> list[RunBudget]:
    store = open_store()
    try:
        runs = store.runs()
        ledger = store.ledger()
        models = store.models()
    finally:
        store.close()
    lineage_of: dict[str, dict[str, Any]] = {}
    for row in models:  # oldest first: the latest registration of a run wins
        lineage_of[row["run_id"]] = row["lineage"]
    out: list[RunBudget] = []
    for run in runs:
        rows = [r for r in ledger if r.charge.run_id == run.run_id]
        if user.role == "partner":
            rows = [r for r in rows if r.partner == user.partner]
            if not rows:
                continue
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            series.setdefault(r.partner, []).append((r.charge.round, r.charge.epsilon_after))
        lineage = lineage_of.get(run.run_id)
        cap = _cap(run.config, lineage)
        try:
            statement = statement_for(user, lineage) if lineage else None
        except FedvaultError:
            statement = None
        out.append(
            RunBudget(
                run_id=run.run_id,
                status=run.status,
                current_round=run.current_round,
                cap=cap,
                deltas=sorted({r.charge.delta for r in rows}),
                accountants=sorted(
                    {f"{r.charge.accountant} {r.charge.accountant_version}" for r in rows}
                ),
                mechanisms=sorted({r.charge.mechanism for r in rows}),
                statement=statement,
                rows=sorted(rows, key=lambda r: (r.partner, r.charge.round)),
                chart=epsilon_chart(series, cap),
                spent={p: max(e for _, e in pts) for p, pts in series.items()},
            )
        )
    return out
