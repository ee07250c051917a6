"""Client SDK for encrypted inference: keys stay here, only ciphertexts travel.

Typical use::

    client = HEClient("https://gateway:8080", api_key=api_key)   # through the gateway
    client = HEClient("http://127.0.0.1:8080", caller="clinic-7")  # stand-alone he serve
    result = client.predict("digits-logreg-v1-ab12cd34", X_raw)   # keys made in memory
    result.classes, result.logits
    result = client.predict("flchain-logreg", frame)   # raw columns: a DataFrame or dicts
    result = client.predict("diamonds-linreg", rows)   # regression: result.values, in dollars

Raw rows: under HE the server never sees a row, so it cannot one-hot encode
or impute it as the plaintext gateway does. The metadata publishes the
model's (public) schema and the DP imputation means instead, and
:class:`RawEncoder` encodes on the caller's side with the very functions the
gateway and the partners' nodes use (:mod:`fedvault.encoding`): the same
checks (bounds, categories, missing-value policies, errors naming the column
and the row), the same encoded vector, before any key or ciphertext is sent.
A regression model's decrypted output is brought back to the target's units
with :meth:`fedvault.encoding.Encoding.decode_target`, as the gateway does.

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
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from fedvault.encoding import Encoding, InvalidValue, encoding_for, parse_cells, typed_values
from fedvault.errors import (
    ConfigError,
    DataError,
    KeyFileError,
)
from fedvault.gateway_client import HttpApiClient
from fedvault.schema import DataSchema, FeatureSpec, from_json
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


# ------------------------------------------------------------ raw rows
# A missing value of a numeric or boolean column read as text: NUL is never a
# printable cell, so it cannot collide with a value or a schema's marker.
_NONE_CELL = "\x00"


def _is_missing(value: Any) -> bool:
    """None, a float NaN, or pandas' NA/NaT (recognised without importing pandas)."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _is_frame(rows: Any) -> bool:
    """A pandas DataFrame, by shape rather than import (pandas is not a dependency)."""
    return hasattr(rows, "columns") and hasattr(rows, "iloc") and hasattr(rows, "to_numpy")


def is_raw_rows(rows: Any) -> bool:
    """True for a DataFrame, a mapping (one row) or a non-empty sequence of mappings."""
    if _is_frame(rows) or isinstance(rows, Mapping):
        return True
    return (
        isinstance(rows, Sequence)
        and not isinstance(rows, (str, bytes))
        and len(rows) > 0
        and all(isinstance(r, Mapping) for r in rows)
    )


class RawEncoder:
    """Raw rows → the exact vector the server's HE plan expects, on the caller's side.

    Built from the HE metadata (:meth:`from_metadata`): the model's public
    schema and, per encoded input a missing cell leaves empty, the DP mean
    the plaintext gateway imputes there. Values are checked and typed by
    :func:`fedvault.encoding.typed_values` (Python and NumPy values) or
    :func:`fedvault.encoding.parse_cells` (text cells, e.g. a CSV), then
    encoded by :meth:`fedvault.encoding.Encoding.encode`: one code path with
    the gateway and the partners' nodes, so a row means the same everywhere.
    """

    def __init__(self, schema: DataSchema, missing_means: Mapping[str, float]) -> None:
        self.schema = schema
        self.encoding: Encoding = encoding_for(schema)  # ConfigError for a draft schema
        self._markers = frozenset(schema.missing_values)
        fill = np.full(self.encoding.width, np.nan)
        lacking = []
        for j in np.flatnonzero(self.encoding.indicator >= 0):
            name = self.encoding.names[j]
            if name not in missing_means:
                lacking.append(name)
                continue
            fill[j] = float(missing_means[name])
        if lacking or not np.isfinite(fill[self.encoding.indicator >= 0]).all():
            raise ConfigError(
                "the model's metadata gives no finite imputation mean for "
                f"{', '.join(map(repr, lacking[:5])) or 'some inputs'}: raw rows cannot be "
                "encoded for it (send its numeric input instead)"
            )
        self._fill = fill

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> RawEncoder | None:
        """The encoder the metadata describes, or None for a model without a known schema."""
        document = meta.get("schema")
        if document is None:
            return None
        schema = from_json(json.dumps(document))  # ConfigError naming the bad field
        encoding = meta.get("encoding") or {}
        encoder = cls(schema, dict(encoding.get("missing_means", {})))
        if list(encoder.encoding.names) != list(meta.get("features", ())):
            raise ConfigError("the model's metadata lists other features than its schema encodes")
        return encoder

    @property
    def columns(self) -> tuple[str, ...]:
        """The raw columns a row must carry, in schema order."""
        return self.schema.feature_names

    # -- rows of Python / NumPy values
    def encode_rows(self, rows: Any) -> F64:
        """A DataFrame, one mapping, or a sequence of mappings keyed by raw column name.

        Extra columns (a label, an id) are ignored. A missing value is None,
        NaN, pandas' NA, or one of the schema's markers (text); numbers and
        booleans may also come as text, parsed as a partner's file is.

        Raises:
            DataError: a column is absent, or a value breaks the schema (naming
                the column and the 1-based row).
        """
        if isinstance(rows, Mapping):
            rows = [rows]
        columns = self._frame_columns(rows) if _is_frame(rows) else self._record_columns(list(rows))
        typed = []
        for spec, column in zip(self.schema.features, columns, strict=True):
            try:
                if column.dtype.kind in "biuf" and spec.type != "categorical":
                    typed.append(typed_values(spec, column.astype(np.float64), self._markers))
                else:
                    typed.append(self._objects(spec, column.tolist()))
            except InvalidValue as exc:
                raise DataError(f"row {exc.row + 1}: {exc.message}", column=spec.name) from None
        return self._finish(typed)

    def _frame_columns(self, frame: Any) -> list[NDArray[Any]]:
        present = [str(c) for c in frame.columns]
        absent = [c for c in self.columns if c not in present]
        if absent:
            raise DataError(f"the rows lack column(s) {_shown(absent)} of the model's schema")
        repeated = [c for c in self.columns if present.count(c) > 1]
        if repeated:
            raise DataError(f"column(s) {_shown(repeated)} given more than once")
        return [np.asarray(frame[name].to_numpy()) for name in self.columns]

    def _record_columns(self, records: Sequence[Mapping[str, Any]]) -> list[NDArray[Any]]:
        out = []
        for name in self.columns:
            column = np.empty(len(records), dtype=np.object_)
            for i, record in enumerate(records):
                if name not in record:
                    raise DataError(
                        f"row {i + 1} has no value (give None for a missing one)", column=name
                    )
                column[i] = record[name]
            out.append(column)
        return out

    def _objects(self, spec: FeatureSpec, values: list[Any]) -> NDArray[Any]:
        """Typed values of one column of arbitrary Python values (InvalidValue at the first bad)."""
        clean = [None if _is_missing(v) else v for v in values]
        if spec.type == "categorical":
            cells = np.empty(len(clean), dtype=np.object_)
            for i, v in enumerate(clean):
                cells[i] = v if v is None or isinstance(v, (str, bytes)) else str(v)
            return typed_values(spec, cells, self._markers)
        if any(isinstance(v, (str, bytes)) for v in clean):  # text: as a partner's file cell
            texts = [
                _NONE_CELL
                if v is None
                else v.decode("utf-8", "replace")
                if isinstance(v, bytes)
                else str(v)
                for v in clean
            ]
            return parse_cells(spec, texts, self._markers | {_NONE_CELL})
        numbers = np.empty(len(clean), dtype=np.float64)
        for i, v in enumerate(clean):
            try:
                numbers[i] = math.nan if v is None else float(v)
            except (TypeError, ValueError, OverflowError):
                raise InvalidValue(i, f"expected a number, got a {type(v).__name__}") from None
        return typed_values(spec, numbers, self._markers)

    # -- text cells (a CSV file)
    def encode_cells(
        self, columns: Mapping[str, Sequence[str]], *, path: str, lines: Sequence[int]
    ) -> F64:
        """Text cells per raw column (as read from a file), checked as a partner's node does.

        Raises:
            DataError: naming ``path``, the file line (``lines[row]``) and the column.
        """
        typed = []
        for spec in self.schema.features:
            try:
                typed.append(parse_cells(spec, columns[spec.name], self._markers))
            except InvalidValue as exc:
                raise DataError(
                    exc.message, path=path, line=lines[exc.row], column=spec.name
                ) from None
        return self._finish(typed)

    def _finish(self, typed: list[NDArray[Any]]) -> F64:
        """Encode, then put the DP mean where a missing cell left NaN (as the gateway does)."""
        x = self.encoding.encode(typed).astype(np.float64)
        gaps = np.isnan(x)
        if gaps.any():
            x = np.where(gaps, self._fill, x)
        if not np.isfinite(x).all():  # pragma: no cover - the checks above make this unreachable
            raise ConfigError("encoding left a non-finite value; nothing was sent")
        return x

    def decode(self, outputs: F64) -> F64:
        """A regression's decrypted outputs (n,) in the target's units, clipped to its range."""
        return self.encoding.decode_target(outputs)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names[:5])) + (
        f" and {len(names) - 5} more" if len(names) > 5 else ""
    )


# ---------------------------------------------------------------- transport
@dataclass(frozen=True, slots=True)
class Prediction:
    """Decrypted outputs.

    ``logits``: (n, k) raw outputs (one per class; for regression k = 1, the
    target rescaled into [-1, 1]). ``classes``: predicted class per sample
    (empty for regression). ``values``: a regression's predictions in the
    target's units (None for a classifier).
    """

    logits: F64  # (n, k)
    classes: list[str]  # predicted class name per sample
    layout: str
    values: F64 | None = None


class HEClient(HttpApiClient):
    """Talks to the HE endpoints; holds keys per model parameters in memory."""

    _what = "HE endpoint"

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
        super().__init__(base_url, headers=headers, timeout_s=timeout_s, transport=transport)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._request(method, path, **kwargs)

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
        x: Any,
        *,
        layout: Literal["auto", "vector", "batch"] = "auto",
        keys: HEKeys | None = None,
    ) -> Prediction:
        """Encrypt ``x``, infer, decrypt: outputs, class names or regression values.

        ``x`` is either raw rows (a pandas DataFrame, a mapping, or a sequence
        of mappings keyed by raw column name), encoded here from the model's
        public schema (:class:`RawEncoder`), or the model's numeric input
        (n, len(features)) as before. Every check of ``x`` runs before a key
        or a ciphertext is sent: a bad cell costs one metadata request.

        ``auto`` uses ``vector`` for one sample and ``batch`` otherwise. Without
        ``keys`` a fresh key pair is made in memory for this call.
        """
        meta = self.metadata(model_id)
        # A name resolves to a version per request; the metadata says which one
        # it was, so the context and the ciphertexts go to that very version even
        # if a newer one is registered meanwhile.
        model_id = str(meta.get("model_id") or model_id)
        encoder = RawEncoder.from_metadata(meta)
        matrix = _model_input(model_id, meta, encoder, x)
        output = meta["output"]
        class_names = list(output.get("classes", []))
        k = int(output.get("n_outputs", len(class_names)))
        regression = output.get("task") == "regression"
        chosen = layout if layout != "auto" else ("vector" if len(matrix) == 1 else "batch")
        params = params_from_metadata(meta)
        if keys is None:
            keys = HEKeys.create(
                params, galois=chosen == "vector", relin=bool(meta["keys"]["relin_keys"])
            )
        context_id = self.register(model_id, keys)
        if chosen == "vector":
            rows = [
                decrypt_vector(
                    keys,
                    self.infer(model_id, context_id, "vector", [encrypt_vector(keys, sample)])[0],
                    k,
                )
                for sample in matrix
            ]
            logits = np.vstack(rows)
        else:
            chunks = []
            for start in range(0, len(matrix), params.slots):
                part = matrix[start : start + params.slots]
                out = self.infer(model_id, context_id, "batch", encrypt_batch(keys, part))
                chunks.append(decrypt_batch(keys, out, len(part)))
            logits = np.vstack(chunks)
        if regression:
            # The model predicts the target rescaled into [-1, 1]; back to its units.
            values = logits[:, 0] if encoder is None else encoder.decode(logits[:, 0])
            return Prediction(logits=logits, classes=[], layout=chosen, values=values)
        predicted = [class_names[i] for i in logits.argmax(axis=1)]
        return Prediction(logits=logits, classes=predicted, layout=chosen)


def _model_input(model_id: str, meta: Mapping[str, Any], encoder: RawEncoder | None, x: Any) -> F64:
    """The (n, d) numeric input to encrypt: raw rows encoded, or a matrix checked."""
    if is_raw_rows(x):
        if encoder is None:
            raise ConfigError(
                f"model {model_id!r} publishes no data schema, so raw rows cannot be encoded "
                f"for it: pass its numeric input, one column per name in its 'features'"
            )
        return encoder.encode_rows(x)
    matrix = np.atleast_2d(np.asarray(x, dtype=np.float64))
    features = meta["features"]
    if matrix.ndim != 2 or matrix.shape[1] != len(features):
        raise ConfigError(f"expected {len(features)} features per sample, got {matrix.shape[-1]}")
    if not np.isfinite(matrix).all():
        raise ConfigError(
            "the numeric input holds NaN or infinity, which would encrypt to garbage: "
            "pass raw rows to have missing values imputed from the model's schema"
        )
    return matrix
