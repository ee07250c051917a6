"""Spool directories for data handed to worker processes, cleaned up after a crash.

Why: the gateway's request codec and the HE service pass request bodies,
arrays and ciphertexts to their worker processes through files in a spool
directory (``/dev/shm`` when roomy). ``close()`` and a finaliser remove it,
but neither runs when the process is killed (``kill -9``, the OOM killer, a
native crash), and on a RAM-backed ``/dev/shm`` that data would stay until
reboot. So the directory's name carries the owner's pid, and each new spool
first removes the spools of owners that are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["make_spool"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def make_spool(prefix: str, base: str | None) -> str:
    """A fresh 0700 directory ``{prefix}{pid}-XXXX`` in ``base`` (None: the system
    temp directory), after removing this user's spools whose process has died."""
    root = Path(base or tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    try:
        entries = list(root.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None or int(found.group(1)) == os.getpid():
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if info.st_uid == os.getuid() and entry.is_dir() and not entry.is_symlink():
            if not _alive(int(found.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base)
