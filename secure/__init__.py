"""Key handling for fedvault: key files, sealed model artifacts and the federation PKI.

Kept in one package so every place that touches secrets goes through the same
permission checks and the same translation of ``cryptography`` errors into
:mod:`fedvault.errors`.
"""

from __future__ import annotations

from secure.artifacts import (
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
from secure.keyfiles import read_secret_file, write_public_file, write_secret_file
from secure.tls import (
    CAFiles,
    NodeKeyFiles,
    ServerCertFiles,
    create_ca,
    create_node_auth_keypair,
    issue_client_cert,
    issue_server_cert,
)

__all__ = [
    "CAFiles",
    "NodeKeyFiles",
    "ServerCertFiles",
    "create_ca",
    "create_node_auth_keypair",
    "decode_key",
    "encode_key",
    "encryption_key_from_env",
    "generate_encryption_key",
    "generate_signing_key",
    "issue_client_cert",
    "issue_server_cert",
    "key_id",
    "load_encryption_key",
    "load_signing_key",
    "open_artifact",
    "public_key_for",
    "read_secret_file",
    "seal_artifact",
    "write_public_file",
    "write_secret_file",
]
