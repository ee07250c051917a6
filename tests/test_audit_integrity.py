"""Issue 16, defects 2–4: the audit log against a live gateway, and the log checking itself.

- ``audit search`` / ``audit export`` against a gateway that audits every read
  of its log: they stop at the checkpoint taken at the start, say so, and an
  interrupted export leaves no temporary file;
- ``audit public-key`` and the console show the verifier key any time;
  ``audit verify`` keeps its state in the user's data directory;
- an entry changed in the database: found at start-up (restart → not ready,
  index reported, no new checkpoint), by the background scrub of a running
  gateway, and named by ``audit verify`` as altered rather than forked.

Everything is real: the gateway (in process, or ``fedvault gateway start``),
SQLite stores, the CLI as a subprocess; the tampering is raw SQL, as an
operator with database access would do it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from secure.signed_note import generate_note_key, save_note_signer
from server.audit.log import AuditLog
from server.audit.records import decode_entry, encode_record
from server.audit.scrub import EntryScrubber
from server.audit.storage import SQLiteStorage
from server.gateway.rest import create_rest_app
from tests.audit_support import record, serve_log
from tests.cli_support import FEDVAULT, create_keys, gateway_process, run_cli, write_token_file
from tests.gateway_support import MODEL, Harness, build, make_home
from tests.he_support import live_server

INFER = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1] * 30}]}
PRELOADED = 2500  # three pages of the audit API


def _tamper(db: Path, index: int) -> bytes:
    """Change one byte of entry ``index`` in place (still a canonical record); the old bytes."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
        (old,) = conn.execute("SELECT entry FROM audit_entries WHERE idx = ?", (index,)).fetchone()
        old = bytes(old)
        for a, b in ((b'"200"', b'"201"'), (b'"ok"', b'"ko"'), (b"user", b"usex")):
            if a in old:
                new = old.replace(a, b, 1)
                break
        else:
            raise AssertionError(f"entry {index} has nothing to change")
        conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = ?", (new, index))
    finally:
        conn.close()
    decode_entry(new)  # the change keeps it a valid record: only its hash tells
    return old


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Harness, str]]:
    """An in-process gateway over REST whose log holds PRELOADED entries; reads are audited."""
    h = build(tmp_path / "gw")
    h.log.storage.append([encode_record(record(i)) for i in range(PRELOADED)])
    with live_server(create_rest_app(h.gw)) as url:
        yield h, url
    h.log.close()


# ------------------------------------------------------------------ 2. search/export
def _tree_size(text: str) -> int:
    found = re.search(r"up to the checkpoint of tree size (\d+) taken at start", text)
    assert found, text
    return int(found.group(1))


def test_search_and_export_finish_against_a_gateway_that_audits_reads(
    gateway: tuple[Harness, str], tmp_path: Path
) -> None:
    h, url = gateway
    token = write_token_file(tmp_path / "auditor.token", h.tokens["auditor"])
    before = h.log.size()
    found = run_cli(
        "audit", "search", "--url", url, "--token-file", token, "--actor", "user1", timeout=60
    )
    assert found.returncode == 0, found.stderr
    # The bound is the newest *signed* checkpoint when the command starts, which
    # may lag the log by the entries the checkpointer has not signed yet.
    tree = _tree_size(found.stderr)
    assert 0 < tree <= before
    hits = [json.loads(line)["index"] for line in found.stdout.splitlines()]
    assert hits == [i for i in range(tree) if i % 3 == 1]
    assert f"read {tree} entries, up to the checkpoint of tree size {tree} taken at start" in (
        found.stderr
    )
    # One entry per request: the checkpoint and the pages, not one per page forever.
    assert h.log.size() <= before + 5

    out = tmp_path / "export.jsonl"
    size = h.log.size()
    done = run_cli("audit", "export", "--url", url, "--token-file", token, "--out", out, timeout=60)
    assert done.returncode == 0, done.stderr
    tree = _tree_size(done.stdout)
    assert tree <= size
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(tree))
    assert f"wrote {tree} entries to {out}" in done.stdout
    assert h.log.size() <= size + 5
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_export_waits_out_the_rate_limit_instead_of_failing(tmp_path: Path) -> None:
    """Many pages meet the auditor key's rate limit: wait as Retry-After says, then go on."""
    h = build(tmp_path / "gw", rate=1.0, burst=2.0)
    h.log.storage.append([encode_record(record(i)) for i in range(PRELOADED)])
    token = write_token_file(tmp_path / "auditor.token", h.tokens["auditor"])
    out = tmp_path / "export.jsonl"
    try:
        with live_server(create_rest_app(h.gw)) as url:
            done = run_cli("audit", "export", "--url", url, "--token-file", token, "--out", out,
                           timeout=60)  # fmt: skip
    finally:
        h.log.close()
    assert done.returncode == 0, done.stderr  # 4 requests, 2 of them after a 429
    assert len(out.read_text().splitlines()) == PRELOADED


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_export_leaves_no_temporary_file(
    gateway: tuple[Harness, str], tmp_path: Path, sig: signal.Signals
) -> None:
    h, url = gateway
    h.sink.delay_s = 0.5  # each audited read takes this long: the export is caught mid-way
    token = write_token_file(tmp_path / "auditor.token", h.tokens["auditor"])
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "all.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    proc = subprocess.Popen(
        [*FEDVAULT, "audit", "export", "--url", url, "--token-file", str(token), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # Ctrl-C's default: a shell that started this run in the background
        # (CI under nohup, `cmd &`) passes SIGINT on ignored, and Python keeps it so.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(outdir.glob(".all.jsonl.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started writing"
            time.sleep(0.01)
        time.sleep(0.2)  # inside a page read
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(outdir.iterdir()) == [], "a temporary (or partial) file stayed behind"


# ------------------------------------------------------------- 4. the verifier key
def test_public_key_prints_the_verifier_key_and_only_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = run_cli("audit", "public-key", "--home", home)
    assert missing.returncode == 7, missing.stderr
    key_file = home / "keys" / "gateway-audit.key"
    assert f"no audit signing key at {key_file} yet" in missing.stderr
    assert "fedvault gateway start" in missing.stderr
    assert "Traceback" not in missing.stderr

    signer = generate_note_key("fedvault/gateway-audit")
    save_note_signer(key_file, signer)
    shown = run_cli("audit", "public-key", "--home", home)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == signer.verifier.line + "\n"
    private = signer.private_text()
    assert private not in shown.stdout + shown.stderr
    assert private.rsplit("+", 1)[-1] not in shown.stdout + shown.stderr
    # FEDVAULT_HOME works as --home does.
    by_env = run_cli("audit", "public-key", home=home)
    assert by_env.stdout == shown.stdout


def test_the_console_shows_the_verifier_key_to_auditors_and_admins(tmp_path: Path) -> None:
    from tests.test_console import login

    h = build(tmp_path / "gw")
    try:
        app = create_rest_app(h.gw)
        line = h.log.signer.verifier.line
        for role in ("auditor", "admin"):
            page = login(app, h.tokens[role]).get("/console/audit")
            assert page.status_code == 200
            assert line in page.text
            assert "fedvault audit public-key" in page.text
            assert h.log.signer.private_text() not in page.text
        assert login(app, h.tokens["analyst"]).get("/console/audit").status_code == 403
        # A damaged entry is shown there too, by index.
        _tamper(h.home / "audit.db", 0)
        h.log.start_integrity_checks(state_file=None, entries_per_interval=0)
        page = login(app, h.tokens["auditor"]).get("/console/audit")
        assert "Audit log damaged" in page.text
        assert "audit log entry 0 was altered" in page.text
    finally:
        h.log.close()


def test_verify_keeps_its_state_in_the_user_data_directory(tmp_path: Path) -> None:
    signer = generate_note_key("fedvault.test/state")
    log = AuditLog(SQLiteStorage(tmp_path / "audit.db"), signer)
    for i in range(5):
        log.append(record(i))
    key = signer.verifier.line
    leaf = f"fedvault.test_state-{signer.verifier.key_id:08x}"
    cwd, xdg = tmp_path / "cwd", tmp_path / "xdg"
    cwd.mkdir()
    try:
        with serve_log(log) as url:
            done = run_cli("audit", "verify", "--url", url, "--key", key, cwd=cwd,
                           env={"XDG_DATA_HOME": str(xdg)})  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert (xdg / "fedvault" / "audit-verifier" / leaf / "checkpoint").is_file()
            assert list(cwd.iterdir()) == []  # nothing in the current directory
            # The second run, from elsewhere, finds it: consistency is checked.
            again = run_cli("audit", "verify", "--url", url, "--key", key, cwd=tmp_path,
                            env={"XDG_DATA_HOME": str(xdg)})  # fmt: skip
            assert "consistent with the checkpoint of size" in again.stdout, again.stderr
            # The override names the root.
            moved = tmp_path / "moved"
            other = run_cli("audit", "verify", "--url", url, "--key", key, cwd=cwd,
                            env={"FEDVAULT_AUDIT_VERIFIER_STATE": str(moved)})  # fmt: skip
            assert other.returncode == 0, other.stderr
            assert (moved / leaf / "checkpoint").is_file()
            # A state an earlier version left under HOME (./.fedvault) is taken over once.
            legacy = cwd / ".fedvault" / "audit-verifier" / leaf
            legacy.parent.mkdir(parents=True)
            (moved / leaf).rename(legacy)
            fresh = tmp_path / "fresh-xdg"
            taken = run_cli("audit", "verify", "--url", url, "--key", key, cwd=cwd,
                            env={"XDG_DATA_HOME": str(fresh)})  # fmt: skip
            assert "consistent with the checkpoint of size" in taken.stdout, taken.stderr
            assert f"using the verifier state found in {Path('.fedvault')}" in taken.stderr
            assert (fresh / "fedvault" / "audit-verifier" / leaf / "checkpoint").is_file()
    finally:
        log.close()


# ---------------------------------------------------------- 3. a tampered entry
def test_verify_says_altered_not_forked(tmp_path: Path) -> None:
    signer = generate_note_key("fedvault.test/altered")
    db = tmp_path / "audit.db"
    log = AuditLog(SQLiteStorage(db), signer)
    for i in range(40):
        log.append(record(i))
    key = signer.verifier.line
    try:
        with serve_log(log) as url:
            assert run_cli("audit", "verify", "--url", url, "--key", key).returncode == 0
            _tamper(db, 17)
            seen = run_cli("audit", "verify", "--url", url, "--key", key)
            fresh = run_cli("audit", "verify", "--url", url, "--key", key,
                            env={"XDG_DATA_HOME": str(tmp_path / "other")})  # fmt: skip
    finally:
        log.close()
    for done in (seen, fresh):  # with the state of an earlier run, and without
        assert done.returncode == 6, done.stdout + done.stderr
        assert "FAILED at index 17: entry 17 was altered" in done.stderr
        assert "fork" not in done.stderr.replace("did not fork", "")


def test_start_up_checks_since_the_verified_point_and_the_scrub_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = generate_note_key("fedvault.test/scrub")
    db, state = tmp_path / "audit.db", tmp_path / "scrub.json"

    def open_log() -> AuditLog:
        return AuditLog(SQLiteStorage(db), signer)

    log = open_log()
    for i in range(10):
        log.append(record(i))
    log.checkpoint(force=True)
    log.start_integrity_checks(state_file=state, entries_per_interval=0)
    assert log.integrity.verified_size == 10
    for i in range(10, 15):
        log.append(record(i))
    log.close()
    _tamper(db, 3)  # below the verified point: the scrub's business
    _tamper(db, 12)  # above it: the start-up check's

    log = open_log()
    try:
        caplog.set_level(logging.ERROR, logger="server.audit.scrub")
        scrubber = EntryScrubber(log, state_file=state, entries_per_interval=100)
        assert scrubber.check_at_start() == 5  # only 10..14: bounded by what is new
        assert [a.index for a in log.integrity.altered()] == [12]
        assert json.loads(state.read_text())["verified_size"] == 12  # never past the damage
        latest = log.checkpoint(force=True)
        log.append(record(99))
        assert log.checkpoint(force=True) == latest  # no new checkpoint over a damaged log
        assert scrubber.step() == 16  # the new entry, then the cycle over 0..15
        assert [a.index for a in log.integrity.altered()] == [3, 12]
        assert log.integrity.problem() == (
            "audit log entry 3 was altered: its stored bytes no longer hash to the leaf hash "
            "recorded when it was appended (1 more entry damaged); no new checkpoint is signed"
        )
        lines = [r.getMessage() for r in caplog.records if "TAMPERING" in r.getMessage()]
        assert len(lines) == 2
        assert "entry 12" in lines[0]
        assert "entry 3" in lines[1]
        assert not any("user" in line or "models/" in line for line in lines)  # no payload
    finally:
        log.close()
    log = open_log()  # the next start checks from the damage on: found again at once
    try:
        log.start_integrity_checks(state_file=state, entries_per_interval=0)
        assert [a.index for a in log.integrity.altered()] == [3, 12]
    finally:
        log.close()


def test_audit_checkpoint_refuses_to_sign_a_log_with_an_altered_entry(tmp_path: Path) -> None:
    db, key = tmp_path / "audit.db", tmp_path / "audit.key"
    signer = generate_note_key("fedvault.test/cli")
    save_note_signer(key, signer)
    log = AuditLog(SQLiteStorage(db), signer)
    try:
        for i in range(6):
            log.append(record(i))
    finally:
        log.close()
    signed = run_cli("audit", "checkpoint", "--db", db, "--key", key)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("fedvault.test/cli\n6\n")
    log = AuditLog(SQLiteStorage(db), signer)
    try:
        log.append(record(6))
    finally:
        log.close()
    _tamper(db, 4)
    refused = run_cli("audit", "checkpoint", "--db", db, "--key", key)
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert "not signed: audit log entry 4 was altered" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stdout == ""
    storage = SQLiteStorage(db)
    try:  # the 6-entry checkpoint stays the latest
        assert storage.latest_checkpoint() == (6, signed.stdout)
    finally:
        storage.close()


def test_a_scrub_step_reads_no_entry_twice(tmp_path: Path) -> None:
    """The cycle over older entries stops at the step's starting tail: the new
    entries the same step just checked are not read again."""
    log = AuditLog(SQLiteStorage(tmp_path / "audit.db"), generate_note_key("fedvault.test/s"))
    try:
        for i in range(10):
            log.append(record(i))
        scrubber = EntryScrubber(log, state_file=None, entries_per_interval=8)
        assert scrubber.check_at_start() == 10
        assert scrubber.step() == 8  # the cycle: 0..7
        for i in range(10, 15):
            log.append(record(i))
        before = log.integrity.checked_total
        assert scrubber.step() == 8  # the new 10..14, then the cycle's 8, 9 and 0
        assert log.integrity.checked_total - before == 8
        assert log.integrity.passes_total == 1  # the pass over 0..9 ended at the old tail
        assert scrubber.step() == 8  # the cycle goes on from 1: 1..8
        assert log.integrity.intact
    finally:
        log.close()


def test_a_running_gateway_scrub_catches_a_tampered_entry(
    gateway: tuple[Harness, str], caplog: pytest.LogCaptureFixture
) -> None:
    h, url = gateway
    interval, batch = 0.05, 500
    h.log.start_integrity_checks(
        state_file=h.home / "audit-scrub.json", interval_s=interval, entries_per_interval=batch
    )
    caplog.set_level(logging.ERROR, logger="server.audit.scrub")
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    auth = {"Authorization": f"Bearer {h.tokens['auditor']}"}
    signed = httpx.get(f"{url}/v2/audit/checkpoint", headers=auth).text
    old = _tamper(h.home / "audit.db", 1234)
    # One full pass of the cycle takes size / batch intervals: the bound to wait.
    bound = (h.log.size() / batch + 2) * interval
    start = time.monotonic()
    while h.log.integrity.intact and time.monotonic() - start < bound + 5:
        time.sleep(interval / 5)
    assert not h.log.integrity.intact, "the scrub did not find the altered entry"
    assert time.monotonic() - start < bound + 1.0

    ready = httpx.get(f"{url}/v2/health/ready")
    assert ready.status_code == 503
    assert "entry 1234 was altered" in ready.json()["detail"]
    metrics = httpx.get(f"{url}/metrics", headers=auth).text
    assert "fedvault_audit_altered_entries_total 1.0" in metrics
    assert "fedvault_audit_intact 0.0" in metrics
    assert "fedvault_audit_first_altered_index 1234.0" in metrics
    (line,) = [r.getMessage() for r in caplog.records if "TAMPERING" in r.getMessage()]
    assert "entry 1234 was altered" in line
    assert decode_entry(old).request_id not in line  # the index, never the entry
    time.sleep(1.1)  # past the checkpoint interval: a new one would be signed now
    assert httpx.get(f"{url}/v2/audit/checkpoint", headers=auth).text == signed


# ---------------------------------------------- 3. the same, through `gateway start`
@contextmanager
def _gateway_process(home: Path, log_file: Path) -> Iterator[str]:
    only_startup_check = {"FEDVAULT_AUDIT_SCRUB_INTERVAL_S": "3600"}  # no background scrub
    with gateway_process(home, log_file, env=only_startup_check) as gw:
        yield gw.url


def _latest_size(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT MAX(size) FROM audit_checkpoints").fetchone()[0])
    finally:
        conn.close()


def test_a_restarted_gateway_with_a_tampered_entry_is_not_ready(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    tokens = create_keys(home, MODEL)
    infer = {"Authorization": f"Bearer {tokens['analyst']}"}
    audit = {"Authorization": f"Bearer {tokens['auditor']}"}
    token_file = write_token_file(tmp_path / "auditor.token", tokens["auditor"])
    with _gateway_process(home, tmp_path / "first.log") as url:
        for _ in range(5):
            r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=INFER, headers=infer)
            assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        key = run_cli("audit", "public-key", "--home", home).stdout.strip()
        first = run_cli("audit", "verify", "--url", url, "--key", key, "--token-file", token_file)
        assert first.returncode == 0, first.stderr
    signed = _latest_size(home / "audit.db")
    old = _tamper(home / "audit.db", 2)

    log_file = tmp_path / "restarted.log"
    with _gateway_process(home, log_file) as url:
        ready = httpx.get(f"{url}/v2/health/ready")
        assert ready.status_code == 503
        assert "entry 2 was altered" in ready.json()["detail"]
        metrics = httpx.get(f"{url}/metrics", headers=audit).text
        assert "fedvault_audit_intact 0.0" in metrics
        assert "fedvault_audit_first_altered_index 2.0" in metrics
        # Requests are still served and audited; checkpoints are no longer signed.
        r = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=INFER, headers=infer)
        assert r.status_code == 200, r.text
        time.sleep(1.2)
        httpx.get(f"{url}/v2/audit/checkpoint", headers=audit)
        assert _latest_size(home / "audit.db") == signed
        verified = run_cli(
            "audit", "verify", "--url", url, "--key", key, "--token-file", token_file
        )
        assert verified.returncode == 6
        assert "FAILED at index 2: entry 2 was altered" in verified.stderr
    logged = log_file.read_text()
    (line,) = [ln for ln in logged.splitlines() if "TAMPERING" in ln]
    assert "audit log entry 2 was altered" in line
    assert "start-up check" in line
    record_2 = decode_entry(old)
    assert record_2.request_digest is not None
    assert record_2.request_digest not in logged  # the index, never the entry


@pytest.mark.parametrize("value", ["text", 7, 2.5])
def test_an_entry_of_another_sqlite_type_is_reported_altered(tmp_path: Path, value: object) -> None:
    """SQLite columns take any type: an entry set to text or a number is an
    altered entry, found by the start-up check and by the scrub, never an
    exception that stops the checks (or the server's start)."""
    signer = generate_note_key("fedvault.test/odd-type")
    db, state = tmp_path / "audit.db", tmp_path / "scrub.json"
    log = AuditLog(SQLiteStorage(db), signer)
    for i in range(6):
        log.append(record(i))
    log.checkpoint(force=True)
    log.start_integrity_checks(state_file=state, entries_per_interval=0)
    log.close()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
        conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = ?", (value, 2))
        conn.execute("UPDATE audit_entries SET entry = ? WHERE idx = ?", (value, 5))
    finally:
        conn.close()
    log = AuditLog(SQLiteStorage(db), signer)
    try:
        # Entry 5 is at the verified point's edge: the start-up check re-reads
        # from there; entry 2 is the scrub's.
        scrubber = EntryScrubber(log, state_file=tmp_path / "fresh.json", entries_per_interval=100)
        scrubber.check_at_start()
        scrubber.step()
        assert [a.index for a in log.integrity.altered()] == [2, 5]
    finally:
        log.close()
