"""Shared set-up of the gateway tests: a registry with real sealed models, keys, a live gateway.

Everything is real: SQLite registry and key store, sealed (signed + encrypted)
artifacts, the audit log on SQLite, uvicorn and grpc.aio servers on free
loopback ports. The only test-side object is :class:`SwitchableSink`, which
stands in front of the real audit log so a test can make appends fail — the
gateway's own seam, not HTTP, gRPC or the database.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedvault.errors import UnavailableError
from fedvault.modelspec import ModelSpec
from fedvault.privacy import PrivacyCharge
from fedvault.schema import DataSchema
from secure.signed_note import generate_note_key
from server.audit.log import AuditLog
from server.audit.records import AuditRecord
from server.audit.storage import open_storage
from server.gateway.build import GatewayConfig, build_gateway
from server.gateway.keys import ROLES
from server.gateway.rest import GatewayApp, Limits
from server.http_serving import ConnectionLimits
from server.registry import ModelRegistry, ensure_model_keys, load_model_keys
from server.store import FederationStore, LedgerRow
from tests.he_support import trained

MODEL = "bc-logreg"
OTHER = "bc-mlp"
TAMPERED = "bc-tampered"
LINEAGE = {
    "run_id": "run-gw",
    "dataset": "breast-cancer",
    "private": True,
    "partners": ["alpha", "beta"],
    "epsilon": {"alpha": 1.5, "beta": 2.75},
    "delta": 1e-5,
    "accountant": "rdp opacus-1.6",
    "rounds_completed": 3,
    "hyperparameters": {"max_grad_norm": 1.0, "target_epsilon": 3.0},
}


class SwitchableSink:
    """The real audit log, with a switch that makes appends fail (the outage to test)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.broken = False
        self.delay_s = 0.0  # a slow commit, to see what overlaps it
        self.hold_until = 0  # appends wait until this many are waiting (5 s at most) ...
        self.hold_s = 0.0  # ... then this long, to see whether more arrive
        self.in_flight = 0
        self.max_in_flight = 0

    def append(self, record: AuditRecord) -> int:
        if self.broken:
            raise UnavailableError("audit store unreachable")
        return self.log.append(record)

    async def append_async(self, record: AuditRecord) -> int:
        if self.broken:
            raise UnavailableError("audit store unreachable")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_until:
                deadline = time.monotonic() + 5.0
                while self.in_flight < self.hold_until and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(self.hold_s)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return await self.log.append_async(record)
        finally:
            self.in_flight -= 1


def make_home(home: Path) -> dict[str, str]:
    """Registry with MODEL v1+v2, OTHER v1 and TAMPERED v1 (artifact altered); model ids."""
    ensure_model_keys(home / "keys")
    store = FederationStore(home / "federation.db")
    store.create_run("run-gw", {}, {})
    store.create_run("run-other", {}, {})
    charges = [
        LedgerRow(
            partner,
            PrivacyCharge("run-gw", 1, "dp-sgd", 1.1, 0.1, 10, 1.0, 1e-5, "rdp", "1.6", eps),
        )
        for partner, eps in (("alpha", 1.5), ("beta", 2.75))
    ]
    store.commit_round("run-gw", 1, charges, {"round": 1}, b"state")
    registry = ModelRegistry(store, home / "registry", load_model_keys(home / "keys"))
    ids: dict[str, str] = {}
    spec, params, scaler = trained("breast-cancer", "logreg")
    for version in (1, 2):
        scaled = [p * (1.0 if version == 2 else 0.5) for p in params]
        ids[f"{MODEL}:{version}"] = registry.register(
            name=MODEL, run_id="run-gw", spec=spec, params=scaled, scaler=scaler, lineage=LINEAGE
        )
    mspec, mparams, mscaler = trained("breast-cancer", "mlp")
    ids[OTHER] = registry.register(
        name=OTHER, run_id="run-gw", spec=mspec, params=mparams, scaler=mscaler, lineage=LINEAGE
    )
    ids[TAMPERED] = registry.register(
        name=TAMPERED, run_id="run-gw", spec=spec, params=params, scaler=scaler, lineage=LINEAGE
    )
    artifact = home / "registry" / f"{ids[TAMPERED]}.fvar"
    blob = bytearray(artifact.read_bytes())
    blob[-10] ^= 0x01
    artifact.write_bytes(bytes(blob))
    store.close()
    return ids


@dataclass
class Harness:
    home: Path
    gw: GatewayApp
    log: AuditLog
    sink: SwitchableSink
    ids: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)


def build(
    home: Path, *, rate: float = 0.0, burst: float = 100.0, limits: Limits | None = None
) -> Harness:
    ids = make_home(home)
    log = AuditLog(open_storage(str(home / "audit.db")), generate_note_key("test/gateway-audit"))
    sink = SwitchableSink(log)
    config = GatewayConfig(
        federation_db=home / "federation.db",
        registry_dir=home / "registry",
        model_keys=load_model_keys(home / "keys", signing=False),
        gateway_db=home / "gateway.db",
        rate_limit_per_s=rate,
        rate_burst=burst,
        limits=limits or Limits(),
    )
    gw = build_gateway(config, log, sink)
    h = Harness(home, gw, log, sink, ids)
    store = gw.store
    for role in ROLES:
        token, _ = store.create_key(
            role,
            models=frozenset({MODEL}) if role == "analyst" else frozenset(),
            partner="alpha" if role == "partner" else None,
        )
        h.tokens[role] = token
    h.tokens["analyst-other"], _ = store.create_key("analyst", models=frozenset({OTHER}))
    h.tokens["partner-gamma"], _ = store.create_key("partner", partner="gamma")
    revoked, key = store.create_key("analyst", models=frozenset({MODEL}))
    store.revoke(key.key_id)
    h.tokens["revoked"] = revoked
    h.tokens["expired"], _ = store.create_key("analyst", models=frozenset({MODEL}), expires_at=1.0)
    return h


def features(n: int = 4) -> np.ndarray:  # type: ignore[type-arg]
    from tests.he_support import dataset

    x = dataset("breast-cancer")[2]
    return np.asarray(x[:n], dtype=np.float32)


def expected_logits(h: Harness, version: str, x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    from fedvault.modelspec import forward

    m = h.gw.service.repository.resolve(MODEL, version)
    z = ((x - m.scaler.mean) / m.scaler.std).astype(np.float32)
    return forward(m.spec, m.params, z)


def spec_of(h: Harness, name: str) -> ModelSpec:
    return h.gw.service.repository.resolve(name, None).spec


@contextmanager
def grpc_server(h: Harness, *, connections: ConnectionLimits | None = None) -> Iterator[str]:
    """The gateway's grpc.aio server on a free loopback port, in its own loop thread."""
    from server.gateway.grpc_api import start_grpc_server
    from tests.he_support import free_port

    port = free_port()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        server = await start_grpc_server(h.gw, f"127.0.0.1:{port}", connections=connections)
        ready.set()
        await stop.wait()
        await server.stop(1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("gRPC server did not start")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def database_replica(
    url: str, keys_dir: Path, tmp: Path, log: AuditLog, stack: ExitStack
) -> tuple[GatewayApp, str]:
    """One gateway replica configured with nothing but the database URL and the
    model keys (its registry directory does not exist), served over HTTP."""
    from server.gateway.rest import create_rest_app
    from tests.he_support import live_server

    config = GatewayConfig(
        federation_db=url,
        registry_dir=tmp / "no-such-registry",
        model_keys=load_model_keys(keys_dir, signing=False),
        gateway_db=url,
        enable_he=False,
        enable_console=False,
    )
    gw = build_gateway(config, log)
    return gw, stack.enter_context(live_server(create_rest_app(gw)))


def register_schema_model(
    h: Harness,
    name: str,
    schema: DataSchema,
    *,
    kind: str = "logreg",
    seed: int = 0,
    lineage: dict[str, Any] | None = None,
) -> str:
    """Register a model trained (here: initialised) on ``schema``'s encoded columns.

    Its lineage carries the schema as a coordinator's run stores it, so the
    gateway serves the schema's raw columns; the scaler standardises each
    encoded input by its public bounds; ``lineage`` adds to (or overrides) the
    lineage's entries, e.g. held-out metrics. Call
    ``h.gw.service.repository.load_all()`` afterwards to serve it.
    """
    import json

    from fedvault.encoding import encoding_for
    from fedvault.modelspec import init_parameters
    from fedvault.schema import to_json
    from fedvault.stats import Scaler

    encoding = encoding_for(schema)
    regression = schema.is_regression
    spec = ModelSpec(
        kind=kind,  # type: ignore[arg-type]
        n_features=encoding.width,
        n_classes=schema.n_outputs,
        task="regression" if regression else "classification",
        loss="squared" if regression else "cross-entropy",
    )
    params = [3.0 * p for p in init_parameters(spec, seed)]
    scaler = Scaler(
        mean=((encoding.lo + encoding.hi) / 2).astype(np.float32),
        std=((encoding.hi - encoding.lo) / 4).astype(np.float32),
    )
    recorded = {
        **LINEAGE,
        "dataset": schema.name,
        "task": schema.task,
        "schema": json.loads(to_json(schema)),
        **(lineage or {}),
    }
    store = FederationStore(h.home / "federation.db")
    try:
        registry = ModelRegistry(store, h.home / "registry", load_model_keys(h.home / "keys"))
        return registry.register(
            name=name, run_id="run-gw", spec=spec, params=params, scaler=scaler, lineage=recorded
        )
    finally:
        store.close()
