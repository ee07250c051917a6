"""A small client for the gateway's plaintext inference (Open Inference Protocol v2, REST).

Typical use::

    from fedvault.gateway_client import GatewayClient

    with GatewayClient("https://gateway:8080", api_key=token, verify="ca.pem") as gw:
        out = gw.infer("flchain-logreg", frame)     # a pandas DataFrame of raw columns
        out["probabilities"], out["class"]
        gw.infer("diamonds-linreg", rows)["value"]  # a list of dicts; price in dollars

Why a client at all, when stock ``tritonclient`` works: a model trained on a
schema takes one OIP input per raw column with its own datatype (FP32, BOOL,
BYTES for categories), and a caller holding a DataFrame would otherwise write
that mapping by hand (docs/own-data.md shows it). This client reads the
model's metadata and builds the request from it, so the columns, their order
and types always match what the server serves. It does no validation of its
own: the gateway checks every value against the schema and answers a 400
naming the column and row, which is raised here as the same error class the
server used (one problem-type table, :mod:`fedvault.errors`).

Missing values: ``None``, NaN or pandas' NA. A number goes as JSON ``null``
(JSON has no NaN), a category as ``""`` (a default missing marker); the
schema's policy then decides (impute, fill, or refuse).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

import httpx
import numpy as np
from numpy.typing import NDArray

from fedvault.errors import (
    ConfigError,
    DataError,
    FedvaultError,
    UnavailableError,
    error_for_problem_type,
)

__all__ = ["GatewayClient", "HttpApiClient", "raise_for_problem"]


def raise_for_problem(response: httpx.Response, what: str) -> None:
    """Raise the error class a fedvault server's problem+json names (4xx/5xx only)."""
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        # The stable type URI names the class (server.problem, one table).
        cls = error_for_problem_type(str(problem.get("type")))
        detail = str(problem.get("detail", ""))
    except (ValueError, AttributeError):
        cls, detail = FedvaultError, response.text[:200]
    message = f"{what} refused ({response.status_code}): {detail}"
    try:
        error = cls(message)
    except TypeError:  # classes with required fields (RateLimitedError)
        error = FedvaultError(message)
    raise error


def _missing(value: Any) -> bool:
    """None, a float NaN, or pandas' NA/NaT (recognised without importing pandas)."""
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _is_frame(rows: Any) -> bool:
    return hasattr(rows, "columns") and hasattr(rows, "iloc") and hasattr(rows, "to_numpy")


def _column(rows: Any, name: str) -> list[Any]:
    """One raw column's values from a DataFrame or a sequence of mappings."""
    if _is_frame(rows):
        if name not in rows.columns:
            raise DataError(f"the rows lack column {name!r}, an input of the model")
        return list(rows[name].tolist())
    values = []
    for i, record in enumerate(rows):
        if name not in record:
            raise DataError(f"row {i + 1} has no value (give None for a missing one)", column=name)
        values.append(record[name])
    return values


def _data(datatype: str, values: list[Any], name: str) -> list[Any]:
    """JSON ``data`` for one input; raises DataError for a value of the wrong kind."""
    out: list[Any] = []
    for i, v in enumerate(values):
        if _missing(v):
            out.append("" if datatype == "BYTES" else None)
        elif datatype == "BYTES":
            out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        elif datatype == "BOOL":
            if not isinstance(v, bool | np.bool_):
                raise DataError(
                    f"row {i + 1}: expected a boolean, got a {type(v).__name__}", column=name
                )
            out.append(bool(v))
        else:
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise DataError(
                    f"row {i + 1}: expected a number, got a {type(v).__name__}", column=name
                ) from None
            out.append(number if math.isfinite(number) else None)
    return out


class HttpApiClient:
    """One httpx client to a fedvault server; its problem+json refusals raised typed.

    Shared by this module's :class:`GatewayClient` and the encrypted-inference
    SDK (:class:`secure.client.HEClient`).
    """

    _what = "server"

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout_s: float,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self._base,
            headers=headers,
            timeout=timeout_s,
            verify=verify,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"cannot reach the {self._what} at {self._base} ({type(exc).__name__})"
            ) from None
        raise_for_problem(response, self._what)
        return response


class GatewayClient(HttpApiClient):
    """Plaintext inference against a fedvault gateway, rows in, named arrays out."""

    _what = "gateway"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout_s: float = 60.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``api_key``: an ``fvk_…`` key with a grant for the model (sent as a
        bearer token, never logged). ``verify``: TLS verification, or the path
        of the CA bundle that signed the gateway's certificate."""
        if not api_key or not api_key.strip():
            raise ConfigError("GatewayClient needs an api_key")
        super().__init__(
            base_url,
            headers={"Authorization": f"Bearer {api_key.strip()}"},
            timeout_s=timeout_s,
            verify=verify,
            transport=transport,
        )
        self._metadata: dict[tuple[str, str | None], dict[str, Any]] = {}

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, **kwargs).json()
        return body

    @staticmethod
    def _path(model: str, version: str | None) -> str:
        return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """The model's OIP metadata (inputs, outputs), fetched once per client."""
        key = (model, version)
        if key not in self._metadata:
            self._metadata[key] = self._call("GET", self._path(model, version))
        return self._metadata[key]

    def request_body(self, model: str, rows: Any, version: str | None = None) -> dict[str, Any]:
        """The OIP request for ``rows``, built from the model's metadata.

        ``rows``: a DataFrame or a sequence of mappings keyed by raw column
        (one mapping: one row); for a model served on a numeric matrix
        (input ``features``, shape ``[-1, d]``), also an (n, d) array.
        """
        inputs = self.metadata(model, version)["inputs"]
        if isinstance(rows, Mapping):
            rows = [rows]
        if (
            len(inputs) == 1
            and len(inputs[0]["shape"]) == 2
            and not (
                _is_frame(rows)
                or (isinstance(rows, Sequence) and rows and isinstance(rows[0], Mapping))
            )
        ):
            matrix: NDArray[np.float64] = np.atleast_2d(np.asarray(rows, dtype=np.float64))
            item = inputs[0]
            data = [None if not math.isfinite(v) else v for v in matrix.ravel().tolist()]
            shape = [int(matrix.shape[0]), int(matrix.shape[1])]
            return {
                "inputs": [
                    {
                        "name": item["name"],
                        "datatype": item["datatype"],
                        "shape": shape,
                        "data": data,
                    }
                ]
            }
        n = len(rows)
        body = []
        for item in inputs:
            name, datatype = str(item["name"]), str(item["datatype"])
            body.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": [n],
                    "data": _data(datatype, _column(rows, name), name),
                }
            )
        return {"inputs": body}

    def infer(
        self, model: str, rows: Any, *, version: str | None = None
    ) -> dict[str, NDArray[Any]]:
        """Run the model on ``rows`` (see :meth:`request_body`); outputs by name.

        Raises:
            DataError: a row lacks a column, or a value is of the wrong kind.
            InvalidRequestError: the gateway refused a value (the message
                names the input and the row), and the other classes of
                :mod:`fedvault.errors` for what the gateway answered.
        """
        body = self.request_body(model, rows, version)
        result = self._call("POST", self._path(model, version) + "/infer", json=body)
        outputs: dict[str, NDArray[Any]] = {}
        for out in result.get("outputs", []):
            values = np.asarray(out["data"], dtype=object if out["datatype"] == "BYTES" else None)
            outputs[str(out["name"])] = values.reshape([int(s) for s in out["shape"]])
        return outputs
