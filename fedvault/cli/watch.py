"""Follow a run's progress from the federation database."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedvault.errors import NotFoundError, UnavailableError
from server.store import RUNNING, FederationStore, RunRecord


def wait_for_run(
    store: FederationStore,
    run_id: str,
    *,
    rounds: int,
    console: Console,
    show_progress: bool,
    quiet: bool = False,
    liveness: Callable[[], None] = lambda: None,
    timeout_s: float = 3600,
    poll_s: float = 0.5,
) -> RunRecord:
    """Poll until the run leaves ``running``; draw a progress bar meanwhile.

    Without a terminal (CI, logs) each committed round is printed as a line instead.
    """
    deadline = time.monotonic() + timeout_s
    progress = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=False,
    )
    with progress:
        task = progress.add_task(f"run {run_id}", total=rounds, info="waiting for partners")
        last_line = ""
        while True:
            liveness()
            try:
                record = store.run(run_id)
            except NotFoundError:
                record = None
            if record is not None:
                info = _round_info(store, run_id)
                progress.update(task, completed=record.current_round, info=info)
                line = f"round {record.current_round}/{rounds} {info}"
                if not show_progress and not quiet and line != last_line:
                    console.print(line, highlight=False)
                    last_line = line
                if record.status != RUNNING:
                    return record
            if time.monotonic() > deadline:
                raise UnavailableError(f"run {run_id} did not finish within {timeout_s:.0f} s")
            time.sleep(poll_s)


def _round_info(store: FederationStore, run_id: str) -> str:
    rounds = store.rounds(run_id)
    if not rounds:
        return "stats + calibration"
    _, last = rounds[-1]
    shown = [
        f"{label}={last[key]:.3f}"
        for key, label in _HEADLINE
        if isinstance(last.get(key), int | float)
    ]
    return f"round {last['evaluated_round']}: {' '.join(shown)}" if shown else ""


# The metrics a progress line and the summary show, where a run reports them:
# classification (accuracy, ROC AUC) or regression (R², RMSE in target units).
_HEADLINE = (("eval_accuracy", "acc"), ("roc_auc", "auc"), ("r2", "R²"), ("rmse", "rmse"))
_FINAL = (
    ("eval_accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("roc_auc", "ROC AUC"),
    ("eval_loss", "loss"),
    ("r2", "R²"),
    ("rmse", "RMSE"),
    ("mae", "MAE"),
)


def run_summary(store: FederationStore, record: RunRecord) -> dict[str, Any]:
    """Everything a person or a script wants to know about a finished run."""
    rounds = store.rounds(record.run_id)
    accuracy: dict[int, float | None] = {
        int(m["evaluated_round"]): m.get("eval_accuracy") for _, m in rounds
    }
    if record.final_metrics:
        accuracy[int(record.final_metrics["evaluated_round"])] = record.final_metrics.get(
            "eval_accuracy"
        )
    epsilon: dict[str, float] = {}
    for row in store.ledger(record.run_id):
        epsilon[row.partner] = row.charge.epsilon_after
    return {
        "run_id": record.run_id,
        "status": record.status,
        "message": record.message,
        "rounds_completed": record.current_round,
        "rounds_planned": record.config.get("rounds"),
        "accuracy_by_round": {str(k): v for k, v in sorted(accuracy.items()) if k > 0},
        "final_accuracy": (record.final_metrics or {}).get("eval_accuracy"),
        "final_metrics": {
            key: value
            for key, value in (record.final_metrics or {}).items()
            if key != "evaluated_round"
        },
        "epsilon_by_partner": epsilon,
        "delta": record.config.get("delta"),
        "model_id": record.model_id,
    }


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary['run_id']} — {summary['status']}", show_header=False)
    table.add_row("rounds", f"{summary['rounds_completed']} of {summary['rounds_planned']}")
    for r, acc in summary["accuracy_by_round"].items():
        if acc is not None:
            table.add_row(f"accuracy after round {r}", f"{acc:.4f}")
    final = summary.get("final_metrics") or {}
    for key, label in _FINAL:
        if isinstance(final.get(key), int | float):
            table.add_row(f"final {label}", f"{final[key]:.4f}")
    for partner, eps in sorted(summary["epsilon_by_partner"].items()):
        table.add_row(f"ε {partner}", f"{eps:.3f} (δ={summary['delta']:g})")
    table.add_row("model", summary["model_id"] or "none")
    if summary["message"]:
        table.add_row("message", summary["message"])
    return table
