"""``kill -9`` of a SuperNode or of the SuperLink mid-run, with real Flower processes.

What must hold whatever the moment of the kill: the run finishes (by itself
when a SuperNode dies; after ``fedvault train --resume`` when the SuperLink
does, for its coordinator dies with it), each partner is charged at most once
per (run, round, mechanism) on both sides, and every charge the coordinator
holds is one the node holds too. The one difference allowed is the safe one:
a node that paid for a round (charge and reply are one transaction in its
ledger) but died before its reply reached the coordinator keeps that charge,
and the coordinator, which never saw the release, does not. The node then
over-counts its own spend, never the reverse, and ``compare_ledgers`` names
exactly that row.

Each test starts a federation of its own: these kills must not disturb the
shared one of ``test_federation.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fedvault.cli import federation as fed
from fedvault.cli.ledgers import compare_ledgers
from fedvault.cli.processes import ManagedProcess, ProcessGroup, free_port
from fedvault.datasets import split_dataset
from server.store import FederationStore

from .conftest import PARTNERS, Federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_ARGS = ["--dataset", "digits", "--model", "logreg", "--rounds", "3"]
T = TypeVar("T")


@dataclass
class Rig:
    """A federation whose SuperLink a test may kill and start again."""

    f: Federation
    port: int
    superlink: ManagedProcess

    def restart_superlink(self) -> None:
        # Same address, same --database: node keys, runs and messages survive.
        self.superlink = fed.start_superlink(self.f.group, self.f.paths, "127.0.0.1", self.port)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    home = tmp_path / "federation"
    paths = fed.FederationPaths(home)
    fed.init_federation(paths, PARTNERS, ["127.0.0.1", "localhost"])
    split_dataset("digits", home / "data", partners=len(PARTNERS), alpha=1.0, seed=0)
    with ProcessGroup() as group:
        port = free_port()
        superlink = fed.start_superlink(group, paths, "127.0.0.1", port)
        f = Federation(paths, group, f"127.0.0.1:{port}", home / "data")
        for i, partner in enumerate(PARTNERS):
            f.start_node(partner, i, cap=100.0)
        yield Rig(f, port, superlink)


def _config(f: Federation, extra: str = "") -> Path:
    path = f.paths.home / "faults.toml"
    path.write_text(f"[training]\nseed = 7\nlocal_steps = 10\n{extra}")
    return path


def _trainer(f: Federation, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    return subprocess.Popen(
        [sys.executable, "-m", "fedvault", "train", "--home", str(f.paths.home), "--json",
         *RUN_ARGS, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _stop(trainer: subprocess.Popen[str]) -> None:
    if trainer.poll() is None:
        trainer.kill()
    trainer.communicate()


def _wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")


def _node_rows(f: Federation, partner: str) -> list[tuple[str, int, str, float]]:
    """(run, round, mechanism, ε after) of every charge in the node's ledger, read-only."""
    path = f.paths.node_dir(partner) / "ledger.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT run_id, round, mechanism, epsilon_after FROM charges ORDER BY seq"
        ).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()


def _charged(f: Federation, partner: str, round_: int) -> str | None:
    """The run in which ``partner`` has paid for ``round_`` of DP-SGD, if it has."""
    return next((r[0] for r in _node_rows(f, partner) if r[1:3] == (round_, "dp-sgd")), None)


def _running_run(f: Federation, at_least_round: int) -> str | None:
    if not f.paths.db.exists():
        return None
    with FederationStore(f.paths.db) as store:
        runs = [r for r in store.runs() if r.status == "running"]
    return next((r.run_id for r in runs if r.current_round >= at_least_round), None)


def _in_round_2(f: Federation) -> str | None:
    """The run, once round 1 is committed and some partner has paid for round 2."""
    run_id = _running_run(f, 1)
    if run_id is None or not any(_charged(f, p, 2) == run_id for p in PARTNERS):
        return None
    return run_id


def _assert_no_double_charge(f: Federation, run_id: str) -> None:
    for partner in PARTNERS:
        keys = Counter((r[1], r[2]) for r in _node_rows(f, partner) if r[0] == run_id)
        assert all(n == 1 for n in keys.values()), (partner, keys)
    with FederationStore(f.paths.db) as store:
        rows = store.ledger(run_id)
    federation = Counter((r.partner, r.charge.round, r.charge.mechanism) for r in rows)
    assert all(n == 1 for n in federation.values()), federation


def _assert_registered(f: Federation, summary: dict[str, Any], rounds: int = 3) -> None:
    assert summary["status"] == "finished", summary
    assert summary["rounds_completed"] == rounds
    with FederationStore(f.paths.db) as store:
        model = store.model(summary["model_id"])
    assert model["run_id"] == summary["run_id"]


def _ledgers(f: Federation, run_id: str) -> dict[str, Any]:
    nodes = {p: f.paths.node_dir(p) / "ledger.db" for p in PARTNERS}
    return compare_ledgers(f.paths.db, run_id, nodes)


def _received(log: Path, offset: int = 0, kind: str = "train") -> list[str]:
    """Ids of the ``kind`` messages a SuperNode pulled, in its log from ``offset``."""
    with log.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    marker = f"Receiving: {kind} message (ID: "
    return [line.split(marker)[1].rstrip(")") for line in text.splitlines() if marker in line]


def test_kill9_of_a_supernode_mid_round_then_restart_charges_no_round_twice(rig: Rig) -> None:
    f = rig.f
    # Flower calls a node that died without a word online until it has missed
    # two heartbeats (30-60 s), and refuses the same key meanwhile: beta is
    # out for a round or two, and a 4th round has it back.
    config = _config(f, "round_timeout_s = 30\nmin_partners = 2\n")
    trainer = _trainer(f, "--config", str(config), "--rounds", "4")
    beta_log = f.paths.logs / "supernode-beta.log"
    try:
        # Mid-round, at the worst moment: beta has just paid for round 1 (its
        # charge and cached reply are committed), its reply is not yet out.
        run_id = _wait_for(lambda: _charged(f, "beta", 1), 180, "beta never paid for round 1")
        killed = f.nodes["beta"].kill()
        assert killed, "beta's SuperNode had no SuperExec/ClientApp under it"
        before = _received(beta_log)
        offset = beta_log.stat().st_size
        restart_began = time.monotonic()
        f.restart_node("beta", 1, cap=100.0)
        restarted_at = time.time()
        restart_s = time.monotonic() - restart_began
        out, err = trainer.communicate(timeout=300)
    finally:
        _stop(trainer)
    assert trainer.returncode == 0, out + err
    summary = json.loads(out)
    assert summary["run_id"] == run_id
    _assert_registered(f, summary, rounds=4)

    rounds = _rounds(f, run_id)
    lost = [r for r, (m, _) in rounds.items() if "beta" in m["failed"]]
    # Back under the same key, beta keeps its node id: every round sent after
    # its restart reaches it, and it is at least asked for the final evaluation.
    back = [r for r in rounds if r > 1 and rounds[r - 1][1] > restarted_at]
    assert all("beta" in rounds[r][0]["partners"] for r in back), rounds
    received_after = _received(beta_log, offset, "train") + _received(beta_log, offset, "evaluate")
    assert received_after, "the restarted beta was never sent anything"
    # Flower does not hand a message a dead node had pulled to its successor:
    # the round it died in gets no reply from it, whatever the timeout.
    assert not set(before) & set(received_after)
    # Killed within ~50 ms of its ledger commit, beta has almost always not
    # sent its reply yet (round 1 lost); if it had, the round counted it.
    assert 1 in lost or "beta" in rounds[1][0]["partners"], rounds
    print(  # shown with -s: what this kill exercised
        f"\nbeta restarted after {restart_s:.1f} s; rounds without beta: {lost}; "
        f"rounds sent after the restart: {back}"
    )

    _assert_no_double_charge(f, run_id)
    report = _ledgers(f, run_id)
    # The only disagreement allowed: a round beta paid for whose reply never
    # reached the coordinator. Anything the coordinator holds, the node holds.
    orphans = {
        f"('beta', {r}, 'dp-sgd'): charged by the node but missing from the federation ledger"
        for r in lost
        if _charged(f, "beta", r) is not None
    }
    assert set(report["problems"]) == orphans, report["problems"]
    # The node's ε covers every release it made; the coordinator's never more.
    node_eps = max(r[3] for r in _node_rows(f, "beta") if r[0] == run_id)
    assert summary["epsilon_by_partner"]["beta"] <= node_eps + 1e-12
    for partner in ("alpha", "gamma"):
        assert summary["epsilon_by_partner"][partner] == pytest.approx(
            max(r[3] for r in _node_rows(f, partner) if r[0] == run_id), rel=1e-12
        )


def _rounds(f: Federation, run_id: str) -> dict[int, tuple[dict[str, Any], float]]:
    """round -> (its metrics, when it was committed, as a Unix time)."""
    with FederationStore(f.paths.db) as store:
        metrics = dict(store.rounds(run_id))
    conn = sqlite3.connect(f"file:{f.paths.db}?mode=ro", uri=True, timeout=5)
    try:
        committed = dict(
            conn.execute("SELECT round, committed_at FROM rounds WHERE run_id = ?", (run_id,))
        )
    finally:
        conn.close()
    return {
        r: (m, datetime.fromisoformat(committed[r].replace("Z", "+00:00")).timestamp())
        for r, m in metrics.items()
    }


def test_kill9_of_the_superlink_mid_round_then_resume_finishes(rig: Rig) -> None:
    f = rig.f
    trainer = _trainer(f, "--config", str(_config(f)))
    survivors: list[int] = []
    try:
        # Mid-round: round 1 committed and a partner has paid for round 2.
        run_id = _wait_for(lambda: _in_round_2(f), 180, "the run never got into round 2")
        # The SuperLink process alone dies (OOM killer, kill -9) and is
        # reaped by whatever started it. Its SuperExec (a session of its own)
        # sees it gone and stops the coordinator under it with a signal.
        survivors = rig.superlink.descendants()
        os.killpg(rig.superlink.pid, signal.SIGKILL)
        rig.superlink.popen.wait(timeout=10)
        paid = _round_2_rows(f, run_id)
        out, err = trainer.communicate(timeout=120)
    finally:
        _stop(trainer)
        for pid in survivors:  # the SuperExec and coordinator, should they linger
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    # The operator is told, instead of left waiting on a run nothing drives.
    assert trainer.returncode == 1, out + err
    summary = json.loads(out)
    assert summary["status"] == "failed", summary
    assert summary["message"].startswith("interrupted after round "), summary
    assert f"fedvault train --resume {run_id}" in summary["message"]

    rig.restart_superlink()
    _resume_and_check(f, run_id, paid)
    # The database that kept the node registrations holds every message in
    # flight (model updates, the partners' noisy sums): owner-only, -wal too.
    files = list(f.paths.home.glob("superlink.db*"))
    assert len(files) >= 2, files
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files), files


def test_kill9_of_the_superlink_host_mid_round_then_resume_finishes(rig: Rig) -> None:
    f = rig.f
    trainer = _trainer(f, "--config", str(_config(f)))
    try:
        run_id = _wait_for(lambda: _in_round_2(f), 180, "the run never got into round 2")
        # The whole SuperLink host goes at once: SuperLink, SuperExec and
        # coordinator, with no chance to record anything.
        killed = rig.superlink.kill()
        assert killed, "no SuperExec/ServerApp under the SuperLink"
        paid = _round_2_rows(f, run_id)
        _wait_for(
            lambda: True if not any(_alive(pid) for pid in killed) else None,
            10,
            "the SuperExec or coordinator outlived SIGKILL",
        )
    finally:
        # Nothing is left to finish the run: the watcher would wait in vain.
        _stop(trainer)
    with FederationStore(f.paths.db) as store:
        assert store.run(run_id).status == "running"  # it died without a word
    rig.restart_superlink()
    _resume_and_check(f, run_id, paid)


def _round_2_rows(f: Federation, run_id: str) -> dict[str, tuple[str, int, str, float]]:
    """Each partner's round-2 DP-SGD charge in its own ledger, where it has paid already."""
    rows = {p: [r for r in _node_rows(f, p) if r[:3] == (run_id, 2, "dp-sgd")] for p in PARTNERS}
    return {p: found[0] for p, found in rows.items() if found}


def _resume_and_check(
    f: Federation, run_id: str, paid: dict[str, tuple[str, int, str, float]]
) -> None:
    """Resume ``run_id``: it must finish on every partner, each round charged once.

    The SuperNodes retried while the SuperLink was away and are back under
    their node ids. Resuming replays the round in flight, which a partner
    that already paid for it (``paid``) answers from its reply cache at no
    new charge: its row is the one it wrote before the kill, and the
    coordinator now holds that very row.
    """
    assert paid, "no partner had paid for the round in flight"
    code, summary, err = f.train("--resume", run_id)
    assert code == 0, err
    _assert_registered(f, summary)
    assert all(n.alive() for n in f.nodes.values()), "a SuperNode gave up on the SuperLink"
    _assert_no_double_charge(f, run_id)
    assert _round_2_rows(f, run_id) == {**_round_2_rows(f, run_id), **paid}
    report = _ledgers(f, run_id)
    assert report["agree"], report["problems"]
    assert len(report["rows"]) == len(PARTNERS) * 4  # stats + 3 rounds each
    rounds = _rounds(f, run_id)
    assert sorted(rounds) == [1, 2, 3]
    assert all(m["partners"] == sorted(PARTNERS) for m, _ in rounds.values()), rounds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until its parent reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
