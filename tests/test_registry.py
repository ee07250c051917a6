"""server.registry: model keys, sealed artifacts, lineage and tamper detection.

The registry tests run three ways: artifacts as files beside a SQLite store
(the default), artifacts in a SQLite store (no directory), and artifacts in a
real PostgreSQL (what gateway replicas on other hosts read).
"""

from __future__ import annotations

import dataclasses
import itertools
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedvault.errors import ConfigError, IntegrityError, KeyFileError
from fedvault.modelspec import FloatArray, ModelSpec, init_parameters
from fedvault.stats import Scaler
from secure import generate_encryption_key, key_id
from server.registry import (
    ENCRYPTION_KEY_FILE,
    SIGNING_KEY_FILE,
    VERIFY_KEY_FILE,
    ModelKeys,
    ModelRegistry,
    ensure_model_keys,
    load_model_keys,
    privacy_statement,
)
from server.store import FederationStore
from tests.audit_support import fetch_value, fresh_database, run_sql

_dbs = itertools.count()

SPEC = ModelSpec(kind="mlp", n_features=6, n_classes=3, hidden=4, activation="relu")
LINEAGE: dict[str, Any] = {
    "run_id": "run-1",
    "dataset": "digits",
    "private": True,
    "epsilon": {"partner-0": 1.234, "partner-1": 2.5},
    "delta": 1e-5,
    "accountant": "rdp opacus-1.6",
    "rounds_completed": 5,
    "hyperparameters": {"max_grad_norm": 1.0, "rounds": 5},
}


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    ensure_model_keys(path)
    return path


@dataclasses.dataclass
class Where:
    """Where artifacts live, and how an attacker with write access would alter them."""

    mode: str  # "file", "sqlite-db" or "postgres"
    location: str
    registry_dir: Path | None  # what ModelRegistry is given

    @property
    def in_db(self) -> bool:
        return self.mode != "file"

    def read(self, model_id: str) -> bytes:
        if not self.in_db:
            assert self.registry_dir is not None
            return (self.registry_dir / f"{model_id}.fvar").read_bytes()
        blob = fetch_value(
            self.location, "SELECT artifact_blob FROM models WHERE model_id = %s", (model_id,)
        )
        assert isinstance(blob, bytes)
        return blob

    def write(self, model_id: str, blob: bytes | None) -> None:
        if not self.in_db:
            assert self.registry_dir is not None
            path = self.registry_dir / f"{model_id}.fvar"
            if blob is None:
                path.unlink()
            else:
                path.write_bytes(blob)
            return
        run_sql(
            self.location,
            "UPDATE models SET artifact_blob = %s WHERE model_id = %s",
            (blob, model_id),
        )


@pytest.fixture(params=["file", "sqlite-db", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "postgres":
        url = fresh_database(request.getfixturevalue("pg_admin"), f"registry_{next(_dbs)}")
        # A directory is given but must stay unused: PostgreSQL stores hold the blob.
        return Where("postgres", url, tmp_path / "registry")
    location = str(tmp_path / "fed.sqlite")
    if request.param == "sqlite-db":
        return Where("sqlite-db", location, None)
    return Where("file", location, tmp_path / "registry")


@pytest.fixture
def store(where: Where) -> Iterator[FederationStore]:
    s = FederationStore(where.location)
    s.create_run("run-1", {}, {})
    s.create_run("run-2", {}, {})
    yield s
    s.close()


@pytest.fixture
def registry_dir(where: Where) -> Path | None:
    return where.registry_dir


@pytest.fixture
def registry(store: FederationStore, registry_dir: Path | None, keys_dir: Path) -> ModelRegistry:
    return ModelRegistry(store, registry_dir, load_model_keys(keys_dir))


def _scaler() -> Scaler:
    return Scaler(mean=np.linspace(0.0, 5.0, 6), std=np.linspace(1.0, 2.0, 6))


def _register(registry: ModelRegistry, seed: int = 0, run_id: str = "run-1") -> str:
    return registry.register(
        name="digits-mlp",
        run_id=run_id,
        spec=SPEC,
        params=init_parameters(SPEC, seed),
        scaler=_scaler(),
        lineage={**LINEAGE, "run_id": run_id},
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_model_keys_creates_private_files_once(tmp_path: Path) -> None:
    keys_dir = tmp_path / "new" / "keys"
    ensure_model_keys(keys_dir)
    assert _mode(keys_dir / SIGNING_KEY_FILE) == 0o600
    assert _mode(keys_dir / ENCRYPTION_KEY_FILE) == 0o600
    assert _mode(keys_dir / VERIFY_KEY_FILE) == 0o644  # a public key, meant to be shared
    before = {p.name: p.read_bytes() for p in keys_dir.iterdir()}
    assert set(before) == {SIGNING_KEY_FILE, VERIFY_KEY_FILE, ENCRYPTION_KEY_FILE}
    ensure_model_keys(keys_dir)
    assert {p.name: p.read_bytes() for p in keys_dir.iterdir()} == before
    keys = load_model_keys(keys_dir)
    assert keys.signing_key is not None
    assert len(keys.verify_key) == 32
    assert len(keys.encryption_key) == 32
    assert load_model_keys(keys_dir, signing=False).signing_key is None


def test_register_then_load_round_trips(
    registry: ModelRegistry,
    store: FederationStore,
    registry_dir: Path | None,
    keys_dir: Path,
    where: Where,
) -> None:
    params = init_parameters(SPEC, 0)
    model_id = _register(registry)
    assert model_id.startswith("digits-mlp-v1-")
    assert registry.stores_in_database == where.in_db
    if where.in_db:
        assert store.model_artifact(model_id) == where.read(model_id)
        assert registry_dir is None or not registry_dir.exists()  # nothing on disk
    else:
        assert registry_dir is not None
        assert _mode(registry_dir / f"{model_id}.fvar") == 0o600
        assert store.model_artifact(model_id) is None

    loaded = registry.load(model_id)
    assert loaded.model_id == model_id
    assert loaded.spec == SPEC
    assert len(loaded.params) == len(params)
    for got, want in zip(loaded.params, params, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.float32
    np.testing.assert_array_equal(loaded.scaler.mean, _scaler().mean)
    np.testing.assert_array_equal(loaded.scaler.std, _scaler().std)
    statement = loaded.lineage.pop("privacy_statement")
    assert loaded.lineage == LINEAGE
    assert "ε=1.23" in statement
    assert "ε=2.5" in statement
    assert "δ=1e-05" in statement
    assert "5 rounds" in statement

    row = store.model(model_id)
    assert (row["name"], row["version"], row["run_id"]) == ("digits-mlp", 1, "run-1")
    assert row["lineage"]["privacy_statement"] == statement
    assert row["signing_key_id"] == key_id(load_model_keys(keys_dir).verify_key)
    assert store.run("run-1").model_id == model_id

    # A serving process needs no signing key to load.
    reader = ModelRegistry(store, registry_dir, load_model_keys(keys_dir, signing=False))
    assert reader.load(model_id).spec == SPEC
    with pytest.raises(KeyFileError, match="signing key"):
        _register(reader)


def test_versions_increase(registry: ModelRegistry, store: FederationStore) -> None:
    a = _register(registry, seed=1)
    b = _register(registry, seed=2, run_id="run-2")
    assert [store.model(m)["version"] for m in (a, b)] == [1, 2]
    assert not np.array_equal(registry.load(a).params[0], registry.load(b).params[0])


def test_artifact_reveals_no_lineage_without_keys(registry: ModelRegistry, where: Where) -> None:
    model_id = _register(registry)
    blob = where.read(model_id)
    assert b"partner-0" not in blob
    assert b"privacy_statement" not in blob


def test_the_statement_names_the_evaluation_sums_released_for_the_task() -> None:
    classes = privacy_statement({**LINEAGE, "task": "multiclass"})
    assert "confusion matrix" in classes
    regression = privacy_statement({**LINEAGE, "task": "regression"})
    assert "sum of squares of the target" in regression
    assert "accuracy" not in regression
    assert "not covered by ε" in regression


def test_non_private_statement() -> None:
    text = privacy_statement({**LINEAGE, "private": False})
    assert "WITHOUT differential privacy" in text


def test_register_refuses_bad_parameters(registry: ModelRegistry, store: FederationStore) -> None:
    params: list[FloatArray] = init_parameters(SPEC, 0)
    params[0] = params[0][:, :3]
    with pytest.raises(ConfigError, match="shapes"):
        registry.register(
            name="x", run_id="run-1", spec=SPEC, params=params, scaler=_scaler(), lineage=LINEAGE
        )
    assert store.models() == []


def test_flipped_byte_is_detected(registry: ModelRegistry, where: Where) -> None:
    model_id = _register(registry)
    blob = where.read(model_id)
    for offset in (0, len(blob) // 2, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[offset] ^= 0x01
        where.write(model_id, bytes(tampered))
        with pytest.raises(IntegrityError):
            registry.load(model_id)
    where.write(model_id, blob[:-1])  # truncated
    with pytest.raises(IntegrityError):
        registry.load(model_id)
    where.write(model_id, blob)
    assert registry.load(model_id).model_id == model_id


def test_swapped_artifact_is_detected(registry: ModelRegistry, where: Where) -> None:
    victim = _register(registry, seed=1)
    other = _register(registry, seed=2, run_id="run-2")
    where.write(victim, where.read(other))
    where.write(other, None)
    with pytest.raises(IntegrityError, match="signed for model"):
        registry.load(victim)
    with pytest.raises(IntegrityError, match="missing"):
        registry.load(other)


def test_wrong_encryption_key_is_detected(
    registry: ModelRegistry, store: FederationStore, registry_dir: Path | None, keys_dir: Path
) -> None:
    model_id = _register(registry)
    keys = load_model_keys(keys_dir)
    wrong = dataclasses.replace(keys, encryption_key=generate_encryption_key())
    with pytest.raises(IntegrityError):
        ModelRegistry(store, registry_dir, wrong).load(model_id)


def test_other_signing_key_is_detected(
    registry: ModelRegistry,
    store: FederationStore,
    registry_dir: Path | None,
    keys_dir: Path,
    tmp_path: Path,
) -> None:
    model_id = _register(registry)
    ensure_model_keys(tmp_path / "other-keys")
    other = load_model_keys(tmp_path / "other-keys")
    mine = load_model_keys(keys_dir)
    keys = ModelKeys(None, other.verify_key, mine.encryption_key)
    with pytest.raises(IntegrityError, match="key id"):
        ModelRegistry(store, registry_dir, keys).load(model_id)


def test_missing_encryption_key_file(keys_dir: Path) -> None:
    (keys_dir / ENCRYPTION_KEY_FILE).unlink()
    with pytest.raises(KeyFileError, match=ENCRYPTION_KEY_FILE):
        load_model_keys(keys_dir)


def test_missing_verify_key_file(keys_dir: Path) -> None:
    (keys_dir / VERIFY_KEY_FILE).unlink()
    with pytest.raises(KeyFileError, match=VERIFY_KEY_FILE):
        load_model_keys(keys_dir)


def test_loose_key_file_mode_is_refused(keys_dir: Path) -> None:
    (keys_dir / ENCRYPTION_KEY_FILE).chmod(0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        load_model_keys(keys_dir)


def test_encryption_key_from_argument(
    registry: ModelRegistry, store: FederationStore, registry_dir: Path | None, keys_dir: Path
) -> None:
    model_id = _register(registry)
    key_file = keys_dir / ENCRYPTION_KEY_FILE
    b64 = key_file.read_text(encoding="ascii").strip()
    key_file.unlink()
    keys = load_model_keys(keys_dir, encryption_key_b64=b64, signing=False)
    assert ModelRegistry(store, registry_dir, keys).load(model_id).model_id == model_id
    with pytest.raises(KeyFileError):
        load_model_keys(keys_dir, encryption_key_b64="not base64 !!", signing=False)


_LOAD_ELSEWHERE = """
import json, sys
from pathlib import Path
from server.registry import ModelRegistry, load_model_keys
from server.store import FederationStore

store = FederationStore(sys.argv[1])
keys = load_model_keys(Path(sys.argv[2]), signing=False)
loaded = ModelRegistry(store, None, keys).load(sys.argv[3])
print(json.dumps({"model_id": loaded.model_id, "n_features": loaded.spec.n_features}))
store.close()
"""


def test_a_replica_loads_from_the_database_alone(
    registry: ModelRegistry, where: Where, keys_dir: Path, tmp_path: Path
) -> None:
    """Another process with only the database location and the keys: no registry directory."""
    if not where.in_db:
        pytest.skip("file-backed artifacts need the registry directory by design")
    model_id = _register(registry)
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_ELSEWHERE, where.location, str(keys_dir), model_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'"model_id": "{model_id}"' in result.stdout
    assert not (tmp_path / "registry").exists()


def test_rows_from_a_file_registry_stay_readable(
    where: Where, keys_dir: Path, tmp_path: Path
) -> None:
    """Rows written before artifacts moved into the database (NULL blob) load from the directory."""
    with FederationStore(where.location) as store:
        store.create_run("run-1", {}, {})
        model_id = _register(ModelRegistry(store, tmp_path / "old-registry", _keys(keys_dir)))
        assert store.shared or store.model_artifact(model_id) is None
        if store.shared:  # make it look like a row from before: file on disk, no blob
            (tmp_path / "old-registry").mkdir(exist_ok=True)
            (tmp_path / "old-registry" / f"{model_id}.fvar").write_bytes(where.read(model_id))
            where.write(model_id, None)
        reader = ModelRegistry(store, tmp_path / "old-registry", load_model_keys(keys_dir))
        assert reader.load(model_id).model_id == model_id


def _keys(keys_dir: Path) -> ModelKeys:
    return load_model_keys(keys_dir)
