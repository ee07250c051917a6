"""Signed and encrypted model artifacts at rest.

Why sign *and* encrypt: the encryption key is shared by every process that
must read models (it is a confidentiality key), so on its own it cannot say who
*produced* a model. The Ed25519 signing key is held only by the aggregator, so
a valid signature proves a model came from it even if the encryption key
leaked. The signature is made first and then encrypted with it
("sign-then-encrypt"), so the signature does not reveal which plaintext was
signed, and it covers the header (format version, signer key id, metadata) so
metadata cannot be swapped between artifacts.

Envelope layout (all integers big-endian)::

    b"FVAR1\\n" | header length (4 bytes) | header JSON | nonce (12) | ciphertext

The header is canonical JSON (sorted keys, no spaces, ASCII) of
``{"key_id": ..., "metadata": {...}, "version": 1}``; it is AES-256-GCM
associated data, so it is authenticated though readable without a key. The
plaintext is the 64-byte Ed25519 signature over ``SHA-256(header + payload)``
followed by the payload. Canonical JSON objects are prefix-free, and the header
is re-canonicalised on read, so ``header + payload`` splits one way only.

Key files hold the raw key base64-encoded on one line, so the same text can be
stored in a file or passed in an environment variable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedvault.errors import ConfigError, IntegrityError, KeyFileError
from secure.keyfiles import read_secret_file

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "decode_key",
    "encode_key",
    "encryption_key_from_env",
    "generate_encryption_key",
    "generate_signing_key",
    "key_id",
    "load_encryption_key",
    "load_signing_key",
    "open_artifact",
    "public_key_for",
    "seal_artifact",
]

MAGIC: Final = b"FVAR1\n"
FORMAT_VERSION: Final = 1

KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_SIGNATURE_BYTES: Final = 64
_LENGTH_BYTES: Final = 4
# A header is a few hundred bytes; the cap stops a corrupt length field from
# making us slice (and later JSON-parse) an arbitrarily large region.
_MAX_HEADER_BYTES: Final = 1 << 20

_NOT_AN_ARTIFACT: Final = "not a fedvault artifact or truncated"


def generate_signing_key() -> bytes:
    """Return a new Ed25519 private key as its raw 32 bytes."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def public_key_for(private: bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key of a raw private key."""
    return (
        _signing_key(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def generate_encryption_key() -> bytes:
    """Return 32 random bytes: a fresh AES-256-GCM key."""
    return os.urandom(KEY_BYTES)


def key_id(public_key: bytes) -> str:
    """Return the short public identifier of a raw Ed25519 public key.

    The first 8 bytes of its SHA-256, in hex: enough to tell keys apart in
    messages and logs without printing whole keys.
    """
    return hashlib.sha256(public_key).digest()[:8].hex()


def seal_artifact(
    payload: bytes,
    *,
    signing_key: bytes,
    encryption_key: bytes,
    metadata: dict[str, str],
) -> bytes:
    """Sign, then encrypt, ``payload`` and ``metadata`` into one envelope.

    A fresh random 96-bit nonce is drawn per call; with random nonces one key
    can safely seal about 2**32 artifacts, far beyond a federation's needs.

    Raises:
        ConfigError: a key has the wrong length or ``metadata`` is not a
            mapping of strings to strings.
    """
    _check_metadata(metadata)
    private = _signing_key(signing_key)
    aead = _aead(encryption_key)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    header = _canonical_json(
        {"key_id": key_id(public), "metadata": metadata, "version": FORMAT_VERSION}
    )
    signature = private.sign(hashlib.sha256(header + payload).digest())
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, signature + payload, header)
    return b"".join((MAGIC, len(header).to_bytes(_LENGTH_BYTES, "big"), header, nonce, ciphertext))


def open_artifact(
    blob: bytes, *, verify_key: bytes, encryption_key: bytes
) -> tuple[bytes, dict[str, str]]:
    """Decrypt and verify an envelope made by :func:`seal_artifact`.

    Decryption comes first because until the GCM tag checks, nothing in the
    header can be trusted; only then are the signer's key id and signature
    compared with ``verify_key``.

    Returns:
        The payload and the metadata it was sealed with.

    Raises:
        IntegrityError: the blob is not an artifact or is truncated, was
            modified, was sealed under another encryption key, or was not
            signed by the private key matching ``verify_key``.
        ConfigError: a key has the wrong length.
    """
    public = _verify_key(verify_key)
    aead = _aead(encryption_key)

    prefix = len(MAGIC) + _LENGTH_BYTES
    if len(blob) < prefix or not blob.startswith(MAGIC):
        raise IntegrityError(_NOT_AN_ARTIFACT)
    header_len = int.from_bytes(blob[len(MAGIC) : prefix], "big")
    minimum = prefix + header_len + _NONCE_BYTES + _TAG_BYTES + _SIGNATURE_BYTES
    if header_len > _MAX_HEADER_BYTES or len(blob) < minimum:
        raise IntegrityError(_NOT_AN_ARTIFACT)
    header = bytes(blob[prefix : prefix + header_len])
    nonce = bytes(blob[prefix + header_len : prefix + header_len + _NONCE_BYTES])
    ciphertext = bytes(blob[prefix + header_len + _NONCE_BYTES :])

    try:
        plaintext = aead.decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise IntegrityError(
            "artifact failed authenticated decryption: it was modified or the "
            "encryption key is wrong"
        ) from None

    signer_id, metadata = _parse_header(header)
    expected_id = key_id(verify_key)
    if signer_id != expected_id:
        raise IntegrityError(
            f"artifact was signed by key id {signer_id}, but the verify key has "
            f"key id {expected_id}"
        )
    if len(plaintext) < _SIGNATURE_BYTES:
        raise IntegrityError(_NOT_AN_ARTIFACT)
    signature, payload = plaintext[:_SIGNATURE_BYTES], plaintext[_SIGNATURE_BYTES:]
    try:
        public.verify(signature, hashlib.sha256(header + payload).digest())
    except InvalidSignature:
        raise IntegrityError(
            f"artifact signature does not verify against key id {expected_id}"
        ) from None
    return payload, metadata


def encode_key(b: bytes) -> bytes:
    """Return ``b`` as one line of standard base64 with a trailing newline."""
    return base64.b64encode(b) + b"\n"


def decode_key(text: bytes, source: str) -> bytes:
    """Decode one line of base64 key text read from ``source``.

    ``source`` (a path or a variable name) is used only to say where the bad
    text came from; the text itself is never echoed, because a corrupt key
    is usually still mostly key.

    Raises:
        KeyFileError: the text is empty or not valid base64.
    """
    decoded = _b64decode(text)
    if decoded is None:
        raise KeyFileError(f"{source} does not hold a base64-encoded key on one line")
    return decoded


def load_signing_key(path: Path) -> bytes:
    """Read a raw Ed25519 private key from a 0600 base64 key file."""
    return _load_key(path, "signing key file")


def load_encryption_key(path: Path) -> bytes:
    """Read a raw AES-256 key from a 0600 base64 key file."""
    return _load_key(path, "encryption key file")


def encryption_key_from_env(value: str) -> bytes:
    """Decode an AES-256 key passed as base64 text in an environment variable.

    Raises:
        ConfigError: the value is not base64 or does not decode to 32 bytes;
            the message never contains the value.
    """
    decoded = _b64decode(value.encode("utf-8", errors="replace"))
    if decoded is None:
        raise ConfigError("the encryption key from the environment is not valid base64")
    if len(decoded) != KEY_BYTES:
        raise ConfigError(
            f"the encryption key from the environment must hold {KEY_BYTES} bytes "
            f"(base64-encoded), it holds {len(decoded)}"
        )
    return decoded


def _load_key(path: Path, what: str) -> bytes:
    """Shared body of the key-file loaders: read, decode, check the length."""
    key = decode_key(read_secret_file(path), f"{what} {path}")
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"{what} {path} must hold {KEY_BYTES} bytes (base64-encoded), it holds {len(key)}"
        )
    return key


def _b64decode(text: bytes) -> bytes | None:
    """Strictly decode base64, returning None instead of raising on bad input.

    ``validate=True`` rejects characters outside the alphabet rather than
    silently skipping them, so a truncated or mangled key is not "decoded"
    into a different key.
    """
    stripped = text.strip()
    if not stripped:
        return None
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        return None


def _signing_key(raw: bytes) -> Ed25519PrivateKey:
    """Build an Ed25519 private key, translating length errors."""
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"an Ed25519 signing key must be {KEY_BYTES} raw bytes, got {len(raw)}")
    try:
        return Ed25519PrivateKey.from_private_bytes(raw)
    except ValueError:
        raise ConfigError("the signing key is not a valid Ed25519 key") from None


def _verify_key(raw: bytes) -> Ed25519PublicKey:
    """Build an Ed25519 public key, translating length and encoding errors."""
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"an Ed25519 verify key must be {KEY_BYTES} raw bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError("the verify key is not a valid Ed25519 key") from None


def _aead(raw: bytes) -> AESGCM:
    """Build the AES-256-GCM cipher; AES-128/192 keys are refused on purpose."""
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"an AES-256-GCM key must be {KEY_BYTES} bytes, got {len(raw)}")
    return AESGCM(raw)


def _check_metadata(metadata: object) -> None:
    """Refuse metadata that would not round-trip as ``dict[str, str]``."""
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ConfigError("artifact metadata must map strings to strings")


def _canonical_json(value: object) -> bytes:
    """Serialise to the one byte string both sealer and opener agree on."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _parse_header(header: bytes) -> tuple[str, dict[str, str]]:
    """Parse an (already authenticated) header and check its exact shape.

    The header is re-serialised and compared byte for byte, which keeps the
    signed ``header + payload`` unambiguous.
    """
    try:
        parsed = json.loads(header.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError("artifact header is malformed") from None
    if not isinstance(parsed, dict) or set(parsed) != {"key_id", "metadata", "version"}:
        raise IntegrityError("artifact header is malformed")
    version = parsed["version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise IntegrityError(f"unsupported artifact format version {version!r}")
    signer_id = parsed["key_id"]
    metadata = parsed["metadata"]
    if not isinstance(signer_id, str):
        raise IntegrityError("artifact header is malformed")
    try:
        _check_metadata(metadata)
    except ConfigError:
        raise IntegrityError("artifact header is malformed") from None
    if _canonical_json(parsed) != header:
        raise IntegrityError("artifact header is not in canonical form")
    return signer_id, metadata
