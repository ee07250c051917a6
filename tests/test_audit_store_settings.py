"""Where the audit log lives: settings, password files, and the coordinator's run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedvault.errors import ConfigError
from fedvault.settings import FedvaultSettings
from server.audit.storage import SQLiteStorage, open_storage


def test_default_is_a_sqlite_file_in_home(tmp_path: Path) -> None:
    settings = FedvaultSettings(home=tmp_path)
    assert settings.audit_location == str(tmp_path / "audit.db")


def test_a_postgres_url_without_password_is_accepted(tmp_path: Path) -> None:
    url = "postgresql://fedvault@db:5432/fedvault?sslmode=verify-full&sslrootcert=/ca.crt"
    settings = FedvaultSettings(home=tmp_path, audit_store=url)
    assert settings.audit_location == url


def test_a_password_in_the_url_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        FedvaultSettings(home=tmp_path, audit_store="postgresql://fedvault:hunter2@db/fedvault")
    assert "must not contain a password" in str(info.value)
    assert "hunter2" not in str(info.value.errors(include_input=False))


def test_a_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password file"):
        open_storage("postgresql://fedvault@127.0.0.1:1/x", password_file=tmp_path / "nope")


def test_a_sqlite_location_ignores_the_password_file(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "audit.db", password_file=tmp_path / "unused")
    try:
        assert isinstance(storage, SQLiteStorage)
    finally:
        storage.close()
