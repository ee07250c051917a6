"""Bad input to `fedvault audit …` and `fedvault he …`, found by a sweep.

Each case runs the real CLI in a subprocess and checks the exit code from the
error table, the message, that no traceback is printed, and — where a file or
a secret was at stake — that nothing was written, destroyed or echoed.
URLs point at a port nothing listens on: a command that connected before
checking its input would answer exit 10 (unreachable), not the usage error.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedvault.errors import ConfigError
from fedvault.urls import bearer_token, check_service_url
from secure.signed_note import NoteSigner, generate_note_key, save_note_signer
from server.audit.log import AuditLog
from server.audit.records import encode_record
from server.audit.storage import SQLiteStorage
from tests.audit_support import record
from tests.cli_support import refused, run_cli

ORIGIN = "fedvault.test/audit"
SECRET = "s3cr3tQ"  # noqa: S105 - a marker that must never be printed


def _cli(*args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, home=home)


def _refused(done: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    refused(done, code, message)
    assert SECRET not in done.stdout + done.stderr


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return generate_note_key(ORIGIN)


@pytest.fixture
def dead_url() -> str:
    """A loopback URL with nothing behind it."""
    from fedvault.cli.processes import free_port

    return f"http://127.0.0.1:{free_port()}"


def _make_bundle(directory: Path, signer: NoteSigner, entries: list[bytes]) -> Path:
    """An offline bundle (what `verify --export` writes) whose checkpoint covers ``entries``."""
    directory.mkdir(parents=True)
    log = AuditLog(SQLiteStorage(directory.parent / f"{directory.name}.db"), signer)
    try:
        for entry in entries:
            log.append_entry(entry)
        note = log.checkpoint(force=True)
    finally:
        log.close()
    (directory / "checkpoint.txt").write_text(note, encoding="utf-8")
    with (directory / "entries.jsonl").open("w", encoding="utf-8") as fh:
        for index, entry in enumerate(entries):
            fh.write(json.dumps({"index": index, "entry": base64.b64encode(entry).decode()}) + "\n")
    return directory


@pytest.fixture
def bundle(tmp_path: Path, signer: NoteSigner) -> Path:
    return _make_bundle(tmp_path / "bundle", signer, [encode_record(record(i)) for i in range(5)])


# ------------------------------------------------------------ 1. export is all or nothing
@pytest.fixture
def broken_bundle(tmp_path: Path, signer: NoteSigner) -> Path:
    """Entry 0 decodes, entry 1 does not: an export fails after writing a line."""
    entries = [encode_record(record(0)), b'{"not": "an audit record"}']
    return _make_bundle(tmp_path / "broken", signer, entries)


def test_a_failed_export_leaves_the_earlier_file_whole(tmp_path: Path, broken_bundle: Path) -> None:
    out = tmp_path / "exports" / "audit.jsonl"
    out.parent.mkdir()
    out.write_text("an earlier export\n")
    done = _cli("audit", "export", "--out", out, "--bundle", broken_bundle)
    _refused(done, 6, "FAILED at index 1")
    assert out.read_text() == "an earlier export\n"  # was truncated to the first line
    assert sorted(p.name for p in out.parent.iterdir()) == ["audit.jsonl"]  # no temp left


def test_an_export_to_stdout_is_written_in_place(bundle: Path) -> None:
    """/dev/stdout on a pipe resolves to 'pipe:[N]', which no temp file can sit beside."""
    done = _cli("audit", "export", "--out", "/dev/stdout", "--bundle", bundle)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["index"] for line in done.stdout.splitlines()] == list(range(5))
    assert "wrote 5 entries to /dev/stdout" in done.stderr


def test_a_file_in_a_directory_without_room_for_a_temp_is_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writable file in a directory the user may not create files in (as open() allowed)."""
    from fedvault.cli import audit as audit_cli

    out = tmp_path / "audit.jsonl"
    out.write_text("old\n")
    real_open = os.open

    def no_new_files(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_new_files)
    target, in_place = audit_cli._export_target(out)
    assert not in_place
    assert audit_cli._write_lines(iter(["a\n", "b\n"]), out, target, in_place=False) == 2
    assert out.read_text() == "a\nb\n"


def test_a_failed_export_creates_no_file(tmp_path: Path, broken_bundle: Path) -> None:
    out = tmp_path / "exports" / "audit.jsonl"
    out.parent.mkdir()
    done = _cli("audit", "export", "--out", out, "--bundle", broken_bundle)
    _refused(done, 6, "FAILED at index 1")
    assert list(out.parent.iterdir()) == []


def test_an_export_replaces_the_file_and_keeps_its_mode(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    link = tmp_path / "latest.jsonl"
    link.symlink_to(out.name)
    done = _cli("audit", "export", "--out", link, "--bundle", bundle)
    assert done.returncode == 0, done.stderr
    assert f"wrote 5 entries to {link}" in done.stdout
    assert link.is_symlink()  # written through the link, not replacing it
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == list(range(5))
    assert out.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.jsonl"
    assert _cli("audit", "export", "--out", fresh, "--bundle", bundle).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # what open("w") gave
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------ 2. --out that cannot be a file
def test_export_to_a_missing_directory_is_refused_up_front(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "nowhere" / "audit.jsonl"
    done = _cli("audit", "export", "--out", out, "--bundle", bundle)
    _refused(done, 2, f"cannot write the export to {out}: its directory {out.parent} does not")
    assert not out.parent.exists()


def test_export_to_a_directory_is_refused_up_front(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "exports"
    out.mkdir()
    done = _cli("audit", "export", "--out", out, "--bundle", bundle)
    _refused(done, 2, f"cannot write the export to {out}: it is a directory")
    assert list(out.iterdir()) == []


# ------------------------------------------------------------ 3. --url checked before use
def test_check_service_url_accepts_base_urls() -> None:
    for url in ("http://127.0.0.1:8080", "https://[::1]:443/base/", "https://audit.example"):
        assert check_service_url(url, "--url") == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"https://user:{SECRET}@127.0.0.1:1/", "credentials in the URL are not accepted"),
        (f"user:{SECRET}@127.0.0.1:1", "credentials in the URL are not accepted"),
        (f"http://user:{SECRET}@[::1", "credentials in the URL are not accepted"),
        ("http://h:99999", "--url is not a valid URL (check its host and port)"),
        ("http://h:abc", "--url is not a valid URL (check its host and port)"),
        ("localhost:8080", "--url must be an http:// or https:// URL"),
        ("ftp://x", "--url must be an http:// or https:// URL"),
        ("http://", "--url names no host"),
        ("http://h:0", "port 0"),
        ("http://exa mple.com", "spaces or control characters"),
        ("http://h/?page=2", "takes no ?query or #fragment"),
        (f"https://gw.example/?api_key={SECRET}", "takes no ?query or #fragment"),
        (f"https://gw.example/#{SECRET}", "takes no ?query or #fragment"),
    ],
)
def test_check_service_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="--url") as raised:
        check_service_url(url, "--url")
    assert message in str(raised.value)
    assert SECRET not in str(raised.value)


def _url_cases(port_url: str) -> list[tuple[str, str]]:
    port = port_url.rsplit(":", 1)[1]
    return [
        (f"https://auditor:{SECRET}@127.0.0.1:{port}/", "credentials in the URL are not accepted"),
        ("http://127.0.0.1:99999", "not a valid URL"),
        (f"localhost:{port}", "must be an http:// or https:// URL"),
        (f"ftp://127.0.0.1:{port}", "must be an http:// or https:// URL"),
    ]


def test_audit_verify_checks_its_url_before_connecting(
    tmp_path: Path, signer: NoteSigner, dead_url: str
) -> None:
    for url, message in _url_cases(dead_url):
        done = _cli("audit", "verify", "--key", signer.verifier.line, "--url", url, home=tmp_path)
        _refused(done, 2, message)
    assert not (tmp_path / "audit-verifier").exists()  # no state written either ...
    assert not (Path(os.environ["XDG_DATA_HOME"]) / "fedvault").exists()  # ... anywhere


def test_he_predict_checks_its_url_before_connecting(tmp_path: Path, dead_url: str) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    for url, message in _url_cases(dead_url):
        done = _cli("he", "predict", "--model", "m", "--csv", rows, "--url", url)
        _refused(done, 2, message)


# ------------------------------------------------------------ 4. he predict: inputs first
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (b"a,b\n\xff\xfe,1\n", "{path} is not UTF-8 text"),
        (b"a,b\n" + b"1" * 200_000 + b",2\n", "{path} is not a CSV file (line 2: field larger"),
    ],
)
def test_he_predict_reads_the_csv_before_connecting(
    tmp_path: Path, dead_url: str, content: bytes | None, message: str
) -> None:
    rows = tmp_path / "rows.csv"
    if content is not None:
        rows.write_bytes(content)
    done = _cli("he", "predict", "--model", "m", "--csv", rows, "--url", dead_url)
    _refused(done, 2, message.format(path=rows))


def test_he_predict_without_data_rows_fails_before_connecting(
    tmp_path: Path, dead_url: str
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n")
    done = _cli("he", "predict", "--model", "m", "--csv", rows, "--url", dead_url)
    _refused(done, 3, f"file {rows}: no data rows")


def test_he_predict_loads_the_key_file_before_connecting(tmp_path: Path, dead_url: str) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    ctx = tmp_path / "he.ctx"
    ctx.write_bytes(b"\xff\xfe" + SECRET.encode())
    ctx.chmod(0o600)
    done = _cli(
        "he", "predict", "--model", "m", "--csv", rows, "--url", dead_url, "--key-file", ctx
    )
    _refused(done, 5, f"{ctx} is not a TenSEAL context")


# ------------------------------------------------------------ 5. files that are not text
def test_a_verifier_key_file_that_is_not_utf8(tmp_path: Path, bundle: Path) -> None:
    key = tmp_path / "verifier.key"
    key.write_bytes(f"{ORIGIN}+\xff+{SECRET}".encode("latin-1"))
    done = _cli("audit", "verify", "--key", key, "--bundle", bundle)
    _refused(done, 2, f"verifier key file {key} is not UTF-8 text")


@pytest.mark.parametrize("command", ["verify", "search"])
def test_a_bundle_that_is_not_utf8(
    tmp_path: Path, signer: NoteSigner, bundle: Path, command: str
) -> None:
    (bundle / "entries.jsonl").write_bytes(b"\xff\xfe" + SECRET.encode())
    key = ["--key", signer.verifier.line] if command == "verify" else []
    done = _cli("audit", command, *key, "--bundle", bundle)
    _refused(done, 2, f"not an audit bundle: {bundle}")


def test_a_verifier_state_that_is_not_utf8(
    tmp_path: Path, signer: NoteSigner, bundle: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoint").write_bytes(b"\xff\xfe" + SECRET.encode())
    (state / "leaves.bin").write_bytes(b"")
    done = _cli(
        "audit", "verify", "--key", signer.verifier.line, "--bundle", bundle, "--state", state
    )
    _refused(done, 2, f"verifier state {state / 'checkpoint'} is not UTF-8 text")
    assert (state / "checkpoint").read_bytes().startswith(b"\xff\xfe")  # not overwritten


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe" + SECRET.encode(), "is not UTF-8 text"),
        (f"fvk_é{SECRET}".encode(), "does not hold a token"),  # a header must be ASCII
        (b"\n", "is empty"),
    ],
)
def test_a_token_file_that_is_not_a_token(
    tmp_path: Path, dead_url: str, content: bytes, message: str
) -> None:
    token = tmp_path / "token"
    token.write_bytes(content)
    token.chmod(0o600)
    done = _cli("audit", "search", "--url", dead_url, "--token-file", token)
    _refused(done, 2, f"the token file {token} {message}")
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    done = _cli(
        "he", "predict", "--model", "m", "--csv", rows, "--url", dead_url,
        "--api-key-file", token,
    )  # fmt: skip
    _refused(done, 2, f"the API key file {token} {message}")


def test_bearer_token_strips_and_keeps_a_real_token(tmp_path: Path) -> None:
    token = "fvk_8ab755eff0d8_n_wgG8yXTyhxq15Mc8zu4Ec70oowgZo99Xtr6u_PxZU"  # noqa: S105
    assert bearer_token(f"  {token}\n".encode(), tmp_path / "t", "token file") == token


def test_a_signing_key_that_is_not_utf8_creates_no_store(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    key.write_bytes(b"\xff\xfe" + SECRET.encode())
    key.chmod(0o600)
    db = tmp_path / "audit.db"
    done = _cli("audit", "checkpoint", "--db", db, "--key", key)
    _refused(done, 5, f"key file {key} does not hold a signed-note private key")
    assert not db.exists()


# ------------------------------------------------------------ 6. a key for another log
def test_checkpoint_with_a_key_of_another_name_is_a_key_mismatch(
    tmp_path: Path, signer: NoteSigner
) -> None:
    db = tmp_path / "audit.db"
    log = AuditLog(SQLiteStorage(db), signer)
    log.append(record(0))
    note = log.checkpoint(force=True)
    log.close()
    other = tmp_path / "other.key"
    save_note_signer(other, generate_note_key("someone.else/audit"))
    done = _cli("audit", "checkpoint", "--db", db, "--key", other)
    # SigningKeyMismatchError (exit 5): a wrong key file, as for a key of the
    # right name and another id — not IntegrityError's tampering (exit 6).
    _refused(done, 5, f"latest checkpoint is signed by {ORIGIN}+")
    assert "this process signs with someone.else/audit+" in done.stderr
    assert f"(--key {other})" in done.stderr
    storage = SQLiteStorage(db)
    try:
        assert storage.latest_checkpoint() == (1, note)  # nothing signed
    finally:
        storage.close()


# ------------------------------------------------------------ 7. no store for a missing key
@pytest.mark.parametrize("command", ["checkpoint", "serve"])
def test_a_missing_key_creates_no_store(tmp_path: Path, command: str) -> None:
    db = tmp_path / "audit.db"
    key = tmp_path / "missing.key"
    done = _cli("audit", command, "--db", db, "--key", key)
    _refused(done, 5, f"key file {key} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_audit_serve_stops_cleanly_on_sigterm(tmp_path: Path, signer: NoteSigner) -> None:
    """uvicorn.run re-raised SIGTERM before `finally: log.close()`: exit -15, log left open."""
    import signal
    import time

    import httpx

    from fedvault.cli.processes import free_port

    key = tmp_path / "audit.key"
    save_note_signer(key, signer)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "audit", "serve", "--db", str(tmp_path / "a.db"),
             "--key", str(key), "--port", str(port)],
            stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/v2/audit/checkpoint", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, log.read_text(errors="replace")
                assert time.monotonic() < deadline, "audit serve did not start"
                time.sleep(0.2)
        assert got.status_code == 200, got.text
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text(errors="replace")
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_audit_serve_refuses_a_port_out_of_range_before_opening_the_store(
    tmp_path: Path, signer: NoteSigner
) -> None:
    key = tmp_path / "audit.key"
    save_note_signer(key, signer)
    done = _cli("audit", "serve", "--db", tmp_path / "a.db", "--key", key, "--port", "70000")
    _refused(done, 2, "70000 is not a port number")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.key"]


# ------------------------------------------------------------ 8. --outcome values
def test_search_refuses_an_unknown_outcome(bundle: Path) -> None:
    done = _cli("audit", "search", "--bundle", bundle, "--outcome", "bogus")
    _refused(done, 2, "--outcome must be one of ok, denied, error, client-disconnected, started")
    assert "got 'bogus'" in done.stderr
    assert done.stdout == ""
    denied = _cli("audit", "search", "--bundle", bundle, "--outcome", "denied")
    assert denied.returncode == 0, denied.stderr
    assert [json.loads(line)["index"] for line in denied.stdout.splitlines()] == [0]


def test_every_recorded_outcome_can_be_searched() -> None:
    from fedvault.cli.audit import OUTCOMES
    from server.gateway.audit import outcome_of
    from server.store import FAILED, FINISHED, STOPPED

    gateway = {outcome_of(s) for s in ("200", "OK", "401", "PERMISSION_DENIED", "503", "INTERNAL")}
    training = {"started", "resumed", "committed", "aborted", "charged", "registered"}
    assert gateway | training | {FINISHED, FAILED, STOPPED} <= set(OUTCOMES)
