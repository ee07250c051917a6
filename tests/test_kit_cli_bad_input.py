"""Bad input to `federation init|up`, `partner add` and `node start`: refused before anything
is written or started, with the error table's exit code and no traceback.

Each case runs the real CLI in a subprocess against ``tmp_path`` and compares
the directory listing before and after: a refused command leaves nothing
(above all no partial kit holding a private key). `federation up` and
`node start` are only driven down the paths that exit before any process
starts; should a regression start one anyway, SIGTERM makes the CLI stop its
children before it exits.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedvault.cli import federation as fed
from fedvault.cli import kits
from fedvault.datasets import split_dataset
from fedvault.errors import ConfigError
from tests.cli_support import refused, run_cli

SUPERLINK = "127.0.0.1:19092"  # nothing listens there: the kit's key stays unregistered


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=timeout)


def _tree(root: Path) -> set[str]:
    """Every path under ``root``, hidden ones included (a staging directory would show)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def operator(tmp_path: Path) -> Path:
    """A federation home made for kits (no operator-held node keys), as in the docs."""
    home = tmp_path / "op"
    paths = fed.FederationPaths(home)
    fed.init_federation(paths, [], ["127.0.0.1"], name="acme")
    kits.init_identity(paths, "acme", ["127.0.0.1"])
    return home


@pytest.fixture
def kit(operator: Path, tmp_path: Path) -> Path:
    """A complete kit with valid data in its data/ directory."""
    kit_dir = tmp_path / "kit"
    kits.add_partner(
        fed.FederationPaths(operator),
        "alpha",
        out=kit_dir,
        superlink=SUPERLINK,
        dataset="digits",
        epsilon_cap=5.0,
        metrics_hosts=[],
    )
    split_dataset("digits", tmp_path / "parts", partners=2, alpha=1.0, seed=1)
    (kit_dir / "data").mkdir()
    for name in ("train.csv", "test.csv"):
        (kit_dir / "data" / name).write_bytes(
            (tmp_path / "parts" / "partner-0" / name).read_bytes()
        )
    return kit_dir


# ------------------------------------------------ 1. partner add: no partial kit
@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("--epsilon-cap=-1", "--epsilon-cap must be a finite number greater than 0"),
        ("--epsilon-cap=0", "--epsilon-cap must be a finite number greater than 0"),
        ("--epsilon-cap=nan", "--epsilon-cap must be a finite number greater than 0"),
        ("--epsilon-cap=inf", "--epsilon-cap must be a finite number greater than 0"),
        ("--metrics-host=bad host!", "--metrics-host 'bad host!' is neither an IP address"),
    ],
)
def test_partner_add_refuses_bad_input_and_leaves_nothing(
    operator: Path, tmp_path: Path, option: str, needle: str
) -> None:
    before = _tree(tmp_path)
    done = _cli(
        "partner", "add", "delta", "--home", str(operator), "--superlink", SUPERLINK, option
    )
    refused(done, 2, needle)
    assert _tree(tmp_path) == before  # no kits/delta (private keys), no record, no public key
    assert "delta" not in kits.load_partners(fed.FederationPaths(operator))


def test_partner_add_retry_after_a_refusal_works(operator: Path) -> None:
    args = ("partner", "add", "delta", "--home", str(operator), "--superlink", SUPERLINK)
    refused(_cli(*args, "--epsilon-cap=-1"), 2, "--epsilon-cap")
    done = _cli(*args, "--epsilon-cap=3")
    assert done.returncode == 0, done.stderr
    assert "epsilon_cap = 3.0" in (operator / "kits" / "delta" / "node.toml").read_text()


def test_partner_add_out_that_is_a_file(operator: Path, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me\n")
    before = _tree(tmp_path)
    for out, needle in (
        (target, f"kit directory {target} exists and is not a directory"),
        (target / "kit", f"{target} is not a directory"),
    ):
        done = _cli(
            "partner", "add", "zeta", "--home", str(operator), "--superlink", SUPERLINK,
            "--out", str(out),
        )  # fmt: skip
        refused(done, 2, needle)
    assert _tree(tmp_path) == before
    assert target.read_text() == "keep me\n"


# ------------------------------------------- 2. federation init: validate, then write
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--partners", "alpha", "--host", ""], "--host '' is neither an IP address"),
        (["--partners", "alpha", "--host", "bad host!"], "--host 'bad host!'"),
        (["--partners", "alpha,alpha"], "partner 'alpha' is named twice"),
        (["--partners", "_alpha"], "partner name '_alpha' must be"),
        (["--partners", "alpha", "--service", "prom=bad host"], "--service prom: host 'bad host'"),
    ],
)
def test_federation_init_refuses_bad_input_before_writing(
    tmp_path: Path, options: list[str], needle: str
) -> None:
    done = _cli("federation", "init", "acme", "--home", str(tmp_path / "fed"), *options)
    refused(done, 2, needle)
    assert _tree(tmp_path) == set()  # not even the CA key


def test_federation_init_home_that_is_a_file(tmp_path: Path) -> None:
    home = tmp_path / "a-file"
    home.write_text("keep me\n")
    done = _cli("federation", "init", "--home", str(home), "--partners", "alpha")
    refused(done, 2, f"federation home {home} is not a directory")
    done = _cli("federation", "init", "--home", str(home / "fed"), "--partners", "alpha")
    refused(done, 2, f"cannot write federation home {home / 'fed'}", "Not a directory")
    assert _tree(tmp_path) == {"a-file"}
    assert home.read_text() == "keep me\n"


def test_federation_init_keeps_an_existing_home_on_a_bad_rerun(tmp_path: Path) -> None:
    home = tmp_path / "fed"
    assert (
        _cli("federation", "init", "acme", "--home", str(home), "--partners", "a").returncode == 0
    )
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    done = _cli("federation", "init", "other", "--home", str(home), "--partners", "a,b")
    refused(done, 2, "already holds federation 'acme', not 'other'")
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before  # no nodes/b


def test_federation_init_bad_superlink_writes_nothing(tmp_path: Path) -> None:
    done = _cli(
        "federation", "init", "--home", str(tmp_path / "fed"), "--partners", "alpha",
        "--kits-dir", str(tmp_path / "kits"), "--superlink", "h:99999",
    )  # fmt: skip
    refused(done, 2, "--superlink 'h:99999' must be host:port")
    assert _tree(tmp_path) == set()


def test_init_federation_and_kits_checks_superlink_before_writing(tmp_path: Path) -> None:
    paths = fed.FederationPaths(tmp_path / "fed")
    with pytest.raises(ConfigError, match="--superlink 'h:99999' must be host:port"):
        kits.init_federation_and_kits(
            paths, "acme", ["alpha"], ["127.0.0.1"], kits_dir=tmp_path / "kits", superlink="h:99999"
        )
    assert _tree(tmp_path) == set()


def test_init_federation_and_kits_undoes_everything_on_a_later_failure(tmp_path: Path) -> None:
    """beta's kit directory is in use: alpha's kit and the new federation are removed again."""
    (tmp_path / "kits" / "beta").mkdir(parents=True)
    (tmp_path / "kits" / "beta" / "notes.txt").write_text("someone else's\n")
    before = _tree(tmp_path)
    paths = fed.FederationPaths(tmp_path / "fed")
    with pytest.raises(ConfigError, match="is not empty"):
        kits.init_federation_and_kits(
            paths,
            "acme",
            ["alpha", "beta"],
            ["127.0.0.1"],
            kits_dir=tmp_path / "kits",
            superlink=SUPERLINK,
        )
    assert _tree(tmp_path) == before
    kits.init_federation_and_kits(  # and a retry that can succeed does
        paths, "acme", ["alpha"], ["127.0.0.1"], kits_dir=tmp_path / "kits", superlink=SUPERLINK
    )
    assert (tmp_path / "kits" / "alpha" / "node.toml").is_file()


def test_a_failed_init_leaves_no_partner_record_behind(tmp_path: Path) -> None:
    """Kits for alpha and beta were issued before gamma's failed: the partner registry they
    wrote is removed with them, so the retry issues all three again instead of refusing."""
    (tmp_path / "kits" / "gamma").mkdir(parents=True)
    (tmp_path / "kits" / "gamma" / "notes.txt").write_text("someone else's\n")
    before = _tree(tmp_path)
    paths = fed.FederationPaths(tmp_path / "fed")
    partners = ["alpha", "beta", "gamma"]
    with pytest.raises(ConfigError, match="is not empty"):
        kits.init_federation_and_kits(
            paths, "acme", partners, ["127.0.0.1"], kits_dir=tmp_path / "kits", superlink=SUPERLINK
        )
    assert _tree(tmp_path) == before
    (tmp_path / "kits" / "gamma" / "notes.txt").unlink()
    kits.init_federation_and_kits(
        paths, "acme", partners, ["127.0.0.1"], kits_dir=tmp_path / "kits", superlink=SUPERLINK
    )
    assert all((tmp_path / "kits" / p / "node.toml").is_file() for p in partners)


def test_undo_restores_only_what_existed_before(tmp_path: Path) -> None:
    registry = tmp_path / "old.json"
    registry.write_text("before")

    def init_that_fails() -> None:
        with fed.undo_on_error() as undo:
            undo.will_replace(registry)
            registry.write_text("during")
            fresh = tmp_path / "new" / "partners.json"
            undo.will_replace(fresh)  # created by this invocation ...
            fresh.parent.mkdir()
            fresh.write_text("one")
            undo.will_replace(fresh)  # ... and rewritten by it: still removed, not restored
            fresh.write_text("two")
            raise RuntimeError("later step failed")

    with pytest.raises(RuntimeError):
        init_that_fails()
    assert registry.read_text() == "before"
    assert not (tmp_path / "new").exists()


# ------------------------------------------------- 3./4. node start --kit: clean refusals
def test_node_start_kit_state_that_is_a_file(kit: Path) -> None:
    (kit / "state").write_text("not a directory\n")
    before = _tree(kit)
    done = _cli("node", "start", "--kit", str(kit), timeout=60)
    refused(done, 2, f"the node's state directory {kit / 'state'} is not a directory")
    assert _tree(kit) == before


@pytest.mark.parametrize("where", ["kit", "kit-config"])
def test_node_start_config_that_is_not_utf8(kit: Path, tmp_path: Path, where: str) -> None:
    marker = b"# secret-ish caf\xe9 marker-7f3a\n"
    if where == "kit":
        config = kit / "node.toml"
        config.write_bytes(config.read_bytes() + marker)
        args = ["--kit", str(kit)]
    else:
        config = tmp_path / "binary.toml"
        config.write_bytes(bytes(range(256)) + marker)
        args = ["--kit", str(kit), "--kit-config", str(config)]
    before = _tree(tmp_path)
    done = _cli("node", "start", *args)
    refused(done, 2, f"{config} is not UTF-8 text")
    assert "marker-7f3a" not in done.stderr + done.stdout  # content is never echoed
    assert _tree(tmp_path) == before


# ---------------------------------------------------- 5. federation up: checked before start
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--port", "99999"], "--port 99999 is not a port number"),
        (["--port=-5"], "--port -5 is not a port number"),
        (["--port", "18811", "--host", "bad host!"], "--host 'bad host!' is neither"),
        (["--host", "bad host!"], "'bad host!' is neither an IP address"),
        (["--fleet-host", "127.0.0.1", "--fleet-port", "99999"], "--fleet-port 99999"),
        (["--fleet-host", "bad host!"], "--fleet-host 'bad host!'"),
        (["--metrics-port", "99999"], "--metrics-port 99999"),
        (["--metrics-port", "18812", "--metrics-host", "bad host!"], "--metrics-host 'bad host!'"),
    ],
)
def test_federation_up_refuses_bad_binds_before_starting(
    operator: Path, options: list[str], needle: str
) -> None:
    before = _tree(operator)
    done = _cli("federation", "up", "--home", str(operator), *options)
    refused(done, 2, needle)
    assert _tree(operator) == before  # no superlink.db, no logs/: nothing started


def test_check_up_options_covers_every_bind() -> None:
    """The check `federation up` runs first (fleet and metrics binds included)."""
    fed.check_up_options("127.0.0.1", 0, fleet_host="0.0.0.0", metrics_port=0)  # noqa: S104
    for kwargs, needle in (
        ({"fleet_host": "127.0.0.1", "fleet_port": 99999}, "--fleet-port 99999"),
        ({"fleet_host": "bad host!"}, "--fleet-host 'bad host!'"),
        ({"metrics_port": 99999}, "--metrics-port 99999"),
        ({"metrics_host": "bad host!"}, "--metrics-host 'bad host!'"),
    ):
        with pytest.raises(ConfigError, match=needle):
            fed.check_up_options("127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]


def test_host_names_as_deployed_are_accepted() -> None:
    """Underscores (compose v1 container names), IPv6 and wildcards keep working."""
    from fedvault.addresses import check_address, check_host

    assert check_address("proj_superlink_1:9092", "--superlink") == ("proj_superlink_1", 9092)
    assert check_address("[::1]:9092", "--superlink") == ("::1", 9092)
    assert check_host("0.0.0.0", "--host") == "0.0.0.0"  # noqa: S104
    assert check_host("*.fed.example", "--host", wildcard=True) == "*.fed.example"
    for bad in (" superlink", "super link", "-superlink", "a..b"):
        with pytest.raises(ConfigError, match="is neither an IP address nor a DNS name"):
            check_host(bad, "--host")


def test_metrics_port_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    from server.federation_metrics import serve_federation_metrics

    with pytest.raises(ConfigError, match="--metrics-port 99999"):
        serve_federation_metrics(tmp_path / "federation.db", "127.0.0.1", 99999)


# ------------------------------------- 6. node start (operator-held key): checked before start
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--superlink", "nohost"], "--superlink 'nohost' must be host:port"),
        (["--superlink", "127.0.0.1:70000"], "--superlink '127.0.0.1:70000' must be host:port"),
        (["--superlink", SUPERLINK, "--epsilon-cap=-1"], "--epsilon-cap must be a finite"),
        (["--superlink", SUPERLINK, "--epsilon-cap=nan"], "--epsilon-cap must be a finite"),
    ],
)
def test_node_start_refuses_bad_superlink_and_cap_before_starting(
    tmp_path: Path, options: list[str], needle: str
) -> None:
    home = tmp_path / "fed"
    fed.init_federation(fed.FederationPaths(home), ["alpha"], ["127.0.0.1"])
    split_dataset("digits", tmp_path / "parts", partners=2, alpha=1.0, seed=1)
    data = tmp_path / "parts" / "partner-0"
    before = _tree(tmp_path)
    done = _cli(
        "node", "start", "--home", str(home), "--partner", "alpha",
        "--train-csv", str(data / "train.csv"), "--test-csv", str(data / "test.csv"), *options,
    )  # fmt: skip
    refused(done, 2, needle)
    assert _tree(tmp_path) == before  # no logs/: no SuperNode was started
