"""A small PKI for a federation: TLS for Flower, and SuperNode auth keys.

Why our own CA rather than public certificates: SuperLinks in a federation are
often reached by IP address on private networks, and the partners must trust
exactly the federation's CA, not every public CA. The files written here are
what Flower consumes:

* ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key`` and ``flower-supernode --root-certificates
  ca.crt``;
* ``flower-supernode --auth-supernode-private-key NAME`` and
  ``flwr supernode register NAME.pub``, which load OpenSSH-format ECDSA keys,
  the same as ``ssh-keygen -t ecdsa -b 384`` writes.

EC P-384 with SHA-384 signatures is used throughout: it is accepted by gRPC's
TLS stacks and by Flower's NIST-curve check for node keys. Private keys are
written 0600 (unencrypted, because the services start unattended) and
certificates and public keys 0644. Errors are fedvault errors: bad arguments
raise :class:`ConfigError`, unusable CA files :class:`KeyFileError`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvault.errors import ConfigError, KeyFileError
from secure.keyfiles import read_secret_file, write_public_file, write_secret_file

__all__ = [
    "CAFiles",
    "NodeKeyFiles",
    "ServerCertFiles",
    "create_ca",
    "create_node_auth_keypair",
    "issue_client_cert",
    "issue_server_cert",
]

CA_VALIDITY: Final = dt.timedelta(days=3650)
LEAF_VALIDITY: Final = dt.timedelta(days=365)
# Back-date certificates a little so a peer whose clock runs slightly behind
# does not reject a certificate issued a moment ago as "not yet valid".
_CLOCK_SKEW: Final = dt.timedelta(minutes=5)
_SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DNS_LABEL: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class CAFiles:
    """Where a federation CA's certificate (0644) and key (0600) live."""

    ca_cert: Path
    ca_key: Path


@dataclass(frozen=True, slots=True)
class ServerCertFiles:
    """A leaf certificate (0644) and its private key (0600).

    Used for client certificates too: the pair has the same shape.
    """

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class NodeKeyFiles:
    """A SuperNode's OpenSSH-format auth key pair (private 0600, public 0644)."""

    private_key: Path
    public_key: Path


def create_ca(common_name: str, out_dir: Path) -> CAFiles:
    """Create a self-signed CA valid for 10 years in ``out_dir``.

    Writes ``ca.crt`` and ``ca.key`` (replacing existing ones). The CA may
    sign only end-entity certificates (path length 0), which is all a
    federation needs and limits what a stolen CA key could be used for.
    """
    _check_common_name(common_name)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    files = CAFiles(ca_cert=out_dir / "ca.crt", ca_key=out_dir / "ca.key")
    write_secret_file(files.ca_key, _private_pem(key))
    write_public_file(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def issue_server_cert(ca: CAFiles, out_dir: Path, *, hosts: list[str]) -> ServerCertFiles:
    """Issue a 1-year TLS server certificate for ``hosts``; write server.pem/key.

    Each host becomes a subjectAltName entry: an IPAddress entry for IP
    literals (IPv4 or IPv6) and a DNSName entry otherwise, because TLS clients
    match IP addresses only against IPAddress entries. The first host is also
    the subject common name (if it fits X.509's 64 characters), for tools
    that still display it; verifiers use only the subjectAltName.
    """
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name or IP")
    sans = [_san(host) for host in hosts]
    return _issue_leaf(
        ca,
        out_dir / "server.pem",
        out_dir / "server.key",
        common_name=hosts[0].strip() if len(hosts[0].strip()) <= 64 else None,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )


def issue_client_cert(ca: CAFiles, out_dir: Path, common_name: str) -> ServerCertFiles:
    """Issue a 1-year TLS client certificate; write ``{common_name}.pem/.key``.

    The common name doubles as the file name, so it must be a plain name
    (letters, digits, ``.``, ``_``, ``-``). It is also carried as the
    subjectAltName URI ``urn:fedvault:client:{common_name}``, because strict
    RFC 5280 verifiers require a SAN on every leaf certificate.
    """
    _check_file_name(common_name)
    return _issue_leaf(
        ca,
        out_dir / f"{common_name}.pem",
        out_dir / f"{common_name}.key",
        common_name=common_name,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[x509.UniformResourceIdentifier(f"urn:fedvault:client:{common_name}")],
    )


def create_node_auth_keypair(out_dir: Path, name: str) -> NodeKeyFiles:
    """Create a SuperNode auth key pair as ``{name}`` and ``{name}.pub``.

    The private key is an OpenSSH private key and the public key one OpenSSH
    line (``ecdsa-sha2-nistp384 AAAA... name``), the formats Flower loads with
    ``load_ssh_private_key`` / ``load_ssh_public_key``.
    """
    _check_file_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files = NodeKeyFiles(private_key=out_dir / name, public_key=out_dir / f"{name}.pub")
    write_secret_file(files.private_key, private)
    write_public_file(files.public_key, public + b" " + name.encode("ascii") + b"\n")
    return files


def _issue_leaf(
    ca: CAFiles,
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str | None,
    eku: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> ServerCertFiles:
    """Sign an end-entity certificate with the CA and write it with its key."""
    subject: list[x509.NameAttribute[str]] = []
    if common_name is not None:
        _check_common_name(common_name)
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    ca_cert, ca_key = _load_ca(ca)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    # A leaf must not outlive its CA: verifiers would reject the tail anyway.
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        # RFC 5280: with an empty subject the SAN is the identity, so critical.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
    cert = builder.sign(ca_key, hashes.SHA384())
    write_secret_file(key_path, _private_pem(key))
    write_public_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ServerCertFiles(cert=cert_path, key=key_path)


def _load_ca(ca: CAFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA pair, insisting the key is private and matches the cert.

    A mismatched pair would produce certificates that no peer can verify,
    and the failure would only show up as an opaque TLS handshake error.
    """
    key_pem = read_secret_file(ca.ca_key)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"CA key file {ca.ca_key} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"CA key file {ca.ca_key} does not hold an EC private key")
    try:
        cert_pem = ca.ca_cert.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"CA certificate {ca.ca_cert} cannot be read: {exc.strerror or 'unknown error'}"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise KeyFileError(f"CA certificate {ca.ca_cert} is not a PEM certificate") from None
    if cert.public_key() != key.public_key():
        raise KeyFileError(f"CA key file {ca.ca_key} does not match CA certificate {ca.ca_cert}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise KeyFileError(f"CA certificate {ca.ca_cert} is not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyFileError(
            f"CA certificate {ca.ca_cert} is not a valid self-signed certificate"
        ) from None
    return cert, key


def _san(host: str) -> x509.GeneralName:
    """Map one host string to the subjectAltName entry TLS clients match."""
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if labels[0] == "*" and len(labels) > 2:  # a wildcard only as leftmost label
        labels = labels[1:]
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in labels):
        raise ConfigError(
            f"{host!r} is neither an IP address nor a DNS name "
            "(use the ASCII/punycode form for international names)"
        )
    return x509.DNSName(host)


def _check_common_name(common_name: str) -> None:
    """X.509 limits a common name to 64 characters; refuse empty ones too."""
    if not common_name or len(common_name) > 64:
        raise ConfigError("a certificate common name must be 1 to 64 characters")


def _check_file_name(name: str) -> None:
    """Keep names that become file names from escaping ``out_dir``."""
    if not _SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a plain name (letters, digits, '.', '_', '-'; "
            "not starting with '.' or '-')"
        )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM, what gRPC loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    """Current UTC time truncated to seconds (X.509 times have no fractions)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
