"""Bad input at the command line: a precise message and the table's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedvault.cli import federation as fed
from fedvault.cli.processes import free_port
from fedvault.datasets import split_dataset


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", **(env or {}))
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env["PATH"]
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
        check=False,
    )


def test_malformed_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[training]\nrounds = 0\naggregation = 'mean'\n")
    result = _cli("demo", "--home", str(tmp_path), "--config", str(config))
    assert result.returncode == 2
    assert "rounds" in result.stderr
    assert "aggregation" in result.stderr
    assert not (tmp_path / "demo").exists()  # refused before anything was written


def test_unreachable_superlink_gives_up_after_bounded_retries(tmp_path: Path) -> None:
    paths = fed.FederationPaths(tmp_path)
    fed.init_federation(paths, ["alpha"], ["127.0.0.1"])
    fed.write_connection(paths, f"127.0.0.1:{free_port()}")  # nothing listens there
    result = _cli(
        "train",
        "--home",
        str(tmp_path),
        env={"FEDVAULT_CONNECT_RETRIES": "2", "FEDVAULT_CONNECT_BACKOFF_S": "0.1"},
    )
    assert result.returncode == 10, result.stderr
    assert "failed after 2 attempts" in result.stderr


def test_no_federation_is_a_clear_error(tmp_path: Path) -> None:
    result = _cli("train", "--home", str(tmp_path))
    assert result.returncode == 10
    assert "no running federation" in result.stderr


def test_missing_key_file_is_reported(tmp_path: Path) -> None:
    paths = fed.FederationPaths(tmp_path)
    fed.init_federation(paths, ["alpha"], ["127.0.0.1"])
    (tmp_path / "keys" / "model-encryption.key").unlink()
    result = _cli("models", "show", "some-model", "--home", str(tmp_path))
    assert result.returncode == 5
    assert "model-encryption.key does not exist" in result.stderr


def test_node_refuses_a_file_that_does_not_match_the_schema(tmp_path: Path) -> None:
    split_dataset("digits", tmp_path / "data", partners=1, seed=0)
    train = tmp_path / "data" / "partner-0" / "train.csv"
    lines = train.read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = "abc"
    lines[2] = ",".join(cells)
    train.write_text("\n".join(lines) + "\n")
    result = _cli(
        "node", "start", "--home", str(tmp_path), "--partner", "alpha",
        "--train-csv", str(train),
        "--test-csv", str(tmp_path / "data" / "partner-0" / "test.csv"),
    )  # fmt: skip
    assert result.returncode == 3
    header = lines[0].split(",")
    assert f"line 3, column {header[5]!r}" in result.stderr
    assert "abc" in result.stderr


@pytest.mark.parametrize("split_args", [["--partners", "0"], ["--alpha", "-1"]])
def test_data_split_rejects_bad_arguments(tmp_path: Path, split_args: list[str]) -> None:
    result = _cli("data", "split", "--dataset", "digits", "--out", str(tmp_path / "o"), *split_args)
    assert result.returncode == 2


def test_data_split_json_manifest(tmp_path: Path) -> None:
    result = _cli(
        "data", "split", "--dataset", "breast-cancer", "--out", str(tmp_path / "o"), "--json"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["dataset"] == "breast-cancer"
    assert manifest["partners"] == 3
