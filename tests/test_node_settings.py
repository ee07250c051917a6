"""clients.app.NodeSettings: a deployed site's node config, and simulated partners."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.app import NodeSettings
from fedvault.errors import ConfigError


def _context(
    node: dict[str, bool | float | int | str], run: dict[str, bool | float | int | str]
) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run)


SITE = {
    "partner": "alpha",
    "train-csv": "/data/train.csv",
    "test-csv": "/data/test.csv",
    "ledger": "/var/fedvault/ledger.db",
    "epsilon-cap": 4.0,
}


def test_deployed_site_reads_its_node_config_and_ignores_simulation_keys() -> None:
    settings = NodeSettings.from_context(
        _context(SITE, {"sim-data-dir": "/elsewhere", "sim-epsilon-cap": 99.0})
    )
    assert settings.partner == "alpha"
    assert settings.train_csv == Path("/data/train.csv")
    assert settings.epsilon_cap == 4.0


def test_simulated_partner_derives_paths_from_the_split_directory(tmp_path: Path) -> None:
    settings = NodeSettings.from_context(
        _context(
            {"partition-id": 2, "num-partitions": 5},
            {"sim-data-dir": str(tmp_path), "sim-epsilon-cap": 6.0},
        )
    )
    assert settings.partner == "partner-2"
    assert settings.train_csv == tmp_path / "partner-2" / "train.csv"
    assert settings.test_csv == tmp_path / "partner-2" / "test.csv"
    assert settings.ledger == tmp_path / "ledgers" / "partner-2.db"
    assert settings.epsilon_cap == 6.0


def test_simulated_partner_without_a_data_dir_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="sim-data-dir"):
        NodeSettings.from_context(_context({"partition-id": 0, "num-partitions": 3}, {}))


def test_simulated_partner_without_a_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epsilon-cap"):
        NodeSettings.from_context(
            _context({"partition-id": 0, "num-partitions": 3}, {"sim-data-dir": str(tmp_path)})
        )


def test_site_missing_a_key_names_it() -> None:
    node = {k: v for k, v in SITE.items() if k != "ledger"}
    with pytest.raises(ConfigError, match="'ledger'"):
        NodeSettings.from_context(_context(node, {}))


def test_a_site_sets_its_table_memory_budget() -> None:
    settings = NodeSettings.from_context(_context({**SITE, "memory-mb": 64}, {}))
    assert settings.memory_bytes == 64 << 20
    assert settings.storage.memory_bytes == 64 << 20
    assert settings.storage.spill_dir == Path("/var/fedvault")  # beside the ledger
    default = NodeSettings.from_context(_context(SITE, {}))
    assert default.memory_bytes == 128 << 20
    for bad in (0, -5, "lots"):
        with pytest.raises(ConfigError, match="memory-mb"):
            NodeSettings.from_context(_context({**SITE, "memory-mb": bad}, {}))
