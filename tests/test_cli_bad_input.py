"""Bad input the CLI used to crash on (traceback, exit 1) or leak: found by a sweep.

Each case runs the real CLI in a subprocess and checks the exit code from the
error table, the message, that no traceback is printed and, where a secret or
a file was at stake, that neither leaked nor appeared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedvault.errors import ConfigError, NotFoundError
from server.gateway.keys import MAX_KEY_LIFETIME_S, GatewayStore, parse_expiry
from tests.cli_support import run_cli

TOKEN = "fvk_8ab755eff0d8_n_wgG8yXTyhxq15Mc8zu4Ec70oowgZo99Xtr6u_PxZU"  # noqa: S105 - made up
SECRET_PART = TOKEN.split("_", 2)[2]


def _cli(
    *args: str | bytes, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=env)


def _clean(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout


# ------------------------------------------------------------ Rich markup in text
def test_brackets_in_an_id_are_printed_not_parsed_as_markup(tmp_path: Path) -> None:
    """'[/x]' is a closing tag to Rich: the error message itself used to crash."""
    from server.store import FederationStore

    with FederationStore(tmp_path / "federation.db"):
        pass
    done = _cli("runs", "show", "[/x]", "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 7, done.stderr
    assert "no run '[/x]'" in done.stderr
    done = _cli("runs", "show", "[bold]abc", "--home", str(tmp_path))
    assert "no run '[bold]abc'" in done.stderr  # was shown as "no run 'abc'"


def test_a_success_message_with_brackets_is_still_a_success(tmp_path: Path) -> None:
    """All files were written, then printing the path crashed: success reported as failure."""
    out = tmp_path / "[/y]"
    done = _cli("data", "split", "--dataset", "breast-cancer", "--out", str(out))
    _clean(done)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout + done.stderr


# ------------------------------------------------------------ undecodable arguments
def test_an_argument_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    done = _cli("runs", "show", b"\xff\xfe", "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 2
    assert "argument 3 is not valid UTF-8" in done.stderr


# ------------------------------------------------------------ stray OSError
def _run_raising(
    exc: BaseException, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``run()`` around a command that raises ``exc`` (the commands translate their own
    errors; this is the net for one that slips through)."""
    import typer

    from fedvault.cli import main

    probe = typer.Typer()

    @probe.command()
    def fail() -> None:
        raise exc

    monkeypatch.setattr(main, "app", probe)
    monkeypatch.setattr(sys, "argv", ["fedvault"])
    with pytest.raises(SystemExit) as info:
        main.run()
    return int(str(info.value.code)), capsys.readouterr().err


def test_a_stray_file_error_is_exit_2_with_path_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "x"
    with pytest.raises(FileNotFoundError) as raised:
        missing.write_text("x")
    code, err = _run_raising(raised.value, monkeypatch, capsys)
    assert code == 2
    assert err.strip() == f"error: No such file or directory ({missing})"


def test_a_stray_connection_error_is_exit_10(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_raising(ConnectionRefusedError(111, "Connection refused"), monkeypatch, capsys)
    assert code == 10
    assert err.strip() == "error: cannot connect: Connection refused"


# ------------------------------------------------------------ API keys
@pytest.mark.parametrize(
    ("expires", "message"),
    [
        ("99999999999d", "at most 100 years ahead"),  # stored, then `keys list` crashed
        ("9999-12-31T00:00:00", "at most 100 years ahead"),
        ("2001-01-01", "in the past"),
        ("0d", "in the past"),
        ("1" * 40 + "h", "must be like 30d"),
    ],
)
def test_an_expiry_out_of_range_is_refused_and_the_store_stays_listable(
    tmp_path: Path, expires: str, message: str
) -> None:
    done = _cli("keys", "create", "--role", "admin", "--expires", expires, "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    listed = _cli("keys", "list", "--home", str(tmp_path))
    _clean(listed)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_the_longest_expiry_allowed_still_lists() -> None:
    now = time.time()
    assert parse_expiry("36500d", now) == now + 36500 * 86400
    assert 36500 * 86400 < MAX_KEY_LIFETIME_S


def test_the_store_refuses_an_expiry_no_date_can_show(tmp_path: Path) -> None:
    """The REST admin call reaches the store without the CLI's parsing."""
    store = GatewayStore(tmp_path / "gateway.db")
    try:
        with pytest.raises(ConfigError, match="100 years"):
            store.create_key("admin", expires_at=time.time() + 2 * MAX_KEY_LIFETIME_S)
        with pytest.raises(ConfigError, match="100 years"):
            store.create_key("admin", expires_at=float("inf"))
        assert store.keys() == []
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "analyst", "--model", ""], "is not a model name"),
        (["--role", "analyst", "--model", "a b"], "is not a model name"),
        (["--role", "partner", "--partner", "x y"], "is not a partner name"),
    ],
)
def test_grants_must_be_names(tmp_path: Path, args: list[str], message: str) -> None:
    done = _cli("keys", "create", *args, "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_a_token_pasted_as_a_key_id_is_not_echoed(tmp_path: Path) -> None:
    GatewayStore(tmp_path / "gateway.db").close()
    done = _cli("keys", "revoke", TOKEN, "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 7
    assert "that is a token (a secret)" in done.stderr
    assert SECRET_PART[:8] not in done.stdout + done.stderr


def test_the_store_never_quotes_what_is_not_a_key_id(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gateway.db")
    try:
        with pytest.raises(NotFoundError) as info:
            store.revoke(TOKEN)
        assert SECRET_PART[:8] not in str(info.value)
        with pytest.raises(NotFoundError, match="no API key '0123456789ab'"):
            store.revoke("0123456789ab")
    finally:
        store.close()


# ------------------------------------------------------------ store locations
@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("host=127.0.0.1 port=1 password=s3cr3tQ", "libpq 'key=value' connection string"),
        ("mysql://u@h/db", "names a 'mysql' URL"),
        ("postgresql://user@127.0.0.1:99999/db", "check its host, and its port"),
        ("postgresql://user@127.0.0.1:s3cr3tQ/db", "check its host, and its port"),
        ("postgresql://user@[::1/db", "not a valid PostgreSQL URL"),
    ],
)
def test_a_store_location_that_is_no_store_is_refused_without_a_file(
    tmp_path: Path, location: str, message: str
) -> None:
    """Anything but a postgresql:// URL used to be a SQLite *file name*: a DSN's password
    ended up in a file in the working directory."""
    work = tmp_path / "cwd"
    work.mkdir()
    done = _cli(
        "runs",
        "list",
        "--home",
        str(tmp_path / "home"),
        cwd=work,
        env={"FEDVAULT_FEDERATION_STORE": location},
    )
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "s3cr3tQ" not in done.stderr + done.stdout
    assert list(work.iterdir()) == []


def test_the_audit_db_option_is_checked_the_same_way(tmp_path: Path) -> None:
    done = _cli(
        "audit",
        "checkpoint",
        "--db",
        "host=db password=s3cr3tQ",
        "--key",
        str(tmp_path / "k.key"),
        cwd=tmp_path,
    )
    _clean(done)
    assert done.returncode in (2, 5), done.stderr  # the key file may be checked first
    assert "s3cr3tQ" not in done.stderr + done.stdout
    assert not any(p.name.startswith("host=") for p in tmp_path.iterdir())


# ------------------------------------------------------------ ledger show
def test_a_node_ledger_path_that_does_not_exist_is_not_an_empty_ledger(tmp_path: Path) -> None:
    """A typo in --node-ledger used to create an empty ledger file and compare with it."""
    from clients.ledger import NodeLedger
    from fedvault.privacy import PrivacyCharge
    from server.store import FederationStore, LedgerRow

    home = tmp_path / "home"
    charge = PrivacyCharge("r1", 1, "dp-sgd", 1.1, 0.1, 10, 1.0, 1e-5, "rdp", "1.6", 0.5)
    with FederationStore(home / "federation.db") as store:
        store.create_run("r1", {"rounds": 1}, {"name": "digits"})
        store.commit_round("r1", 1, [LedgerRow("alpha", charge)], {"round": 1}, b"state")
    real = tmp_path / "alpha.db"
    with NodeLedger(real) as node:
        node.record("digits", [charge], run_id="r1", round_=1, digest="d", reply=b"reply")
    agreed = _cli("ledger", "show", "r1", "--node-ledger", f"alpha={real}", "--home", str(home))
    assert agreed.returncode == 0, agreed.stderr
    assert "views agree" in agreed.stdout

    typo = tmp_path / "alpah.db"
    done = _cli("ledger", "show", "r1", "--node-ledger", f"alpha={typo}", "--home", str(home))
    _clean(done)
    assert done.returncode == 7, done.stderr
    assert f"no node ledger for 'alpha' at {typo}" in done.stderr
    assert not typo.exists()


# ------------------------------------------------------------ gateway start
@pytest.fixture
def gateway_home(tmp_path: Path) -> Path:
    from server.store import FederationStore

    home = tmp_path / "gw-home"
    with FederationStore(home / "federation.db"):
        pass
    return home


def _start(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _cli("gateway", "start", "--home", str(home), "--host", "127.0.0.1", *args)


def _refused_before_anything(home: Path, done: subprocess.CompletedProcess[str]) -> None:
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert not (home / "keys").exists()  # no audit key made, no store opened
    assert not (home / "audit.db").exists()


def test_gateway_start_refuses_one_port_for_both_doors(gateway_home: Path) -> None:
    from fedvault.cli.processes import free_port

    port = str(free_port())
    done = _start(gateway_home, "--http-port", port, "--grpc-port", port)
    _refused_before_anything(gateway_home, done)
    assert f"the REST and gRPC ports are both {port}" in done.stderr


@pytest.mark.parametrize("door", ["REST", "gRPC"])
def test_gateway_start_refuses_a_port_in_use(gateway_home: Path, door: str) -> None:
    import socket

    from fedvault.cli.processes import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken, other = str(busy.getsockname()[1]), str(free_port())
        ports = (taken, other) if door == "REST" else (other, taken)
        done = _start(gateway_home, "--http-port", ports[0], "--grpc-port", ports[1])
    _refused_before_anything(gateway_home, done)
    assert f"cannot listen for {door} on 127.0.0.1:{taken}: Address already in use" in done.stderr


def test_gateway_start_refuses_tls_files_that_are_not_pem(
    gateway_home: Path, tmp_path: Path
) -> None:
    from fedvault.cli.processes import free_port

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_bytes(b"\x00\x01")
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port())]
    done = _start(gateway_home, *ports, "--tls-cert", str(cert), "--tls-key", str(key))
    _refused_before_anything(gateway_home, done)
    assert "not a PEM certificate and its private key" in done.stderr


# ------------------------------------------------------------ stores that are not there
@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["runs", "list"], "no federation store"),
        (["runs", "show", "r1"], "no federation store"),
        (["models", "list"], "no federation store"),
        (["ledger", "show", "r1"], "no federation store"),
        (["keys", "list"], "no gateway key store"),
        (["keys", "revoke", "0123456789ab"], "no gateway key store"),
    ],
)
def test_a_command_that_only_reads_creates_no_store(
    tmp_path: Path, args: list[str], what: str
) -> None:
    """A mistyped --home used to become a new, empty federation that listed nothing."""
    home = tmp_path / "typo"
    done = _cli(*args, "--home", str(home))
    _clean(done)
    assert done.returncode == 7, done.stderr
    assert what in done.stderr
    assert not home.exists()


def test_a_file_that_is_not_a_database_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "federation.db").write_text("not sqlite")
    done = _cli("runs", "list", "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert "federation.db is not a SQLite database" in done.stderr
    assert (tmp_path / "federation.db").read_text() == "not sqlite"


def test_a_home_that_is_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    home = tmp_path / "afile"
    home.write_text("x")
    done = _cli("keys", "create", "--role", "admin", "--home", str(home))
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert f"{home} is a file, not a directory" in done.stderr


def _read_only_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ``home`` bind-mounted read-only in a private mount namespace.

    Why a mount, not chmod: tests run as root here, and root ignores mode bits;
    a read-only mount is what an evidence snapshot or a read-only volume is.
    """
    script = (
        f'mount --bind "{home}" "{home}" && mount -o remount,bind,ro "{home}" && '
        f'exec "{sys.executable}" -m fedvault "$@"'
    )
    return run_cli(*args, command=["unshare", "-m", "sh", "-c", script, "sh"])


def test_a_read_only_store_is_a_configuration_error_not_an_outage(tmp_path: Path) -> None:
    """SQLite's WAL mode cannot read from a read-only directory: say so, do not 'retry later'."""
    probe = subprocess.run(
        ["unshare", "-m", "mount", "--bind", str(tmp_path), str(tmp_path)],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("needs unshare and mount (root in a mount namespace)")
    GatewayStore(tmp_path / "gateway.db").close()
    before = sorted(p.name for p in tmp_path.iterdir())
    done = _read_only_cli(tmp_path, "keys", "list", "--home", str(tmp_path))
    _clean(done)
    assert done.returncode == 2, done.stderr
    assert "gateway.db: it or its directory is read-only" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
