"""Startup kits for partner sites, the operator's partner registry, and ``node start --kit``.

Why kits: partner IT must bring a node up at its own site in minutes, with an
identity and TLS trust the federation operator controls. A kit is one
directory the operator hands over (out of band, like any key material)::

    node.toml      federation name and id, SuperLink Fleet address, node settings
                   (partner, schema, data paths, ledger, local ε cap), health port
    ca.crt         the federation CA certificate: the only root the node trusts
    node_key       this partner's SuperNode authentication key (OpenSSH EC P-384, 0600)
    node_key.pub   its public half, registered with the SuperLink by the operator
    tls/server.pem, tls/server.key (0600)
                   a certificate from the federation CA for the node's own
                   health/metrics endpoint, so Prometheus can scrape it over TLS
    README.md      what partner IT runs

What a kit is *not*: Flower 1.41 SuperNodes present no TLS client certificate
(``flower-supernode`` has only ``--root-certificates`` for the SuperLink and
``--ssl-*`` for its own local Runtime API); a node proves who it is by signing
with its auth key, which the SuperLink checks against the keys the operator
registered (``--enable-supernode-auth``). So a kit holds no client
certificate, no CA key and nothing of any other partner.

The operator keeps only each partner's *public* key (``nodes/NAME/node_key.pub``)
and a registry (``partners.json``: status, Flower node id). Revoking a partner
marks it revoked there first (so no later ``federation up`` registers it
again) and then unregisters its node id with ``flwr supernode unregister``,
which ends a running node and refuses the key from then on.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedvault.addresses import check_address, check_host
from fedvault.errors import (
    ConfigError,
    KeyFileError,
    NotFoundError,
    ProcessFailedError,
    SecurityError,
    UnavailableError,
)
from fedvault.training_config import DatasetName
from secure import create_node_auth_keypair, issue_server_cert
from secure.keyfiles import read_secret_file, write_public_file
from secure.tls import CAFiles

from . import federation as fed
from .federation import IDENTITY_FILE as IDENTITY_FILE
from .federation import check_name as check_name
from .processes import (
    ManagedProcess,
    ProcessGroup,
    child_env,
    executable,
    free_port,
    wait_for_port,
)

KIT_CONFIG = "node.toml"
KIT_CA = "ca.crt"
KIT_NODE_KEY = "node_key"
KIT_NODE_PUB = "node_key.pub"
KIT_TLS_CERT = "tls/server.pem"
KIT_TLS_KEY = "tls/server.key"
KIT_README = "README.md"
KIT_SCHEMA = "schema.toml"  # the federation's data schema, for a table of its own
# The only private keys a kit may hold; anything else that looks like one
# (a CA key copied in by mistake, another partner's key) makes the kit invalid.
_KIT_SECRETS = frozenset({KIT_NODE_KEY, KIT_TLS_KEY})
# Directories a running node writes into; never part of what is checked.
_KIT_STATE_DIRS = frozenset({"state", "data"})

PARTNERS_FILE = "partners.json"
# Lines flower-supernode logs when the SuperLink accepts / refuses the node.
_ACCEPTED = "SuperNode ID:"
_REFUSED = ("Failed to activate SuperNode", "[code: 2004]", "Failed to register")


# ------------------------------------------------------------------ federation identity
class FederationIdentity(BaseModel):
    """Name and random id of a federation, written once by ``federation init``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    federation_id: str
    hosts: list[str]


def init_identity(paths: fed.FederationPaths, name: str, hosts: list[str]) -> FederationIdentity:
    """Create (or re-read) the federation's identity; a different name is refused."""
    check_name(name, "federation")
    target = paths.home / IDENTITY_FILE
    if target.exists():
        identity = read_identity(paths)
        if identity.name != name:
            raise ConfigError(
                f"{paths.home} already holds federation {identity.name!r}, not {name!r}"
            )
        return identity
    identity = FederationIdentity(name=name, federation_id=uuid.uuid4().hex, hosts=hosts)
    write_public_file(target, identity.model_dump_json(indent=2).encode())
    return identity


def read_identity(paths: fed.FederationPaths) -> FederationIdentity:
    try:
        return FederationIdentity.model_validate_json((paths.home / IDENTITY_FILE).read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{paths.home} has no federation; run `fedvault federation init NAME` first"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read federation home {paths.home}: {fed.os_reason(exc)}"
        ) from None
    except ValidationError as exc:
        raise ConfigError(f"{paths.home / IDENTITY_FILE} is malformed: {exc}") from None


# --------------------------------------------------------------------- partner registry
class PartnerRecord(BaseModel):
    """What the operator knows about one partner (never its private key)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Literal["active", "revoked"]
    public_key: str
    node_id: int | None = None
    created_at: str
    revoked_at: str | None = None
    unregistered: bool = False


def load_partners(paths: fed.FederationPaths) -> dict[str, PartnerRecord]:
    target = paths.home / PARTNERS_FILE
    if not target.exists():
        return {}
    try:
        raw = json.loads(target.read_text())
        return {name: PartnerRecord.model_validate(rec) for name, rec in raw.items()}
    except OSError as exc:
        raise ConfigError(f"cannot read {target}: {fed.os_reason(exc)}") from None
    except (ValueError, ValidationError, AttributeError) as exc:
        raise ConfigError(f"{target} is malformed: {exc}") from None


def save_partners(paths: fed.FederationPaths, records: dict[str, PartnerRecord]) -> None:
    body = {name: rec.model_dump() for name, rec in sorted(records.items())}
    write_public_file(paths.home / PARTNERS_FILE, json.dumps(body, indent=2).encode())


def superlink_reachable(paths: fed.FederationPaths) -> bool:
    """Whether a SuperLink this home started answers on its recorded address."""
    try:
        address = fed.read_address(paths)
    except UnavailableError:
        return False
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
    except (OSError, ValueError):
        return False
    return True


def register_partner(paths: fed.FederationPaths, record: PartnerRecord) -> None:
    """Register the partner's public key with the SuperLink; keep the node id it gives.

    ``flwr --format json`` exits 0 even on failure, so the JSON is what counts.
    A key the SuperLink already knows (a persistent SuperLink database) is fine.
    """
    pub = paths.node_dir(record.name) / f"{fed.NODE_KEY_NAME}.pub"
    reply = _flwr_json(paths, ["supernode", "register", str(pub), fed.CONNECTION])
    if reply.get("success"):
        record.node_id = int(reply["node-id"])
        record.unregistered = False
        return
    message = str(reply.get("error-message", ""))
    if "already in use" in message:
        return
    raise ProcessFailedError(
        f"the SuperLink refused to register partner {record.name}: {message[-500:]}"
    )


def unregister_partner(paths: fed.FederationPaths, record: PartnerRecord) -> bool:
    """Unregister the partner's node id; True when the SuperLink no longer knows it."""
    if record.node_id is None:
        return False
    reply = _flwr_json(paths, ["supernode", "unregister", str(record.node_id), fed.CONNECTION])
    message = str(reply.get("error-message", ""))
    if reply.get("success") or "not found" in message.lower():
        record.unregistered = True
        return True
    raise ProcessFailedError(
        f"the SuperLink did not unregister partner {record.name}: {message[-500:]}"
    )


def _flwr_json(paths: fed.FederationPaths, args: list[str]) -> dict[str, Any]:
    out = fed.run_flwr(paths, [*args, "--format", "json"])
    try:
        reply = json.loads(out)
    except ValueError:
        raise ProcessFailedError(f"`flwr {' '.join(args[:2])}` did not answer JSON") from None
    if not isinstance(reply, dict):
        raise ProcessFailedError(f"`flwr {' '.join(args[:2])}` answered {type(reply).__name__}")
    return reply


def sync_registrations(paths: fed.FederationPaths) -> tuple[list[str], list[str]]:
    """At SuperLink start: register active partners, unregister revoked ones not yet done.

    Homes made with ``federation init --partners`` (operator-held keys, the
    demo) have node directories without registry records: those are
    registered as before. Returns (registered, unregistered) names.
    """
    records = load_partners(paths)
    registered: list[str] = []
    unregistered: list[str] = []
    for name, record in sorted(records.items()):
        if record.status == "active":
            register_partner(paths, record)
            registered.append(name)
        elif not record.unregistered and unregister_partner(paths, record):
            unregistered.append(name)
        save_partners(paths, records)
    nodes = paths.home / "nodes"
    legacy = sorted(p.name for p in nodes.iterdir() if p.is_dir()) if nodes.exists() else []
    for name in legacy:
        if name not in records and (nodes / name / f"{fed.NODE_KEY_NAME}.pub").exists():
            record = PartnerRecord(name=name, status="active", public_key="", created_at=_now_iso())
            register_partner(paths, record)
            registered.append(name)
    return registered, unregistered


# --------------------------------------------------------------------------- kit config
class KitFederation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    federation_id: str
    superlink: str = Field(description="host:port of the SuperLink's Fleet API")


class KitNode(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    partner: str
    dataset: DatasetName
    # The federation's schema.toml for a table of its own (relative to the kit);
    # without it, dataset names a built-in table.
    schema_file: Path | None = Field(default=None, alias="schema")
    train_csv: Path
    test_csv: Path
    ledger: Path
    epsilon_cap: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    cap_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # How this site's CSV files are written (Parquet files need neither).
    csv_delimiter: str | None = None
    csv_encoding: str = "utf-8"
    # Memory for each encoded table before it spills to the ledger's directory.
    memory_mb: Annotated[int, Field(ge=1, le=1 << 20)] = 128


class KitHealth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9400
    tls: bool = True


class KitConnection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_retries: Annotated[int, Field(ge=0)] = 10
    max_wait_s: Annotated[float, Field(gt=0)] = 60.0


class KitConfig(BaseModel):
    """``node.toml``: unknown or invalid fields are refused with their name."""

    model_config = ConfigDict(extra="forbid")
    federation: KitFederation
    node: KitNode
    health: KitHealth = KitHealth()
    connection: KitConnection = KitConnection()


@dataclass(frozen=True)
class Kit:
    """A checked kit: its directory and config with paths resolved against it."""

    root: Path
    config: KitConfig

    @property
    def ca_cert(self) -> Path:
        return self.root / KIT_CA

    @property
    def node_key(self) -> Path:
        return self.root / KIT_NODE_KEY

    @property
    def tls(self) -> tuple[Path, Path] | None:
        cert, key = self.root / KIT_TLS_CERT, self.root / KIT_TLS_KEY
        return (cert, key) if cert.exists() and key.exists() else None

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.root / path)


# ------------------------------------------------------------------------- making kits
def add_partner(
    paths: fed.FederationPaths,
    partner: str,
    *,
    out: Path,
    superlink: str,
    dataset: DatasetName,
    epsilon_cap: float,
    metrics_hosts: list[str],
    created: fed.CreatedPaths | None = None,
    schema_text: str | None = None,
) -> tuple[PartnerRecord, bool]:
    """Write ``partner``'s kit to ``out`` and register its key if the SuperLink is up.

    Every input is checked before a key is generated, and the kit is built in
    a staging directory moved into place only when complete: a failure leaves
    no partial kit (a private key among it) and no registry record, so a retry
    works. ``created``: undo this together with the caller's other writes.

    Returns the record and whether the key was registered now (else at the
    next ``federation up``).
    """
    config = _kit_config(
        paths, partner, superlink, dataset, epsilon_cap, has_schema=schema_text is not None
    )
    hosts = _kit_cert_hosts(partner, metrics_hosts)
    records = load_partners(paths)
    existing = records.get(partner)
    if existing is not None and existing.status == "active":
        raise ConfigError(f"partner {partner!r} already has a kit; revoke it first to reissue")
    if existing is None and paths.node_key(partner).exists():
        raise ConfigError(
            f"partner {partner!r} has an operator-held key from `federation init --partners`; "
            "choose another name for a kit"
        )
    out = _check_kit_dir(out)
    try:
        with fed.undo_on_error(created) as undo:
            _write_kit(paths, config, out, hosts, undo, schema_text)
            public_key = (out / KIT_NODE_PUB).read_text().strip()
            pub = paths.node_dir(partner) / f"{fed.NODE_KEY_NAME}.pub"
            undo.will_create(pub)
            write_public_file(pub, (public_key + "\n").encode())
            record = PartnerRecord(
                name=partner, status="active", public_key=public_key, created_at=_now_iso()
            )
            records[partner] = record
            undo.will_replace(paths.home / PARTNERS_FILE)
            save_partners(paths, records)
    except OSError as exc:
        raise ConfigError(f"cannot write the kit for {partner!r}: {fed.os_reason(exc)}") from None
    registered = False
    if superlink_reachable(paths):
        register_partner(paths, record)
        save_partners(paths, records)
        registered = True
    return record, registered


# Where a refused KitConfig field came from on the command line.
_KIT_OPTIONS = {
    "partner": "partner NAME",
    "dataset": "--dataset",
    "epsilon_cap": "--epsilon-cap",
    "superlink": "--superlink",
}


def _kit_config(
    paths: fed.FederationPaths,
    partner: str,
    superlink: str,
    dataset: DatasetName,
    epsilon_cap: float,
    *,
    has_schema: bool = False,
) -> KitConfig:
    """The kit's node.toml, validated before anything is generated or written."""
    check_name(partner, "partner")
    check_address(superlink, "--superlink")
    fed.check_epsilon_cap(epsilon_cap)
    identity = read_identity(paths)
    try:
        return KitConfig(
            federation=KitFederation(
                name=identity.name, federation_id=identity.federation_id, superlink=superlink
            ),
            node=KitNode(
                partner=partner,
                dataset=dataset,
                schema=Path(KIT_SCHEMA) if has_schema else None,
                train_csv=Path("data/train.csv"),
                test_csv=Path("data/test.csv"),
                ledger=Path("state/ledger.db"),
                epsilon_cap=epsilon_cap,
            ),
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{_KIT_OPTIONS.get(str(e['loc'][-1]), str(e['loc'][-1]))}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"cannot issue a kit for {partner!r}: {problems}") from None


def _kit_cert_hosts(partner: str, metrics_hosts: list[str]) -> list[str]:
    """Names for the node's metrics certificate; a bad --metrics-host is refused up front."""
    for host in metrics_hosts:
        check_host(host, "--metrics-host", wildcard=True)  # as given: it goes into the cert
    dns_name = f"node-{partner}".replace("_", "-").lower()
    return list(dict.fromkeys([dns_name, "localhost", "127.0.0.1", *metrics_hosts]))


def _check_kit_dir(out: Path) -> Path:
    """``out`` must be new or an empty directory (e.g. a volume's mount point)."""
    if out.is_symlink():
        out = out.resolve()
    try:
        if out.exists():
            if not out.is_dir():
                raise ConfigError(f"kit directory {out} exists and is not a directory")
            if any(out.iterdir()):
                raise ConfigError(f"{out} is not empty; a kit needs a new directory")
            return out
    except OSError as exc:
        raise ConfigError(f"cannot use kit directory {out}: {fed.os_reason(exc)}") from None
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create kit directory {out}: {ancestor} is not a directory")
    return out


def _write_kit(
    paths: fed.FederationPaths,
    config: KitConfig,
    out: Path,
    hosts: list[str],
    undo: fed.CreatedPaths,
    schema_text: str | None = None,
) -> None:
    """Build the kit in a staging directory, then move it to ``out`` in one step.

    An existing (empty) ``out`` may be a volume's mount point, which cannot be
    replaced: the kit is then staged inside it and its entries moved up.
    """
    if out.exists():
        staging = out / f".partial-{uuid.uuid4().hex[:8]}"
    else:
        undo.will_create(out.parent)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    undo.will_create(staging)
    staging.mkdir(mode=0o700)
    staging.chmod(0o700)
    create_node_auth_keypair(staging, KIT_NODE_KEY)
    write_public_file(staging / KIT_CA, paths.ca_cert.read_bytes())
    ca = CAFiles(ca_cert=paths.ca_cert, ca_key=paths.pki / "ca.key")
    issue_server_cert(ca, staging / "tls", hosts=hosts)
    (staging / "tls").chmod(0o700)
    write_public_file(staging / KIT_CONFIG, render_config(config).encode())
    if schema_text is not None:
        write_public_file(staging / KIT_SCHEMA, schema_text.encode())
    write_public_file(staging / KIT_README, render_readme(config).encode())
    if staging.parent == out:
        for entry in sorted(staging.iterdir()):
            undo.will_create(out / entry.name)
            entry.rename(out / entry.name)
        staging.rmdir()
        out.chmod(0o700)
    else:
        undo.will_create(out)
        staging.rename(out)


def init_federation_and_kits(
    paths: fed.FederationPaths,
    name: str,
    partners: list[str],
    hosts: list[str],
    *,
    services: dict[str, list[str]] | None = None,
    kits_dir: Path | None = None,
    superlink: str | None = None,
) -> None:
    """`federation init` as one step: every option checked, then everything written.

    A failure part-way removes what this call created (an existing home keeps
    what it had), so a retry starts clean. Re-running on an existing home
    keeps its CA and the kits already issued (e.g. on every `docker compose up`).
    """
    fed.check_partner_names(partners)
    check_name(name, "federation")
    if kits_dir is not None:
        if superlink is None:
            raise ConfigError("--kits-dir needs --superlink (the Fleet address partners reach)")
        check_address(superlink, "--superlink")
        if kits_dir.exists() and not kits_dir.is_dir():
            raise ConfigError(f"--kits-dir {kits_dir} is not a directory")
    with fed.undo_on_error() as undo:
        fed.init_federation(
            paths,
            [] if kits_dir else partners,
            hosts,
            name=name,
            services=services,
            created=undo,
        )
        undo.will_create(paths.home / IDENTITY_FILE)
        init_identity(paths, name, hosts)
        if kits_dir is None or superlink is None:
            return
        issued = load_partners(paths)
        for partner in partners:
            if partner in issued and (kits_dir / partner / KIT_CONFIG).exists():
                continue
            add_partner(
                paths,
                partner,
                out=kits_dir / partner,
                superlink=superlink,
                dataset="digits",
                epsilon_cap=10.0,
                metrics_hosts=[],
                created=undo,
            )


def revoke_partner(paths: fed.FederationPaths, partner: str) -> PartnerRecord:
    """Revoke ``partner``: recorded first, then unregistered if the SuperLink is up."""
    records = load_partners(paths)
    record = records.get(partner)
    if record is None:
        raise NotFoundError(f"no partner {partner!r} in {paths.home / PARTNERS_FILE}")
    if record.status == "revoked" and record.unregistered:
        return record
    record.status = "revoked"
    record.revoked_at = record.revoked_at or _now_iso()
    pub = paths.node_dir(partner) / f"{fed.NODE_KEY_NAME}.pub"
    if pub.exists():
        # Kept for the record, under a name `federation up` never registers.
        revoked_dir = paths.node_dir(partner) / "revoked"
        revoked_dir.mkdir(exist_ok=True)
        pub.rename(revoked_dir / f"{time.strftime('%Y%m%dT%H%M%S')}.pub")
    save_partners(paths, records)
    if superlink_reachable(paths):
        unregister_partner(paths, record)
        save_partners(paths, records)
    return record


def render_config(config: KitConfig) -> str:
    """``node.toml`` with comments for partner IT (only plain strings and numbers)."""
    f, n, h, c = config.federation, config.node, config.health, config.connection
    schema_line = (
        f"schema = {_q(str(n.schema_file))}          # the federation's schema file\n"
        if n.schema_file is not None
        else ""
    )
    return f"""\
# fedvault node configuration for partner {n.partner!r} in federation {f.name!r}.
# Edit the [node] paths and cap to match this site; leave [federation] as issued.
# Relative paths are relative to this kit directory.

[federation]
name = {_q(f.name)}
federation_id = {_q(f.federation_id)}
superlink = {_q(f.superlink)}          # the operator's Fleet API (TLS, node authentication)

[node]
partner = {_q(n.partner)}
dataset = {_q(n.dataset)}              # schema the local data must match
{schema_line}train_csv = {_q(str(n.train_csv))}
test_csv = {_q(str(n.test_csv))}
ledger = {_q(str(n.ledger))}          # this site's own privacy ledger (keep it; back it up)
epsilon_cap = {n.epsilon_cap!r}              # lifetime ε this site allows on this dataset
cap_delta = {n.cap_delta!r}
memory_mb = {n.memory_mb}              # per table in memory; larger tables spill beside the ledger

[health]
host = {_q(h.host)}              # /healthz and /metrics; 0.0.0.0 to let Prometheus scrape
port = {h.port}
tls = {"true" if h.tls else "false"}                   # serve them with tls/server.pem

[connection]
max_retries = {c.max_retries}
max_wait_s = {c.max_wait_s!r}
"""


def render_readme(config: KitConfig) -> str:
    f, n = config.federation, config.node
    return f"""\
# fedvault startup kit — partner `{n.partner}`, federation `{f.name}`

This directory is this site's identity in the federation. Keep it private:
`node_key` and `tls/server.key` are private keys (mode 0600); nobody else,
including the federation operator, holds them. It contains no other
partner's keys and no CA key.

## Bring the node up

1. Install fedvault (Python 3.11): `pip install fedvault` (or the operator's image).
2. Put this site's data in the files named in `node.toml` (`[node] train_csv`,
   `test_csv`; by default `data/train.csv` and `data/test.csv` here). They must
   match the `{n.dataset}` schema; the node checks every row before it starts
   and names the first bad file, line and column.
3. Allow outbound TCP to the SuperLink at `{f.superlink}` (TLS). No inbound port
   is needed, except the health/metrics port if the operator's Prometheus
   scrapes it (`[health]` in `node.toml`).
4. Run:

       fedvault node start --kit /path/to/this/kit

It checks this kit (files present, key permissions 0600, CA certificate, config),
validates the data, checks that the SuperLink's certificate was issued by
this federation's CA, then runs the node until stopped (Ctrl-C / SIGTERM).

## Health

`https://HOST:{config.health.port}/healthz` (JSON; 503 unless the node runs,
is accepted by the SuperLink and its data is valid) and `/metrics`
(Prometheus): `fedvault_node_rounds_done`, `fedvault_node_epsilon_spent`
vs `fedvault_node_epsilon_cap`, `fedvault_node_data_validation_failures_total`.
The certificate is issued by `ca.crt`.

## Privacy

`epsilon_cap` is this site's own lifetime limit on the dataset: the node
refuses any request that would take its ledger (`[node] ledger`) past it,
whatever the coordinator asks. Keep the ledger file between runs.

## If the node is refused

"not accepted by the SuperLink": the operator has not registered this
kit's key yet, or has revoked it. "certificate not issued by this kit's
federation CA": the address points to another federation's SuperLink, or
this kit belongs to another federation.
"""


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string here


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------ checking kits
def load_kit(root: Path, config_file: Path | None = None) -> Kit:
    """Check a kit before anything runs: files, key modes and formats, CA, config.

    Raises ConfigError (missing files, bad config) or KeyFileError/SecurityError
    (loose permissions, unusable keys, an unexpected private key in the kit).
    """
    if not root.is_dir():
        raise ConfigError(f"kit directory {root} does not exist")
    for name in (KIT_CONFIG, KIT_CA, KIT_NODE_KEY, KIT_NODE_PUB):
        if not (root / name).is_file():
            raise ConfigError(f"kit {root} lacks {name}; ask the operator for a complete kit")
    _check_no_foreign_secrets(root)
    _check_node_key(root / KIT_NODE_KEY, root / KIT_NODE_PUB)
    if (root / KIT_TLS_KEY).exists():
        read_secret_file(root / KIT_TLS_KEY)
    _check_ca(root / KIT_CA)
    source = config_file if config_file is not None else root / KIT_CONFIG
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
        config = KitConfig.model_validate(raw)
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # Never echo the bytes: a misplaced file could be anything, a key included.
        raise ConfigError(f"{source} is not UTF-8 text; a node config is TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
    check_address(config.federation.superlink, "SuperLink address")
    check_name(config.node.partner, "partner")
    return Kit(root=root, config=config)


def _check_no_foreign_secrets(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in _KIT_STATE_DIRS or not path.is_file():
            continue
        if rel.as_posix() in _KIT_SECRETS:
            continue
        try:
            head = path.read_bytes()[:1_000_000]
        except OSError:
            continue
        if b"PRIVATE KEY" in head:
            raise SecurityError(
                f"kit {root} contains an unexpected private key ({rel}); a kit holds only "
                "its own node key: delete that file and ask the operator why it was there"
            )


def _check_node_key(private: Path, public: Path) -> None:
    data = read_secret_file(private)  # refuses group/other access
    try:
        key = serialization.load_ssh_private_key(data, password=None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
    except (ValueError, TypeError):
        raise KeyFileError(
            f"{private} / {public} are not an OpenSSH key pair (Flower node auth)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP384R1 | ec.SECP256R1 | ec.SECP521R1
    ):
        raise KeyFileError(f"{private} is not an EC key on a NIST curve (Flower node auth)")
    if pub != key.public_key():
        raise KeyFileError(f"{public} is not the public half of {private}")


def _check_ca(path: Path) -> None:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM certificate") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{path} is not a CA certificate")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyFileError(f"CA certificate {path} is not valid now (expired or not yet valid)")


def check_superlink_certificate(address: str, ca_cert: Path, timeout_s: float = 5.0) -> bool:
    """TLS-handshake with the SuperLink, trusting only the kit's CA.

    Returns False when nothing answers (the node will retry); raises
    SecurityError when something answers with a certificate this federation's
    CA did not issue — a foreign kit or a wrong address, refused before the
    node sends anything.
    """
    host, port = check_address(address, "SuperLink address")
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return False
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return True
    except ssl.SSLCertVerificationError as exc:
        raise SecurityError(
            f"the SuperLink at {address} presented a certificate not issued by this kit's "
            f"federation CA ({exc.verify_message}): this kit belongs to another federation, "
            "or the address is wrong"
        ) from None
    except (ssl.SSLError, OSError):
        return False
    finally:
        sock.close()


# ------------------------------------------------------------------------- running nodes
@dataclass(frozen=True)
class NodeOverrides:
    """Site-specific values given on the command line instead of in node.toml."""

    train_csv: Path | None = None
    test_csv: Path | None = None
    ledger: Path | None = None
    health_host: str | None = None
    health_port: int | None = None


def node_settings(kit: Kit, overrides: NodeOverrides) -> dict[str, Any]:
    """The SuperNode's ``--node-config`` (what clients.app.NodeSettings reads)."""
    n = kit.config.node
    return {
        "partner": n.partner,
        "train-csv": str(overrides.train_csv or kit.resolve(n.train_csv)),
        "test-csv": str(overrides.test_csv or kit.resolve(n.test_csv)),
        "ledger": str(overrides.ledger or kit.resolve(n.ledger)),
        "epsilon-cap": n.epsilon_cap,
        "cap-delta": n.cap_delta,
        "dataset": n.dataset,
        "csv-delimiter": n.csv_delimiter or "",
        "csv-encoding": n.csv_encoding,
        "memory-mb": n.memory_mb,
    }


def kit_schema(kit: Kit) -> Any:
    """The schema this node's data must match: the kit's schema file, or a built-in table."""
    from fedvault.schema import builtin_schema, load_schema

    n = kit.config.node
    if n.schema_file is None:
        return builtin_schema(n.dataset)
    schema = load_schema(kit.resolve(n.schema_file))
    if schema.name != n.dataset:
        raise ConfigError(
            f"node.toml: dataset is {n.dataset!r} but the schema file describes {schema.name!r}"
        )
    return schema


def start_kit_supernode(
    group: ProcessGroup, kit: Kit, node_config: dict[str, Any], log_path: Path
) -> ManagedProcess:
    conn = kit.config.connection
    config = " ".join(f"{k}={fed.toml_value(v)}" for k, v in node_config.items())
    argv = [
        executable("flower-supernode"),
        "--superlink", kit.config.federation.superlink,
        "--root-certificates", str(kit.ca_cert),
        "--auth-supernode-private-key", str(kit.node_key),
        "--node-config", config,
        "--port", str(free_port()),  # its local Runtime API, on 127.0.0.1
        "--max-retries", str(conn.max_retries),
        "--max-wait-time", str(conn.max_wait_s),
    ]  # fmt: skip
    if log_path.exists():
        # One log per start: "accepted"/"refused" are read from this start's lines only.
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    return group.start(f"supernode-{kit.config.node.partner}", argv, log_path, child_env())


def supernode_accepted(proc: ManagedProcess) -> bool:
    return _ACCEPTED in proc.log_tail(400)


def raise_for_exit(proc: ManagedProcess) -> None:
    """Turn a SuperNode's exit into the error partner IT can act on."""
    tail = proc.log_tail(40)
    if any(marker in tail for marker in _REFUSED):
        raise SecurityError(
            "the SuperLink did not accept this node: its key is not registered there "
            "(revoked, not yet registered by the operator, or a kit of another federation); "
            f"see {proc.log_path}"
        )
    if "terminated gracefully" in tail and _ACCEPTED in proc.log_tail(400):
        raise SecurityError(
            "the SuperLink ended this node's session (the operator unregistered it: "
            f"revoked?); see {proc.log_path}"
        )
    proc.check_alive()
    raise ProcessFailedError(f"{proc.name} stopped; see {proc.log_path}")


def start_fleet_proxy(
    group: ProcessGroup,
    paths: fed.FederationPaths,
    listen_host: str,
    listen_port: int,
    superlink_host: str,
    superlink_port: int,
) -> ManagedProcess:
    """Start ``fedvault federation fleet-proxy`` as a child and wait until it listens.

    Its binds are checked by ``federation up`` (``check_up_options``) before
    the SuperLink starts.
    """
    argv = [
        sys.executable, "-m", "fedvault", "federation", "fleet-proxy",
        "--home", str(paths.home),
        "--listen", f"{listen_host}:{listen_port}",
        "--upstream", f"{superlink_host}:{superlink_port}",
    ]  # fmt: skip
    proc = group.start("fleet-proxy", argv, paths.logs / "fleet-proxy.log", fed.flwr_env(paths))
    probe = "127.0.0.1" if listen_host in ("0.0.0.0", "::") else listen_host  # noqa: S104
    wait_for_port(probe, listen_port, timeout_s=30, process=proc)
    return proc
