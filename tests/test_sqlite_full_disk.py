"""A full disk in the SQLite stores that use :func:`fedvault.sqlite.transaction`.

SQLite reports a full disk at ``COMMIT``, which the transaction helper once
ran outside its error handling: the node's privacy ledger surfaced a raw
``sqlite3.OperationalError``. Now it is an :class:`UnavailableError`, nothing
of the failed release is kept, and the ledger works again once space is freed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clients.ledger import NodeLedger, request_digest
from fedvault.errors import UnavailableError
from fedvault.privacy import non_private_charge
from tests.test_audit_store_faults import _fill, _mount_tmpfs


def _release(ledger: NodeLedger, round_: int, reply: bytes) -> None:
    charge = non_private_charge("run-1", round_, 0.1, 1, 1e-5)
    ledger.record(
        "table",
        [charge],
        run_id="run-1",
        round_=round_,
        digest=request_digest(str(round_).encode()),
        reply=reply,
    )


def _release_until_refused(ledger: NodeLedger) -> None:
    for round_ in range(1, 200):  # the WAL's last free pages may take a few
        _release(ledger, round_, b"x" * 16384)


def test_a_full_disk_is_unavailable_and_the_ledger_keeps_nothing_of_it(tmp_path: Path) -> None:
    mount = tmp_path / "node-fs"
    _mount_tmpfs(mount, "1m")
    try:
        with NodeLedger(mount / "ledger.db") as ledger:
            _release(ledger, 0, b"stats")
            _fill(mount / "ballast", 0)
            with pytest.raises(UnavailableError, match="disk is full"):
                _release_until_refused(ledger)
            kept = [c.round for c in ledger.charges("table")]
            (mount / "ballast").unlink()
            _release(ledger, 500, b"after")  # works again, same connection
            assert [c.round for c in ledger.charges("table")] == [*kept, 500]
            assert ledger.cached_reply("table", "run-1", 500, request_digest(b"500")) == b"after"
            failed = len(kept)  # the round that hit the full disk left no charge and no reply
            assert ledger.cached_reply("table", "run-1", failed, request_digest(b"x")) is None
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30, check=False)
