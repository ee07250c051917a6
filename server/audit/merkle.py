"""RFC 6962 / RFC 9162 Merkle tree math: hashes, tree shape, proofs. Pure.

Why a module of its own: everything an auditor must be able to re-derive
without trusting the operator lives here, free of I/O, clocks and storage, so
the verifier and the server share one implementation and the property tests
run it for thousands of tree shapes in a second.

Storage model the functions assume: every *perfect* subtree (``2**level``
leaves starting at a multiple of ``2**level``) has a stable hash once it is
complete, addressed by :data:`NodeKey` ``(level, index)`` — level 0 holds the
leaf hashes. The RFC's tree for any size decomposes into O(log n) such nodes,
so a root or a proof at any size costs O(log n) node reads, never a rehash of
the log (issue 6, requirement 7).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "NodeKey",
    "ProofError",
    "consistency_proof",
    "consistency_ranges",
    "inclusion_proof",
    "inclusion_ranges",
    "keys_for_ranges",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "range_keys",
    "reference_root",
    "root_from_nodes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) = SHA-256() per RFC 9162 §2.1.1."""

NodeKey = tuple[int, int]
"""``(level, index)`` of a perfect subtree covering leaves
``[index * 2**level, (index + 1) * 2**level)``."""

NodeFetcher = Callable[[Sequence[NodeKey]], Mapping[NodeKey, bytes]]


class ProofError(ValueError):
    """A proof does not verify, or its parameters are impossible.

    A plain ``ValueError`` subclass because this module is pure and shared by
    the verifier: edges translate it into :class:`fedvault.errors.IntegrityError`
    or a 400 as the context demands.
    """


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 ‖ entry): the prefix keeps leaves and nodes apart (RFC 6962 §2.1)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n ≥ 2): the RFC's k."""
    return 1 << ((n - 1).bit_length() - 1)


def reference_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH straight from the RFC's recursive definition; O(n), for tests and tiny logs."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(reference_root(leaf_hashes[:k]), reference_root(leaf_hashes[k:]))


def range_keys(lo: int, hi: int) -> list[NodeKey]:
    """Perfect subtrees, left to right, whose right fold is MTH(D[lo:hi]).

    Valid for every range the RFC recursion produces (their perfect parts are
    always aligned); other ranges raise, since their hash is not defined by the
    tree shape.
    """
    if not 0 <= lo < hi:
        raise ProofError(f"empty or negative range [{lo}, {hi})")
    keys: list[NodeKey] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        if lo & ((1 << level) - 1):
            raise ProofError(f"range [{lo}, {hi}) is not a subtree of the RFC tree shape")
        keys.append((level, lo >> level))
        lo += 1 << level
    return keys


def range_hash(lo: int, hi: int, nodes: Mapping[NodeKey, bytes]) -> bytes:
    """MTH(D[lo:hi]) from stored perfect-subtree hashes."""
    keys = range_keys(lo, hi)
    result = nodes[keys[-1]]
    for key in reversed(keys[:-1]):
        result = node_hash(nodes[key], result)
    return result


def root_from_nodes(size: int, nodes: Mapping[NodeKey, bytes]) -> bytes:
    """MTH of the first ``size`` leaves from stored nodes (O(log n) of them)."""
    return EMPTY_ROOT if size == 0 else range_hash(0, size, nodes)


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose hashes form PATH(index, D[size]), leaf-side first (RFC 9162 §2.1.3.1)."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m = lo + k, m - k
    out.reverse()
    return out


def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Leaf ranges whose hashes form PROOF(first, D[second]) (RFC 9162 §2.1.4.1)."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    out: list[tuple[int, int]] = []
    lo, hi, m, complete = 0, second, first, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                out.append((lo, hi))
            break
        k = _split(n)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    out.reverse()
    return out


def keys_for_ranges(ranges: Iterable[tuple[int, int]]) -> list[NodeKey]:
    """Every stored node needed to hash ``ranges``, deduplicated, for one batched read."""
    seen: dict[NodeKey, None] = {}
    for lo, hi in ranges:
        for key in range_keys(lo, hi):
            seen[key] = None
    return list(seen)


def inclusion_proof(index: int, size: int, fetch: NodeFetcher) -> list[bytes]:
    """PATH(index, D[size]) from stored nodes, with one call to ``fetch``."""
    ranges = inclusion_ranges(index, size)
    nodes = fetch(keys_for_ranges(ranges))
    return [range_hash(lo, hi, nodes) for lo, hi in ranges]


def consistency_proof(first: int, second: int, fetch: NodeFetcher) -> list[bytes]:
    """PROOF(first, D[second]) from stored nodes, with one call to ``fetch``."""
    ranges = consistency_ranges(first, second)
    nodes = fetch(keys_for_ranges(ranges))
    return [range_hash(lo, hi, nodes) for lo, hi in ranges]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2; raises :class:`ProofError` unless ``leaf`` is at ``index``."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if len(p) != HASH_SIZE:
            raise ProofError("proof hash has the wrong length")
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2; raises :class:`ProofError` unless tree ``first`` prefixes ``second``."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    if any(len(p) != HASH_SIZE for p in proof):
        raise ProofError("proof hash has the wrong length")
    if first == second:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError("equal sizes with different roots")
        return
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        raise ProofError("consistency proof is empty")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != first_root:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != second_root:
        raise ProofError("consistency proof does not lead to the second root")


class Frontier:
    """The right edge of a growing tree: one perfect-subtree hash per set bit of its size.

    Appending is O(1) amortised and reports every perfect node it completes, so
    a store can persist them in the same transaction as the entry; the root of
    the current size is an O(log n) fold. This is the "compact range" of
    transparency-log implementations.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ProofError(f"a frontier of size {size} needs {bin(size).count('1')} hashes")
        self._size = size
        self._hashes = list(hashes)

    @classmethod
    def keys_for(cls, size: int) -> list[NodeKey]:
        """The stored nodes a frontier of ``size`` is rebuilt from."""
        return range_keys(0, size) if size else []

    @classmethod
    def from_nodes(cls, size: int, nodes: Mapping[NodeKey, bytes]) -> Frontier:
        return cls(size, [nodes[key] for key in cls.keys_for(size)])

    @property
    def size(self) -> int:
        return self._size

    def copy(self) -> Frontier:
        return Frontier(self._size, self._hashes)

    def append(self, leaf: bytes) -> list[tuple[NodeKey, bytes]]:
        """Add one leaf hash; return the completed perfect nodes above level 0."""
        index = self._size
        completed: list[tuple[NodeKey, bytes]] = []
        current, level = leaf, 0
        while (index >> level) & 1:
            current = node_hash(self._hashes.pop(), current)
            level += 1
            completed.append(((level, index >> level), current))
        self._hashes.append(current)
        self._size += 1
        return completed

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        result = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            result = node_hash(h, result)
        return result
