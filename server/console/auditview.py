"""Reading the audit log for people: filters, newest-first pages, exports, proofs, verification.

Everything here works on :class:`~server.audit.log.AuditLog` in process —
the same object the gateway appends to and ``/v2/audit`` serves — so the
console needs no second connection and no HTTP loop-back.

Cost, stated: the log is indexed by position only, so a filtered page scans
entries newest first, one :data:`~server.audit.log.MAX_PAGE` batch at a
time, and stops once it has the page (plus one row, to know whether a next
page exists) or after :data:`SCAN_LIMIT` entries, which the page then says.
Verification re-hashes the whole log (what an auditor's client does).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from fedvault.errors import IntegrityError
from secure.signed_note import open_note, parse_checkpoint
from server.audit import merkle
from server.audit.log import MAX_PAGE, AuditLog
from server.audit.records import AuditRecord, InvalidEntry, decode_entry
from server.audit.verifier import VerifierState, verify_log
from server.console.sessions import VerifyOutcome

__all__ = [
    "CSV_COLUMNS",
    "EXPORT_LIMIT",
    "OUTCOMES",
    "PAGE_SIZE",
    "SCAN_LIMIT",
    "AuditFilter",
    "AuditRow",
    "InclusionCheck",
    "LogView",
    "check_inclusion",
    "export_csv",
    "export_jsonl",
    "scan",
    "verify",
]

PAGE_SIZE: Final = 50
SCAN_LIMIT: Final = 200_000
EXPORT_LIMIT: Final = 100_000
OUTCOMES: Final = ("ok", "denied", "error", "client-disconnected")
ROLES: Final = ("admin", "analyst", "partner", "auditor", "none")
CSV_COLUMNS: Final = (
    "index",
    "time",
    "actor",
    "role",
    "action",
    "resource",
    "outcome",
    "status",
    "protocol",
    "peer",
    "request_id",
    "error_type",
    "latency_ms",
    "run_id",
    "round",
    "partner",
    "epsilon_charged",
    "leaf_hash",
)
_TEXT_LIMIT: Final = 200


def _parse_time(text: str) -> datetime | None:
    """``datetime-local`` input (``2026-11-23T12:00``) or ISO 8601; naive means UTC."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What the reviewer asked for; text fields match case-insensitively as substrings."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str = ""
    role: str = ""
    action: str = ""
    resource: str = ""
    outcome: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> tuple[AuditFilter, list[str]]:
        """The filter and the problems found in the query (shown, not raised)."""
        problems: list[str] = []
        times: dict[str, datetime | None] = {"since": None, "until": None}
        for name in times:
            raw = query.get(name, "").strip()
            if raw:
                try:
                    times[name] = _parse_time(raw)
                except ValueError:
                    problems.append(f"'{name}' is not a date and time; ignored")
        text = {k: query.get(k, "").strip()[:_TEXT_LIMIT] for k in ("actor", "action", "resource")}
        role = query.get("role", "").strip()
        outcome = query.get("outcome", "").strip()
        if role and role not in ROLES:
            problems.append("unknown role; ignored")
            role = ""
        if outcome and outcome not in OUTCOMES:
            problems.append("unknown outcome; ignored")
            outcome = ""
        flt = cls(
            times["since"],
            times["until"],
            actor=text["actor"],
            role=role,
            action=text["action"],
            resource=text["resource"],
            outcome=outcome,
        )
        return flt, problems

    @property
    def active(self) -> bool:
        fields = (self.actor, self.role, self.action, self.resource, self.outcome)
        return self.since is not None or self.until is not None or any(fields)

    def matches(self, record: AuditRecord) -> bool:
        if self.since is not None and record.time < self.since:
            return False
        if self.until is not None and record.time > self.until:
            return False
        if self.role and record.role != self.role:
            return False
        if self.outcome and record.outcome != self.outcome:
            return False
        for wanted, have in (
            (self.actor, record.actor),
            (self.action, record.action),
            (self.resource, record.resource),
        ):
            if wanted and wanted.lower() not in have.lower():
                return False
        return True

    def query(self) -> dict[str, str]:
        """Back to query parameters (pagination and export links keep the filter)."""
        out = {
            "since": self.since.strftime("%Y-%m-%dT%H:%M") if self.since else "",
            "until": self.until.strftime("%Y-%m-%dT%H:%M") if self.until else "",
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "resource": self.resource,
            "outcome": self.outcome,
        }
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True, slots=True)
class AuditRow:
    index: int
    entry: bytes
    record: AuditRecord | None  # None: the stored bytes are not a canonical record
    problem: str | None = None

    @property
    def leaf_hash(self) -> str:
        return merkle.leaf_hash(self.entry).hex()

    def flat(self) -> dict[str, Any]:
        """One export row: the record's canonical fields plus index and leaf hash."""
        fields: dict[str, Any] = self.record.to_json_dict() if self.record else {}
        if self.record is None:
            fields["undecodable"] = self.problem or "not an audit record"
        return {"index": self.index, **fields, "leaf_hash": self.leaf_hash}


def _rows_newest_first(log: AuditLog, size: int, limit: int) -> Iterator[AuditRow]:
    end = size
    scanned = 0
    while end > 0 and scanned < limit:
        start = max(0, end - MAX_PAGE)
        for index, entry in reversed(log.entries(start, end)):
            try:
                record: AuditRecord | None = decode_entry(entry)
                problem = None
            except InvalidEntry as exc:
                record, problem = None, str(exc)
            yield AuditRow(index, entry, record, problem)
        scanned += end - start
        end = start


@dataclass(frozen=True, slots=True)
class LogView:
    rows: list[AuditRow]
    size: int
    has_next: bool
    scanned_all: bool


def scan(log: AuditLog, flt: AuditFilter, *, page: int = 0, page_size: int = PAGE_SIZE) -> LogView:
    """Page ``page`` (0 = newest) of the entries that ``flt`` matches."""
    size = log.size()
    skip = page * page_size
    rows: list[AuditRow] = []
    seen = 0
    has_next = False
    scanned = 0
    for row in _rows_newest_first(log, size, SCAN_LIMIT):
        scanned += 1
        # An undecodable entry matches only the unfiltered view: it has no fields to filter.
        if not (flt.matches(row.record) if row.record is not None else not flt.active):
            continue
        seen += 1
        if seen <= skip:
            continue
        if len(rows) == page_size:
            has_next = True
            break
        rows.append(row)
    return LogView(rows, size, has_next, scanned_all=scanned >= size or has_next)


def _matching(log: AuditLog, flt: AuditFilter) -> Iterator[AuditRow]:
    count = 0
    for row in _rows_newest_first(log, log.size(), SCAN_LIMIT):
        if row.record is not None and not flt.matches(row.record):
            continue
        if row.record is None and flt.active:
            continue
        yield row
        count += 1
        if count >= EXPORT_LIMIT:
            return


def export_jsonl(log: AuditLog, flt: AuditFilter) -> str:
    """The filtered view, newest first, one JSON object per line."""
    return "".join(
        json.dumps(row.flat(), ensure_ascii=False, sort_keys=True) + "\n"
        for row in _matching(log, flt)
    )


_FORMULA = re.compile(r"^[=+\-@\t\r]")


def _cell(value: Any) -> str:
    """A CSV cell that a spreadsheet will not run: text starting like a formula gets a quote."""
    text = "" if value is None else str(value)
    return "'" + text if _FORMULA.match(text) else text


def export_csv(log: AuditLog, flt: AuditFilter) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in _matching(log, flt):
        flat = row.flat()
        writer.writerow([_cell(flat.get(c)) for c in CSV_COLUMNS])
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class InclusionCheck:
    """An entry's inclusion proof against the latest signed checkpoint, checked here."""

    tree_size: int
    root_hex: str
    proof_hex: list[str]
    verified: bool
    message: str


def check_inclusion(log: AuditLog, index: int, entry: bytes) -> InclusionCheck:
    note = log.checkpoint()
    try:
        cp = parse_checkpoint(open_note(note, log.signer.verifier))
    except IntegrityError as exc:
        return InclusionCheck(0, "", [], False, f"checkpoint signature does not verify: {exc}")
    if index >= cp.size:
        return InclusionCheck(
            cp.size,
            cp.root.hex(),
            [],
            False,
            f"not yet covered: the latest signed checkpoint has {cp.size} entries "
            "(a new one is signed at most once a second; reload)",
        )
    proof = log.inclusion_proof(index, cp.size)
    try:
        merkle.verify_inclusion(index, cp.size, merkle.leaf_hash(entry), proof, cp.root)
        ok, message = True, f"included in the signed tree of size {cp.size}"
    except merkle.ProofError as exc:
        ok, message = False, f"FAILED: this entry is not in the signed tree ({exc})"
    return InclusionCheck(cp.size, cp.root.hex(), [h.hex() for h in proof], ok, message)


class _InProcessSource:
    """:class:`~server.audit.verifier.LogSource` over the live log object."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def checkpoint(self) -> str:
        return self._log.checkpoint()

    def entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        return self._log.entries(start, end)

    def consistency_proof(self, first: int, second: int) -> list[bytes] | None:
        return self._log.consistency_proof(first, second)


_AT_INDEX = re.compile(r"at index (\d+)")


def verify(
    log: AuditLog, state: VerifierState | None, now: float
) -> tuple[VerifyOutcome, VerifierState | None]:
    """Verify the latest checkpoint and every entry, and consistency with ``state``.

    The checkpoint is checked against this gateway's own verifier key: the
    console shows what the server holds. Independent assurance (a key
    obtained out of band, on another machine) is ``fedvault audit verify``.
    Returns the outcome and the state to keep (unchanged on failure, so the
    next attempt is still compared with the last good checkpoint).
    """
    try:
        result = verify_log(_InProcessSource(log), log.signer.verifier, state)
    except IntegrityError as exc:
        text = str(exc)
        found = _AT_INDEX.search(text)
        outcome = VerifyOutcome(
            False,
            text,
            int(found.group(1)) if found else None,
            None,
            state.checkpoint.size if state else None,
            now,
        )
        return outcome, state
    previous = result.previous_size
    outcome = VerifyOutcome(True, "verified", None, result.checkpoint.size, previous, now)
    return outcome, VerifierState(result.note, result.checkpoint, result.leaves)
