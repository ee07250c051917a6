"""Group commit in a child process: the audit writer off the server's GIL.

Why: in the gateway the writer thread of :class:`~server.audit.log.GroupCommitter`
shares one GIL with the event loop (and, for gRPC, with grpc.aio's poller
thread). Every SQLite call releases the GIL and must win it back from a busy
loop, so under load a commit that takes ~0.2 ms on an idle machine took
~1 ms, and the hand-offs cost CPU on the loop's own core (measured with
``bench/gateway.py``; see the README's gateway benchmark). Here the same
group commit runs in a child process with its own interpreter: the parent
writes length-prefixed entries to a socket and a reader thread wakes once per
acknowledged batch.

What does not change: an entry is acknowledged only after the child's
``storage.append`` returned, i.e. after the durable commit (SQLite WAL with
``synchronous=FULL``, or PostgreSQL's commit), so an acknowledged index is
durable exactly as with the thread. A failed commit fails every waiter of
that batch. If the child dies, or the socket breaks, every pending waiter
fails (the request fails closed) and the first append a second later starts
a new child (appends in between fail at once, so a writer that cannot start
never costs a spawn per request); an entry the dead child had committed
without acknowledging stays in the log (like a request whose connection
dropped after its record was written). A child that cannot open the store
makes the constructor raise: the gateway refuses to start.

Wire format, parent to child: ``u32 length ‖ entry`` per entry. Child to
parent: ``0x02`` once the store is open, then per batch in order:
``0x00 ‖ u64 first index ‖ u32 count`` or
``0x01 ‖ u32 count ‖ u16 length ‖ UTF-8 message`` (the batch failed; the
message is the storage's error text, which never holds entries).
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fedvault.errors import FedvaultError, UnavailableError
from server.audit.log import GroupCommitter, _LoopWaiter

__all__ = ["ProcessCommitter", "main", "wait_for_more"]

_OK: Final = struct.Struct(">BQI")
_ERR: Final = struct.Struct(">BIH")
_LEN: Final = struct.Struct(">I")
_SEND_BUFFER: Final = 4 * 1024 * 1024
"""Room for thousands of queued entries, so a sender only blocks when the child is stuck."""
_SEND_TIMEOUT_S: Final = 10.0
"""A thread's append that could not be written this long (child stalled) fails closed."""
_READ: Final = 1 << 20
_READY: Final = 2
"""The child's first byte once its store is open."""
_START_TIMEOUT_S: Final = 60.0
_RESTART_BACKOFF_S: Final = 1.0
_ENV_LOCATION: Final = "FEDVAULT_AUDIT_WRITER_LOCATION"
_ENV_PASSWORD_FILE: Final = "FEDVAULT_AUDIT_WRITER_PASSWORD_FILE"  # noqa: S105 - a variable name


_Waiter = Future[int] | _LoopWaiter


def _settle_waiters(
    waiters: Sequence[_Waiter], start: int | None, error: BaseException | None
) -> None:
    GroupCommitter._settle(
        [(w, None if start is None else start + i) for i, w in enumerate(waiters)], error
    )


@dataclass(eq=False)
class _Child:
    """One writer process, its socket and the waiters of the frames sent to it, in order."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    waiters: collections.deque[_Waiter] = field(default_factory=collections.deque)
    pending: list[bytes] = field(default_factory=list)  # frames not yet written
    alive: bool = True
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None


class ProcessCommitter:
    """:class:`~server.audit.log.GroupCommitter`'s interface, committing in a child process.

    ``location`` and ``password_file`` are what :func:`server.audit.storage.open_storage`
    takes; the child opens its own storage there (SQLite and PostgreSQL both
    serialise appenders themselves, so the parent's storage keeps serving
    reads and checkpoints beside it).
    """

    def __init__(
        self, location: str | Path, *, password_file: Path | None = None, max_batch: int = 1024
    ) -> None:
        self._location = str(location)
        self._password_file = password_file
        self._max_batch = max_batch
        self._lock = threading.Lock()  # frame order on the socket == waiter order
        self._closed = False
        self._flush_scheduled = False
        self.batches = 0
        self.items = 0
        self.restarts = 0
        self._retry_at = 0.0  # no new child before this (monotonic), after one died
        with self._lock:
            self._child = self._spawn()
        # Fail at start, not on the first request, when the store cannot be opened.
        if not self._child.ready.wait(_START_TIMEOUT_S) or not self._child.alive:
            self.close()
            raise UnavailableError("the audit writer process could not open the audit store")

    # ------------------------------------------------------------------ child
    def _spawn(self) -> _Child:
        """Start a writer process and the thread that reads its acknowledgements."""
        parent, child_end = socket.socketpair()
        try:
            parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            # Non-blocking: the event loop must never wait on a stuck writer.
            # What the socket cannot take yet stays queued (see _flush_locked).
            parent.setblocking(False)
            args = [
                sys.executable,
                "-m",
                "server.audit.writer",
                str(child_end.fileno()),
                str(self._max_batch),
            ]
            # The location goes by environment, not argv: a PostgreSQL URL may
            # carry credentials, and argv is readable by every local user.
            env = {**os.environ, _ENV_LOCATION: self._location}
            if self._password_file is not None:
                env[_ENV_PASSWORD_FILE] = str(self._password_file)
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                args, pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=env
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child_end.close()
        child = _Child(proc, parent)
        acks = parent.dup()  # the reader's handle (non-blocking too: it waits in select)
        child.reader = threading.Thread(
            target=self._read_acks, args=(child, acks), name="audit-writer-acks", daemon=True
        )
        child.reader.start()
        return child

    def _read_acks(self, child: _Child, acks: socket.socket) -> None:
        """Resolve ``child``'s waiters batch by batch, in order; at its end fail whoever is left."""
        buf = bytearray()
        error: BaseException = UnavailableError("audit writer process stopped")
        try:
            while True:
                try:
                    select.select([acks], [], [])
                    data = acks.recv(_READ)
                except BlockingIOError:
                    continue
                except (OSError, ValueError):  # ValueError: closed under us
                    data = b""
                if not data:
                    break
                buf += data
                while buf:
                    if buf[0] == _READY:
                        del buf[:1]
                        child.ready.set()
                    elif buf[0] == 0 and len(buf) >= _OK.size:
                        _, start, count = _OK.unpack_from(buf)
                        del buf[: _OK.size]
                        self._pop_and_settle(child, count, start, None)
                    elif buf[0] == 1 and len(buf) >= _ERR.size:
                        _, count, size = _ERR.unpack_from(buf)
                        if len(buf) < _ERR.size + size:
                            break
                        text = bytes(buf[_ERR.size : _ERR.size + size]).decode("utf-8", "replace")
                        del buf[: _ERR.size + size]
                        self._pop_and_settle(child, count, None, UnavailableError(text))
                    elif buf[0] not in (0, 1, _READY):
                        error = UnavailableError("audit writer process sent garbage")
                        return
                    else:
                        break
        finally:
            acks.close()
            with self._lock:
                child.alive = False
                child.ready.set()  # wakes a constructor still waiting (alive says how it went)
                self._retry_at = time.monotonic() + _RESTART_BACKOFF_S
                left = list(child.waiters)
                child.waiters.clear()
            _settle_waiters(left, None, error)

    def _pop_and_settle(
        self, child: _Child, count: int, start: int | None, error: BaseException | None
    ) -> None:
        with self._lock:
            n = min(count, len(child.waiters))
            batch = [child.waiters.popleft() for _ in range(n)]
        if error is None:
            self.batches += 1
            self.items += len(batch)
        _settle_waiters(batch, start, error)

    # -------------------------------------------------------------- producers
    def _enqueue(self, item: bytes, waiter: _Waiter) -> _Child:
        """Queue ``item``'s frame beside its waiter (one lock: same order on both sides)."""
        frame = _LEN.pack(len(item)) + item
        with self._lock:
            if self._closed:
                raise UnavailableError("audit log is closed")
            child = self._child
            if not child.alive:  # it died: a fresh one for this append
                if time.monotonic() < self._retry_at:
                    # At most one restart per backoff: a writer that cannot start
                    # must not cost a process spawn per request.
                    raise UnavailableError("audit writer process is restarting")
                _stop(child, kill=True)
                self.restarts += 1
                child = self._child = self._spawn()
            child.waiters.append(waiter)
            child.pending.append(frame)
            return child

    def _flush_locked(self, child: _Child) -> bool:
        """Write what the socket takes now, keep the rest; True once nothing is left.

        Never blocks: a writer stuck in a slow commit (a PostgreSQL failover,
        a disk stall) fills the socket, and the event loop must keep serving
        health probes and timing requests out meanwhile.
        """
        if not child.alive:
            return True  # its reader fails the waiters
        if not child.pending:
            return True
        data = b"".join(child.pending)
        child.pending.clear()
        sent = 0
        try:
            while sent < len(data):
                sent += child.sock.send(data[sent:])
        except BlockingIOError:
            child.pending.append(data[sent:])  # byte order is all the stream needs
            return False
        except OSError:
            # The child is gone: its reader fails every waiter still pending,
            # the next append starts another.
            child.alive = False
            _stop(child, kill=True)
            raise UnavailableError("audit writer process is not accepting entries") from None
        return True

    def submit(self, item: bytes) -> Future[int]:
        """For a caller on a thread: written before this returns (or the append fails)."""
        fut: Future[int] = Future()
        child = self._enqueue(item, fut)
        deadline = time.monotonic() + _SEND_TIMEOUT_S
        while True:
            with self._lock:
                if self._flush_locked(child):
                    return fut
            if time.monotonic() > deadline:
                with self._lock:
                    child.alive = False
                    _stop(child, kill=True)  # its reader fails the waiters, this one too
                raise UnavailableError("audit writer process is not accepting entries")
            try:
                select.select([], [child.sock], [], 0.05)
            except (OSError, ValueError):
                continue  # closed meanwhile: the next round says so

    def submit_async(self, item: bytes) -> asyncio.Future[int]:
        """An asyncio future of the running loop, resolved once per batch (like the thread's).

        Why the deferred write: the requests of one event-loop turn go to the
        child in one ``send`` (fewer system calls and child wake-ups, larger
        batches) instead of one each.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._enqueue(item, _LoopWaiter(loop, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_on, loop)
        return fut

    def _flush_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Write the queued frames; while the socket is full, try again in a millisecond."""
        with self._lock:
            try:
                done = self._flush_locked(self._child)
            except UnavailableError:
                done = True  # the dead child's reader fails the waiters
            if done or self._closed:
                self._flush_scheduled = False
                return
        loop.call_later(0.001, self._flush_on, loop)

    # -------------------------------------------------------------- lifecycle
    @property
    def pid(self) -> int:
        """The current child's process id (tests kill it to check the fail-closed path)."""
        return self._child.proc.pid

    def close(self) -> None:
        """Commit what was sent, then stop the child (it exits at the end of its input)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            child = self._child
        deadline = time.monotonic() + _SEND_TIMEOUT_S
        while time.monotonic() < deadline:  # whatever a loop had not written yet
            with self._lock:
                try:
                    if self._flush_locked(child):
                        break
                except UnavailableError:
                    break
            try:
                select.select([], [child.sock], [], 0.05)
            except (OSError, ValueError):
                break
        try:
            child.sock.shutdown(socket.SHUT_WR)  # EOF after the queued frames
        except OSError:
            pass
        if child.reader is not None:
            child.reader.join(30)
        _stop(child)


def _stop(child: _Child, *, kill: bool = False) -> None:
    """Close ``child``'s socket and reap the process (killing it if asked or stuck)."""
    try:
        child.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    child.sock.close()
    if kill and child.proc.poll() is None:
        child.proc.kill()
    try:
        child.proc.wait(10)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait(5)


# ---------------------------------------------------------------------- child
def _frames(buf: bytearray) -> list[bytes]:
    """Take the complete ``u32 length ‖ entry`` frames off the front of ``buf``."""
    entries: list[bytes] = []
    pos = 0
    while len(buf) - pos >= _LEN.size:
        (size,) = _LEN.unpack_from(buf, pos)
        if len(buf) - pos - _LEN.size < size:
            break
        entries.append(bytes(buf[pos + _LEN.size : pos + _LEN.size + size]))
        pos += _LEN.size + size
    del buf[:pos]
    return entries


def wait_for_more(entries: int, since_last_commit_s: float) -> bool:
    """Whether to hold a batch up to :data:`COMMIT_DELAY_S` for more entries.

    Why: with a fast disk, a server whose requests trickle in one per event
    loop turn (grpc.aio's do) sent batches of ~1, so every request paid a
    whole commit — one fsync and a wake-up of both processes — and gRPC
    served ~25% fewer requests than with the writer thread (whose GIL waits
    happened to batch). Like PostgreSQL's ``commit_delay`` with
    ``commit_siblings``, the wait applies only under load: a small batch
    right after a commit. An idle server commits at once.
    """
    return entries < SMALL_BATCH and since_last_commit_s < BUSY_WINDOW_S


SMALL_BATCH: Final = 4
BUSY_WINDOW_S: Final = 0.002
COMMIT_DELAY_S: Final = 0.0003


def _serve(sock: socket.socket, location: str, max_batch: int, password_file: Path | None) -> None:
    from server.audit.storage import open_storage

    storage = open_storage(location, password_file=password_file)
    sock.sendall(bytes([_READY]))
    buf = bytearray()
    last_commit = 0.0
    try:
        closing = False
        while not closing:
            data = sock.recv(_READ)
            if not data:
                return  # parent closed (or died): everything sent was handled
            buf += data
            entries = _frames(buf)
            if wait_for_more(len(entries), time.monotonic() - last_commit):
                ready, _, _ = select.select([sock], [], [], COMMIT_DELAY_S)
                if ready:
                    more = sock.recv(_READ)
                    closing = not more  # commit what we have, then stop
                    buf += more
                    entries += _frames(buf)
            for offset in range(0, len(entries), max_batch):
                chunk = entries[offset : offset + max_batch]
                try:
                    start = storage.append(chunk)
                except Exception as exc:  # every waiter of the batch must hear about it
                    text = (
                        str(exc)
                        if isinstance(exc, FedvaultError)
                        else f"audit append failed: {type(exc).__name__}"
                    )
                    raw = text.encode("utf-8", "replace")[:1000]
                    sock.sendall(_ERR.pack(1, len(chunk), len(raw)) + raw)
                    continue
                sock.sendall(_OK.pack(0, start, len(chunk)))
            last_commit = time.monotonic()
    finally:
        storage.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m server.audit.writer FD MAX_BATCH`` (spawned above; the store from the env)."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Ctrl-C or a group SIGTERM must not kill the writer before the server drained:
    # it stops when the server closes the socket (or exits).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    password = os.environ.get(_ENV_PASSWORD_FILE)
    try:
        _serve(sock, os.environ[_ENV_LOCATION], int(args[1]), Path(password) if password else None)
    except OSError:
        pass  # the parent went away mid-answer; nothing is waiting any more
    except FedvaultError as exc:  # the store would not open: one line, no traceback
        print(f"audit writer: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sock.close()


if __name__ == "__main__":
    main()
