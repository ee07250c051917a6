"""Run the real ``fedvault`` CLI in a subprocess, as the bad-input tests do.

One runner for every such test: a clean environment (no ``FEDVAULT_*`` from
the caller), the venv's console scripts first on PATH (commands that start
Flower processes find them), and a timeout that stops the CLI with SIGTERM so
its ProcessGroup stops whatever it started instead of leaving it running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests import secret_scan

FEDVAULT = (sys.executable, "-m", "fedvault")


def run_cli(
    *args: str | bytes | Path,
    home: Path | None = None,
    command: Sequence[str] = FEDVAULT,
    timeout: float = 120,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` (the CLI, or a wrapper that execs it with ``"$@"``) with ``args``.

    ``env`` adds variables to the clean environment (``FEDVAULT_*`` included).
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    clean["FLWR_TELEMETRY_ENABLED"] = "0"
    clean["PATH"] = str(Path(sys.executable).parent) + os.pathsep + clean.get("PATH", "")
    if home is not None:
        clean["FEDVAULT_HOME"] = str(home)
    clean.update(env or {})
    argv = [*command, *(a if isinstance(a, bytes) else str(a) for a in args)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=cwd,
        env=clean,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # its ProcessGroup stops every child it started
        out, err = proc.communicate(timeout=30)
        pytest.fail(
            f"`fedvault {' '.join(map(str, args))}` did not exit: it started something\n{err}"
        )
    secret_scan.record_cli_failure(proc.returncode, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def refused(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Refused with exit ``code``, each needle in stderr, and no traceback anywhere."""
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == code, output
    for needle in needles:
        assert needle in done.stderr, done.stderr


def create_keys(home: Path, model: str) -> dict[str, str]:
    """An analyst key granted ``model`` and an auditor key, made by ``fedvault keys
    create`` in ``home``; their tokens by role."""
    tokens: dict[str, str] = {}
    for role in ("analyst", "auditor"):
        extra = ["--model", model] if role == "analyst" else []
        made = run_cli("keys", "create", "--role", role, *extra, "--home", home, "--json")
        assert made.returncode == 0, made.stderr
        tokens[role] = json.loads(made.stdout)["token"]
    return tokens


def write_token_file(path: Path, token: str) -> Path:
    """``token`` in a 0600 file, as ``--token-file`` options expect it."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
