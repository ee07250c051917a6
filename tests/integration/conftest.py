"""A real federation on 127.0.0.1 for integration tests.

One flower-superlink (TLS, SuperNode authentication) and partner
flower-supernodes, started through the same helpers as ``fedvault demo``, torn
down after the module whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedvault.cli import federation as fed
from fedvault.cli.processes import ManagedProcess, ProcessGroup, free_port
from fedvault.datasets import split_dataset

PARTNERS = ["alpha", "beta", "gamma"]


@dataclass
class Federation:
    paths: fed.FederationPaths
    group: ProcessGroup
    address: str
    data: Path
    nodes: dict[str, ManagedProcess] = field(default_factory=dict)

    def start_node(
        self,
        partner: str,
        index: int,
        cap: float,
        *,
        register: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Start a SuperNode; ``extra`` adds node-config keys (e.g. ``memory-mb``)."""
        if register:
            fed.register_node(self.paths, partner)
        self.nodes[partner] = fed.start_supernode(
            self.group,
            self.paths,
            partner,
            superlink=self.address,
            node_config=self._node_config(partner, index, cap, extra),
            port=free_port(),
        )

    def _node_config(
        self, partner: str, index: int, cap: float, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        split = self.data / f"partner-{index}"
        return {
            "partner": partner,
            "train-csv": str(split / "train.csv"),
            "test-csv": str(split / "test.csv"),
            "ledger": str(self.paths.node_dir(partner) / "ledger.db"),
            "epsilon-cap": cap,
            **(extra or {}),
        }

    def restart_node(self, partner: str, index: int, cap: float) -> None:
        """Start a crashed partner's SuperNode again: same key, data and ledger.

        Waits (bounded) until the SuperLink has let go of the dead session.
        """
        self.nodes[partner] = fed.restart_supernode(
            self.group,
            self.paths,
            partner,
            superlink=self.address,
            node_config=self._node_config(partner, index, cap),
            port=free_port(),
        )

    def cli(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--home", str(self.paths.home), timeout=timeout, env=env)

    def train(
        self, *args: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], str]:
        result = run_cli(
            "train", "--home", str(self.paths.home), "--json", *args, timeout=timeout, env=env
        )
        summary = json.loads(result.stdout) if result.stdout.strip() else {}
        return result.returncode, summary, result.stderr


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m fedvault ARGS`` with our venv first on PATH; ``env`` adds variables."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    home = tmp_path_factory.mktemp("federation")
    paths = fed.FederationPaths(home)
    fed.init_federation(paths, [*PARTNERS, "delta", "mallory", "zeta"], ["127.0.0.1", "localhost"])
    split_dataset("digits", home / "data", partners=4, alpha=1.0, seed=0)
    with ProcessGroup() as group:
        port = free_port()
        fed.start_superlink(group, paths, "127.0.0.1", port)
        f = Federation(paths, group, f"127.0.0.1:{port}", home / "data")
        for i, partner in enumerate(PARTNERS):
            f.start_node(partner, i, cap=100.0)
        yield f
