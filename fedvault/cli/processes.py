"""Starting and stopping the federation's real processes.

Every child (``flower-superlink``, ``flower-supernode``) is started in its own
process group with its output in a log file, and stopped (SIGTERM, then
SIGKILL after a grace period) by :class:`ProcessGroup` on exit, error or
Ctrl-C, so a demo never leaves processes behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from fedvault.addresses import check_host
from fedvault.errors import ConfigError, ProcessFailedError, UnavailableError


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a child process to bind a moment later.

    Why not simply bind port 0: the kernel hands out those ports from the
    ephemeral range, the same range every outgoing connection's source port
    comes from. Between our check and the child's bind, a busy process on the
    host (a SuperExec polling every 0.1 s opens connection after connection)
    can take the port as a source port, and the child fails to start. Ports
    below the ephemeral range are never handed out that way.
    """
    check_host(host, "bind address")
    low, _ = _ephemeral_range()
    pick = random.SystemRandom()
    for _ in range(64):
        port = pick.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as exc:
            raise ConfigError(
                f"cannot bind {host!r}: {exc.strerror or type(exc).__name__}"
            ) from None
        return int(s.getsockname()[1])


SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_SECONDS = "0.1"
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for children: our venv's ``bin`` first on PATH (Flower starts
    ``flwr-serverapp``/``flwr-clientapp`` by name) and telemetry off."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # Flower's SuperExec asks its SuperNode for a ClientApp task once a second
    # by default; each round waits for that poll. 0.1 s is Flower's own
    # documented knob, costs ~10 loopback requests/s per node, and takes ~0.5 s
    # off every round. An operator's value wins.
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
    # Our models' matrices are small: BLAS threads only add wake-up cost, and
    # on a shared host they oversubscribe the cores (each node, the SuperLink
    # and the coordinator would all spawn one thread per core).
    for var in BLAS_THREAD_VARS:
        env.setdefault(var, "1")
    if extra:
        env.update(extra)
    return env


def executable(name: str) -> str:
    """Absolute path of a console script, preferring the running venv's."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ProcessFailedError(f"{name} is not installed (expected beside {sys.executable})")
    return found


class ManagedProcess:
    """One child process with its log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(  # noqa: S603 - argv built from our own values
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ProcessFailedError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"see {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def descendants(self) -> list[int]:
        """Every live process below this one, whatever its process group."""
        return descendants(self.pid)

    def kill(self) -> list[int]:
        """SIGKILL this process, its group and every descendant, as a crash would.

        The whole tree, not only the group: a SuperLink's ``flower-superexec``
        (and the ``flwr-serverapp`` under it) runs in a session of its own, so
        ``kill -9`` of the group alone leaves the coordinator running. Returns
        the pids signalled besides this one.
        """
        others = self.descendants()
        _signal_group(self.pid, signal.SIGKILL)
        _kill_pids(others)
        self.popen.wait(timeout=10)
        return others

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
        # Taken first, and only from a live process: once the parent is gone its
        # children are re-parented to init and can no longer be found from here,
        # and a reaped pid may already belong to an unrelated process.
        tree = self.descendants() if self.alive() else []
        deadline = time.monotonic() + grace_s
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace_s)
        # Grandchildren (ClientApp/ServerApp processes) share the group.
        _signal_group(self.pid, signal.SIGKILL)
        # A SuperExec in a session of its own stops its ServerApp when it sees
        # its parent gone, and the ServerApp records the run as interrupted on
        # the way out: the rest of the grace period is theirs, then they must
        # not outlive us.
        _kill_pids(_wait_gone(tree, deadline))
        self._log.close()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, parents before children (Linux ``/proc``; [] elsewhere)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        children: list[int] = []
        try:
            for task in Path(f"/proc/{parent}/task").iterdir():
                children += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        found += children
        todo += children
    return found


def _wait_gone(pids: Sequence[int], deadline: float) -> list[int]:
    """Those of ``pids`` still running at ``deadline`` (polled; zombies count as gone)."""
    while True:
        left = [pid for pid in pids if _running(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessGroup:
    """Context manager owning children; stops them all on exit or SIGTERM."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []
        self._previous: object = None

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]
    ) -> ManagedProcess:
        proc = ManagedProcess(name, argv, log_path, env)
        self.processes.append(proc)
        return proc

    def discard(self, proc: ManagedProcess) -> None:
        """Stop ``proc`` and forget it (a failed start that will be retried)."""
        proc.stop()
        if proc in self.processes:
            self.processes.remove(proc)

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> ProcessGroup:
        # Turn SIGTERM into KeyboardInterrupt so `finally` blocks run.
        self._previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def wait_for_port(
    host: str, port: int, *, timeout_s: float, process: ManagedProcess | None = None
) -> None:
    """Block until ``host:port`` accepts TCP connections (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            process.check_alive()
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise UnavailableError(f"nothing is listening on {host}:{port} after {timeout_s:.0f} s")
