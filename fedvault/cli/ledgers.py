"""Compare the federation's copy of a run's ledger with each node's own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clients.ledger import NodeLedger
from fedvault.errors import NotFoundError
from server.store import FederationStore


def compare_ledgers(
    db: str | Path,
    run_id: str,
    node_ledgers: dict[str, Path],
    *,
    password_file: Path | None = None,
) -> dict[str, Any]:
    """Row-by-row join of both views; ``agree`` only if every row matches exactly.

    ``db`` is the federation store's location (a SQLite path or PostgreSQL URL).
    """
    with FederationStore(db, password_file=password_file) as store:
        record = store.run(run_id)
        federation = store.ledger(run_id)
    dataset = str(record.schema["name"])
    for partner, path in node_ledgers.items():
        # Opening a missing file would create an empty ledger: a typo in the
        # path would then read as a node that charged nothing.
        if not Path(path).is_file():
            raise NotFoundError(f"no node ledger for {partner!r} at {path}")
    node_rows: dict[tuple[str, int, str], Any] = {}
    for partner, path in node_ledgers.items():
        with NodeLedger(path) as ledger:
            for charge in ledger.charges(dataset, run_id):
                node_rows[(partner, charge.round, charge.mechanism)] = charge
    rows, problems = [], []
    seen = set()
    for row in federation:
        key = (row.partner, row.charge.round, row.charge.mechanism)
        seen.add(key)
        node = node_rows.get(key)
        if row.partner in node_ledgers and node != row.charge:
            problems.append(f"{key}: node has {node}, coordinator has {row.charge}")
        rows.append(
            {
                "partner": row.partner,
                **{k: v for k, v in row.charge.to_dict().items() if k != "epsilon_after"},
                "coordinator_epsilon": _finite(row.charge.epsilon_after),
                "node_epsilon": _finite(node.epsilon_after) if node is not None else None,
            }
        )
    for key in node_rows.keys() - seen:
        problems.append(f"{key}: charged by the node but missing from the federation ledger")
    return {"run_id": run_id, "agree": not problems, "problems": problems, "rows": rows}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
