"""The log checks its own entries: a start-up check and a background scrub.

Why: the signed checkpoints and the outside verifier catch an entry changed
in the database, but only when someone runs the verifier. Opening the log
checks the stored *tree* against the latest checkpoint (O(log n)), which an
entry edited in place does not disturb — its leaf hash lives with the tree
nodes, not beside it (:mod:`server.audit.storage`). So the gateway would
restart, stay ready and keep signing checkpoints over a tampered entry. Here
each entry is re-hashed and compared with the leaf hash stored when it was
appended:

- at start-up, every entry from the last verified point on (persisted in a
  small state file, bound to the tree's root at that point, so a replaced or
  restored log is checked from 0 again);
- in the background, a bounded number of entries per interval: first the
  entries appended since the last check, then a cycle over the older ones,
  so every entry is re-checked once per ``size / entries_per_interval``
  intervals.

A mismatch (or a missing entry) is recorded in :class:`IntegrityStatus`:
readiness turns false, the log stops signing checkpoints, the Prometheus
collector exports it and one error line names the index — never the entry's
content. It stays recorded for the life of the process (the evidence does not
heal itself); the persisted verified point never passes it, so the next
start finds it again unless the entry was restored.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedvault.errors import FedvaultError, IntegrityError
from server.audit import merkle

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from server.audit.log import AuditLog

__all__ = [
    "DEFAULT_ENTRIES_PER_INTERVAL",
    "DEFAULT_INTERVAL_S",
    "AlteredEntry",
    "EntryScrubber",
    "IntegrityStatus",
    "integrity_collector",
]

_log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S: Final = 1.0
DEFAULT_ENTRIES_PER_INTERVAL: Final = 1000
"""About 3 ms of hashing and reads per second: a million entries re-checked every ~17 min."""
_PAGE: Final = 1000
_KEPT: Final = 1000
"""Most altered indices remembered individually (the counter counts them all)."""


@dataclass(frozen=True, slots=True)
class AlteredEntry:
    """One entry whose stored bytes no longer match the leaf hash stored with the tree."""

    index: int
    what: str  # "altered" or "missing"
    found_by: str  # "start-up check" or "scrub"
    found_at: float  # wall clock

    def message(self) -> str:
        if self.what == "missing":
            return f"audit log entry {self.index} is missing from the store"
        return (
            f"audit log entry {self.index} was altered: its stored bytes no longer hash to "
            "the leaf hash recorded when it was appended"
        )


class IntegrityStatus:
    """What the checks found; read by readiness, the metrics, the console and the signer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._altered: dict[int, AlteredEntry] = {}
        self.altered_total = 0
        self.checked_total = 0
        self.passes_total = 0
        self.verified_size = 0

    @property
    def intact(self) -> bool:
        return not self._altered

    def first(self) -> AlteredEntry | None:
        """The lowest altered index found (the one to report and investigate first)."""
        with self._lock:
            return self._altered[min(self._altered)] if self._altered else None

    def altered(self) -> list[AlteredEntry]:
        with self._lock:
            return [self._altered[i] for i in sorted(self._altered)]

    def problem(self) -> str | None:
        """One line for readiness and the console; None while every check passed."""
        first = self.first()
        if first is None:
            return None
        more = self.altered_total - 1
        also = f" ({more} more entr{'y' if more == 1 else 'ies'} damaged)" if more > 0 else ""
        return f"{first.message()}{also}; no new checkpoint is signed"

    def record(self, index: int, what: str, found_by: str) -> AlteredEntry | None:
        """Note a damaged entry; the finding the first time this index is found, else None."""
        with self._lock:
            if index in self._altered:
                return None
            self.altered_total += 1
            found = AlteredEntry(index, what, found_by, time.time())
            if len(self._altered) >= _KEPT:
                highest = max(self._altered)
                if index > highest:
                    return found  # counted; the lowest ones are the ones kept
                del self._altered[highest]
            self._altered[index] = found
            return found


class EntryScrubber:
    """Re-hashes stored entries against their stored leaf hashes (see the module doc).

    ``state_file`` keeps the verified point between runs (None: every start
    checks the whole log). ``entries_per_interval`` bounds the background
    cost; 0 turns the background scrub off (the start-up check still runs).
    """

    def __init__(
        self,
        log: AuditLog,
        *,
        state_file: Path | None,
        interval_s: float = DEFAULT_INTERVAL_S,
        entries_per_interval: int = DEFAULT_ENTRIES_PER_INTERVAL,
    ) -> None:
        if interval_s <= 0 or entries_per_interval < 0:
            raise ValueError("the scrub needs interval_s > 0 and entries_per_interval >= 0")
        self._log = log
        self._status = log.integrity
        self._state_file = state_file
        self._interval = interval_s
        self._batch = entries_per_interval
        self._tail = 0  # entries below this were checked (this run, or before: the state file)
        self._cursor = 0  # the cycle's next index, below _tail
        self._saved: int | None = None
        self._state_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start-up check and steps never overlap

    # ------------------------------------------------------------------ checks
    def check_at_start(self) -> int:
        """Check every entry from the persisted verified point to the end; how many."""
        with self._lock:
            start = self._load_state()
            size = self._log.storage.size()
            self._tail = start
            checked = self._check(start, size, "start-up check")
            self._tail = size
            self._save_state()
            if start or size:
                _log.info("audit log: re-hashed entries %d..%d at start-up", start, size)
            return checked

    def step(self) -> int:
        """One interval's work: new entries first, then the cycle over older ones."""
        with self._lock:
            budget = self._batch
            size = self._log.storage.size()
            done = 0
            # Never the same entry twice per step: the cycle runs over what was
            # checked before this step, not over the new entries just checked.
            cycled = self._tail
            if self._tail < size and budget > 0:
                end = min(size, self._tail + budget)
                done += self._check(self._tail, end, "scrub")
                self._tail = end
            left = min(budget - done, cycled)
            while left > 0:
                if self._cursor >= cycled:
                    self._cursor = 0
                end = min(cycled, self._cursor + left)
                checked = self._check(self._cursor, end, "scrub")
                done += checked
                left -= end - self._cursor
                self._cursor = end
                if self._cursor >= cycled:
                    self._status.passes_total += 1
            if done:
                self._save_state()
            return done

    def _check(self, start: int, end: int, found_by: str) -> int:
        """Re-hash entries ``start <= i < end`` page by page; how many were read."""
        storage = self._log.storage
        checked = 0
        for lo in range(start, end, _PAGE):
            hi = min(end, lo + _PAGE)
            rows = dict(storage.entries(lo, hi))
            for index, stored in self._leaves(lo, hi):
                entry = rows.get(index)
                if entry is None:
                    self._found(index, "missing", found_by)
                elif stored is None or merkle.leaf_hash(entry) != stored:
                    self._found(index, "altered", found_by)
            checked += hi - lo
            self._status.checked_total += hi - lo
        return checked

    def _leaves(self, lo: int, hi: int) -> Iterator[tuple[int, bytes | None]]:
        """Stored leaf hashes of ``lo..hi-1``; None for one that is gone."""
        keys = [(0, i) for i in range(lo, hi)]
        try:
            found = self._log.storage.nodes(keys)
        except IntegrityError:  # some are missing: find which, one by one
            found = {}
            for key in keys:
                try:
                    found.update(self._log.storage.nodes([key]))
                except IntegrityError:
                    continue
        for key in keys:
            yield key[1], found.get(key)

    def _found(self, index: int, what: str, found_by: str) -> None:
        found = self._status.record(index, what, found_by)
        if found is None:
            return
        # The index and nothing of the entry: its content is what was tampered with.
        _log.error(
            "AUDIT LOG TAMPERING: %s (found by the %s); readiness is false and no new "
            "checkpoint is signed until the entry is restored and the server restarted",
            found.message(),
            found_by,
        )

    # ------------------------------------------------------------------- state
    def _verified_point(self) -> int:
        first = self._status.first()
        return self._tail if first is None else min(self._tail, first.index)

    def _load_state(self) -> int:
        """The persisted verified point if it belongs to this log; else 0 (check everything)."""
        path = self._state_file
        if path is None:
            return 0
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            _log.warning("audit scrub state %s unreadable (%s); re-checking every entry", path, exc)
            return 0
        try:
            size = int(data["verified_size"])
            root = bytes.fromhex(str(data["root"]))
            origin = str(data["origin"])
        except (KeyError, TypeError, ValueError):
            _log.warning("audit scrub state %s is malformed; re-checking every entry", path)
            return 0
        try:
            same = (
                origin == self._log.origin
                and 0 <= size <= self._log.storage.size()
                and self._log.root(size) == root
            )
        except FedvaultError:
            same = False
        if not same:
            # A replaced, restored or migrated log: its entries were never checked here.
            _log.warning(
                "audit scrub state %s does not match this log; re-checking every entry", path
            )
            return 0
        self._status.verified_size = size
        return size

    def _save_state(self) -> None:
        """Persist the verified point (never past a damaged entry), atomically."""
        point = self._verified_point()
        self._status.verified_size = point
        if self._state_file is None or point == self._saved:
            return
        path = self._state_file
        try:
            body = {"origin": self._log.origin, "verified_size": point}
            body["root"] = self._log.root(point).hex()
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except (OSError, FedvaultError) as exc:
            if not self._state_warned:
                _log.warning("cannot save the audit scrub state %s: %s", path, exc)
                self._state_warned = True
            return
        self._saved = point

    # -------------------------------------------------------------- background
    def start(self) -> None:
        """Run :meth:`step` every interval on a daemon thread (no-op when turned off)."""
        if self._thread is None and self._batch > 0:
            self._thread = threading.Thread(target=self._run, name="audit-scrub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        reported: str | None = None
        while not self._stop.wait(self._interval):
            try:
                self.step()
                reported = None
            except FedvaultError as exc:  # the store is away: the next tick retries
                if str(exc) != reported:
                    _log.warning("audit scrub skipped an interval: %s", exc)
                    reported = str(exc)
            except Exception as exc:  # never let one odd row end the checks for good
                name = f"{type(exc).__module__}.{type(exc).__qualname__}"
                if name != reported:
                    # The class only: the message may quote stored content.
                    _log.error("audit scrub failed an interval (%s); retrying", name)
                    reported = name

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def integrity_collector(status: IntegrityStatus) -> Collector:
    """The checks' findings as Prometheus metrics, read at scrape time.

    ``fedvault_audit_altered_entries_total`` is the alert: any increase means
    a stored entry changed (``deploy/prometheus/alerts.yml``). Built here
    rather than at import so that processes which only append (writers,
    the coordinator) do not import the Prometheus client.
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    class IntegrityCollector(Collector):
        def collect(self) -> Iterator[Any]:
            s = status
            altered = CounterMetricFamily(
                "fedvault_audit_altered_entries",
                "Audit entries found altered or missing by the start-up check or the scrub.",
            )
            altered.add_metric([], float(s.altered_total))
            intact = GaugeMetricFamily(
                "fedvault_audit_intact",
                "1 while every re-hashed audit entry matched its stored leaf hash, else 0.",
            )
            intact.add_metric([], 1.0 if s.intact else 0.0)
            first = s.first()
            index = GaugeMetricFamily(
                "fedvault_audit_first_altered_index",
                "Index of the lowest damaged audit entry found (-1: none).",
            )
            index.add_metric([], float(first.index) if first is not None else -1.0)
            checked = CounterMetricFamily(
                "fedvault_audit_scrubbed_entries",
                "Audit entries re-hashed against their stored leaf hashes.",
            )
            checked.add_metric([], float(s.checked_total))
            passes = CounterMetricFamily(
                "fedvault_audit_scrub_passes",
                "Complete background passes over the audit entries checked before.",
            )
            passes.add_metric([], float(s.passes_total))
            verified = GaugeMetricFamily(
                "fedvault_audit_verified_size",
                "Entries below this index were re-hashed and matched (the verified point).",
            )
            verified.add_metric([], float(s.verified_size))
            yield from (altered, intact, index, checked, passes, verified)

    return IntegrityCollector()
