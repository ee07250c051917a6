"""fedvault.spool: a spool left by a killed process is removed by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedvault.spool import make_spool


def test_spools_of_dead_owners_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)  # exited: its pid names no process (for now)
    left = tmp_path / f"fedvault-codec-{dead_pid}-abcd"
    left.mkdir()
    (left / "request.bin").write_bytes(b"a partner's row")
    live = tmp_path / f"fedvault-codec-{os.getppid()}-efgh"  # our parent: alive
    live.mkdir()
    other = tmp_path / f"fedvault-he-{dead_pid}-ijkl"  # another prefix: not ours
    other.mkdir()
    made = Path(make_spool("fedvault-codec-", str(tmp_path)))
    assert made.name.startswith(f"fedvault-codec-{os.getpid()}-")
    assert (made.stat().st_mode & 0o777) == 0o700
    assert not left.exists()
    assert live.exists()
    assert other.exists()
