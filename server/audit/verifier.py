"""The auditor's side: re-derive the log from its entries and trust only the key.

What is checked, in order, and why:

1. the checkpoint's signature, against a verifier key obtained out of band
   (never the one the server publishes — the server is what is audited);
2. every entry from 0 to the checkpoint's size: present, in order, and a
   canonical audit record (one spelling per record);
3. against the last checkpoint this auditor saw (state directory): the log
   did not shrink, and its first ``old size`` entries hash to the old root —
   a rewritten, re-signed history (a fork) fails here even though step 4
   passes, because the operator holds the signing key;
4. the root recomputed from the entries equals the signed root;
5. the server's consistency proof from the old checkpoint verifies.

On failure the first bad index is named: from the leaf hashes kept in the
state directory when they differ, else by bisection with the server's
consistency proofs (the largest prefix still consistent with the signed root).
Step 2's entries pass through no trusted hash, so the localisation is a
diagnosis; the verdict (fail) does not depend on it.

The diagnosis tells two failures apart. *Entry N was altered*: its bytes
changed, but the signed tree did not — the entries no longer hash to the
signed root, yet that root is consistent with the last verified one (or the
prefix before N is consistent with it): a row edited in the database. *The
log forked*: the signed tree itself changed — entries that hash to a signed
root that does not extend the verified one: history rewritten and re-signed
by whoever holds the key. Both fail; the message says which, because the
response differs (restore one row from a backup, or investigate the operator).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from fedvault.errors import (
    AuthenticationError,
    ConfigError,
    FedvaultError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from secure.signed_note import Checkpoint, NoteVerifier, open_note, parse_checkpoint
from server.audit import merkle
from server.audit.records import InvalidEntry, decode_entry

__all__ = [
    "BundleSource",
    "BundleWriter",
    "HttpSource",
    "LogSource",
    "VerifiedLog",
    "VerifierState",
    "iter_entries",
    "verify_log",
]

PAGE: Final = 1000


class LogSource(Protocol):
    """Where entries come from: the live API, or an exported bundle."""

    def checkpoint(self) -> str: ...

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]: ...

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        """None where no proofs can be had (offline)."""
        ...


_RATE_LIMIT_RETRIES: Final = 5


def _retry_after(value: str | None) -> float:
    """Seconds to wait for a 429's ``Retry-After`` (delta seconds), within [0.1, 30]."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.1), 30.0)


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class HttpSource:
    """The ``/v2/audit`` endpoints over HTTP(S) with an optional bearer token."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self._url = url

    def _get(self, path: str, params: dict[str, int] | None = None) -> Any:
        import httpx

        for attempt in range(_RATE_LIMIT_RETRIES + 1):
            try:
                response = self._client.get(f"/v2/audit/{path}", params=params)
            except httpx.HTTPError as exc:
                raise UnavailableError(
                    f"cannot reach the audit API at {self._url}: {exc}"
                ) from None
            if response.status_code != 429 or attempt == _RATE_LIMIT_RETRIES:
                break
            # Rate-limited: reading a large log is many pages, and the gateway's
            # per-key limit applies to auditors too. Wait as told, a bounded number of times.
            time.sleep(_retry_after(response.headers.get("retry-after")))
        if response.status_code >= 400:
            try:
                detail = str(response.json().get("detail", ""))
            except ValueError:
                detail = ""
            error: type[FedvaultError] = {
                401: AuthenticationError,
                403: PermissionDeniedError,
                404: NotFoundError,
                400: ConfigError,
                422: IntegrityError,
            }.get(response.status_code, UnavailableError)
            raise error(f"audit API {path}: HTTP {response.status_code} {detail}".strip())
        return response

    def checkpoint(self) -> str:
        return str(self._get("checkpoint").text)

    def public_key(self) -> str:
        return str(self._get("public-key").text).strip()

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        body = self._get("entries", {"start": start, "end": end}).json()
        try:
            return [(int(e["index"]), _unb64(e["entry"])) for e in body["entries"]]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError("audit API returned a malformed entries page") from None

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        body = self._get("proof/consistency", {"first": first, "second": second}).json()
        try:
            return [_unb64(h) for h in body["hashes"]]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError("audit API returned a malformed consistency proof") from None

    def close(self) -> None:
        self._client.close()


class BundleSource:
    """An offline bundle written by :func:`export_bundle`: checkpoint + entries."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            self._note = (directory / "checkpoint.txt").read_text(encoding="utf-8")
            lines = (directory / "entries.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise NotFoundError(f"not an audit bundle: {directory} ({exc.strerror})") from None
        self._rows: list[tuple[int, bytes]] = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                self._rows.append((int(item["index"]), _unb64(item["entry"])))
            except (ValueError, KeyError, TypeError):
                raise IntegrityError(f"bundle entries.jsonl line {n} is malformed") from None

    def checkpoint(self) -> str:
        return self._note

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        # Rows are positional in the file; a missing or extra line shows as a wrong index.
        return self._rows[start:end]

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        return None


@dataclass(frozen=True)
class VerifierState:
    """The last checkpoint an auditor verified, and the leaf hashes behind it."""

    note: str
    checkpoint: Checkpoint
    leaves: bytes  # 32 bytes per entry, entry i at [32i, 32i+32)

    @classmethod
    def load(cls, directory: Path, verifier: NoteVerifier) -> VerifierState | None:
        try:
            note = (directory / "checkpoint").read_text(encoding="utf-8")
            leaves = (directory / "leaves.bin").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read verifier state {directory}: {exc.strerror}") from None
        try:
            cp = parse_checkpoint(open_note(note, verifier))
        except IntegrityError as exc:
            raise ConfigError(f"verifier state {directory} is not ours or damaged: {exc}") from None
        if len(leaves) != 32 * cp.size:
            raise ConfigError(f"verifier state {directory} is damaged (leaf file size)")
        return cls(note, cp, leaves)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in (("leaves.bin", self.leaves), ("checkpoint", self.note.encode())):
            tmp = directory / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, directory / name)


@dataclass(frozen=True)
class VerifiedLog:
    checkpoint: Checkpoint
    note: str
    leaves: bytes
    previous_size: int | None


def iter_entries(source: LogSource, size: int) -> Iterator[tuple[int, bytes]]:
    """Entries 0..size-1 in order; an absent or out-of-order one fails naming its index."""
    expected = 0
    while expected < size:
        rows = source.entries(expected, min(size, expected + PAGE))
        if not rows:
            raise IntegrityError(f"FAILED at index {expected}: entry missing from the log")
        for index, entry in rows:
            if index != expected:
                raise IntegrityError(
                    f"FAILED at index {expected}: entry missing or out of order "
                    f"(the log returned index {index} in its place)"
                )
            yield index, entry
            expected += 1
            if expected == size:
                return


class _Levels:
    """Every perfect node of a tree, bottom-up, for locating a bad index by bisection."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.levels = [leaves]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append(
                [merkle.node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            )

    def __getitem__(self, key: merkle.NodeKey) -> bytes:
        return self.levels[key[0]][key[1]]

    def root(self, size: int) -> bytes:
        return merkle.root_from_nodes(size, self)  # type: ignore[arg-type]


def _locate_by_proofs(source: LogSource, leaves: list[bytes], cp: Checkpoint) -> int | None:
    """Largest prefix consistent with the signed root = index of the first bad entry."""
    if cp.size == 0 or source.consistency_proof(1, cp.size) is None:
        return None
    tree = _Levels(leaves)

    def consistent(m: int) -> bool:
        if m == 0:
            return True
        proof = source.consistency_proof(m, cp.size) or []
        try:
            merkle.verify_consistency(m, cp.size, tree.root(m), cp.root, proof)
        except merkle.ProofError:
            return False
        return True

    lo, hi = 0, cp.size  # consistent(lo) holds; consistent(hi) does not (roots differ)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if consistent(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _extends(source: LogSource, old: Checkpoint, new: Checkpoint) -> bool | None:
    """Whether the signed tree ``new`` extends ``old``; None where no proof can be had."""
    if new.size == old.size:
        return new.root == old.root
    proof = source.consistency_proof(old.size, new.size)
    if proof is None:
        return None
    try:
        merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    except merkle.ProofError:
        return False
    return True


def _changed_since_verified(
    source: LogSource, index: int, old: Checkpoint, cp: Checkpoint, matches_root: bool
) -> str:
    """The message for entry ``index`` differing from the one verified at ``old``.

    Altered: the entries do not hash to the signed root, and that root still
    extends the verified one — the tree is intact, the entry's bytes are not.
    Forked: the entries hash to a signed root that does not extend it.
    """
    if not matches_root:
        extends = _extends(source, old, cp)
        if extends:
            return (
                f"FAILED at index {index}: entry {index} was altered: its bytes changed since "
                f"it was verified at tree size {old.size}, but the signed tree still holds the "
                "original (consistent with that checkpoint): the stored entry was modified, "
                "the log did not fork"
            )
        if extends is None:
            return (
                f"FAILED at index {index}: entry {index} differs from the one verified at tree "
                f"size {old.size}: altered, or the history rewritten (offline: no consistency "
                "proof to tell which)"
            )
    return (
        f"FAILED at index {index}: entry differs from the one verified at tree size "
        f"{old.size} (history rewritten: the log forked)"
    )


def verify_log(
    source: LogSource,
    verifier: NoteVerifier,
    state: VerifierState | None,
    *,
    bundle: BundleWriter | None = None,
) -> VerifiedLog:
    """Run every check; return what was verified or raise :class:`IntegrityError`.

    ``bundle`` receives the checkpoint and every entry as it is fetched, so an
    export costs no second download and keeps the evidence even when
    verification fails.
    """
    note = source.checkpoint()
    if bundle is not None:
        bundle.checkpoint(note)
    try:
        cp = parse_checkpoint(open_note(note, verifier))
    except IntegrityError as exc:
        raise IntegrityError(f"FAILED: checkpoint: {exc}") from None
    if state is not None and state.checkpoint.origin != cp.origin:
        raise IntegrityError(
            f"FAILED: checkpoint is for log {cp.origin!r}, state for {state.checkpoint.origin!r}"
        )

    frontier = merkle.Frontier()
    leaves: list[bytes] = []
    for index, entry in iter_entries(source, cp.size):
        if bundle is not None:
            bundle.entry(index, entry)
        try:
            decode_entry(entry)
        except InvalidEntry as exc:
            raise IntegrityError(f"FAILED at index {index}: {exc}") from None
        leaf = merkle.leaf_hash(entry)
        leaves.append(leaf)
        frontier.append(leaf)

    matches_root = frontier.root() == cp.root
    if state is not None:
        old = state.checkpoint
        if cp.size < old.size:
            raise IntegrityError(
                f"FAILED at index {cp.size}: the log shrank from {old.size} to {cp.size} "
                "entries since the last verified checkpoint (rolled back or forked)"
            )
        for i in range(old.size):
            if leaves[i] != state.leaves[32 * i : 32 * i + 32]:
                raise IntegrityError(_changed_since_verified(source, i, old, cp, matches_root))

    if not matches_root:
        where = _locate_by_proofs(source, leaves, cp)
        if where is None:
            raise IntegrityError(
                "FAILED (index not located offline): entries do not hash to the signed root "
                f"of tree size {cp.size}"
            )
        raise IntegrityError(
            f"FAILED at index {where}: entry {where} was altered: its bytes do not hash to "
            f"the leaf the signed tree of size {cp.size} holds (the entries before it do)"
        )

    if state is not None and 0 < state.checkpoint.size < cp.size:
        old = state.checkpoint
        proof = source.consistency_proof(old.size, cp.size)
        if proof is not None:
            try:
                merkle.verify_consistency(old.size, cp.size, old.root, cp.root, proof)
            except merkle.ProofError as exc:
                raise IntegrityError(
                    f"FAILED at index {old.size}: server's consistency proof from size "
                    f"{old.size} to {cp.size} does not verify ({exc})"
                ) from None

    return VerifiedLog(cp, note, b"".join(leaves), None if state is None else state.checkpoint.size)


class BundleWriter:
    """Writes what :class:`BundleSource` reads: verifiable later with no network."""

    def __init__(self, directory: Path, key_line: str) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "verifier-key.txt").write_text(key_line + "\n", encoding="utf-8")
            self._entries = (directory / "entries.jsonl").open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the bundle {directory}: {exc.strerror}") from None
        self.directory = directory

    def checkpoint(self, note: str) -> None:
        (self.directory / "checkpoint.txt").write_text(note, encoding="utf-8")

    def entry(self, index: int, entry: bytes) -> None:
        self._entries.write(
            json.dumps({"index": index, "entry": base64.b64encode(entry).decode()}) + "\n"
        )

    def close(self) -> None:
        self._entries.close()
