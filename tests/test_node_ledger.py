"""clients.ledger.NodeLedger: the partner's append-only privacy ledger on disk."""

from __future__ import annotations

import functools
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.ledger import NodeLedger, request_digest
from fedvault.errors import ConflictError
from fedvault.privacy import (
    MECHANISM_GAUSSIAN_SUMS,
    GaussianEvent,
    epsilon,
    non_private_charge,
)
from tests.ledger_support import charge

DELTA = 1e-5
_charge = functools.partial(charge, epsilon_after=1.0)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "node" / "ledger.sqlite"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[NodeLedger]:
    node = NodeLedger(ledger_path)
    yield node
    node.close()


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_record_and_charges_round_trip(ledger: NodeLedger) -> None:
    stats = _charge("run-a", 0, mechanism=MECHANISM_GAUSSIAN_SUMS, sigma=20.0, q=1.0, steps=1)
    first = _charge("run-a", 1, epsilon_after=0.7)
    digest = request_digest(b"params", b"round 1")
    ledger.record("ds", [stats, first], run_id="run-a", round_=1, digest=digest, reply=b"\x00r1")
    baseline = non_private_charge("run-b", 1, 0.1, 5, DELTA)
    ledger.record("ds", [baseline], run_id="run-b", round_=1, digest="d", reply=b"r")
    ledger.record("other", [_charge("run-a", 1)], run_id="run-a", round_=1, digest="d", reply=b"")

    assert ledger.charges("ds") == [stats, first, baseline]
    assert ledger.charges("ds", "run-a") == [stats, first]
    assert ledger.charges("ds", "run-b")[0].epsilon_after == math.inf
    assert ledger.charges("ds", "no-such-run") == []
    assert ledger.charges("unknown") == []
    assert ledger.datasets() == ["ds", "other"]


def test_request_digest_separates_parts() -> None:
    assert request_digest(b"ab", b"c") != request_digest(b"a", b"bc")
    assert request_digest(b"ab", b"c") == request_digest(b"ab", b"c")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE charges SET epsilon_after = 0",
        "DELETE FROM charges",
        "UPDATE replies SET reply = x'00'",
        "DELETE FROM replies",
    ],
)
def test_tables_are_append_only(ledger: NodeLedger, ledger_path: Path, statement: str) -> None:
    ledger.record("ds", [_charge("r", 1)], run_id="r", round_=1, digest="d", reply=b"reply")
    conn = _raw(ledger_path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    finally:
        conn.close()
    assert ledger.charges("ds") == [_charge("r", 1)]
    assert ledger.cached_reply("ds", "r", 1, "d") == b"reply"


def test_duplicate_charge_is_rejected_without_partial_rows(ledger: NodeLedger) -> None:
    original = _charge("r", 1)
    ledger.record("ds", [original], run_id="r", round_=1, digest="d1", reply=b"one")
    # Round 2's reply carries a fresh charge *and* a replay of round 1's key:
    # the whole record must be refused, leaving neither the new charge nor the reply.
    with pytest.raises(ConflictError):
        ledger.record(
            "ds",
            [_charge("r", 2), _charge("r", 1, epsilon_after=9.0)],
            run_id="r",
            round_=2,
            digest="d2",
            reply=b"two",
        )
    assert ledger.charges("ds") == [original]
    assert ledger.cached_reply("ds", "r", 2, "d2") is None
    # The ledger is still usable after the rollback.
    ledger.record("ds", [_charge("r", 2)], run_id="r", round_=2, digest="d2", reply=b"two")
    assert ledger.cached_reply("ds", "r", 2, "d2") == b"two"


def test_same_round_other_mechanism_needs_its_own_reply(ledger: NodeLedger) -> None:
    ledger.record("ds", [_charge("r", 1)], run_id="r", round_=1, digest="d", reply=b"one")
    stats = _charge("r", 1, mechanism=MECHANISM_GAUSSIAN_SUMS, sigma=20.0, q=1.0, steps=1)
    with pytest.raises(ConflictError):
        ledger.record("ds", [stats], run_id="r", round_=1, digest="d", reply=b"again")
    assert ledger.charges("ds") == [_charge("r", 1)]
    assert ledger.cached_reply("ds", "r", 1, "d") == b"one"


def test_cached_reply(ledger: NodeLedger) -> None:
    digest = request_digest(b"request")
    assert ledger.cached_reply("ds", "r", 1, digest) is None
    ledger.record("ds", [_charge("r", 1)], run_id="r", round_=1, digest=digest, reply=b"\x01\x02")
    assert ledger.cached_reply("ds", "r", 1, digest) == b"\x01\x02"
    with pytest.raises(ConflictError, match="different request"):
        ledger.cached_reply("ds", "r", 1, request_digest(b"another request"))
    assert ledger.cached_reply("ds", "r", 2, digest) is None
    assert ledger.cached_reply("other-ds", "r", 1, digest) is None


def test_lifetime_epsilon_composes_across_runs(ledger: NodeLedger) -> None:
    charges = [
        _charge("run-a", 0, mechanism=MECHANISM_GAUSSIAN_SUMS, sigma=20.0, q=1.0, steps=1),
        _charge("run-a", 1),
        _charge("run-b", 1, sigma=0.9, q=0.1, steps=30),
    ]
    ledger.record("ds", charges[:2], run_id="run-a", round_=1, digest="a", reply=b"a")
    ledger.record("ds", charges[2:], run_id="run-b", round_=1, digest="b", reply=b"b")
    events: list[GaussianEvent | None] = [c.event for c in charges]
    assert ledger.lifetime_epsilon("ds", DELTA, []) == pytest.approx(
        epsilon(events, DELTA), rel=1e-12
    )
    assert ledger.lifetime_epsilon("ds", DELTA, []) > epsilon(events[:2], DELTA)
    extra = GaussianEvent(1.1, 0.05, 20)
    assert ledger.lifetime_epsilon("ds", DELTA, [extra]) == pytest.approx(
        epsilon([*events, extra], DELTA), rel=1e-12
    )
    assert ledger.lifetime_epsilon("ds", DELTA, [None]) == math.inf
    assert ledger.lifetime_epsilon("unused", DELTA, []) == 0.0


def test_a_non_private_charge_makes_lifetime_epsilon_infinite(ledger: NodeLedger) -> None:
    ledger.record(
        "ds",
        [non_private_charge("r", 1, 0.1, 5, DELTA)],
        run_id="r",
        round_=1,
        digest="d",
        reply=b"",
    )
    assert ledger.lifetime_epsilon("ds", DELTA, []) == math.inf


def test_ledger_persists_across_reopen(ledger_path: Path) -> None:
    charges = [_charge("r", 1), _charge("r", 2, sigma=1.3)]
    first = NodeLedger(ledger_path)
    try:
        first.record("ds", charges[:1], run_id="r", round_=1, digest="d1", reply=b"one")
        first.record("ds", charges[1:], run_id="r", round_=2, digest="d2", reply=b"two")
        before = first.lifetime_epsilon("ds", DELTA, [])
    finally:
        first.close()
    second = NodeLedger(ledger_path)
    try:
        assert second.charges("ds") == charges
        assert second.cached_reply("ds", "r", 2, "d2") == b"two"
        assert second.lifetime_epsilon("ds", DELTA, []) == before
        # Reopening re-runs the schema script; the triggers must still be there.
        conn = _raw(ledger_path)
        try:
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute("DELETE FROM charges")
        finally:
            conn.close()
    finally:
        second.close()
