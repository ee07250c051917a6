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
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
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


@dataclass
class GatewayProcess:
    """A ``fedvault gateway start`` subprocess and where it answers."""

    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    log_file: Path

    def status(self, path: str) -> int:
        return httpx.get(f"{self.url}{path}", timeout=5).status_code


@contextmanager
def gateway_process(
    home: Path,
    log_file: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    start_timeout_s: float = 60,
    stop_timeout_s: float = 20,
) -> Iterator[GatewayProcess]:
    """``fedvault gateway start --no-he`` on free ports, logging to ``log_file``.

    In its own session, so a test can find (and a kill -9 test can check) the
    writer and codec processes it starts; the whole group is killed at the end,
    whatever failed. ``env`` adds variables to the clean environment.
    """
    from tests.he_support import free_port

    http_port, grpc_port = free_port(), free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDVAULT_")}
    ports = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    with log_file.open("w") as sink:
        proc = subprocess.Popen(
            [*FEDVAULT, "gateway", "start", "--home", str(home), "--no-he", *ports, *extra],
            stdout=sink,
            stderr=sink,
            env={**clean, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0", **(env or {})},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while "gateway_started" not in log_file.read_text():
            assert proc.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)
        url, grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        yield GatewayProcess(proc, url, grpc_target, log_file)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:  # its writer and codec workers, whatever failed
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
