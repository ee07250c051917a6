"""Sealed artifacts round-trip, and any modification is caught as IntegrityError."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvault.errors import ConfigError, IntegrityError, KeyFileError
from secure.artifacts import (
    MAGIC,
    decode_key,
    encode_key,
    encryption_key_from_env,
    generate_encryption_key,
    generate_signing_key,
    key_id,
    load_encryption_key,
    load_signing_key,
    open_artifact,
    public_key_for,
    seal_artifact,
)
from secure.keyfiles import write_secret_file

PAYLOAD = b"model weights \x00\x01\x02" * 3
METADATA = {"run": "r-42", "round": "7", "note": "d\u00e9j\u00e0 vu \u2713"}


@functools.cache
def _fixture() -> tuple[bytes, bytes, bytes, bytes]:
    """One sealed blob shared by the property tests (hypothesis re-runs a lot)."""
    signing = generate_signing_key()
    enc = generate_encryption_key()
    blob = seal_artifact(PAYLOAD, signing_key=signing, encryption_key=enc, metadata=METADATA)
    return blob, signing, public_key_for(signing), enc


def _open(blob: bytes) -> tuple[bytes, dict[str, str]]:
    _, _, verify, enc = _fixture()
    return open_artifact(blob, verify_key=verify, encryption_key=enc)


def _flip(blob: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(blob)
    changed[position] ^= mask
    return bytes(changed)


def test_key_generation_shapes() -> None:
    signing = generate_signing_key()
    assert len(signing) == 32
    assert len(public_key_for(signing)) == 32
    assert public_key_for(signing) == public_key_for(signing)
    assert len(generate_encryption_key()) == 32
    assert generate_signing_key() != signing
    assert generate_encryption_key() != generate_encryption_key()


def test_round_trip_with_metadata() -> None:
    blob, _, _, _ = _fixture()
    assert _open(blob) == (PAYLOAD, METADATA)


@pytest.mark.parametrize("payload", [b"", b"x", os.urandom(1 << 20)])
@pytest.mark.parametrize("metadata", [{}, {"a": ""}, {"\u00fcml": '"quoted"\n'}])
def test_round_trip_payload_and_metadata_shapes(payload: bytes, metadata: dict[str, str]) -> None:
    signing, enc = generate_signing_key(), generate_encryption_key()
    blob = seal_artifact(payload, signing_key=signing, encryption_key=enc, metadata=metadata)
    assert open_artifact(blob, verify_key=public_key_for(signing), encryption_key=enc) == (
        payload,
        metadata,
    )


def test_envelope_layout() -> None:
    blob, signing, verify, _ = _fixture()
    assert blob.startswith(MAGIC)
    assert MAGIC == b"FVAR1\n"
    header_len = int.from_bytes(blob[6:10], "big")
    header = json.loads(blob[10 : 10 + header_len])
    assert header == {
        "key_id": hashlib.sha256(verify).digest()[:8].hex(),
        "metadata": METADATA,
        "version": 1,
    }
    assert header["key_id"] == key_id(verify)
    # nonce 12 + (signature 64 + payload) + tag 16; payload is not in clear.
    assert len(blob) == 10 + header_len + 12 + 64 + len(PAYLOAD) + 16
    assert PAYLOAD not in blob
    assert signing not in blob


def test_nonce_is_fresh_per_seal() -> None:
    _, signing, _, enc = _fixture()
    a = seal_artifact(PAYLOAD, signing_key=signing, encryption_key=enc, metadata={})
    b = seal_artifact(PAYLOAD, signing_key=signing, encryption_key=enc, metadata={})
    assert a != b


def test_every_single_byte_flip_is_detected() -> None:
    blob, _, _, _ = _fixture()
    for position in range(len(blob)):
        with pytest.raises(IntegrityError):
            _open(_flip(blob, position))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), mask=st.integers(min_value=1, max_value=255))
def test_any_byte_change_anywhere_is_detected(data: st.DataObject, mask: int) -> None:
    blob, _, _, _ = _fixture()
    position = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    with pytest.raises(IntegrityError):
        _open(_flip(blob, position, mask))


def test_every_truncation_is_detected() -> None:
    blob, _, _, _ = _fixture()
    for length in range(len(blob)):
        with pytest.raises(IntegrityError):
            _open(blob[:length])


def test_short_or_foreign_blobs_say_not_an_artifact() -> None:
    blob, _, _, _ = _fixture()
    for bad in (b"", MAGIC, blob[:12], b"PK\x03\x04" + blob[4:], b"\x00" * 200):
        with pytest.raises(IntegrityError, match="not a fedvault artifact or truncated"):
            _open(bad)


def test_huge_header_length_is_refused() -> None:
    blob, _, _, _ = _fixture()
    with pytest.raises(IntegrityError, match="not a fedvault artifact or truncated"):
        _open(MAGIC + (2**32 - 1).to_bytes(4, "big") + blob[10:])


def test_appended_bytes_are_detected() -> None:
    blob, _, _, _ = _fixture()
    with pytest.raises(IntegrityError, match="authenticated decryption"):
        _open(blob + b"\x00")


def test_wrong_encryption_key() -> None:
    blob, _, verify, _ = _fixture()
    with pytest.raises(IntegrityError) as info:
        open_artifact(blob, verify_key=verify, encryption_key=generate_encryption_key())
    assert str(info.value) == (
        "artifact failed authenticated decryption: it was modified or the encryption key is wrong"
    )


def test_wrong_verify_key_reports_key_ids() -> None:
    blob, _, verify, enc = _fixture()
    other = public_key_for(generate_signing_key())
    with pytest.raises(IntegrityError) as info:
        open_artifact(blob, verify_key=other, encryption_key=enc)
    message = str(info.value)
    assert key_id(verify) in message
    assert key_id(other) in message


def test_forged_signature_with_leaked_encryption_key_is_caught() -> None:
    """Someone holding the encryption key but not the signing key.

    They can build a well-formed envelope claiming the real signer's key id,
    but cannot sign it: exactly the case sign-then-encrypt exists for.
    """
    _, _, verify, enc = _fixture()
    header = json.dumps(
        {"key_id": key_id(verify), "metadata": {}, "version": 1},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    payload = b"backdoored weights"
    forged_sig = Ed25519PrivateKey.generate().sign(hashlib.sha256(header + payload).digest())
    nonce = os.urandom(12)
    ciphertext = AESGCM(enc).encrypt(nonce, forged_sig + payload, header)
    blob = MAGIC + len(header).to_bytes(4, "big") + header + nonce + ciphertext
    with pytest.raises(IntegrityError) as info:
        _open(blob)
    assert str(info.value) == (
        f"artifact signature does not verify against key id {key_id(verify)}"
    )


def test_swapping_metadata_between_artifacts_is_caught() -> None:
    """A header from one artifact cannot be spliced onto another's ciphertext."""
    _, signing, _, enc = _fixture()
    a = seal_artifact(b"a", signing_key=signing, encryption_key=enc, metadata={"m": "1"})
    b = seal_artifact(b"b", signing_key=signing, encryption_key=enc, metadata={"m": "2"})
    len_a = int.from_bytes(a[6:10], "big")
    len_b = int.from_bytes(b[6:10], "big")
    spliced = a[: 10 + len_a] + b[10 + len_b :]
    with pytest.raises(IntegrityError):
        _open(spliced)


def test_bad_in_memory_keys_and_metadata_are_config_errors() -> None:
    _, signing, verify, enc = _fixture()
    with pytest.raises(ConfigError, match="32"):
        seal_artifact(b"", signing_key=signing[:31], encryption_key=enc, metadata={})
    with pytest.raises(ConfigError, match="AES-256-GCM"):
        seal_artifact(b"", signing_key=signing, encryption_key=enc[:16], metadata={})
    with pytest.raises(ConfigError, match="strings"):
        seal_artifact(
            b"",
            signing_key=signing,
            encryption_key=enc,
            metadata={"round": 7},  # type: ignore[dict-item]
        )
    with pytest.raises(ConfigError):
        open_artifact(b"", verify_key=verify + b"\x00", encryption_key=enc)


def test_key_text_round_trip() -> None:
    key = generate_encryption_key()
    text = encode_key(key)
    assert text.endswith(b"\n")
    assert text.count(b"\n") == 1
    assert decode_key(text, "somewhere") == key


@pytest.mark.parametrize("text", [b"", b"   \n", b"not*base64!", b"QUJD\nREVG\n", b"QUJDR"])
def test_bad_key_text_does_not_leak_content(text: bytes) -> None:
    with pytest.raises(KeyFileError) as info:
        decode_key(text, "env FEDVAULT_KEY")
    message = str(info.value)
    assert "env FEDVAULT_KEY" in message
    for token in text.split():
        assert token.decode() not in message


def test_load_keys_from_files(tmp_path: Path) -> None:
    signing, enc = generate_signing_key(), generate_encryption_key()
    write_secret_file(tmp_path / "signing.key", encode_key(signing))
    write_secret_file(tmp_path / "enc.key", encode_key(enc))
    assert load_signing_key(tmp_path / "signing.key") == signing
    assert load_encryption_key(tmp_path / "enc.key") == enc


def test_load_key_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    write_secret_file(path, encode_key(os.urandom(16)))
    with pytest.raises(KeyFileError, match="must hold 32 bytes") as info:
        load_encryption_key(path)
    assert str(path) in str(info.value)
    with pytest.raises(KeyFileError, match="must hold 32 bytes"):
        load_signing_key(path)


def test_load_key_refuses_loose_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    path.write_bytes(encode_key(generate_signing_key()))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_encryption_key(tmp_path / "missing.key")


def test_load_key_with_garbage_does_not_leak(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    secretish = b"c2VjcmV0 with spaces & junk"
    write_secret_file(path, secretish)
    with pytest.raises(KeyFileError) as info:
        load_encryption_key(path)
    assert "c2VjcmV0" not in str(info.value)


def test_encryption_key_from_env() -> None:
    key = generate_encryption_key()
    value = base64.b64encode(key).decode()
    assert encryption_key_from_env(value) == key
    assert encryption_key_from_env(f"  {value}\n") == key
    with pytest.raises(ConfigError, match="32 bytes"):
        encryption_key_from_env(base64.b64encode(key[:24]).decode())
    with pytest.raises(ConfigError, match="not valid base64") as info:
        encryption_key_from_env("s3cr3t-not-base64!")
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError):
        encryption_key_from_env("\u00e9\u00e9\u00e9\u00e9")


def test_error_messages_never_contain_keys() -> None:
    blob, signing, verify, enc = _fixture()
    wrong = generate_encryption_key()
    messages: list[str] = []
    for kwargs in (
        {"verify_key": verify, "encryption_key": wrong},
        {"verify_key": public_key_for(generate_signing_key()), "encryption_key": enc},
    ):
        with pytest.raises(IntegrityError) as info:
            open_artifact(blob, **kwargs)
        messages.append(str(info.value))
    for message in messages:
        for key in (signing, enc, wrong):
            assert key.hex() not in message
            assert base64.b64encode(key).decode() not in message
