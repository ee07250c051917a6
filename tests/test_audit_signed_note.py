"""Signed notes: the Go sumdb/note vector, round trips, tampering, key files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from fedvault.errors import ConfigError, IntegrityError, KeyFileError
from secure.signed_note import (
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    generate_note_key,
    load_note_signer,
    open_note,
    parse_checkpoint,
    save_note_signer,
)

# From golang.org/x/mod/sumdb/note's documentation and tests.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def test_go_vector_sign_and_open() -> None:
    signer = NoteSigner.parse(GO_SKEY)
    assert signer.verifier.line == GO_VKEY
    assert signer.sign(GO_TEXT) == GO_NOTE  # Ed25519 is deterministic
    assert open_note(GO_NOTE, NoteVerifier.parse(GO_VKEY)) == GO_TEXT
    assert signer.private_text() == GO_SKEY


def test_key_id_formula() -> None:
    v = NoteVerifier.parse(GO_VKEY)
    digest = hashlib.sha256(b"PeterNeumann\n\x01" + v.public_key).digest()
    assert v.key_id == int.from_bytes(digest[:4], "big") == 0xC74F20A3


def test_tampered_note_fails() -> None:
    v = NoteVerifier.parse(GO_VKEY)
    with pytest.raises(IntegrityError, match="does not verify"):
        open_note(GO_NOTE.replace("cryptography", "cryptographY"), v)
    other = generate_note_key("PeterNeumann")
    with pytest.raises(IntegrityError, match="not signed by"):
        open_note(GO_NOTE, other.verifier)
    with pytest.raises(IntegrityError):
        open_note(GO_TEXT, v)


def test_foreign_signatures_are_ignored() -> None:
    ours, witness = generate_note_key("log.example/a"), generate_note_key("witness")
    note = ours.sign("hello\n")
    cosigned = note + witness.sign("hello\n").split("\n\n", 1)[1]
    assert open_note(cosigned, ours.verifier) == "hello\n"
    assert open_note(cosigned, witness.verifier) == "hello\n"


def test_malformed_keys_are_config_errors() -> None:
    for bad in ("", "a+b", "name+zzzzzzzz+AAAA", GO_VKEY.replace("c74f20a3", "c74f20a4")):
        with pytest.raises(ConfigError):
            NoteVerifier.parse(bad)
    with pytest.raises(ConfigError):
        generate_note_key("has space")
    with pytest.raises(ConfigError):
        NoteSigner.parse("PRIVATE+KEY+x+00000000+AAAA")


def test_key_file_is_0600_and_round_trips(tmp_path: Path) -> None:
    signer = generate_note_key("fedvault.test/audit")
    path = tmp_path / "audit.key"
    save_note_signer(path, signer)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_note_signer(path)
    assert loaded.verifier == signer.verifier
    assert "PRIVATE" not in repr(loaded)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_note_signer(path)
    (tmp_path / "junk.key").write_text("nonsense\n")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(KeyFileError):
        load_note_signer(tmp_path / "junk.key")


def test_checkpoint_round_trip() -> None:
    cp = Checkpoint("fedvault.test/audit", 42, bytes(range(32)))
    signer = generate_note_key("fedvault.test/audit")
    text = open_note(signer.sign(cp.text()), signer.verifier)
    assert parse_checkpoint(text) == cp
    assert text.split("\n")[1] == "42"
    for bad in ("o\n01\nAAAA\n", "o\nx\nAAAA\n", "o\n1\n", "o\n1\nAAAA\n"):
        with pytest.raises(IntegrityError):
            parse_checkpoint(bad)
