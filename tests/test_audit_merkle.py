"""RFC 6962 / 9162 Merkle math: published vectors, then properties for every small shape."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audit import merkle as m

h = bytes.fromhex
# Leaves and roots of the RFC 6962 reference tests (certificate-transparency,
# transparency-dev/merkle testdata): root i is MTH of the first i+1 leaves.
LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION_5_OF_8 = [
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
]
CONSISTENCY_6_TO_8 = [
    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
]
CONSISTENCY_2_TO_5 = [
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
]


def _tree(n: int) -> tuple[list[bytes], dict[m.NodeKey, bytes]]:
    """Leaf hashes and every perfect node of an n-leaf tree, built incrementally."""
    frontier = m.Frontier()
    nodes: dict[m.NodeKey, bytes] = {}
    leaves = []
    for i in range(n):
        leaf = m.leaf_hash(i.to_bytes(4, "big"))
        leaves.append(leaf)
        nodes[(0, i)] = leaf
        nodes.update(frontier.append(leaf))
    return leaves, nodes


def _fetch(nodes: dict[m.NodeKey, bytes]) -> m.NodeFetcher:
    return lambda keys: {k: nodes[k] for k in keys}


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert m.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert m.Frontier().root() == m.EMPTY_ROOT
    assert m.reference_root([]) == m.EMPTY_ROOT


def test_rfc_roots_for_sizes_1_to_8() -> None:
    frontier = m.Frontier()
    leaves = [m.leaf_hash(h(x)) for x in LEAVES]
    for i, leaf in enumerate(leaves):
        frontier.append(leaf)
        assert frontier.root().hex() == ROOTS[i]
        assert m.reference_root(leaves[: i + 1]).hex() == ROOTS[i]


def test_rfc_inclusion_vectors() -> None:
    proof = [h(x) for x in INCLUSION_5_OF_8]
    m.verify_inclusion(5, 8, m.leaf_hash(h(LEAVES[5])), proof, h(ROOTS[7]))
    with pytest.raises(m.ProofError):
        m.verify_inclusion(4, 8, m.leaf_hash(h(LEAVES[5])), proof, h(ROOTS[7]))
    m.verify_inclusion(2, 3, m.leaf_hash(h(LEAVES[2])), [h(ROOTS[1])], h(ROOTS[2]))
    # Our prover emits the same hashes as the vector.
    leaves = [m.leaf_hash(h(x)) for x in LEAVES]
    frontier, nodes = m.Frontier(), {}
    for i, leaf in enumerate(leaves):
        nodes[(0, i)] = leaf
        nodes.update(frontier.append(leaf))
    assert [p.hex() for p in m.inclusion_proof(5, 8, _fetch(nodes))] == INCLUSION_5_OF_8


def test_rfc_consistency_vectors() -> None:
    proof = [h(x) for x in CONSISTENCY_6_TO_8]
    m.verify_consistency(6, 8, h(ROOTS[5]), h(ROOTS[7]), proof)
    with pytest.raises(m.ProofError):
        m.verify_consistency(6, 8, h(ROOTS[4]), h(ROOTS[7]), proof)
    m.verify_consistency(2, 5, h(ROOTS[1]), h(ROOTS[4]), [h(x) for x in CONSISTENCY_2_TO_5])
    leaves = [m.leaf_hash(h(x)) for x in LEAVES]
    frontier, nodes = m.Frontier(), {}
    for i, leaf in enumerate(leaves):
        nodes[(0, i)] = leaf
        nodes.update(frontier.append(leaf))
    assert [p.hex() for p in m.consistency_proof(6, 8, _fetch(nodes))] == CONSISTENCY_6_TO_8
    assert [p.hex() for p in m.consistency_proof(2, 5, _fetch(nodes))] == CONSISTENCY_2_TO_5


SIZES = 70


def test_every_inclusion_proof_verifies_up_to_70() -> None:
    leaves, nodes = _tree(SIZES)
    for n in range(1, SIZES + 1):
        root = m.reference_root(leaves[:n])
        assert m.root_from_nodes(n, nodes) == root
        for i in range(n):
            proof = m.inclusion_proof(i, n, _fetch(nodes))
            m.verify_inclusion(i, n, leaves[i], proof, root)


def test_every_consistency_proof_verifies_up_to_70() -> None:
    leaves, nodes = _tree(SIZES)
    roots = [m.reference_root(leaves[:n]) for n in range(SIZES + 1)]
    for n in range(1, SIZES + 1):
        for first in range(1, n + 1):
            proof = m.consistency_proof(first, n, _fetch(nodes))
            m.verify_consistency(first, n, roots[first], roots[n], proof)


def test_frontier_rebuilds_from_stored_nodes() -> None:
    leaves, nodes = _tree(SIZES)
    for n in range(SIZES + 1):
        rebuilt = m.Frontier.from_nodes(n, nodes)
        assert rebuilt.root() == m.reference_root(leaves[:n])
        rebuilt.append(m.leaf_hash(b"next"))
        assert rebuilt.root() == m.reference_root([*leaves[:n], m.leaf_hash(b"next")])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, SIZES))
def test_tampered_inclusion_proof_fails(data: st.DataObject, n: int) -> None:
    leaves, nodes = _tree(n)
    root = m.reference_root(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = m.inclusion_proof(i, n, _fetch(nodes))
    tamper = data.draw(st.sampled_from(["leaf", "proof", "index", "drop", "extra"]))
    leaf = leaves[i]
    # (A different size with the same root is not tested: size and root come
    # together from one signed checkpoint, so the pair is what is authenticated.)
    index, size = i, n
    if tamper == "leaf":
        leaf = m.leaf_hash(b"forged")
    elif tamper == "proof":
        if not proof:
            return
        j = data.draw(st.integers(0, len(proof) - 1))
        proof[j] = bytes([proof[j][0] ^ 1]) + proof[j][1:]
    elif tamper == "index":
        if n == 1:
            return
        index = data.draw(st.integers(0, n - 1).filter(lambda x: x != i))
    elif tamper == "drop":
        if not proof:
            return
        proof.pop()
    else:
        proof.append(leaves[0])
    with pytest.raises(m.ProofError):
        m.verify_inclusion(index, size, leaf, proof, root)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(2, SIZES))
def test_tampered_consistency_proof_fails(data: st.DataObject, n: int) -> None:
    leaves, nodes = _tree(n)
    first = data.draw(st.integers(1, n - 1))
    proof = m.consistency_proof(first, n, _fetch(nodes))
    first_root, second_root = m.reference_root(leaves[:first]), m.reference_root(leaves)
    tamper = data.draw(st.sampled_from(["first_root", "second_root", "proof", "drop", "extra"]))
    if tamper == "first_root":
        first_root = m.reference_root([*leaves[: first - 1], m.leaf_hash(b"forged")])
    elif tamper == "second_root":
        second_root = m.reference_root([*leaves[:-1], m.leaf_hash(b"forged")])
    elif tamper == "proof":
        j = data.draw(st.integers(0, len(proof) - 1))
        proof[j] = bytes([proof[j][0] ^ 1]) + proof[j][1:]
    elif tamper == "drop":
        proof.pop()
    else:
        proof.append(leaves[0])
    with pytest.raises(m.ProofError):
        m.verify_consistency(first, n, first_root, second_root, proof)


def test_impossible_parameters_are_refused() -> None:
    with pytest.raises(m.ProofError):
        m.inclusion_ranges(3, 3)
    with pytest.raises(m.ProofError):
        m.consistency_ranges(0, 3)
    with pytest.raises(m.ProofError):
        m.consistency_ranges(4, 3)
    with pytest.raises(m.ProofError):
        m.range_keys(1, 3)  # not a subtree of the RFC shape
    with pytest.raises(m.ProofError):
        m.verify_consistency(3, 3, b"a" * 32, b"a" * 32, [b"b" * 32])


def test_proofs_at_a_million_leaves_touch_log_n_nodes() -> None:
    size = 1_000_003
    for index in (0, 1, 524_287, 999_999, size - 1):
        keys = m.keys_for_ranges(m.inclusion_ranges(index, size))
        assert len(keys) <= 2 * size.bit_length()
    keys = m.keys_for_ranges(m.consistency_ranges(777_777, size))
    assert len(keys) <= 2 * size.bit_length()
