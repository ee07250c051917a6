"""Round-time benchmark: fedvault deployment vs a vanilla Flower 1.41 deployment.

Same tiny task on both sides: softmax regression (logreg) on digits, 3 partners,
``R`` rounds (3 with ``--quick``, 5 otherwise), 20 local SGD steps of batch 64.

* **fedvault** — real processes started with the ``fedvault.cli.federation``
  helpers, exactly as ``fedvault demo`` does: ``flower-superlink`` with TLS and
  SuperNode authentication, 3 registered ``flower-supernode``s with per-site node
  config (CSV files, ledger, ε cap), a run of ``server.coordinator:app`` /
  ``clients.app:app`` submitted with ``submit_run`` (DP-SGD on, ε target 3,
  ``min_partners=3``). Per-round time comes from the ``committed_at`` timestamps
  of the ``rounds`` table in the federation DB.
* **vanilla Flower** — a minimal quickstart-shaped app written to a temp dir:
  ServerApp running ``flwr.serverapp.strategy.FedAvg`` on the grid, ClientApp with
  ``@app.train`` and ``@app.evaluate`` (separate messages) doing the torch logreg
  on sklearn's digits; insecure ``flower-superlink`` + 3 insecure
  ``flower-supernode``s; submitted with ``flwr run APP CONNECTION`` from a private
  FLWR_HOME. Per-round time comes from timestamps the ServerApp writes from the
  strategy's ``evaluate_fn`` hook (called after every round; it only records time).

Both per-round figures are the mean interval between the ends of consecutive
rounds 1..R (steady state: excludes process start-up, fedvault's stats round and
final evaluation); end-to-end time / R is reported too.

* **fedvault on the simulation engine** — the same ServerApp/ClientApp run with
  ``flwr run`` on a simulation SuperLink (Ray backend, ``options.num-supernodes``
  = 3, 10, 30 and 100 by default, ``--sim-partners``; one Ray ClientApp
  actor per core, or ``--sim-actors``). Virtual nodes get only ``partition-id``; the run
  config's ``sim-data-dir`` (a ``fedvault data split`` directory) and
  ``sim-epsilon-cap`` give each its data, ledger and cap. Same per-round
  measure (``committed_at`` of the federation DB), also divided by the number
  of partners (``s_per_partner``) and as the marginal cost of each partner
  added between two sizes (``simulation_scaling``): the scaling target is a
  per-partner cost that does not grow, and 100 partners at ≤ 10 s per round.
  Needs the ``simulation`` extra (Ray); without it the bench stops at once.

All processes run on 127.0.0.1 with free ports, in their own process groups, and
are stopped (with any descendants, by pid) in ``finally``.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

from fedvault.cli import federation as fed
from fedvault.cli.processes import (
    SUPEREXEC_POLL_ENV,
    ProcessGroup,
    child_env,
    executable,
    free_port,
    wait_for_port,
)

PARTNERS = ["alpha", "beta", "gamma"]
LOCAL_STEPS = 20
BATCH = 64
LR = 0.1


def log(msg: str) -> None:
    print(f"[rounds {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------- process hygiene
def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pids: list[int]) -> set[int]:
    tree = _children_map()
    seen: set[int] = set()
    stack = list(pids)
    while stack:
        pid = stack.pop()
        for child in tree.get(pid, []):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def stop_everything(group: ProcessGroup, extra: set[int]) -> None:
    """Stop the group (SIGTERM, then SIGKILL per process group), then any
    descendant we recorded that escaped into its own session (e.g. Ray)."""
    tracked = extra | descendants([p.pid for p in group.processes])
    group.stop_all()
    for pid in sorted(tracked):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------- fedvault
def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def run_fedvault(work: Path, rounds: int, group: ProcessGroup, extra: set[int]) -> dict[str, Any]:
    from fedvault.datasets import split_dataset
    from fedvault.training_config import TrainingConfig

    paths = fed.FederationPaths(work / "fedvault")
    t0 = time.monotonic()
    fed.init_federation(paths, PARTNERS, ["127.0.0.1", "localhost"])
    split_dataset("digits", paths.home / "data", partners=3, alpha=1.0, seed=0)
    port = free_port()
    fed.start_superlink(group, paths, "127.0.0.1", port)
    for i, partner in enumerate(PARTNERS):
        fed.register_node(paths, partner)
        data = paths.home / "data" / f"partner-{i}"
        fed.start_supernode(
            group,
            paths,
            partner,
            superlink=f"127.0.0.1:{port}",
            node_config={
                "partner": partner,
                "train-csv": str((data / "train.csv").resolve()),
                "test-csv": str((data / "test.csv").resolve()),
                "ledger": str((paths.node_dir(partner) / "ledger.db").resolve()),
                "epsilon-cap": 10.0,
            },
            port=free_port(),
        )
    log(f"fedvault: SuperLink (TLS, node auth) + 3 SuperNodes up in {time.monotonic() - t0:.1f} s")
    cfg = TrainingConfig(
        dataset="digits",
        model="logreg",
        rounds=rounds,
        local_steps=LOCAL_STEPS,
        batch_size=BATCH,
        min_partners=3,
    )
    run_id = fed.new_run_id()
    t_submit = time.time()
    fed.submit_run(paths, run_id=run_id, config=cfg)
    status, message = _wait_fedvault(paths.db, run_id, group, timeout_s=240)
    t_done = time.time()
    extra |= descendants([p.pid for p in group.processes])
    return {"status": status, "message": message[:200], **_round_times(paths.db, run_id)} | {
        "end_to_end_s_per_round": round((t_done - t_submit) / rounds, 3)
    }


def _round_times(db: Path, run_id: str) -> dict[str, Any]:
    """Per-round intervals from the ``committed_at`` stamps of the federation DB."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT round, committed_at FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
        ).fetchall()
        created = conn.execute("SELECT created_at FROM runs WHERE run_id=?", (run_id,)).fetchone()
    stamps = [_iso(ts) for _, ts in rows]
    gaps = _intervals(stamps)
    return {
        "rounds_committed": len(rows),
        "round_intervals_s": [round(g, 3) for g in gaps],
        "s_per_round": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "first_round_s_after_run_created": round(stamps[0] - _iso(created[0]), 3)
        if stamps and created
        else None,
    }


def _wait_fedvault(db: Path, run_id: str, group: ProcessGroup, timeout_s: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    last = -1
    while time.monotonic() < deadline:
        group.check_alive()
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    row = conn.execute(
                        "SELECT status, message, current_round FROM runs WHERE run_id=?",
                        (run_id,),
                    ).fetchone()
            except sqlite3.OperationalError:
                row = None
            if row is not None:
                if row[2] != last:
                    last = row[2]
                    log(f"fedvault: round {last} committed")
                if row[0] != "running":
                    return str(row[0]), str(row[1])
        time.sleep(0.25)
    raise TimeoutError(f"fedvault run {run_id} did not finish in {timeout_s:.0f} s")


# ------------------------------------------------------------------------ vanilla
VANILLA_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "vanillabench"
version = "1.0.0"
description = "Minimal quickstart-shaped Flower app (bench/rounds.py baseline)"
license = "Apache-2.0"
dependencies = ["flwr>=1.41", "torch", "scikit-learn"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "vanillabench.server_app:app"
clientapp = "vanillabench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
local-steps = 20
batch-size = 64
lr = 0.1
timing-file = ""
"""

VANILLA_TASK = '''\
"""Model, data and train/test of the vanilla app (torch logreg on sklearn digits)."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def Net() -> nn.Module:
    return nn.Linear(64, 10)


def load_data(partition_id: int, num_partitions: int):
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    part = np.array_split(order, num_partitions)[partition_id]
    x = torch.tensor(x[part] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[part], dtype=torch.int64)
    n_test = len(y) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def train(net, data, steps, batch_size, lr):
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        opt.zero_grad()
        loss = loss_fn(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss)
    return total / steps


def test(net, data):
    x, y = data
    with torch.no_grad():
        logits = net(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    return loss, acc
'''

VANILLA_CLIENT = '''\
"""vanillabench: a Flower / PyTorch ClientApp (quickstart shape)."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from vanillabench.task import Net, load_data, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainset, _ = load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    loss = train(
        model,
        trainset,
        int(context.run_config["local-steps"]),
        int(context.run_config["batch-size"]),
        float(msg.content["config"]["lr"]),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(trainset[1])}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testset = load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    loss, acc = test(model, testset)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(testset[1])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
'''

VANILLA_SERVER = '''\
"""vanillabench: a Flower / PyTorch ServerApp (quickstart shape) + round timestamps."""

import time

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from vanillabench.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-server-rounds"])
    lr = float(context.run_config["lr"])
    timing_file = str(context.run_config["timing-file"])

    def stamp(server_round, arrays):
        # Called before round 1 and after every round: only records the time.
        with open(timing_file, "a") as fh:
            fh.write(f"{server_round} {time.time()}\\n")
        return None

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=3,
        min_evaluate_nodes=3,
        min_available_nodes=3,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=stamp,
    )
    with open(timing_file, "a") as fh:
        fh.write(f"done {time.time()}\\n")
'''


def write_vanilla_app(app_dir: Path) -> None:
    pkg = app_dir / "vanillabench"
    pkg.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(VANILLA_PYPROJECT)
    (pkg / "__init__.py").write_text('"""vanillabench."""\n')
    (pkg / "task.py").write_text(VANILLA_TASK)
    (pkg / "client_app.py").write_text(VANILLA_CLIENT)
    (pkg / "server_app.py").write_text(VANILLA_SERVER)


def stock_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Flower's defaults for the vanilla side: no fedvault tuning of its polls."""
    env = child_env(extra)
    if SUPEREXEC_POLL_ENV not in os.environ:
        env.pop(SUPEREXEC_POLL_ENV, None)
    return env


def _flwr_run(
    app: Path,
    connection: str,
    flwr_home: Path,
    overrides: dict[str, Any],
    cwd: Path,
    federation_config: dict[str, Any] | None = None,
) -> str:
    """``flwr run`` with a run-config file (and ``--federation-config``); its JSON reply.

    With ``--format json`` Flower exits 0 even when it refused the run and says
    so only in the JSON (``"success": false``); taking that for a submission
    left the caller waiting for a run that never existed.
    """
    override_file = cwd / f"run-config-{connection}.toml"
    override_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items()))
    env = child_env({"FLWR_HOME": str(flwr_home)})
    argv = [executable("flwr"), "run", str(app), connection, "--run-config", str(override_file)]
    if federation_config:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in federation_config.items())
        argv += ["--federation-config", pairs]
    argv += ["--format", "json"]
    last = ""
    for attempt in range(5):
        res = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=120, check=False, cwd=cwd
        )
        if res.returncode == 0 and _submitted(res.stdout):
            return res.stdout
        last = (res.stdout + res.stderr)[-1500:]
        time.sleep(0.5 * 2**attempt)
    raise RuntimeError(f"flwr run failed: {last}")


def _submitted(stdout: str) -> bool:
    """Whether ``flwr run --format json`` reports a started run."""
    try:
        reply = json.loads(stdout)
    except ValueError:
        return False
    return isinstance(reply, dict) and reply.get("success") is True


def run_vanilla(work: Path, rounds: int, group: ProcessGroup, extra: set[int]) -> dict[str, Any]:
    home = work / "vanilla"
    app = home / "app"
    write_vanilla_app(app)
    flwr_home = home / "flwr"
    flwr_home.mkdir(parents=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "vanilla"\n\n'
        f'[superlink.vanilla]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    t0 = time.monotonic()
    env = stock_env({"FLWR_HOME": str(flwr_home)})
    argv = [
        executable("flower-superlink"),
        "--insecure",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    link = group.start("vanilla-superlink", argv, home / "logs" / "superlink.log", env)
    wait_for_port("127.0.0.1", port, timeout_s=60, process=link)
    for i in range(3):
        argv = [
            executable("flower-supernode"),
            "--insecure",
            "--superlink", f"127.0.0.1:{port}",
            "--node-config", f"partition-id={i} num-partitions=3",
            "--port", str(free_port()),
            "--max-retries", "10",
            "--max-wait-time", "60",
        ]  # fmt: skip
        group.start(
            f"vanilla-supernode-{i}", argv, home / "logs" / f"supernode-{i}.log", stock_env()
        )
    log(f"vanilla: insecure SuperLink + 3 SuperNodes up in {time.monotonic() - t0:.1f} s")
    timing = home / "timing.txt"
    t_submit = time.time()
    _flwr_run(
        app,
        "vanilla",
        flwr_home,
        {
            "num-server-rounds": rounds,
            "local-steps": LOCAL_STEPS,
            "batch-size": BATCH,
            "lr": LR,
            "timing-file": str(timing),
        },
        home,
    )
    deadline = time.monotonic() + 240
    stamps: dict[str, float] = {}
    while time.monotonic() < deadline:
        group.check_alive()
        if timing.exists():
            stamps = dict(
                (k, float(v)) for k, v in (ln.split() for ln in timing.read_text().splitlines())
            )
            if "done" in stamps:
                break
        time.sleep(0.25)
    else:
        raise TimeoutError("vanilla run did not finish in 240 s")
    extra |= descendants([p.pid for p in group.processes])
    ends = [stamps[str(r)] for r in range(1, rounds + 1)]
    gaps = _intervals(ends)
    return {
        "status": "finished",
        "round_intervals_s": [round(g, 3) for g in gaps],
        "s_per_round": round(sum(gaps) / len(gaps), 3),
        "strategy_s_per_round": round((stamps[str(rounds)] - stamps["0"]) / rounds, 3),
        "end_to_end_s_per_round": round((stamps["done"] - t_submit) / rounds, 3),
    }


# --------------------------------------------------------------------- simulation
def require_simulation_engine() -> None:
    """Exit at once, with the fix, when Flower's simulation engine (Ray) is absent.

    Without it the simulation SuperLink starts, its simulation process dies
    at the first run, and ``flwr run`` waits for a run that never starts.
    """
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit(
            "the simulation runs need Flower's simulation engine (Ray): "
            "pip install 'fedvault[simulation]' (make install does), "
            "or pass --no-simulation"
        )


def run_simulation(
    work: Path,
    rounds: int,
    group: ProcessGroup,
    extra: set[int],
    partners: int = 3,
    actors: int | None = None,
) -> dict[str, Any]:
    """The same ServerApp/ClientApp on Flower's simulation engine (Ray), ``partners`` nodes.

    Virtual nodes get only ``partition-id``; the run config names the data
    split (``sim-data-dir``) and the nodes' cap (``sim-epsilon-cap``), which
    ``clients.app.NodeSettings.from_context`` turns into per-partner settings.
    Flower's federation config sets the engine: one CPU per ClientApp
    (``client-resources-num-cpus``; Flower's default is 2, one actor on this
    2-core machine), so Ray keeps one long-lived actor per CPU it was given
    (``init-args-num-cpus``: ``actors``, or every core when None) and feeds
    every virtual node's messages through that pool.
    """
    from fedvault.datasets import split_dataset
    from fedvault.training_config import TrainingConfig

    paths = fed.FederationPaths(work / f"fedvault-sim-{partners}")
    fed.init_federation(paths, PARTNERS, ["127.0.0.1", "localhost"])
    data_dir = paths.home / "data"
    split_dataset("digits", data_dir, partners=partners, alpha=1.0, seed=0, min_examples=10)
    flwr_home = paths.home / "flwr-sim"
    flwr_home.mkdir(parents=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n'
        f'[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    federation: dict[str, Any] = {"num-supernodes": partners, "client-resources-num-cpus": 1}
    if actors is not None:
        federation["init-args-num-cpus"] = actors
    env = child_env({"FLWR_HOME": str(flwr_home)})
    argv = [
        executable("flower-superlink"),
        "--insecure",
        "--simulation",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    link = group.start("sim-superlink", argv, paths.logs / "sim-superlink.log", env)
    wait_for_port("127.0.0.1", port, timeout_s=60, process=link)
    cfg = TrainingConfig(
        dataset="digits", model="logreg", rounds=rounds, local_steps=LOCAL_STEPS,
        batch_size=BATCH, min_partners=partners, round_timeout_s=120,
    )  # fmt: skip
    run_id = fed.new_run_id()
    t_submit = time.time()
    submitted = _flwr_run(
        paths.app_dir,
        "sim",
        flwr_home,
        {
            "fedvault-run-id": run_id,
            "state-dir": str(paths.home.resolve()),
            "training": cfg.model_dump_json(),
            "sim-data-dir": str(data_dir.resolve()),
            "sim-epsilon-cap": 10.0,
        },
        paths.home,
        federation_config=federation,
    )
    try:
        status, message = _wait_fedvault(paths.db, run_id, group, timeout_s=300)
    except TimeoutError as exc:
        status, message = "timeout", str(exc)
    finally:
        extra |= descendants([p.pid for p in group.processes])
    elapsed = time.time() - t_submit
    out: dict[str, Any] = {
        "partners": partners,
        "actors": actors or os.cpu_count(),
        "status": status,
        "message": message[:240],
        "end_to_end_s_per_round": round(elapsed / rounds, 3),
    }
    if status == "finished":
        out |= _round_times(paths.db, run_id)
        if out["s_per_round"] is not None:
            out["s_per_partner"] = round(out["s_per_round"] / partners, 4)
    else:
        out["client_refusals_seen"] = _run_log_lines(
            submitted, flwr_home, "sim", ("refused", "lacks"), limit=2
        )
    return out


def _run_log_lines(
    submitted: str, flwr_home: Path, connection: str, needles: tuple[str, ...], limit: int
) -> list[str]:
    """Lines of the run's log (``flwr log RUN_ID --show``) containing any needle."""
    try:
        flwr_run_id = str(json.loads(submitted)["run-id"])
        res = subprocess.run(
            [executable("flwr"), "log", flwr_run_id, connection, "--show"],
            env=child_env({"FLWR_HOME": str(flwr_home)}),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (ValueError, KeyError, OSError, subprocess.TimeoutExpired) as exc:
        return [f"(no run log: {exc})"]
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)
    hits: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^\(ClientAppActor pid=\d+\)\s*", "", line.strip())
        if any(n in line for n in needles) and line[-200:] not in hits:
            hits.append(line[-200:])
    return hits[:limit]


def simulation_scaling(sims: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-partner and marginal round cost across the simulated sizes, and the target.

    A fixed per-round cost (polls, Ray scheduling, the commit) makes the
    per-partner figure fall with size; the marginal cost of each partner added
    between consecutive sizes shows whether the partners' own cost grows.
    """
    done = sorted(
        (s["partners"], s["s_per_round"]) for s in sims if s.get("s_per_round") is not None
    )
    at_100 = dict(done).get(100)
    return {
        "s_per_partner": {str(n): round(t / n, 4) for n, t in done},
        "marginal_s_per_added_partner": {
            f"{a}->{b}": round((tb - ta) / (b - a), 4)
            for (a, ta), (b, tb) in itertools.pairwise(done)
        },
        "target_s_per_round_at_100": 10.0,
        "meets_target_at_100": None if at_100 is None else at_100 <= 10.0,
    }


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="R=3 instead of 5")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-simulation", action="store_true", help="skip the simulation runs")
    ap.add_argument("--only-simulation", action="store_true", help="skip the deployment comparison")
    ap.add_argument(
        "--sim-partners",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[3, 10, 30, 100],
        help="partner counts for the simulation-engine runs (comma-separated)",
    )
    ap.add_argument(
        "--sim-actors",
        type=int,
        default=None,
        help="Ray ClientApp actors for the simulation runs (default: one per core)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="fedvault-rounds-"))
    out: dict[str, Any] = {"benchmark": "rounds", "quick": args.quick, "rounds": rounds}
    t_start = time.monotonic()
    try:
        deployments = (
            ()
            if args.only_simulation
            else (
                ("fedvault", run_fedvault),
                ("vanilla_flower", run_vanilla),
            )
        )
        if not args.no_simulation:
            require_simulation_engine()
        for name, fn in deployments:
            extra: set[int] = set()
            with ProcessGroup() as group:
                try:
                    out[name] = fn(work, rounds, group, extra)
                except Exception as exc:  # report, and still run the other side
                    out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]}
                    log(f"{name} failed: {exc}")
                finally:
                    stop_everything(group, extra)
            log(f"{name}: {out[name]}")
        if deployments:
            fv = out["fedvault"].get("s_per_round")
            va = out["vanilla_flower"].get("s_per_round")
            out["ratio_vanilla_over_fedvault"] = round(va / fv, 3) if fv and va else None
            out["target_ratio"] = 2.0
            out["meets_target"] = bool(fv and va and va / fv >= 2.0)
        sims: list[dict[str, Any]] = []
        for n in [] if args.no_simulation else args.sim_partners:
            extra = set()
            with ProcessGroup() as group:
                try:
                    sims.append(
                        run_simulation(
                            work, rounds, group, extra, partners=n, actors=args.sim_actors
                        )
                    )
                except Exception as exc:
                    sims.append(
                        {
                            "partners": n,
                            "status": "error",
                            "error": f"{type(exc).__name__}: {exc}"[:400],
                        }
                    )
                finally:
                    stop_everything(group, extra)
            log(f"simulation: {sims[-1]}")
        if sims:
            out["fedvault_simulation"] = sims
            out["simulation_scaling"] = simulation_scaling(sims)
    finally:
        out["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if args.keep:
            out["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
