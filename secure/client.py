"""Client SDK for encrypted inference: keys stay here, only ciphertexts travel.

Typical use::

    client = HEClient("https://gateway:8080", api_key=api_key)   # through the gateway
    client = HEClient("http://127.0.0.1:8080", caller="clinic-7")  # stand-alone he serve
    result = client.predict("digits-logreg-v1-ab12cd34", X_raw)   # keys made in memory
    result.classes, result.logits

Keys: :class:`HEKeys` creates a TenSEAL context with the parameters the
server's metadata states, and sends only ``serialize(save_secret_key=False)``.
The secret key lives in this process's memory; :meth:`HEKeys.save` writes it to
a 0600 file (atomic, via :mod:`secure.keyfiles`) for callers that want to reuse
a registered context across runs; nothing else ever writes it.

Everything here uses TenSEAL's public API, so the README's plain-TenSEAL recipe
and this SDK produce the same bytes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from fedvault.errors import (
    ConfigError,
    FedvaultError,
    KeyFileError,
    UnavailableError,
    error_for_problem_type,
)
from secure.he.params import CKKSParams
from secure.keyfiles import read_secret_file, write_secret_file

F64 = NDArray[np.float64]
IDENTITY_HEADER = "X-Fedvault-Caller"


class HEKeys:
    """A private TenSEAL CKKS context (secret key included) for one parameter set."""

    def __init__(self, context: ts.Context) -> None:
        if not context.is_private():
            raise KeyFileError("HEKeys needs a context that holds its secret key")
        self.context = context

    @classmethod
    def create(cls, params: CKKSParams, *, galois: bool, relin: bool) -> HEKeys:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        ctx.global_scale = params.global_scale
        if galois:
            ctx.generate_galois_keys()
        if relin:
            ctx.generate_relin_keys()
        return cls(ctx)

    def public_bytes(self) -> bytes:
        """What the server may hold: public, relinearisation and galois keys only."""
        return bytes(self.context.serialize(save_secret_key=False))

    def save(self, path: Path) -> None:
        """Write the full context, secret key included, to a 0600 file."""
        write_secret_file(path, bytes(self.context.serialize(save_secret_key=True)))

    @classmethod
    def load(cls, path: Path) -> HEKeys:
        data = read_secret_file(path)  # refuses group/other-readable files
        try:
            return cls(ts.context_from(data))
        except Exception:
            raise KeyFileError(f"{path} is not a TenSEAL context with a secret key") from None


# ------------------------------------------------------------ encrypt/decrypt
def encrypt_vector(keys: HEKeys, features: NDArray[np.floating]) -> bytes:
    """The ``vector`` layout: one sample → one ciphertext."""
    return bytes(
        ts.ckks_vector(keys.context, np.asarray(features, np.float64).tolist()).serialize()
    )


def encrypt_batch(keys: HEKeys, x: NDArray[np.floating]) -> list[bytes]:
    """The ``batch`` layout: feature-major, one ciphertext per feature column."""
    x = np.asarray(x, dtype=np.float64)
    return [bytes(ts.ckks_vector(keys.context, col.tolist()).serialize()) for col in x.T]


def decrypt_vector(keys: HEKeys, output: bytes, n_outputs: int) -> F64:
    values = ts.ckks_vector_from(keys.context, output).decrypt()
    return np.asarray(values[:n_outputs], dtype=np.float64)


def decrypt_batch(keys: HEKeys, outputs: list[bytes], n_samples: int) -> F64:
    """(n_samples, k) logits from k per-class output ciphertexts."""
    cols = [ts.ckks_vector_from(keys.context, o).decrypt()[:n_samples] for o in outputs]
    return np.asarray(cols, dtype=np.float64).T


def params_from_metadata(meta: dict[str, Any]) -> CKKSParams:
    p = meta["parameters"]
    return CKKSParams(
        poly_modulus_degree=int(p["poly_modulus_degree"]),
        coeff_mod_bit_sizes=tuple(int(b) for b in p["coeff_mod_bit_sizes"]),
        scale_bits=int(p["global_scale_bits"]),
    )


# ---------------------------------------------------------------- transport
@dataclass(frozen=True, slots=True)
class Prediction:
    logits: F64  # (n, k)
    classes: list[str]  # predicted class name per sample
    layout: str


class HEClient:
    """Talks to the HE endpoints; holds keys per model parameters in memory."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        caller: str | None = None,
        timeout_s: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``api_key``: the gateway's bearer credential (``fvk_…``, sent as
        ``Authorization: Bearer``; the gateway then ignores ``caller``).
        ``caller``: the stand-alone HE server's identity header. At least one."""
        if not api_key and not caller:
            raise ConfigError("HEClient needs an api_key (gateway) or a caller (stand-alone)")
        headers: dict[str, str] = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key.strip()}"
        elif caller:
            headers[IDENTITY_HEADER] = caller
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            transport=transport,
        )
        self._base = base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"cannot reach the HE endpoint at {self._base} ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                # The stable type URI names the class (server.problem, one table).
                cls = error_for_problem_type(str(problem.get("type")))
                detail = str(problem.get("detail", ""))
            except ValueError:
                cls, detail = FedvaultError, response.text[:200]
            message = f"server refused ({response.status_code}): {detail}"
            try:
                error = cls(message)
            except TypeError:  # classes with required fields (RateLimitedError)
                error = FedvaultError(message)
            raise error
        return response

    def metadata(self, model_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v2/models/{model_id}/he").json()
        return result

    def register(self, model_id: str, keys: HEKeys) -> str:
        response = self._call(
            "POST",
            f"/v2/models/{model_id}/he/contexts",
            content=keys.public_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        return str(response.json()["context_id"])

    def infer(
        self, model_id: str, context_id: str, layout: str, inputs: list[bytes]
    ) -> list[bytes]:
        response = self._call(
            "POST",
            f"/v2/models/{model_id}/he/infer",
            json={
                "context_id": context_id,
                "layout": layout,
                "inputs": [base64.b64encode(b).decode() for b in inputs],
            },
        )
        return [base64.b64decode(o) for o in response.json()["outputs"]]

    def predict(
        self,
        model_id: str,
        x: NDArray[np.floating],
        *,
        layout: Literal["auto", "vector", "batch"] = "auto",
        keys: HEKeys | None = None,
    ) -> Prediction:
        """Encrypt raw features ``x`` (n, d), infer, decrypt: logits and class names.

        ``auto`` uses ``vector`` for one sample and ``batch`` otherwise. Without
        ``keys`` a fresh key pair is made in memory for this call.
        """
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        meta = self.metadata(model_id)
        features, class_names = meta["features"], meta["output"]["classes"]
        if x.shape[1] != len(features):
            raise ConfigError(f"expected {len(features)} features per sample, got {x.shape[1]}")
        chosen = layout if layout != "auto" else ("vector" if len(x) == 1 else "batch")
        params = params_from_metadata(meta)
        if keys is None:
            keys = HEKeys.create(
                params, galois=chosen == "vector", relin=bool(meta["keys"]["relin_keys"])
            )
        context_id = self.register(model_id, keys)
        k = len(class_names)
        if chosen == "vector":
            rows = [
                decrypt_vector(
                    keys,
                    self.infer(model_id, context_id, "vector", [encrypt_vector(keys, sample)])[0],
                    k,
                )
                for sample in x
            ]
            logits = np.vstack(rows)
        else:
            chunks = []
            for start in range(0, len(x), params.slots):
                part = x[start : start + params.slots]
                out = self.infer(model_id, context_id, "batch", encrypt_batch(keys, part))
                chunks.append(decrypt_batch(keys, out, len(part)))
            logits = np.vstack(chunks)
        predicted = [class_names[i] for i in logits.argmax(axis=1)]
        return Prediction(logits=logits, classes=predicted, layout=chosen)
