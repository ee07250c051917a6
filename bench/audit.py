"""Audit log benchmark: durable appends/s and proof latency, with baselines in one run.

1. Appends. ``W`` writer threads (1, 8, 64) each append records through
   ``AuditLog.append`` (canonical encoding, leaf and node hashing, group
   commit into SQLite WAL with ``synchronous=FULL``; every call returns only
   after its transaction committed). Baseline: the same writers, the same
   encoding and the same group-commit writer, storing each entry as one plain
   row without any Merkle work. ``merkle_cost`` is plain appends/s over
   Merkle appends/s (1.0 = free). Also reported: the naive path, one
   transaction per append without group commit (``storage.append([e])`` from
   each writer), to show what group commit buys.
2. Proofs. One store grown to 10k, 100k and 1M entries (bulk appends of small
   synthetic entries); at each size, inclusion proofs for random indices at
   ``tree_size = size`` and consistency proofs from random earlier sizes,
   through ``AuditLog`` (node cache warm after the first pass: cold and warm
   passes are reported separately).

Prints one JSON object on stdout; progress on stderr. ``--quick`` runs small
sizes for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedvault.sqlite import connect, transaction
from secure.signed_note import generate_note_key
from server.audit.log import AuditLog, GroupCommitter
from server.audit.records import AuditRecord, encode_record
from server.audit.storage import SQLiteStorage

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def _records(n: int) -> list[AuditRecord]:
    digest = "ab" * 32
    return [
        AuditRecord(
            time=T0 + timedelta(milliseconds=i),
            actor=f"svc-{i % 17}",
            role="analyst",
            action="infer",
            resource=f"models/m{i % 5}",
            outcome="ok",
            request_id=f"req-{i:08d}",
            request_digest=digest,
            response_digest=digest,
        )
        for i in range(n)
    ]


def _run_writers(writers: int, per_writer: int, append: Callable[[int], object]) -> float:
    """Appends/s of ``writers`` threads each calling ``append(i)`` ``per_writer`` times."""
    barrier = threading.Barrier(writers + 1)

    def work(w: int) -> None:
        barrier.wait()
        base = w * per_writer
        for j in range(per_writer):
            append(base + j)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return writers * per_writer / (time.perf_counter() - start)


class PlainStore:
    """The same SQLite settings and group commit, rows only: the baseline."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path, check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS plain (idx INTEGER PRIMARY KEY, entry BLOB)")
        self.size = 0

    def append(self, entries: Sequence[bytes]) -> int:
        with transaction(self.conn):
            start = self.size
            self.conn.executemany(
                "INSERT INTO plain VALUES (?, ?)",
                [(start + k, e) for k, e in enumerate(entries)],
            )
        self.size += len(entries)
        return start


def _one_round(
    writers: int, per: int, records: list[AuditRecord], workdir: Path, tag: str
) -> dict[str, float]:
    """One measurement of each path at ``writers`` threads, each on a fresh file."""
    signer = generate_note_key("bench.example/audit")
    log = AuditLog(SQLiteStorage(workdir / f"m{writers}-{tag}.db"), signer)
    merkle = _run_writers(writers, per, lambda i: log.append(records[i]))
    batches, items = log.group_commit_stats
    log.close()

    plain_store = PlainStore(workdir / f"p{writers}-{tag}.db")
    committer = GroupCommitter(plain_store.append)
    plain = _run_writers(
        writers, per, lambda i: committer.submit(encode_record(records[i])).result()
    )
    committer.close()
    plain_store.conn.close()

    naive_store = SQLiteStorage(workdir / f"n{writers}-{tag}.db")
    naive_n = max(1, min(per, 1000 // writers))
    naive = _run_writers(
        writers, naive_n, lambda i: naive_store.append([encode_record(records[i])])
    )
    naive_store.close()
    return {"merkle": merkle, "plain": plain, "naive": naive, "batch": items / max(1, batches)}


def bench_appends(total: int, reps: int, workdir: Path) -> dict[str, object]:
    """Interleaved repetitions (every path in every round), medians reported.

    fsync latency on a shared disk drifts; interleaving exposes every path to
    the same drift, and the per-round ratios are reported beside the medians.
    """
    records = _records(total)
    plan = {1: min(total, 2000), 8: min(total, 6400), 64: total}
    rounds: dict[int, list[dict[str, float]]] = {w: [] for w in plan}
    for rep in range(reps):
        for writers, count in plan.items():
            got = _one_round(writers, count // writers, records, workdir, str(rep))
            rounds[writers].append(got)
            print(f"rep {rep} writers={writers}: {got}", file=sys.stderr)
    out: dict[str, object] = {}
    for writers, runs in rounds.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out[str(writers)] = {
            "merkle_appends_per_s": round(med["merkle"]),
            "plain_rows_appends_per_s": round(med["plain"]),
            "merkle_cost": round(med["plain"] / med["merkle"], 2),
            "merkle_cost_per_round": [round(r["plain"] / r["merkle"], 2) for r in runs],
            "no_group_commit_appends_per_s": round(med["naive"]),
            "group_commit_speedup": round(med["merkle"] / med["naive"], 2),
            "mean_batch": round(med["batch"], 1),
        }
    return out


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    us = [s * 1e6 for s in samples]
    return {
        "mean_us": round(statistics.fmean(us), 1),
        "p50_us": round(us[len(us) // 2], 1),
        "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
    }


def bench_proofs(sizes: list[int], queries: int, workdir: Path) -> dict[str, object]:
    storage = SQLiteStorage(workdir / "proofs.db")
    signer = generate_note_key("bench.example/audit")
    rng = random.Random(7)
    out: dict[str, object] = {}
    have = 0
    for size in sizes:
        start = time.perf_counter()
        while have < size:
            n = min(20_000, size - have)
            storage.append([b'{"n":%d}' % (have + k) for k in range(n)])
            have += n
        print(f"grew to {size} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        log = AuditLog(storage, signer)  # fresh node cache per size
        indices = [rng.randrange(size) for _ in range(queries)]
        firsts = [rng.randrange(1, size) for _ in range(queries)]
        result: dict[str, object] = {}
        for name, call, args in (
            ("inclusion", log.inclusion_proof, [(i, size) for i in indices]),
            ("consistency", log.consistency_proof, [(f, size) for f in firsts]),
        ):
            for phase in ("cold", "warm"):
                times = []
                for a in args:
                    t = time.perf_counter()
                    call(*a)
                    times.append(time.perf_counter() - t)
                result[f"{name}_{phase}"] = _percentiles(times)
        result["proof_hashes"] = len(log.inclusion_proof(size // 3, size))
        out[str(size)] = result
        print(f"size={size}: {result}", file=sys.stderr)
    storage.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--appends", type=int, default=12_800, help="appends per writer config")
    parser.add_argument("--queries", type=int, default=2000, help="proofs per size and phase")
    parser.add_argument("--reps", type=int, default=3, help="interleaved append rounds")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = parser.parse_args()
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000, 1_000_000]
    appends = 1_280 if args.quick else args.appends
    with tempfile.TemporaryDirectory(prefix="fedvault-audit-bench-") as tmp:
        result = {
            "store": "SQLite WAL, synchronous=FULL",
            "appends": bench_appends(appends, 1 if args.quick else args.reps, Path(tmp)),
            "proofs": bench_proofs(sizes, 200 if args.quick else args.queries, Path(tmp)),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
