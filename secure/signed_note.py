"""C2SP signed notes (Ed25519) and tlog-checkpoint bodies.

Why this format: it is what transparency logs (Go's sumdb, Sigstore, Tessera)
and their witnesses already speak, so an auditor can check our checkpoints with
any conforming tool, not only ours. Layout (https://c2sp.org/signed-note):

    <text, ending in a newline>
    <blank line>
    — <key name> <base64(4-byte key id ‖ 64-byte Ed25519 signature)>

The key id is the first four bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public
key); the verifier key is published as ``<name>+<hex id>+<base64(0x01 ‖
public key)>``. Private keys are stored in Go's ``PRIVATE+KEY+<name>+<hex
id>+<base64(0x01 ‖ seed)>`` form, in a 0600 file written by
:mod:`secure.keyfiles`, so they interoperate with ``golang.org/x/mod/sumdb/note``.

Errors: malformed keys are :class:`~fedvault.errors.ConfigError` (or
:class:`~fedvault.errors.KeyFileError` when read from a file); a note that
does not verify is :class:`~fedvault.errors.IntegrityError`. No message ever
contains private key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedvault.errors import ConfigError, IntegrityError, KeyFileError
from secure.keyfiles import read_secret_file, write_secret_file

__all__ = [
    "Checkpoint",
    "NoteSigner",
    "NoteVerifier",
    "format_checkpoint",
    "generate_note_key",
    "load_note_signer",
    "open_note",
    "parse_checkpoint",
    "save_note_signer",
]

ALG_ED25519: Final = 0x01
_DASH: Final = "\u2014"  # EM DASH, the signature-line marker of the spec
_PRIVATE_PREFIX: Final = "PRIVATE+KEY+"
_MAX_SIGNATURES: Final = 100


def _check_name(name: str) -> str:
    if not name or "+" in name or any(c.isspace() for c in name) or not name.isprintable():
        raise ConfigError(f"key name {name!r} must be non-empty, printable, without spaces or '+'")
    return name


def _key_id(name: str, public: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public).digest()
    return int.from_bytes(digest[:4], "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A public key that may verify notes, with the name it signs under."""

    name: str
    key_id: int
    public_key: bytes

    @classmethod
    def parse(cls, line: str) -> NoteVerifier:
        """Parse ``<name>+<hex id>+<base64(0x01 ‖ key)>``, checking the id matches."""
        parts = line.strip().split("+", 2)
        if len(parts) != 3:
            raise ConfigError("a verifier key has the form <name>+<hex key id>+<base64 key>")
        name, hex_id, b64 = parts
        _check_name(name)
        raw = _unb64(b64)
        if len(hex_id) != 8 or raw is None or len(raw) != 33 or raw[0] != ALG_ED25519:
            raise ConfigError(f"verifier key for {name!r} is malformed (not an Ed25519 key)")
        try:
            key_id = int(hex_id, 16)
        except ValueError:
            raise ConfigError(f"verifier key for {name!r} has a malformed key id") from None
        if _key_id(name, raw[1:]) != key_id:
            raise ConfigError(f"verifier key for {name!r}: key id does not match the key")
        return cls(name, key_id, raw[1:])

    @property
    def line(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{_b64(bytes([ALG_ED25519]) + self.public_key)}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


class NoteSigner:
    """An Ed25519 key that signs notes under a name."""

    __slots__ = ("_key", "verifier")

    def __init__(self, name: str, seed: bytes) -> None:
        _check_name(name)
        if len(seed) != 32:
            raise ConfigError("an Ed25519 seed must be 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = NoteVerifier(name, _key_id(name, public), public)

    @classmethod
    def parse(cls, skey: str) -> NoteSigner:
        """Parse Go's ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>``."""
        text = skey.strip()
        parts = (
            text[len(_PRIVATE_PREFIX) :].split("+", 2) if text.startswith(_PRIVATE_PREFIX) else []
        )
        raw = _unb64(parts[2]) if len(parts) == 3 else None
        if raw is None or len(raw) != 33 or raw[0] != ALG_ED25519:
            raise ConfigError("not a signed-note private key (PRIVATE+KEY+name+id+key)")
        signer = cls(parts[0], raw[1:])
        if f"{signer.verifier.key_id:08x}" != parts[1].lower():
            raise ConfigError("signed-note private key: key id does not match the key")
        return signer

    @property
    def name(self) -> str:
        return self.verifier.name

    def private_text(self) -> str:
        """The private key in Go's format; only ever written to a 0600 file."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        v = self.verifier
        return f"{_PRIVATE_PREFIX}{v.name}+{v.key_id:08x}+{_b64(bytes([ALG_ED25519]) + seed)}"

    def sign(self, text: str) -> str:
        """Return ``text`` as a signed note carrying this key's one signature."""
        body = _check_text(text)
        sig = self._key.sign(body)
        blob = struct.pack(">I", self.verifier.key_id) + sig
        return f"{text}\n{_DASH} {self.name} {_b64(blob)}\n"

    def __repr__(self) -> str:  # never show the key
        return f"NoteSigner({self.verifier.line!r})"


def _check_text(text: str) -> bytes:
    if not text.endswith("\n"):
        raise ConfigError("note text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ConfigError("note text must not contain control characters")
    return text.encode("utf-8")


def generate_note_key(name: str) -> NoteSigner:
    """A fresh signer; persist it with :func:`save_note_signer`."""
    seed = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return NoteSigner(name, seed)


def save_note_signer(path: Path, signer: NoteSigner) -> None:
    """Write the private key 0600, atomically."""
    write_secret_file(path, (signer.private_text() + "\n").encode("ascii"))


def load_note_signer(path: Path) -> NoteSigner:
    """Read a private key file (refused when group/others may read it)."""
    raw = read_secret_file(path)
    try:
        return NoteSigner.parse(raw.decode("ascii"))
    except (ConfigError, UnicodeDecodeError):
        raise KeyFileError(f"key file {path} does not hold a signed-note private key") from None


def open_note(note: str, verifier: NoteVerifier) -> str:
    """Return the text of ``note`` if ``verifier`` signed it; otherwise raise.

    Signatures by other keys are ignored, as the spec requires (a checkpoint
    may carry witness cosignatures); one by the right name and id that does
    not verify is tampering and fails at once.
    """
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise IntegrityError("malformed signed note: no signature block")
    text, block = note[: split + 1], note[split + 2 :]
    body = _check_text(text)
    lines = block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise IntegrityError("malformed signed note: too many signatures")
    found = False
    for line in lines:
        prefix = f"{_DASH} "
        fields = line[len(prefix) :].split(" ") if line.startswith(prefix) else []
        blob = _unb64(fields[1]) if len(fields) == 2 else None
        if blob is None or len(blob) < 5:
            raise IntegrityError("malformed signed note: bad signature line")
        if fields[0] != verifier.name or struct.unpack(">I", blob[:4])[0] != verifier.key_id:
            continue
        if not verifier.verify(body, blob[4:]):
            raise IntegrityError(f"signature by {verifier.name} does not verify")
        found = True
    if not found:
        raise IntegrityError(f"note is not signed by {verifier.name}")
    return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tlog-checkpoint body: which log, how big, which root."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        return format_checkpoint(self.origin, self.size, self.root, self.extensions)


def format_checkpoint(origin: str, size: int, root: bytes, extensions: tuple[str, ...] = ()) -> str:
    """``<origin>\\n<size>\\n<base64 root>\\n`` plus optional extension lines."""
    if not origin or "\n" in origin or size < 0 or len(root) != 32:
        raise ConfigError("a checkpoint needs a one-line origin, a size ≥ 0 and a 32-byte root")
    return "".join(f"{line}\n" for line in (origin, str(size), _b64(root), *extensions))


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (already verified by :func:`open_note`)."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise IntegrityError("malformed checkpoint: needs origin, size and root lines")
    origin, size_text, root_text, *extensions = lines[:-1]
    if not size_text.isdigit() or (size_text.startswith("0") and size_text != "0"):
        raise IntegrityError("malformed checkpoint: tree size is not a decimal number")
    root = _unb64(root_text)
    if not origin or root is None or len(root) != 32:
        raise IntegrityError("malformed checkpoint: bad origin or root hash")
    return Checkpoint(origin, int(size_text), root, tuple(extensions))
