"""Open Inference Protocol v2 tensors: the transport-independent form and its codecs.

Why one module: REST (JSON, or JSON plus the *binary tensor data extension*)
and gRPC (typed ``contents`` or ``raw_*_contents``) describe the same thing —
a named, typed, shaped array — and every malformation must become the same
client error (:class:`~fedvault.errors.InvalidRequestError`, HTTP 400 / gRPC
INVALID_ARGUMENT), never a 500. Pure: no I/O, no clock. Error messages name the
tensor and the problem, never its values.

Binary tensor data extension (Triton/KServe): the request body is a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw
little-endian data of every input whose ``parameters.binary_data_size`` is set,
in input order; responses do the same for outputs asked for with
``parameters.binary_data`` (or request-level ``binary_data_output``).

``BYTES`` tensors (inputs only: a model's categorical columns) become NumPy
object arrays of :class:`bytes`. JSON ``data`` gives them as strings (stored
UTF-8 encoded); binary data (REST extension, gRPC ``raw_input_contents``) as
Triton lays them out: per element a 4-byte little-endian length, then its
bytes. Whether the bytes are UTF-8 text is the service's check, which knows
the row to name.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.errors import InvalidRequestError

__all__ = [
    "BYTES",
    "DATATYPES",
    "MAX_BYTES_ELEMENTS",
    "MAX_BYTES_ITEM",
    "BytesBudget",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "Tensor",
    "bytes_from_items",
    "check_datatype",
    "decode_rest_request",
    "encode_rest_response",
]

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
"""Numeric OIP datatypes and their little-endian NumPy dtypes (BYTES is separate)."""

BYTES = "BYTES"
"""Variable-length byte strings (inputs only; held as an object array of ``bytes``)."""

MAX_ELEMENTS = 16 * 1024 * 1024
"""Largest tensor accepted, in elements: a shape is checked before any allocation."""

MAX_BYTES_ELEMENTS = 1024 * 1024
"""Most BYTES elements in one request, all its BYTES tensors together: each is a
Python object (~40 bytes), so the numeric cap would allow ~0.7 GB per request."""

MAX_BYTES_ITEM = 4096
"""Longest BYTES element accepted, in bytes (a category name is at most 128 characters)."""

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named, typed, shaped array; ``data`` already has ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: NDArray[Any]
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request-level default decides


@dataclass(frozen=True, slots=True)
class InferRequest:
    model_name: str
    model_version: str | None
    inputs: Sequence[Tensor]
    outputs: Sequence[RequestedOutput] | None = None
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: Sequence[Tensor]
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in raw
    ):
        raise InvalidRequestError(f"tensor {name!r}: shape must be a list of integers")
    if any(d < 0 for d in raw):
        raise InvalidRequestError(f"tensor {name!r}: shape has a negative dimension")
    count = math.prod(raw)
    if count > MAX_ELEMENTS:
        raise InvalidRequestError(f"tensor {name!r}: {count} elements exceed {MAX_ELEMENTS}")
    return tuple(raw)


def dtype_of(name: str, datatype: Any) -> np.dtype[Any]:
    """The NumPy dtype of an OIP datatype; a client error for unknown or unserved ones."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidRequestError(f"tensor {name!r}: unsupported datatype {str(datatype)[:32]!r}")
    return DATATYPES[datatype]


def check_datatype(name: str, datatype: Any) -> str:
    """A served OIP datatype (numeric or BYTES) as given; a client error otherwise."""
    if datatype == BYTES:
        return BYTES
    dtype_of(name, datatype)
    return str(datatype)


class BytesBudget:
    """Counts one request's BYTES elements against :data:`MAX_BYTES_ELEMENTS`,
    from the shapes alone, before any element is read."""

    def __init__(self) -> None:
        self.used = 0

    def charge(self, name: str, shape: tuple[int, ...]) -> None:
        self.used += math.prod(shape)
        if self.used > MAX_BYTES_ELEMENTS:
            raise InvalidRequestError(
                f"tensor {name!r}: more than {MAX_BYTES_ELEMENTS} BYTES elements in one request"
            )


def _bytes_item(name: str, index: int, value: bytes) -> bytes:
    if len(value) > MAX_BYTES_ITEM:
        raise InvalidRequestError(
            f"tensor {name!r}: element {index + 1} is longer than {MAX_BYTES_ITEM} bytes"
        )
    return value


def bytes_from_buffer(
    name: str, shape: tuple[int, ...], raw: bytes | memoryview
) -> NDArray[np.object_]:
    """Triton's serialised BYTES (per element: uint32 LE length, then the bytes) → array."""
    count = math.prod(shape)
    view = memoryview(raw)
    end = len(view)
    out = np.empty(count, dtype=np.object_)
    pos = 0
    for i in range(count):
        if pos + 4 > end:
            raise InvalidRequestError(
                f"tensor {name!r}: BYTES data ends before element {i + 1} of {count}"
            )
        (size,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if size > MAX_BYTES_ITEM:
            raise InvalidRequestError(
                f"tensor {name!r}: element {i + 1} is longer than {MAX_BYTES_ITEM} bytes"
            )
        if pos + size > end:
            raise InvalidRequestError(f"tensor {name!r}: BYTES data ends inside element {i + 1}")
        out[i] = bytes(view[pos : pos + size])
        pos += size
    if pos != end:
        raise InvalidRequestError(
            f"tensor {name!r}: {end - pos} data bytes after its {count} BYTES elements"
        )
    return out.reshape(shape)


def bytes_from_items(
    name: str, shape: tuple[int, ...], items: Sequence[bytes]
) -> NDArray[np.object_]:
    """gRPC ``bytes_contents`` (one entry per element, row-major) → array of ``shape``."""
    count = math.prod(shape)
    if len(items) != count:
        raise InvalidRequestError(
            f"tensor {name!r}: {len(items)} data elements do not fill shape {list(shape)}"
        )
    out = np.empty(count, dtype=np.object_)
    for i, item in enumerate(items):
        out[i] = _bytes_item(name, i, bytes(item))
    return out.reshape(shape)


def bytes_from_list(name: str, shape: tuple[int, ...], data: Any) -> NDArray[np.object_]:
    """JSON ``data`` of strings (flat or nested, row-major) → array of UTF-8 ``bytes``."""
    if not isinstance(data, list):
        raise InvalidRequestError(f"tensor {name!r}: data must be a list")
    count = math.prod(shape)
    out = np.empty(count, dtype=np.object_)
    filled = 0
    stack = [iter(data)]  # iterative: nesting depth is the client's choice
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise InvalidRequestError(f"tensor {name!r}: BYTES data must be strings")
            if filled == count:
                raise InvalidRequestError(
                    f"tensor {name!r}: more data elements than shape {list(shape)} holds"
                )
            try:
                encoded = item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(
                    f"tensor {name!r}: element {filled + 1} is not valid Unicode text"
                ) from None
            out[filled] = _bytes_item(name, filled, encoded)
            filled += 1
        else:
            stack.pop()
    if filled != count:
        raise InvalidRequestError(
            f"tensor {name!r}: {filled} data elements do not fill shape {list(shape)}"
        )
    return out.reshape(shape)


def from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> NDArray[Any]:
    """Little-endian raw bytes → array of ``shape``; the size must match exactly."""
    if datatype == BYTES:
        return bytes_from_buffer(name, shape, raw)
    dtype = dtype_of(name, datatype)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequestError(
            f"tensor {name!r}: {len(raw)} data bytes, expected {expected} for shape "
            f"{list(shape)} {datatype}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def from_list(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> NDArray[Any]:
    """JSON ``data`` (flat or nested, row-major) → array of ``shape``."""
    if datatype == BYTES:
        return bytes_from_list(name, shape, data)
    dtype = dtype_of(name, datatype)
    if not isinstance(data, list):
        raise InvalidRequestError(f"tensor {name!r}: data must be a list")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequestError(
            f"tensor {name!r}: data is not a regular array of {datatype} values"
        ) from None
    if arr.dtype == np.object_ or arr.size != math.prod(shape):
        raise InvalidRequestError(
            f"tensor {name!r}: {arr.size} data elements do not fill shape {list(shape)}"
        )
    if datatype != "BOOL" and any(isinstance(v, bool) for v in _first(data)):
        raise InvalidRequestError(f"tensor {name!r}: booleans given for {datatype}")
    return arr.reshape(shape)


def _first(data: list[Any]) -> list[Any]:
    """The first innermost list (enough to catch JSON ``true`` sent as a number)."""
    while data and isinstance(data[0], list):
        data = data[0]
    return data


def _parameters(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"{where}: parameters must be an object")
    return raw


def decode_rest_request(
    model_name: str, model_version: str | None, body: bytes, header_length: str | None
) -> InferRequest:
    """Parse a REST infer body, JSON alone or JSON header + binary tensor data.

    Every way the body or header can be malformed is an
    :class:`~fedvault.errors.InvalidRequestError` (400), never another exception (500).
    """
    if header_length is not None:
        # ASCII digits only: str.isdigit() also passes '²' (which int() refuses)
        # and '١' (which it reads); and int() refuses more than 4,300 digits.
        if (
            not (header_length.isascii() and header_length.isdigit())
            or len(header_length) > 19
            or int(header_length) > len(body)
        ):
            raise InvalidRequestError("Inference-Header-Content-Length is not a valid length")
        split = int(header_length)
        head, tail = body[:split], memoryview(body)[split:]
    else:
        head, tail = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequestError("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("request needs a non-empty 'inputs' list")
    inputs: list[Tensor] = []
    offset = 0
    budget = BytesBudget()
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequestError(f"input {i}: needs a string 'name'")
        name = item["name"][:128]
        shape = _shape(name, item.get("shape"))
        # An unknown or missing datatype is a 400 before any data.
        datatype = check_datatype(name, item.get("datatype"))
        if datatype == BYTES:
            budget.charge(name, shape)
        params = _parameters(f"input {name!r}", item.get("parameters"))
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequestError(f"tensor {name!r}: bad binary_data_size")
            if offset + size > len(tail):
                raise InvalidRequestError(f"tensor {name!r}: binary data is shorter than declared")
            data = from_bytes(name, datatype, shape, bytes(tail[offset : offset + size]))
            offset += size
        else:
            if "data" not in item:
                raise InvalidRequestError(f"tensor {name!r}: needs 'data' or binary_data_size")
            data = from_list(name, datatype, shape, item["data"])
        inputs.append(Tensor(name, datatype, shape, data, params))
    if offset != len(tail):
        raise InvalidRequestError("binary data is longer than the inputs declare")
    outputs: list[RequestedOutput] | None = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise InvalidRequestError("'outputs' must be a list")
        outputs = []
        for j, out in enumerate(doc["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise InvalidRequestError(f"output {j}: needs a string 'name'")
            oparams = _parameters(f"output {j}", out.get("parameters"))
            binary = oparams.get("binary_data")
            outputs.append(
                RequestedOutput(out["name"][:128], bool(binary) if binary is not None else None)
            )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError("'id' must be a string")
    return InferRequest(
        model_name,
        model_version,
        inputs,
        outputs,
        request_id,
        _parameters("request", doc.get("parameters")),
    )


def wants_binary(request: InferRequest, name: str) -> bool:
    """Whether output ``name`` goes back as binary data (per-output setting wins)."""
    default = bool(request.parameters.get("binary_data_output", False))
    for out in request.outputs or ():
        if out.name == name and out.binary is not None:
            return out.binary
    return default


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def encode_rest_response(
    request: InferRequest, response: InferResponse
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for t in response.outputs:
        item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if wants_binary(request, t.name):
            raw = np.ascontiguousarray(t.data, dtype=DATATYPES[t.datatype]).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            item["data"] = t.data.ravel().tolist()
        outputs.append(item)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    head = _COMPACT.encode(doc).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
