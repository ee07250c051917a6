"""The model registry: signed, encrypted artifacts with lineage.

An artifact is the model's parameters and standardisation, sealed by
:func:`secure.seal_artifact` (Ed25519 signature, then AES-256-GCM). The keys
live in the federation's key directory (0600 files) or, for the encryption key,
an environment variable — never beside the artifacts, so a copy of the
registry directory alone reveals nothing and cannot be altered undetected.

Where the artifact lives: a file in the registry directory when the store is
the embedded SQLite default, a column of the ``models`` row when the store is
PostgreSQL (or no directory is given). Why the database there: gateway
replicas on other hosts then need only the database URL and the keys, not a
shared volume — and the artifact stays as safe as on disk, since it is sealed
(signed, then encrypted) before it leaves this process and verified after it
comes back. Rows written before artifacts moved into the database (a NULL
blob) are still read from the directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedvault.errors import IntegrityError, KeyFileError
from fedvault.modelspec import FloatArray, ModelSpec, check_parameters
from fedvault.stats import Scaler
from secure import (
    decode_key,
    encode_key,
    generate_encryption_key,
    generate_signing_key,
    key_id,
    load_encryption_key,
    load_signing_key,
    open_artifact,
    public_key_for,
    seal_artifact,
    write_public_file,
    write_secret_file,
)
from server.store import FederationStore

SIGNING_KEY_FILE = "model-signing.key"
VERIFY_KEY_FILE = "model-signing.pub"
ENCRYPTION_KEY_FILE = "model-encryption.key"


@dataclass(frozen=True, slots=True)
class ModelKeys:
    signing_key: bytes | None  # None where only verification is needed (serving)
    verify_key: bytes
    encryption_key: bytes


def ensure_model_keys(keys_dir: Path) -> None:
    """Create the signing and encryption keys once (0600), leave existing ones."""
    signing = keys_dir / SIGNING_KEY_FILE
    if not signing.exists():
        private = generate_signing_key()
        write_secret_file(signing, encode_key(private))
        write_public_file(keys_dir / VERIFY_KEY_FILE, encode_key(public_key_for(private)))
    encryption = keys_dir / ENCRYPTION_KEY_FILE
    if not encryption.exists():
        write_secret_file(encryption, encode_key(generate_encryption_key()))


def load_model_keys(
    keys_dir: Path, *, encryption_key_b64: str | None = None, signing: bool = True
) -> ModelKeys:
    """Read the keys; the encryption key from ``encryption_key_b64`` if given."""
    verify_path = keys_dir / VERIFY_KEY_FILE
    try:
        verify_key = decode_key(verify_path.read_bytes(), str(verify_path))
    except FileNotFoundError:
        raise KeyFileError(f"verification key file {verify_path} does not exist") from None
    if encryption_key_b64:
        encryption_key = decode_key(encryption_key_b64.encode(), "model key environment variable")
    else:
        encryption_key = load_encryption_key(keys_dir / ENCRYPTION_KEY_FILE)
    signing_key = load_signing_key(keys_dir / SIGNING_KEY_FILE) if signing else None
    return ModelKeys(signing_key, verify_key, encryption_key)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    spec: ModelSpec
    params: list[FloatArray]
    scaler: Scaler
    lineage: dict[str, Any]


# What a node's evaluation reply holds (fedvault.metrics.partner_sums), by task.
_EVALUATION_RELEASES: dict[str, str] = {
    "regression": "row count, loss, sums of squared and absolute errors, and the sum and "
    "sum of squares of the target",
    "": "row count, loss, confusion matrix and per-class score histograms",
}


def privacy_statement(lineage: dict[str, Any]) -> str:
    """A plain-language account of the privacy guarantee, with its assumptions."""
    eps = lineage.get("epsilon", {})
    per_partner = ", ".join(f"{p}: ε={e:.3g}" for p, e in sorted(eps.items()))
    released = _EVALUATION_RELEASES.get(lineage.get("task", ""), _EVALUATION_RELEASES[""])
    if not lineage.get("private", True):
        return (
            "This model was trained WITHOUT differential privacy (a measured baseline). "
            "It must not be trained on, or shared from, real partner data."
        )
    return (
        f"Each partner's training data is protected by example-level differential privacy: "
        f"({per_partner}) at δ={lineage['delta']:g}, accounted with {lineage['accountant']} "
        f"(Rényi DP of the Poisson-subsampled Gaussian mechanism) over "
        f"{lineage['rounds_completed']} rounds of DP-SGD (clipping norm "
        f"{lineage['hyperparameters']['max_grad_norm']}) and one noisy release of "
        "standardisation sums. Adding or removing one record of one partner changes the "
        "probability of any outcome by at most a factor e^ε (plus δ). Assumptions: partner "
        f"dataset sizes are public; each partner's held-out evaluation sums ({released}) "
        "are released to the coordinator without noise and are not covered by ε; the "
        "guarantee covers what the coordinator and anyone holding the model can learn, not "
        "a partner's own site."
    )


class ModelRegistry:
    """Register and load sealed model versions."""

    def __init__(self, store: FederationStore, registry_dir: Path | None, keys: ModelKeys) -> None:
        self._store = store
        self._dir = registry_dir
        self._keys = keys

    @property
    def stores_in_database(self) -> bool:
        """Whether new artifacts go into the database (shared store, or no directory)."""
        return self._store.shared or self._dir is None

    def register(
        self,
        *,
        name: str,
        run_id: str,
        spec: ModelSpec,
        params: list[FloatArray],
        scaler: Scaler,
        lineage: dict[str, Any],
    ) -> str:
        if self._keys.signing_key is None:
            raise KeyFileError("registering a model needs the signing key")
        check_parameters(spec, params)
        version = self._store.next_model_version(name)
        model_id = f"{name}-v{version}-{uuid.uuid4().hex[:8]}"
        lineage = {**lineage, "privacy_statement": privacy_statement(lineage)}
        # Any-valued so that mypy accepts the ** expansion into np.savez's keywords.
        arrays: dict[str, Any] = {f"param_{i}": p for i, p in enumerate(params)}
        arrays["scaler_mean"] = scaler.mean
        arrays["scaler_std"] = scaler.std
        arrays["spec"] = np.frombuffer(spec.model_dump_json().encode(), dtype=np.uint8)
        arrays["lineage"] = np.frombuffer(json.dumps(lineage, sort_keys=True).encode(), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = seal_artifact(
            buf.getvalue(),
            signing_key=self._keys.signing_key,
            encryption_key=self._keys.encryption_key,
            # Only the id stays in the (authenticated, readable) header: spec and
            # lineage (partners, ε, metrics) are inside the encrypted payload.
            metadata={"model_id": model_id},
        )
        artifact = f"{model_id}.fvar"
        in_db = self.stores_in_database
        if not in_db and self._dir is not None:  # (no directory implies in_db)
            self._dir.mkdir(parents=True, exist_ok=True)
            write_secret_file(self._dir / artifact, blob)
        self._store.add_model(
            model_id=model_id,
            name=name,
            version=version,
            run_id=run_id,
            artifact=artifact,
            artifact_sha256=hashlib.sha256(blob).hexdigest(),
            signing_key_id=key_id(self._keys.verify_key),
            lineage=lineage,
            artifact_blob=blob if in_db else None,
        )
        return model_id

    def load(self, model_id: str) -> LoadedModel:
        """Verify and decrypt a model; a tampered artifact raises IntegrityError."""
        row = self._store.model(model_id)
        blob = self._store.model_artifact(model_id)
        if blob is None:  # a file (the SQLite default, or written before the blob column)
            if self._dir is None:
                raise IntegrityError(
                    f"artifact of model {model_id} is missing: not in the database, and no "
                    f"registry directory is configured to hold {row['artifact']}"
                )
            path = self._dir / row["artifact"]
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                raise IntegrityError(f"artifact of model {model_id} is missing ({path})") from None
        payload, metadata = open_artifact(
            blob, verify_key=self._keys.verify_key, encryption_key=self._keys.encryption_key
        )
        if metadata.get("model_id") != model_id:
            raise IntegrityError(
                f"artifact {row['artifact']} is signed for model {metadata.get('model_id')!r}, "
                f"not {model_id!r}"
            )
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            spec = ModelSpec.model_validate_json(npz["spec"].tobytes())
            lineage = json.loads(npz["lineage"].tobytes().decode())
            params = [npz[f"param_{i}"] for i in range(len(spec.shapes()))]
            scaler = Scaler(mean=npz["scaler_mean"], std=npz["scaler_std"])
        return LoadedModel(model_id, spec, params, scaler, lineage)
