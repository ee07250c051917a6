"""Where the federation store and the gateway's key store live: settings and run config."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedvault.cli import federation as fed
from fedvault.errors import UnavailableError
from fedvault.settings import FedvaultSettings

URL = "postgresql://fedvault@db:5432/fedvault?sslmode=verify-full&sslrootcert=/ca.crt"


def test_defaults_are_sqlite_files_in_home(tmp_path: Path) -> None:
    settings = FedvaultSettings(home=tmp_path)
    assert settings.federation_location == str(tmp_path / "federation.db")
    assert settings.gateway_location == str(tmp_path / "gateway.db")


def test_postgres_urls_without_password_are_accepted(tmp_path: Path) -> None:
    settings = FedvaultSettings(home=tmp_path, federation_store=URL, gateway_store=URL)
    assert settings.federation_location == URL
    assert settings.gateway_location == URL


@pytest.mark.parametrize("field", ["federation_store", "gateway_store", "audit_store"])
def test_a_password_in_a_url_is_refused_naming_the_field(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        FedvaultSettings(home=tmp_path, **{field: "postgresql://fedvault:hunter2@db/fedvault"})
    errors = str(info.value.errors(include_input=False))
    assert f"{field} must not contain a password" in errors
    assert f"FEDVAULT_{field.upper()}_PASSWORD_FILE" in errors
    assert "hunter2" not in errors


@pytest.mark.parametrize(
    "env", ["FEDVAULT_AUDIT_STORE", "FEDVAULT_FEDERATION_STORE", "FEDVAULT_GATEWAY_STORE"]
)
def test_the_cli_exits_2_without_the_secret(tmp_path: Path, env: str) -> None:
    environ = dict(os.environ, **{env: "postgresql://u:hunter2@db/x"})
    result = subprocess.run(
        [sys.executable, "-m", "fedvault", "runs", "list", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert env.removeprefix("FEDVAULT_").lower() in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_coordinator_gets_the_federation_store_through_the_run_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedvault train` hands the URL and the password file's path (never the secret) over."""
    seen: list[list[str]] = []
    texts: list[str] = []

    def fake_flwr(paths: fed.FederationPaths, args: list[str]) -> str:
        seen.append(args)
        texts.append(Path(args[args.index("--run-config") + 1]).read_text())
        return '{"run-id": 7}'

    monkeypatch.setattr(fed, "run_flwr", fake_flwr)
    # A resume first marks the run running again in that store (not what this checks).
    monkeypatch.setattr(fed, "_reopen", lambda store, run_id: None)
    paths = fed.FederationPaths(tmp_path)
    fed.submit_run(
        paths,
        run_id="run-x",
        config=None,
        resume=True,
        federation_store=URL,
        federation_store_password_file=Path("/run/secrets/postgres_password"),
    )
    override = Path(seen[0][seen[0].index("--run-config") + 1])
    assert not override.exists()  # needed only while `flwr run` submits
    config = tomllib.loads(texts[0])
    assert config["federation-store"] == URL
    assert config["federation-store-password-file"] == "/run/secrets/postgres_password"
    # The app's defaults declare the keys, so Flower accepts the override.
    app_config = tomllib.loads(fed._APP_PYPROJECT)["tool"]["flwr"]["app"]["config"]
    assert app_config["federation-store"] == ""
    assert app_config["federation-store-password-file"] == ""


def test_a_failed_submission_leaves_no_run_config_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_flwr(paths: fed.FederationPaths, args: list[str]) -> str:
        assert Path(args[args.index("--run-config") + 1]).is_file()
        raise UnavailableError("SuperLink not reachable")

    monkeypatch.setattr(fed, "run_flwr", failing_flwr)
    with pytest.raises(UnavailableError):
        fed.submit_run(fed.FederationPaths(tmp_path), run_id="run-y", config=None)
    assert list((tmp_path / "run-config").iterdir()) == []


def test_the_superlink_database_and_its_leftovers_are_owner_only(tmp_path: Path) -> None:
    """It holds every message in flight; a -wal left 0644 by a crash is tightened too."""
    db = tmp_path / "superlink.db"
    wal = tmp_path / "superlink.db-wal"
    wal.write_bytes(b"left by a crash")
    wal.chmod(0o644)
    fed._private_database(db)
    assert db.stat().st_mode & 0o777 == 0o600
    assert wal.stat().st_mode & 0o777 == 0o600
