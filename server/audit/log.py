"""The audit log a process writes to: durable group-committed appends, signed checkpoints.

Why a single writer thread with a queue: SQLite (and one PostgreSQL
connection) commits one transaction at a time, and an fsync costs the same
for one row as for a hundred. Producers — request handlers on threads or on
the event loop — hand their encoded record to the writer and wait; the writer
drains whatever queued up while the previous commit was in flight and commits
it as one transaction (group commit). Every producer learns its index only
after that commit returned, so an acknowledged entry is durable, and a failed
commit fails every producer in the batch: the gateway's request fails closed
instead of leaving without an audit record.

Checkpoints are signed at most once per ``checkpoint_interval`` (1 s), when
asked (``checkpoint()``, used by ``GET /v2/audit/checkpoint``) or by the
optional background thread, and immediately with ``force=True``.

One store, one signing key: gateway replicas append to one (PostgreSQL) store
and each signs checkpoints, so they must hold the same key. A process whose
key did not sign the store's latest checkpoint is refused at start-up
(:class:`SigningKeyMismatchError`), and refuses to sign when another key's
checkpoint shows up later (replicas started together on an empty store):
otherwise auditors behind a load balancer would get checkpoints from two keys,
and the one their verifier key does not know reads as tampering. Rotating the
key is explicit: the new key's first process names the old verifier key as
``previous_key``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

from fedvault.errors import (
    FedvaultError,
    IntegrityError,
    InvalidRequestError,
    SigningKeyMismatchError,
    UnavailableError,
)
from secure.signed_note import (
    NoteSigner,
    NoteVerifier,
    format_checkpoint,
    open_note,
    parse_checkpoint,
)
from server.audit import merkle
from server.audit.records import AuditRecord, encode_record
from server.audit.scrub import (
    DEFAULT_ENTRIES_PER_INTERVAL,
    DEFAULT_INTERVAL_S,
    EntryScrubber,
    IntegrityStatus,
)
from server.audit.storage import AuditStorage

__all__ = [
    "KEY_SOURCE",
    "MAX_PAGE",
    "AuditLog",
    "AuditSink",
    "Committer",
    "GroupCommitter",
    "SignedCheckpoint",
    "SigningKeyMismatchError",
]

_log = logging.getLogger(__name__)

MAX_PAGE: Final = 1000
"""Most entries one ``entries()`` call (one API page) returns."""

KEY_SOURCE: Final = (
    "the audit signing key file: HOME/keys/gateway-audit.key for `fedvault gateway start` "
    "(HOME from FEDVAULT_HOME or --home), --key for `fedvault audit`"
)
"""Where a process's audit signing key comes from, for error messages."""


def _note_signers(note: str) -> list[tuple[str, int]]:
    """``(key name, key id)`` of each signature line of a signed note (unverified)."""
    split = note.rfind("\n\n")
    found: list[tuple[str, int]] = []
    if split < 0:
        return found
    for line in note[split + 2 :].rstrip("\n").split("\n"):
        fields = line[2:].split(" ") if line.startswith("\u2014 ") else []
        if len(fields) != 2:
            continue
        try:
            blob = base64.b64decode(fields[1].encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            continue
        if len(blob) >= 4:
            found.append((fields[0], int.from_bytes(blob[:4], "big")))
    return found


def _key_label(name: str, key_id: int) -> str:
    """``name+hex id``: the public prefix of a verifier key line, no key material."""
    return f"{name}+{key_id:08x}"


@runtime_checkable
class AuditSink(Protocol):
    """What the gateway and the coordinator call on their request path.

    ``append`` returns the entry's index only once the entry is durable, and
    raises (a :class:`~fedvault.errors.FedvaultError`, typically
    :class:`~fedvault.errors.UnavailableError`) otherwise: callers must then
    fail the request — never answer without the audit record.
    """

    def append(self, record: AuditRecord) -> int: ...


class Committer(Protocol):
    """Turns single-entry appends into durable batched commits.

    :class:`GroupCommitter` (a writer thread) or
    :class:`server.audit.writer.ProcessCommitter` (a writer process). A future
    resolves to the entry's index only once the entry is durable.
    """

    batches: int
    items: int

    def submit(self, item: bytes) -> Future[int]: ...

    def submit_async(self, item: bytes) -> asyncio.Future[int]: ...

    def close(self) -> None: ...


_STOP: Final = object()


@dataclass(frozen=True, slots=True)
class _LoopWaiter:
    """An appender awaiting on an event loop (resolved on that loop, once per batch)."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]


def _resolve(
    futures: list[tuple[asyncio.Future[int], int | None]], error: BaseException | None
) -> None:
    """On the waiters' loop: settle one batch's futures (skipping cancelled ones)."""
    for fut, index in futures:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(index)  # type: ignore[arg-type]


class GroupCommitter:
    """Funnel single-item appends from many threads into batched commits.

    ``commit(batch) -> index of batch[0]`` must be durable when it returns.
    """

    def __init__(self, commit: Callable[[Sequence[bytes]], int], *, max_batch: int = 1024) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[bytes, Future[int] | _LoopWaiter] | object] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        self.batches = 0
        self.items = 0

    def submit(self, item: bytes) -> Future[int]:
        if self._closed:
            raise UnavailableError("audit log is closed")
        fut: Future[int] = Future()
        self._queue.put((item, fut))
        return fut

    def submit_async(self, item: bytes) -> asyncio.Future[int]:
        """:meth:`submit` for a caller on an event loop: an asyncio future of that loop.

        Why not ``asyncio.wrap_future(submit(...))``: that wakes the loop once
        per item (one ``call_soon_threadsafe`` each). The writer instead
        resolves every waiter of one batch on one loop with a single
        thread-safe call, after the commit returned (durable first).
        """
        if self._closed:
            raise UnavailableError("audit log is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._queue.put((item, _LoopWaiter(loop, fut)))
        return fut

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._flush(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _flush(self, batch: list[tuple[bytes, Future[int] | _LoopWaiter]]) -> None:
        try:
            start = self._commit([item for item, _ in batch])
        except BaseException as exc:  # every waiter must hear about it
            error = (
                exc
                if isinstance(exc, FedvaultError)
                else UnavailableError(f"audit append failed: {type(exc).__name__}")
            )
            self._settle([(w, None) for _, w in batch], error)
            return
        self.batches += 1
        self.items += len(batch)
        self._settle([(w, start + offset) for offset, (_, w) in enumerate(batch)], None)

    @staticmethod
    def _settle(
        waiters: list[tuple[Future[int] | _LoopWaiter, int | None]], error: BaseException | None
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | None]]] = {}
        for waiter, index in waiters:
            if isinstance(waiter, _LoopWaiter):
                by_loop.setdefault(waiter.loop, []).append((waiter.future, index))
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(index)  # type: ignore[arg-type]
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures, error)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                continue

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        while True:  # anything that raced past the closed flag
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(left, tuple):
                self._settle([(left[1], None)], UnavailableError("audit log is closed"))


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str
    made_at: float


class AuditLog:
    """The append side and the read side (proofs, pages, checkpoints) of one log.

    Opening checks, in O(log n), that the store still matches its latest
    signed checkpoint (same root at that size, no entries lost) and refuses to
    start otherwise: a damaged log must be noticed before it is appended to.
    """

    def __init__(
        self,
        storage: AuditStorage,
        signer: NoteSigner,
        *,
        origin: str | None = None,
        checkpoint_interval: float = 1.0,
        max_batch: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        node_cache: int = 65536,
        committer: Committer | None = None,
        previous_key: NoteVerifier | None = None,
        key_source: str = KEY_SOURCE,
    ) -> None:
        """``previous_key``: the verifier key being rotated away from (see the module doc).

        ``key_source`` says where ``signer`` came from, for the refusal's message.
        """
        self.storage = storage
        self.signer = signer
        self.origin = origin or signer.name
        self._previous_key = previous_key
        self._key_source = key_source
        self._mismatch_logged = False
        self._interval = checkpoint_interval
        self._clock = clock
        self._cp_lock = threading.Lock()
        self._cache: dict[merkle.NodeKey, bytes] = {}
        self._cache_limit = node_cache
        self._rotating = False  # set by _check_store: previous_key signed the latest checkpoint
        # What re-hashing the entries found (start_integrity_checks); damage stops signing.
        self.integrity = IntegrityStatus()
        self._scrubber: EntryScrubber | None = None
        self._unsigned_logged = False
        try:
            self._latest = self._check_store()
        except BaseException:
            if committer is not None:
                committer.close()
            raise
        # ``committer`` appends to this same store from elsewhere (a writer process);
        # by default a thread here commits through ``storage``.
        self._committer: Committer = committer or GroupCommitter(
            storage.append, max_batch=max_batch
        )
        self._bg_stop = threading.Event()
        self._bg: threading.Thread | None = None
        if self._rotating:
            try:
                self._finish_rotation()
            except BaseException:
                self._committer.close()
                raise

    # ----------------------------------------------------------------- appends
    def append(self, record: AuditRecord) -> int:
        """Durably append ``record``; its index. Raises instead of losing it."""
        return self.append_entry(encode_record(record))

    def append_entry(self, entry: bytes) -> int:
        return self._committer.submit(entry).result()

    async def append_async(self, record: AuditRecord) -> int:
        """The same, for handlers on an event loop: awaits without blocking the loop."""
        return await self._committer.submit_async(encode_record(record))

    async def append_entry_async(self, entry: bytes) -> int:
        """:meth:`append_async` for a record already in canonical bytes (the gateway's)."""
        return await self._committer.submit_async(entry)

    @property
    def group_commit_stats(self) -> tuple[int, int]:
        """(batches, items) committed so far: items/batches is the batching factor."""
        return self._committer.batches, self._committer.items

    # -------------------------------------------------------------------- reads
    def size(self) -> int:
        return self.storage.size()

    def _fetch(self, keys: Sequence[merkle.NodeKey]) -> dict[merkle.NodeKey, bytes]:
        """Stored nodes, through a cache: perfect subtrees never change once written."""
        found = {k: self._cache[k] for k in keys if k in self._cache}
        missing = [k for k in keys if k not in found]
        if missing:
            fetched = self.storage.nodes(missing)
            found.update(fetched)
            if len(self._cache) + len(fetched) > self._cache_limit:
                self._cache.clear()
            self._cache.update(fetched)
        return found

    def root(self, size: int) -> bytes:
        return merkle.root_from_nodes(size, self._fetch(merkle.Frontier.keys_for(size)))

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """A bounded page: at most :data:`MAX_PAGE` entries, clipped to the log size."""
        size = self.size()
        if start < 0 or end < start:
            raise InvalidRequestError(f"bad range: start={start}, end={end}")
        if start > size:
            raise InvalidRequestError(f"start {start} is beyond the log size {size}")
        return self.storage.entries(start, min(end, size, start + MAX_PAGE))

    def _check_tree_size(self, tree_size: int) -> None:
        size = self.size()
        if tree_size > size:
            raise InvalidRequestError(f"tree_size {tree_size} exceeds the log size {size}")

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        if not 0 <= index < tree_size:
            raise InvalidRequestError(f"index {index} is not below tree_size {tree_size}")
        self._check_tree_size(tree_size)
        return merkle.inclusion_proof(index, tree_size, self._fetch)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        if not 1 <= first <= second:
            raise InvalidRequestError(f"need 1 <= first <= second, got {first} and {second}")
        self._check_tree_size(second)
        return merkle.consistency_proof(first, second, self._fetch)

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self, *, force: bool = False) -> str:
        """The latest signed note; a new one if the tree grew and the rate limit allows."""
        with self._cp_lock:
            latest = self._latest
            size = self.size()
            if latest is not None and latest.size == size:
                return latest.note
            if latest is not None and not force and self._clock() - latest.made_at < self._interval:
                return latest.note

            def refuse_another_signer(stored: tuple[int, str] | None) -> None:
                """Another writer signed since: with our key, or we must not sign."""
                if stored is None or (latest is not None and stored[1] == latest.note):
                    return
                try:
                    self._check_signer(stored[1], rotating=latest is None)
                except SigningKeyMismatchError as exc:
                    if not self._mismatch_logged:
                        _log.error("%s", exc)
                        self._mismatch_logged = True
                    raise

            problem = self.integrity.problem()
            if problem is not None:
                # A stored entry no longer matches its leaf: signing a larger tree
                # would vouch for a log known to be damaged. The last checkpoint
                # is still served, so auditors find the index themselves.
                if not self._unsigned_logged:
                    _log.error("audit log not signed: %s", problem)
                    self._unsigned_logged = True
                if latest is None:
                    raise IntegrityError(problem)
                return latest.note
            # Checked before signing (no work wasted) and again inside the save's
            # transaction: a replica with another key may have signed in between.
            refuse_another_signer(self.storage.latest_checkpoint())
            try:
                root = self.root(size)
            except IntegrityError:
                if latest is None:
                    raise
                # The store is damaged past the last checkpoint: keep serving the
                # last signed one (auditors then find the bad index) and say so.
                _log.error("audit store damaged beyond tree size %d; not signing", latest.size)
                return latest.note
            note = self.signer.sign(format_checkpoint(self.origin, size, root))
            self.storage.save_checkpoint(size, note, check=refuse_another_signer)
            self._latest = SignedCheckpoint(size, root, note, self._clock())
            return note

    def start_checkpointing(self) -> None:
        """Sign a checkpoint every interval while the log grows (background thread)."""
        if self._bg is None:
            self._bg = threading.Thread(target=self._checkpoint_loop, name="audit-cp", daemon=True)
            self._bg.start()

    def _checkpoint_loop(self) -> None:
        reported: str | None = None
        while not self._bg_stop.wait(self._interval):
            try:
                self.checkpoint()
                reported = None
            except IntegrityError as exc:
                # Tampering found by the signer (a forged checkpoint, a tree that
                # no longer matches): say so once per distinct finding, never
                # silently stop signing.
                if str(exc) != reported:
                    _log.error("audit log not signed: %s", exc)
                    reported = str(exc)
            except FedvaultError:
                continue  # the next tick retries; appends do not depend on it

    def _check_store(self) -> SignedCheckpoint | None:
        stored = self.storage.latest_checkpoint()
        if stored is None:
            return None
        size, note = stored
        cp = parse_checkpoint(note[: note.rfind("\n\n") + 1])
        # The signer first: a key of another name also means another origin (it
        # defaults to the key's name), and that is a misconfigured replica
        # (exit 5), not a log that changed its identity (tampering, exit 6).
        try:
            ours = self._check_signer(note, rotating=True)
        except SigningKeyMismatchError as exc:
            raise SigningKeyMismatchError(f"refusing to start: {exc}") from None
        if cp.origin != self.origin:
            raise IntegrityError(
                f"store's checkpoint is for log {cp.origin!r}, not {self.origin!r}"
            )
        if cp.size != size:
            raise IntegrityError("store's checkpoint row disagrees with its note")
        have = self.storage.size()
        if have < size:
            raise IntegrityError(
                f"audit store holds {have} entries but its checkpoint covers {size}: "
                "entries were lost"
            )
        if self.root(size) != cp.root:
            raise IntegrityError(
                f"audit store's tree at size {size} does not match its signed checkpoint"
            )
        self._rotating = not ours
        return (
            SignedCheckpoint(size, cp.root, note, self._clock() - self._interval) if ours else None
        )

    def _finish_rotation(self) -> None:
        """Record the key change in the log itself, then sign with the new key at once.

        Why both: the rotation is an event a compliance reviewer must see, and
        until a checkpoint signed by the new key is stored, the store still
        ends with the old key's — the next start without ``previous_key``
        would be refused. The record makes the tree grow, so that checkpoint
        is new (checkpoints are kept once per size); the old key's
        checkpoints stay in the store, and its root is what this one extends.
        """
        ours, previous = self.signer.verifier, self._previous_key
        assert previous is not None  # noqa: S101 - _rotating implies it
        self.append(
            AuditRecord(
                time=datetime.now(UTC),
                actor="audit-log",
                role="system",
                action="audit.signing-key-rotated",
                resource=(
                    f"signing-key:{_key_label(previous.name, previous.key_id)}"
                    f" -> {_key_label(ours.name, ours.key_id)}"
                ),
                outcome="ok",
            )
        )
        self.checkpoint(force=True)
        self._rotating = False

    def _check_signer(self, note: str, *, rotating: bool) -> bool:
        """True if our key signed ``note``; False if ``previous_key`` did (while rotating).

        Raises :class:`IntegrityError` when a signature line claims our key (or
        the previous one) but does not verify — that is tampering — and
        :class:`SigningKeyMismatchError` when another key signed it.
        """
        ours = self.signer.verifier
        signers = _note_signers(note)
        if (ours.name, ours.key_id) in signers:
            open_note(note, ours)
            return True
        previous = self._previous_key
        if rotating and previous is not None and (previous.name, previous.key_id) in signers:
            open_note(note, previous)  # its root still binds the store
            return False
        theirs = ", ".join(_key_label(n, k) for n, k in signers) or "no readable key"
        raise SigningKeyMismatchError(
            f"this audit store's latest checkpoint is signed by {theirs}, but this process "
            f"signs with {_key_label(ours.name, ours.key_id)} ({self._key_source}). Every "
            "gateway replica and audit writer of one store must use the same signing key: "
            "copy the key file from a running replica. A deliberate rotation names the old "
            "verifier key line once: FEDVAULT_AUDIT_PREVIOUS_KEY for `fedvault gateway "
            "start`, --previous-key for `fedvault audit`"
        )

    def start_integrity_checks(
        self,
        *,
        state_file: Path | None,
        interval_s: float = DEFAULT_INTERVAL_S,
        entries_per_interval: int = DEFAULT_ENTRIES_PER_INTERVAL,
    ) -> EntryScrubber:
        """Re-hash the entries since the last verified point now, then scrub in the background.

        Why here and not on open: the check costs O(new entries) and writes
        ``state_file``; the long-running servers (the gateway, ``audit
        serve``) opt in, tools that only copy, read or sign once do not.
        Findings land in :attr:`integrity` (see :mod:`server.audit.scrub`);
        they stop :meth:`checkpoint` from signing.
        """
        if self._scrubber is None:
            scrubber = EntryScrubber(
                self,
                state_file=state_file,
                interval_s=interval_s,
                entries_per_interval=entries_per_interval,
            )
            scrubber.check_at_start()
            scrubber.start()
            self._scrubber = scrubber
        return self._scrubber

    def verify_store(self) -> int:
        """Rehash every entry against the stored leaves and nodes (O(n)); the size checked.

        For operators after a restore or a disk scare; the verifier does the
        same from outside, without trusting the stored hashes.
        """
        size = self.size()
        frontier = merkle.Frontier()
        for start in range(0, size, MAX_PAGE):
            rows = self.storage.entries(start, min(size, start + MAX_PAGE))
            leaves = self.storage.nodes([(0, i) for i, _ in rows])
            for index, entry in rows:
                if index != frontier.size:
                    raise IntegrityError(f"audit store: entry {frontier.size} is missing")
                leaf = merkle.leaf_hash(entry)
                if leaves[(0, index)] != leaf:
                    raise IntegrityError(f"audit store: entry {index} does not match its hash")
                frontier.append(leaf)
        if frontier.size != size or frontier.root() != self.root(size):
            raise IntegrityError("audit store: stored tree does not match the entries")
        return size

    def close(self) -> None:
        if self._scrubber is not None:
            self._scrubber.close()
        self._bg_stop.set()
        if self._bg is not None:
            self._bg.join()
        self._committer.close()
        self.storage.close()
