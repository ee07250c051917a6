"""Flower's simulation engine (Ray) runs fedvault's apps: ``bench/rounds.py``'s path.

The engine comes with the ``simulation`` extra (part of ``dev``, so ``make
install`` sets it up). Without it the bench must say so at once: Flower's
simulation process dies at the first run and ``flwr run`` would wait forever.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from clients.ledger import NodeLedger
from fedvault.cli.processes import ProcessGroup
from server.store import FINISHED, FederationStore

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "rounds.py"


def _bench() -> ModuleType:
    """bench/rounds.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_rounds", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_fails_fast_without_the_simulation_engine() -> None:
    # ``sys.modules['ray'] = None`` makes ``import ray`` fail as on a machine
    # without the extra; nothing may be started before the message.
    code = (
        "import runpy, sys\n"
        "sys.modules['ray'] = None\n"
        f"sys.argv = [{str(BENCH)!r}, '--only-simulation', '--sim-partners', '3']\n"
        f"runpy.run_path({str(BENCH)!r}, run_name='__main__')\n"
    )
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "simulation engine (Ray)" in out.stderr
    assert "pip install 'fedvault[simulation]'" in out.stderr
    assert "--no-simulation" in out.stderr
    assert "superlink" not in out.stderr.lower()  # failed before starting anything
    assert out.stdout == ""
    assert time.monotonic() - started < 30


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_three_simulated_partners_train_and_register_a_model(tmp_path: Path) -> None:
    bench = _bench()
    bench.require_simulation_engine()  # the extra is part of dev: never a skip
    extra: set[int] = set()
    with ProcessGroup() as group:
        try:
            result = bench.run_simulation(tmp_path, 2, group, extra, partners=3)
        finally:
            bench.stop_everything(group, extra)
    assert result["status"] == "finished", result
    assert result["rounds_committed"] == 2

    home = tmp_path / "fedvault-sim-3"
    store = FederationStore(home / "federation.db")
    try:
        (run,) = store.runs()
        assert run.status == FINISHED
        assert run.model_id is not None
        assert store.model(run.model_id)["run_id"] == run.run_id
        coordinator = sorted(
            (r.partner, r.charge.round, r.charge.mechanism, r.charge.epsilon_after)
            for r in store.ledger(run.run_id)
        )
    finally:
        store.close()
    # Both sides keep the ledger: each virtual partner's own file holds the
    # same charges (stats + 2 rounds) as the coordinator's.
    nodes = []
    for i in range(3):
        with NodeLedger(home / "data" / "ledgers" / f"partner-{i}.db") as ledger:
            nodes += [
                (f"partner-{i}", c.round, c.mechanism, c.epsilon_after)
                for c in ledger.charges("digits", run.run_id)
            ]
    assert sorted(nodes) == coordinator
    assert len(coordinator) == 3 * 3
