"""The federation PKI produces files that TLS stacks and Flower actually accept."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedvault.errors import ConfigError, KeyFileError
from secure.keyfiles import write_secret_file
from secure.tls import (
    CAFiles,
    create_ca,
    create_node_auth_keypair,
    issue_client_cert,
    issue_server_cert,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca(tmp_path: Path) -> CAFiles:
    return create_ca("fedvault test CA", tmp_path / "pki")


@pytest.fixture
def zero_umask() -> Iterator[None]:
    """Modes must come out exact even when the umask masks nothing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_ca_files_and_extensions(tmp_path: Path, zero_umask: object) -> None:
    ca = create_ca("fedvault test CA", tmp_path / "pki")
    assert _mode(ca.ca_key) == 0o600
    assert _mode(ca.ca_cert) == 0o644
    key_pem = ca.ca_key.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)

    cert = _cert(ca.ca_cert)
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ("fedvault test CA")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)


def test_server_cert_verifies_against_ca_with_sans(ca: CAFiles, tmp_path: Path) -> None:
    files = issue_server_cert(ca, tmp_path / "srv", hosts=["127.0.0.1", "localhost", "::1"])
    assert _mode(files.key) == 0o600
    assert _mode(files.cert) == 0o644
    leaf, root = _cert(files.cert), _cert(ca.ca_cert)
    leaf.verify_directly_issued_by(root)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=364) < lifetime < dt.timedelta(days=366)

    # Full RFC 5280 path validation, as a TLS client would do it.
    store = Store([root])
    for name in (
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ):
        verifier = PolicyBuilder().store(store).build_server_verifier(name)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == root
    wrong = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("example.org"))
    with pytest.raises(VerificationError):
        wrong.verify(leaf, [])


def test_server_cert_does_not_verify_against_another_ca(ca: CAFiles, tmp_path: Path) -> None:
    files = issue_server_cert(ca, tmp_path / "srv", hosts=["localhost"])
    other = _cert(create_ca("other CA", tmp_path / "other").ca_cert)
    verifier = (
        PolicyBuilder().store(Store([other])).build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_cert(files.cert), [])


def test_client_cert(ca: CAFiles, tmp_path: Path) -> None:
    files = issue_client_cert(ca, tmp_path / "clients", "partner-a")
    assert files.cert.name == "partner-a.pem"
    assert files.key.name == "partner-a.key"
    assert _mode(files.key) == 0o600
    leaf = _cert(files.cert)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verifier = PolicyBuilder().store(Store([_cert(ca.ca_cert)])).build_client_verifier()
    result = verifier.verify(leaf, [])
    assert result.chain[0] == leaf
    assert result.subjects is not None
    assert x509.UniformResourceIdentifier("urn:fedvault:client:partner-a") in result.subjects


def test_real_mutual_tls_handshake(ca: CAFiles, tmp_path: Path) -> None:
    """OpenSSL (via ssl) accepts the files for an mTLS handshake on 127.0.0.1."""
    server = issue_server_cert(ca, tmp_path / "srv", hosts=["127.0.0.1", "localhost"])
    client = issue_client_cert(ca, tmp_path / "cli", "partner-a")

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.load_verify_locations(ca.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(ca.ca_cert))
    client_ctx.load_cert_chain(client.cert, client.key)

    peer_names: list[str] = []
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    peer_der = tls.getpeercert(binary_form=True)
                    assert peer_der is not None
                    peer = x509.load_der_x509_certificate(peer_der)
                    cn = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
                    peer_names.append(str(cn.value))
                    tls.sendall(tls.recv(16))
            except BaseException as exc:  # reported to the main thread below
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"ping")
            assert tls.recv(16) == b"ping"
        thread.join(timeout=10)
    assert not errors
    assert peer_names == ["partner-a"]


def test_grpc_accepts_the_server_files(ca: CAFiles, tmp_path: Path) -> None:
    """gRPC (BoringSSL), which Flower's SuperLink uses, completes a TLS handshake."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    files = issue_server_cert(ca, tmp_path / "srv", hosts=["127.0.0.1", "localhost"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=ca.ca_cert.read_bytes(),
        require_client_auth=False,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(root_certificates=ca.ca_cert.read_bytes()),
        )
        with channel:
            grpc.channel_ready_future(channel).result(timeout=15)
    finally:
        server.stop(None)


def test_leaf_key_is_pkcs8_p384(ca: CAFiles, tmp_path: Path) -> None:
    files = issue_server_cert(ca, tmp_path, hosts=["fl.example.org", "*.fl.example.org"])
    key_pem = files.key.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    assert _cert(files.cert).public_key() == key.public_key()


@pytest.mark.parametrize(
    "hosts", [[], [""], ["bad host"], ["a/b"], ["-lead.example"], ["*.com"], ["x" * 64]]
)
def test_bad_hosts_are_config_errors(ca: CAFiles, tmp_path: Path, hosts: list[str]) -> None:
    with pytest.raises(ConfigError):
        issue_server_cert(ca, tmp_path, hosts=hosts)


def test_long_dns_name_still_gets_a_certificate(ca: CAFiles, tmp_path: Path) -> None:
    host = ".".join(["a" * 30] * 4)  # 123 characters: too long for a CN
    files = issue_server_cert(ca, tmp_path, hosts=[host])
    san = _cert(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [host]


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-x", "n\n"])
def test_bad_names_are_config_errors(ca: CAFiles, tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        issue_client_cert(ca, tmp_path, name)
    with pytest.raises(ConfigError):
        create_node_auth_keypair(tmp_path, name)


def test_loose_ca_key_is_refused(ca: CAFiles, tmp_path: Path) -> None:
    ca.ca_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        issue_server_cert(ca, tmp_path, hosts=["localhost"])


def test_mismatched_ca_pair_is_refused(ca: CAFiles, tmp_path: Path) -> None:
    other = create_ca("other", tmp_path / "other")
    mixed = CAFiles(ca_cert=ca.ca_cert, ca_key=other.ca_key)
    with pytest.raises(KeyFileError, match="does not match"):
        issue_server_cert(mixed, tmp_path, hosts=["localhost"])


def test_garbage_ca_files_are_key_file_errors(ca: CAFiles, tmp_path: Path) -> None:
    write_secret_file(tmp_path / "junk.key", b"not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        issue_server_cert(
            CAFiles(ca_cert=ca.ca_cert, ca_key=tmp_path / "junk.key"), tmp_path, hosts=["h"]
        )
    (tmp_path / "junk.crt").write_bytes(b"not a cert")
    with pytest.raises(KeyFileError, match="not a PEM certificate"):
        issue_server_cert(
            CAFiles(ca_cert=tmp_path / "junk.crt", ca_key=ca.ca_key), tmp_path, hosts=["h"]
        )
    with pytest.raises(KeyFileError, match="cannot be read"):
        issue_server_cert(
            CAFiles(ca_cert=tmp_path / "missing.crt", ca_key=ca.ca_key), tmp_path, hosts=["h"]
        )


def test_node_keypair_files(tmp_path: Path, zero_umask: object) -> None:
    files = create_node_auth_keypair(tmp_path / "keys", "node1")
    assert files.private_key == tmp_path / "keys" / "node1"
    assert files.public_key == tmp_path / "keys" / "node1.pub"
    assert _mode(files.private_key) == 0o600
    assert _mode(files.public_key) == 0o644
    assert files.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = files.public_key.read_bytes()
    assert line.startswith(b"ecdsa-sha2-nistp384 AAAA")
    assert line.endswith(b" node1\n")


def test_node_keypair_round_trips_through_flowers_loaders(tmp_path: Path) -> None:
    """Load the files with the very functions flower-supernode and flwr CLI use."""
    pytest.importorskip("flwr")
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        public_key_to_bytes,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    files = create_node_auth_keypair(tmp_path, "node1")

    # `flower-supernode --auth-supernode-private-key node1`
    loaded = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(files.private_key),
            auth_supernode_public_key=None,
        )
    )
    assert loaded is not None
    private, public = loaded
    assert isinstance(private.curve, ec.SECP384R1)

    # `flwr supernode register node1.pub`
    registered = try_load_public_key(files.public_key)
    assert registered == public_key_to_bytes(public)

    # The SuperLink verifies what the SuperNode signs with these keys.
    signature = sign_message(private, b"node auth challenge")
    assert verify_signature(public, b"node auth challenge", signature)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_node_keypair_matches_ssh_keygen(tmp_path: Path) -> None:
    """OpenSSH itself reads the private key and derives the same public key."""
    files = create_node_auth_keypair(tmp_path, "node1")
    derived = subprocess.run(
        [shutil.which("ssh-keygen") or "ssh-keygen", "-y", "-f", str(files.private_key)],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout.split()[:2]
    assert derived == files.public_key.read_bytes().split()[:2]
