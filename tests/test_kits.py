"""Startup kits: contents, secrets hygiene, checks before a node starts, revocation record.

No SuperLink here (the kit's key is then registered at the next `federation up`);
the integration tests (tests/integration/test_kits.py, test_netns.py) run the real thing.
"""

from __future__ import annotations

import os
import shutil
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clients.ledger import NodeLedger
from clients.node_health import HealthServer, NodeMonitor, NodeWatch
from fedvault.cli import federation as fed
from fedvault.cli import kits
from fedvault.datasets import split_dataset
from fedvault.errors import ConfigError, KeyFileError, NotFoundError, SecurityError
from fedvault.privacy import ACCOUNTANT_NAME, PrivacyCharge
from fedvault.schema import builtin_schema
from tests.integration.conftest import run_cli

PARTNERS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> fed.FederationPaths:
    home = tmp_path_factory.mktemp("op")
    paths = fed.FederationPaths(home)
    fed.init_federation(paths, [], ["127.0.0.1"], name="acme")
    kits.init_identity(paths, "acme", ["127.0.0.1"])
    for name in PARTNERS:
        _, registered = kits.add_partner(
            paths,
            name,
            out=home / "kits" / name,
            superlink="127.0.0.1:9092",
            dataset="digits",
            epsilon_cap=5.0,
            metrics_hosts=["10.0.0.7"],
        )
        assert not registered  # no SuperLink running
    return paths


def _kit(operator: fed.FederationPaths, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(operator.home / "kits" / name, dst)
    return dst


def test_kit_holds_its_own_material_only(operator: fed.FederationPaths) -> None:
    home = operator.home
    kit = home / "kits" / "alpha"
    files = {p.relative_to(kit).as_posix() for p in kit.rglob("*") if p.is_file()}
    assert files == {
        "node.toml",
        "README.md",
        "ca.crt",
        "node_key",
        "node_key.pub",
        "tls/server.pem",
        "tls/server.key",
    }
    for secret in ("node_key", "tls/server.key"):
        assert stat.S_IMODE((kit / secret).stat().st_mode) == 0o600
    assert stat.S_IMODE(kit.stat().st_mode) == 0o700
    # Scan every byte of the kit for every secret it must not hold.
    forbidden = {
        "CA key": home / "pki" / "ca.key",
        "SuperLink key": home / "pki" / "server.key",
        "model keys": home / "keys",
    }
    for other in ("beta", "gamma"):
        forbidden[f"{other} node key"] = home / "kits" / other / "node_key"
        forbidden[f"{other} tls key"] = home / "kits" / other / "tls" / "server.key"
    key_bodies: dict[str, bytes] = {}
    for what, where in forbidden.items():
        for file in [where] if where.is_file() else sorted(where.iterdir()):
            data = file.read_bytes()
            body = b"".join(line for line in data.splitlines() if b"-----" not in line)
            key_bodies[f"{what} ({file.name})"] = body
    forbidden_scalars = {
        _private_scalar(f.read_bytes())
        for where in forbidden.values()
        for f in ([where] if where.is_file() else [])
    }
    for path in kit.rglob("*"):
        if not path.is_file():
            continue
        blob = path.read_bytes().replace(b"\n", b"")
        for what, body in key_bodies.items():
            assert body not in blob, f"{path} holds the {what}"
        if b"PRIVATE KEY" in blob:
            assert path.relative_to(kit).as_posix() in ("node_key", "tls/server.key")
            scalar = _private_scalar(path.read_bytes())
            assert scalar not in forbidden_scalars, f"{path} is another party's key"
    assert (kit / "ca.crt").read_bytes() == operator.ca_cert.read_bytes()


def _private_scalar(data: bytes) -> int:
    if b"OPENSSH" in data:
        key = serialization.load_ssh_private_key(data, password=None)
    else:
        key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.private_numbers().private_value


def test_operator_keeps_only_public_keys(operator: fed.FederationPaths) -> None:
    records = kits.load_partners(operator)
    assert sorted(records) == PARTNERS
    for name, rec in records.items():
        node_dir = operator.node_dir(name)
        assert not (node_dir / "node_key").exists()
        pub = (node_dir / "node_key.pub").read_text().strip()
        assert pub == rec.public_key
        assert pub == (operator.home / "kits" / name / "node_key.pub").read_text().strip()
        assert rec.status == "active"
        assert rec.node_id is None


def test_kit_config_round_trips_and_names_federation(operator: fed.FederationPaths) -> None:
    kit = kits.load_kit(operator.home / "kits" / "beta")
    identity = kits.read_identity(operator)
    assert kit.config.federation.name == "acme"
    assert kit.config.federation.federation_id == identity.federation_id
    assert kit.config.federation.superlink == "127.0.0.1:9092"
    assert kit.config.node.partner == "beta"
    assert kit.config.node.epsilon_cap == 5.0
    settings = kits.node_settings(kit, kits.NodeOverrides(ledger=Path("/x/l.db")))
    assert settings["ledger"] == "/x/l.db"
    assert settings["train-csv"].endswith("kits/beta/data/train.csv")
    # The issued node.toml states the table memory budget; the node reads it.
    assert "memory_mb = 128" in (operator.home / "kits" / "beta" / "node.toml").read_text()
    assert settings["memory-mb"] == 128
    from clients.app import NodeSettings

    assert NodeSettings.from_node_config(settings).memory_bytes == 128 << 20


def test_loose_key_permissions_refused(operator: fed.FederationPaths, tmp_path: Path) -> None:
    kit = _kit(operator, "alpha", tmp_path)
    (kit / "node_key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        kits.load_kit(kit)


def test_ca_key_in_kit_refused(operator: fed.FederationPaths, tmp_path: Path) -> None:
    kit = _kit(operator, "alpha", tmp_path)
    shutil.copy(operator.pki / "ca.key", kit / "ca.key")
    with pytest.raises(SecurityError, match=r"unexpected private key \(ca.key\)"):
        kits.load_kit(kit)


def test_missing_and_mismatched_files_refused(
    operator: fed.FederationPaths, tmp_path: Path
) -> None:
    kit = _kit(operator, "alpha", tmp_path)
    (kit / "ca.crt").unlink()
    with pytest.raises(ConfigError, match=r"lacks ca\.crt"):
        kits.load_kit(kit)
    kit2 = _kit(operator, "gamma", tmp_path)
    shutil.copy(operator.home / "kits" / "beta" / "node_key.pub", kit2 / "node_key.pub")
    with pytest.raises(KeyFileError, match="not the public half"):
        kits.load_kit(kit2)
    kit3 = _kit(operator, "beta", tmp_path)
    (kit3 / "ca.crt").write_bytes((kit3 / "tls" / "server.pem").read_bytes())
    with pytest.raises(KeyFileError, match="not a CA certificate"):
        kits.load_kit(kit3)


def test_invalid_config_named(operator: fed.FederationPaths, tmp_path: Path) -> None:
    kit = _kit(operator, "alpha", tmp_path)
    text = (kit / "node.toml").read_text()
    (kit / "node.toml").write_text(text.replace("epsilon_cap = 5.0", "epsilon_cap = -1"))
    with pytest.raises(ConfigError, match=r"node\.epsilon_cap"):
        kits.load_kit(kit)
    (kit / "node.toml").write_text(text + "\n[extra]\nx = 1\n")
    with pytest.raises(ConfigError, match="extra"):
        kits.load_kit(kit)


def test_add_refuses_duplicates_and_bad_names(operator: fed.FederationPaths) -> None:
    with pytest.raises(ConfigError, match="already has a kit"):
        kits.add_partner(
            operator,
            "alpha",
            out=operator.home / "elsewhere",
            superlink="127.0.0.1:9092",
            dataset="digits",
            epsilon_cap=1.0,
            metrics_hosts=[],
        )
    with pytest.raises(ConfigError, match="partner name"):
        kits.check_name("../evil", "partner")
    with pytest.raises(ConfigError, match="host:port"):
        kits.add_partner(
            operator,
            "delta",
            out=operator.home / "kits" / "delta",
            superlink="no-port",
            dataset="digits",
            epsilon_cap=1.0,
            metrics_hosts=[],
        )


def test_revoke_offline_recorded_then_reissue(operator: fed.FederationPaths) -> None:
    kits.add_partner(
        operator,
        "omega",
        out=operator.home / "kits" / "omega",
        superlink="127.0.0.1:9092",
        dataset="digits",
        epsilon_cap=1.0,
        metrics_hosts=[],
    )
    old_pub = (operator.node_dir("omega") / "node_key.pub").read_text()
    record = kits.revoke_partner(operator, "omega")
    assert record.status == "revoked"
    assert not record.unregistered
    assert not (operator.node_dir("omega") / "node_key.pub").exists()
    assert [p.read_text() for p in (operator.node_dir("omega") / "revoked").iterdir()] == [old_pub]
    assert kits.load_partners(operator)["omega"].status == "revoked"
    with pytest.raises(NotFoundError):
        kits.revoke_partner(operator, "nobody")
    kits.add_partner(
        operator,
        "omega",
        out=operator.home / "kits" / "omega2",
        superlink="127.0.0.1:9092",
        dataset="digits",
        epsilon_cap=1.0,
        metrics_hosts=[],
    )
    new_pub = (operator.node_dir("omega") / "node_key.pub").read_text()
    assert new_pub != old_pub
    assert kits.load_partners(operator)["omega"].status == "active"


def test_node_start_refuses_invalid_data_before_starting(
    operator: fed.FederationPaths, tmp_path: Path
) -> None:
    kit = _kit(operator, "alpha", tmp_path)
    (kit / "data").mkdir()
    (kit / "data" / "train.csv").write_text("pixel_0,label\n1,2\n")
    (kit / "data" / "test.csv").write_text("pixel_0,label\n1,2\n")
    result = run_cli("node", "start", "--kit", str(kit), timeout=60)
    assert result.returncode == 3, result.stderr
    assert "train.csv" in result.stderr
    assert not (kit / "state" / "supernode.log").exists()


def test_node_start_refuses_loose_key_with_exit_5(
    operator: fed.FederationPaths, tmp_path: Path
) -> None:
    kit = _kit(operator, "beta", tmp_path)
    (kit / "node_key").chmod(0o640)
    result = run_cli("node", "start", "--kit", str(kit), timeout=60)
    assert result.returncode == 5, result.stderr
    assert "BEGIN" not in result.stderr  # the message names the file, never its content


def test_health_and_metrics_over_tls(operator: fed.FederationPaths, tmp_path: Path) -> None:
    kit = kits.load_kit(_kit(operator, "alpha", tmp_path))
    split_dataset("digits", tmp_path / "data", partners=1, alpha=1.0, seed=0)
    train = tmp_path / "data" / "partner-0" / "train.csv"
    test = tmp_path / "data" / "partner-0" / "test.csv"
    ledger_path = tmp_path / "ledger.db"
    with NodeLedger(ledger_path) as ledger:
        for round_ in (0, 1, 2):
            charge = PrivacyCharge(
                run_id="r1",
                round=round_,
                mechanism="m",
                noise_multiplier=1.0,
                sample_rate=1.0,
                steps=4,
                max_grad_norm=1.0,
                delta=1e-5,
                accountant=ACCOUNTANT_NAME,
                accountant_version="test",
                epsilon_after=1.0,
            )
            ledger.record("digits", [charge], run_id="r1", round_=round_, digest="d", reply=b"x")
    monitor = NodeMonitor(
        NodeWatch("alpha", builtin_schema("digits"), train, test, ledger_path, 5.0, 1e-5),
        alive=lambda: True,
        connected=lambda: True,
    )
    server = HealthServer(monitor, "127.0.0.1", 0, tls=kit.tls, refresh_s=60)
    server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(kit.ca_cert))
        base = f"https://localhost:{server.port}"
        resp = httpx.get(f"{base}/healthz", verify=ctx)
        assert resp.status_code == 200
        assert resp.json()["status"] == "ok"
        text = httpx.get(f"{base}/metrics", verify=ctx).text
        assert 'fedvault_node_rounds_done{dataset="digits",partner="alpha"} 2.0' in text
        assert 'fedvault_node_epsilon_cap{dataset="digits",partner="alpha"} 5.0' in text
        spent = next(
            line for line in text.splitlines() if line.startswith("fedvault_node_epsilon_spent")
        )
        assert float(spent.split()[-1]) > 0
        # The data file is replaced in place with an invalid one: counted, health degraded.
        train.write_text(train.read_text().replace(",", ";", 5))
        os.utime(train, (1, 1))
        monitor.refresh()
        text = httpx.get(f"{base}/metrics", verify=ctx).text
        assert (
            'fedvault_node_data_validation_failures_total{dataset="digits",partner="alpha"} 1.0'
            in text
        )
        resp = httpx.get(f"{base}/healthz", verify=ctx)
        assert resp.status_code == 503
        assert resp.json()["data_valid"] is False
    finally:
        server.stop()


def test_a_kit_carries_the_federations_schema_file(
    operator: fed.FederationPaths, tmp_path: Path
) -> None:
    from fedvault.schema import load_schema, to_toml

    schema = builtin_schema("flchain").model_copy(update={"name": "cohort"})
    source = tmp_path / "cohort.toml"
    source.write_text(to_toml(schema), encoding="utf-8")
    result = run_cli(
        "partner", "add", "sigma", "--superlink", "127.0.0.1:9092",
        "--home", str(operator.home), "--schema", str(source), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kit_dir = operator.home / "kits" / "sigma"
    kit = kits.load_kit(kit_dir)
    assert kit.config.node.dataset == "cohort"
    assert kit.config.node.schema_file == Path("schema.toml")
    assert load_schema(kit_dir / "schema.toml") == schema
    assert kits.kit_schema(kit) == schema
    # The node validates its data against that schema before it starts.
    split_dataset("flchain", tmp_path / "parts", partners=1, seed=0)
    copy = _kit(operator, "sigma", tmp_path)
    (copy / "data").mkdir()
    for part in ("train", "test"):
        text = (tmp_path / "parts" / "partner-0" / f"{part}.csv").read_text(encoding="utf-8")
        (copy / "data" / f"{part}.csv").write_text(text.replace(",M,", ",X,", 1))
    result = run_cli("node", "start", "--kit", str(copy), timeout=60)
    assert result.returncode == 3, result.stderr
    assert "unknown category 'X'" in result.stderr
    assert "column 'sex'" in result.stderr
