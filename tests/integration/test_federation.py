"""A 3-node DP federation on loopback, end to end, with real Flower processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fedvault.cli.ledgers import compare_ledgers
from fedvault.errors import IntegrityError, NotFoundError
from server.audit.records import decode_entry
from server.audit.storage import open_storage
from server.registry import ModelRegistry, load_model_keys
from server.store import FederationStore
from tests.audit_support import fresh_database

from .conftest import PARTNERS, Federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_ARGS = ["--dataset", "digits", "--model", "logreg", "--rounds", "3"]


def _ledger(f: Federation, run_id: str) -> list[tuple[object, ...]]:
    store = FederationStore(f.paths.db)
    try:
        return [
            (row.partner, *list(row.charge.to_dict().values())[1:])  # all but run_id
            for row in sorted(
                store.ledger(run_id), key=lambda r: (r.partner, r.charge.round, r.charge.mechanism)
            )
        ]
    finally:
        store.close()


def _node_ledgers(f: Federation) -> dict[str, object]:
    return {p: f.paths.node_dir(p) / "ledger.db" for p in f.nodes}


def test_dp_run_reaches_accuracy_ledgers_agree_and_model_is_signed(f_run: dict) -> None:  # type: ignore[type-arg]
    summary = f_run
    assert summary["status"] == "finished", summary
    assert summary["rounds_completed"] == 3
    assert summary["final_accuracy"] >= 0.80  # chance is 0.10
    eps = summary["epsilon_by_partner"]
    assert set(eps) == {"alpha", "beta", "gamma"}
    assert all(2.5 < e <= 3.0 + 1e-9 for e in eps.values()), eps


def test_ledgers_agree(federation: Federation, f_run: dict) -> None:  # type: ignore[type-arg]
    report = compare_ledgers(federation.paths.db, f_run["run_id"], _node_ledgers(federation))
    assert report["agree"], report["problems"]
    # stats release + 3 DP-SGD rounds per partner
    assert len(report["rows"]) == 3 * 4
    cli = federation.cli("ledger", "show", f_run["run_id"])
    assert cli.returncode == 0, cli.stderr
    assert "views agree" in cli.stdout


def test_the_run_is_in_the_audit_log(federation: Federation, f_run: dict) -> None:  # type: ignore[type-arg]
    run_id = f_run["run_id"]
    storage = open_storage(federation.paths.home / "audit.db")
    try:
        records = [decode_entry(e) for _, e in storage.entries(0, storage.size())]
    finally:
        storage.close()
    mine = [r for r in records if r.run_id == run_id]
    actions = [r.action for r in mine]
    assert actions[0] == "train.start"
    assert actions[-2:] == ["model.register", "train.end"]
    assert mine[-1].outcome == "finished"
    assert [r.round for r in mine if r.action == "train.round"] == [0, 1, 2, 3]
    charged: dict[str, float] = {}
    for r in mine:
        if r.action.startswith("privacy.charge") and r.partner and r.epsilon_charged is not None:
            charged[r.partner] = charged.get(r.partner, 0.0) + r.epsilon_charged
    # The marginals telescope to each partner's final ε in the ledger.
    assert charged == pytest.approx(f_run["epsilon_by_partner"], rel=1e-9)


def test_registered_model_verifies_and_tampering_is_refused(
    federation: Federation,
    f_run: dict,  # type: ignore[type-arg]
) -> None:
    model_id = f_run["model_id"]
    store = FederationStore(federation.paths.db)
    try:
        registry = ModelRegistry(
            store,
            federation.paths.home / "registry",
            load_model_keys(federation.paths.home / "keys", signing=False),
        )
        loaded = registry.load(model_id)
        assert loaded.lineage["run_id"] == f_run["run_id"]
        assert set(loaded.lineage["epsilon"]) == {"alpha", "beta", "gamma"}
        artifact = federation.paths.home / "registry" / store.model(model_id)["artifact"]
        original = artifact.read_bytes()
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0x01
        artifact.write_bytes(bytes(tampered))
        try:
            with pytest.raises(IntegrityError):
                registry.load(model_id)
            cli = federation.cli("models", "show", model_id)
            assert cli.returncode == 6
            assert "modified" in cli.stderr
        finally:
            artifact.write_bytes(original)
    finally:
        store.close()


def test_a_run_keeps_runs_ledger_registry_and_audit_in_postgresql(
    federation: Federation, pg_admin: str
) -> None:
    # The compose stack's setting: coordinator state and the audit log in one
    # PostgreSQL, nothing in the operator's SQLite files, artifacts in the rows.
    env = {
        "FEDVAULT_FEDERATION_STORE": fresh_database(pg_admin, "it_federation"),
        "FEDVAULT_AUDIT_STORE": fresh_database(pg_admin, "it_audit"),
    }
    code, summary, err = federation.train(*RUN_ARGS, "--rounds", "2", env=env)
    assert code == 0, err
    assert summary["status"] == "finished"
    run_id, model_id = summary["run_id"], summary["model_id"]

    with FederationStore(federation.paths.db) as local, pytest.raises(NotFoundError):
        local.run(run_id)
    assert not (federation.paths.home / "registry" / f"{model_id}.fvar").exists()

    with FederationStore(env["FEDVAULT_FEDERATION_STORE"]) as store:
        assert store.run(run_id).status == "finished"
        assert store.model_artifact(model_id) is not None
        keys = load_model_keys(federation.paths.home / "keys", signing=False)
        loaded = ModelRegistry(store, None, keys).load(model_id)
        assert loaded.lineage["run_id"] == run_id
    report = compare_ledgers(env["FEDVAULT_FEDERATION_STORE"], run_id, _node_ledgers(federation))
    assert report["agree"], report["problems"]
    assert len(report["rows"]) == 3 * 3  # stats release + 2 rounds per partner

    storage = open_storage(env["FEDVAULT_AUDIT_STORE"])
    try:
        actions = [
            r.action
            for r in (decode_entry(e) for _, e in storage.entries(0, storage.size()))
            if r.run_id == run_id
        ]
    finally:
        storage.close()
    assert actions[0] == "train.start"
    assert actions[-2:] == ["model.register", "train.end"]

    shown = federation.cli("models", "show", model_id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["lineage"]["run_id"] == run_id


def _serverapp_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_kill9_coordinator_then_resume_matches_uninterrupted_run(federation: Federation) -> None:
    args = [*RUN_ARGS, "--config", str(_seeded_config(federation))]
    code, baseline, err = federation.train(*args)
    assert code == 0, err
    # The interrupted twin: same config and seed, killed after round 1.
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "fedvault", "train", "--home", str(federation.paths.home),
         "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    run_id = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            store = FederationStore(federation.paths.db)
            try:
                runs = [r for r in store.runs() if r.run_id not in {baseline["run_id"]}]
                latest = max(runs, key=lambda r: r.created_at) if runs else None
            finally:
                store.close()
            if latest is not None and latest.current_round >= 1 and latest.status == "running":
                run_id = latest.run_id
                break
            time.sleep(0.2)
        assert run_id is not None, "interrupted run never reached round 1"
        pids = _serverapp_pids()
        assert pids, "no flwr-serverapp process to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        watcher.kill()
        watcher.communicate()
    time.sleep(1)
    store = FederationStore(federation.paths.db)
    try:
        assert store.run(run_id).status == "running"  # it died without a word
    finally:
        store.close()

    code, resumed, err = federation.train("--resume", run_id)
    assert code == 0, err
    assert resumed["status"] == "finished"
    assert resumed["rounds_completed"] == 3
    assert _ledger(federation, run_id) == _ledger(federation, baseline["run_id"])
    report = compare_ledgers(federation.paths.db, run_id, _node_ledgers(federation))
    assert report["agree"], report["problems"]


def _seeded_config(federation: Federation) -> object:
    path = federation.paths.home / "seeded.toml"
    path.write_text("[training]\nseed = 7\nlocal_steps = 10\n")
    return path


def test_coordinator_refuses_rounds_past_the_federation_budget(federation: Federation) -> None:
    path = federation.paths.home / "tight.toml"
    path.write_text("[training]\ntarget_epsilon = 3.0\nfederation_epsilon_budget = 2.0\n")
    code, summary, _err = federation.train(*RUN_ARGS, "--config", str(path))
    assert code == 1
    assert summary["status"] == "stopped"
    assert "federation budget 2.0" in summary["message"]
    assert summary["rounds_completed"] < 3
    assert all(e <= 2.0 for e in summary["epsilon_by_partner"].values())


def test_node_refuses_a_round_past_its_own_cap_and_the_run_goes_on(
    federation: Federation,
) -> None:
    federation.start_node("delta", 3, cap=0.8)  # stats release (ε≈0.65) fits, a round does not
    try:
        time.sleep(3)
        code, summary, err = federation.train(*RUN_ARGS, "--rounds", "2")
        assert code == 0, err
        store = FederationStore(federation.paths.db)
        try:
            rounds = store.rounds(summary["run_id"])
        finally:
            store.close()
        assert rounds[0][1]["failed"] == ["delta"]
        assert "delta" not in rounds[0][1]["partners"]
        conn = sqlite3.connect(federation.paths.node_dir("delta") / "ledger.db")
        mechanisms = [r[0] for r in conn.execute("SELECT mechanism FROM charges")]
        conn.close()
        assert mechanisms == ["gaussian-sums"]  # refused before spending on DP-SGD
    finally:
        federation.nodes.pop("delta").stop()


def test_corrupt_checkpoint_refuses_to_resume(federation: Federation, f_run: dict) -> None:  # type: ignore[type-arg]
    conn = sqlite3.connect(federation.paths.db)
    with conn:
        conn.execute(
            "UPDATE checkpoints SET state = zeroblob(64) WHERE run_id = ?", (f_run["run_id"],)
        )
        conn.execute("UPDATE runs SET status='running' WHERE run_id = ?", (f_run["run_id"],))
    conn.close()
    result = federation.cli("train", "--resume", f_run["run_id"])
    assert result.returncode == 9
    assert "corrupt" in result.stderr


@pytest.fixture(scope="module")
def f_run(federation: Federation) -> dict:  # type: ignore[type-arg]
    code, summary, err = federation.train(*RUN_ARGS)
    assert code == 0, err
    return summary


def test_a_node_whose_key_was_never_registered_is_refused(federation: Federation) -> None:
    # mallory holds a well-formed P-384 key pair, but the operator never
    # registered its public key with the SuperLink.
    federation.start_node("mallory", 0, cap=100.0, register=False)
    node = federation.nodes.pop("mallory")
    try:
        deadline = time.monotonic() + 60
        while node.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not node.alive(), "an unregistered node stayed connected"
        assert node.popen.returncode != 0
        assert "Failed to activate SuperNode" in node.log_tail(30)
    finally:
        node.stop()


def _coordinator_has_stats_of(federation: Federation, partner: str) -> bool:
    # The coordinator commits the stats round's charges once it holds every
    # reply: from then on the partner is in the run, whatever it does next.
    with FederationStore(federation.paths.db) as store:
        return any(row.partner == partner for row in store.ledger())


def test_a_partner_that_stops_answering_is_dropped_and_the_run_goes_on(
    federation: Federation,
) -> None:
    # zeta answers the stats round, then freezes (SIGSTOP: alive, connected,
    # silent), so every training round it is sent times out for it. With
    # min_partners = 2 the run must finish on the other three.
    federation.start_node("zeta", 3, cap=100.0)
    node = federation.nodes["zeta"]
    config = federation.paths.home / "timeout.toml"
    # 30 s, not 15: on a 2-core machine loaded by other jobs a node that spawns
    # a fresh ClientApp per message can take over 15 s to answer, and a late
    # stats reply leaves that partner out of the run.
    config.write_text("[training]\nround_timeout_s = 30\nmin_partners = 2\n")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    time.sleep(3)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "fedvault", "train", "--home", str(federation.paths.home),
         "--json", *RUN_ARGS, "--rounds", "2", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    frozen = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.poll() is None:
            if _coordinator_has_stats_of(federation, "zeta"):
                # Not sooner (e.g. on the node's "Sending" log line): frozen
                # mid-push under load, its reply never arrived and zeta was
                # simply not in the run. Whether it has pulled round 1 yet or
                # not, a frozen zeta answers no training round.
                os.killpg(node.pid, signal.SIGSTOP)
                frozen = True
                break
            time.sleep(0.05)
        assert frozen, "the coordinator never got zeta's stats reply"
        out, err = trainer.communicate(timeout=240)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.communicate()
        if frozen:
            os.killpg(node.pid, signal.SIGKILL)
            os.killpg(node.pid, signal.SIGCONT)
        federation.nodes.pop("zeta").stop()
    assert trainer.returncode == 0, out + err
    summary = json.loads(out)
    assert summary["status"] == "finished"
    assert "zeta" in summary["epsilon_by_partner"], "zeta's stats reply missed the round"
    store = FederationStore(federation.paths.db)
    try:
        rounds = store.rounds(summary["run_id"])
    finally:
        store.close()
    assert [r for r, _ in rounds] == [1, 2]
    for _, metrics in rounds:
        assert metrics["failed"] == ["zeta"]
        assert metrics["partners"] == sorted(PARTNERS)
