"""What crosses the wire between coordinator and partner nodes.

Flower carries typed records (``ArrayRecord``, ``ConfigRecord``,
``MetricRecord``) between processes; this module names the records and keys
both sides use, and packs the few composite values (payload caches, charges)
so that ``server`` and ``clients`` never import each other.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedvault.errors import ConfigError
from fedvault.privacy import PrivacyCharge

# Message actions (Flower message types are "<category>.<action>").
QUERY_STATS = "query.stats"
QUERY_BOUNDS = "query.bounds"
TRAIN = "train"
EVALUATE = "evaluate"

# Record names inside a message's RecordDict.
RUN = "run"  # ConfigRecord: run id, round, hyperparameters
MODEL = "model"  # ArrayRecord: parameters in ModelSpec order
SCALER = "scaler"  # ArrayRecord: mean, std
SUMS = "sums"  # ArrayRecord: noisy Σs, Σs², count
HISTOGRAMS = "histograms"  # ArrayRecord: noisy counts per (column, bin) of the bounds query
PARTNER = "partner"  # ConfigRecord: partner name and example counts
CHARGE = "charge"  # ConfigRecord: the PrivacyCharge this reply paid
METRICS = "metrics"  # MetricRecord
REFUSAL = "refusal"  # ConfigRecord: code + message; the node declined

# Refusal codes a node may answer with instead of a result.
REFUSE_BUDGET = "budget-exceeded"
REFUSE_DATA = "data-invalid"
REFUSE_REQUEST = "bad-request"
REFUSE_CONFLICT = "conflict"


def _field(record: Mapping[str, object], key: str, expected: str) -> object:
    try:
        return record[key]
    except KeyError:
        raise ConfigError(f"record field {key!r}: expected {expected}, but it is missing") from None


def config_str(record: Mapping[str, object], key: str) -> str:
    """``record[key]`` as a str; ConfigError if missing or not a str."""
    value = _field(record, key, "str")
    if not isinstance(value, str):
        raise ConfigError(f"record field {key!r}: expected str, got {type(value).__name__}")
    return value


def config_int(record: Mapping[str, object], key: str) -> int:
    """``record[key]`` as an int (a bool is not an int); ConfigError otherwise."""
    value = _field(record, key, "int")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"record field {key!r}: expected int, got {type(value).__name__}")
    return value


def config_float(record: Mapping[str, object], key: str) -> float:
    """``record[key]`` as a float (an int is accepted, a bool is not); ConfigError otherwise."""
    value = _field(record, key, "float")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"record field {key!r}: expected float, got {type(value).__name__}")
    return float(value)


def config_bool(record: Mapping[str, object], key: str) -> bool:
    """``record[key]`` as a bool; ConfigError if missing or not a bool."""
    value = _field(record, key, "bool")
    if not isinstance(value, bool):
        raise ConfigError(f"record field {key!r}: expected bool, got {type(value).__name__}")
    return value


def metric_float(record: Mapping[str, object], key: str) -> float:
    """A scalar metric as a float (int accepted, bool and lists not); ConfigError otherwise."""
    return config_float(record, key)


def metric_floats(record: Mapping[str, object], key: str, length: int) -> list[float]:
    """A list metric of exactly ``length`` finite numbers; ConfigError otherwise."""
    value = _field(record, key, "list of float")
    if not isinstance(value, list) or len(value) != length:
        raise ConfigError(f"record field {key!r}: expected a list of {length} numbers")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ConfigError(f"record field {key!r}: expected finite numbers")
        out.append(float(item))
    return out


def charge_to_record(charge: PrivacyCharge) -> dict[str, str | int | float]:
    return charge.to_dict()


def charge_from_record(record: dict[str, Any]) -> PrivacyCharge:
    try:
        return PrivacyCharge(
            run_id=str(record["run_id"]),
            round=int(record["round"]),
            mechanism=str(record["mechanism"]),
            noise_multiplier=float(record["noise_multiplier"]),
            sample_rate=float(record["sample_rate"]),
            steps=int(record["steps"]),
            max_grad_norm=float(record["max_grad_norm"]),
            delta=float(record["delta"]),
            accountant=str(record["accountant"]),
            accountant_version=str(record["accountant_version"]),
            epsilon_after=float(record["epsilon_after"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed privacy charge record: {exc}") from None


def pack_payload(arrays: dict[str, list[NDArray[Any]]], meta: dict[str, Any]) -> bytes:
    """Arrays (no pickle) + JSON metadata in one blob, for the node's reply cache."""
    flat: dict[str, NDArray[Any]] = {
        "__meta__": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    }
    for name, values in arrays.items():
        for i, v in enumerate(values):
            flat[f"{name}/{i}"] = v
    buf = io.BytesIO()
    save_arrays(buf, flat)
    return buf.getvalue()


def save_arrays(file: io.BytesIO, arrays: Mapping[str, NDArray[Any]]) -> None:
    """``np.savez(file, **arrays)``, typed: the keys become the archive's names."""
    kwds: dict[str, Any] = dict(arrays)
    np.savez(file, **kwds)


def unpack_payload(blob: bytes) -> tuple[dict[str, list[NDArray[Any]]], dict[str, Any]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        meta = json.loads(npz["__meta__"].tobytes().decode())
        arrays: dict[str, list[NDArray[Any]]] = {}
        keys = sorted(
            (k for k in npz.files if k != "__meta__"),
            key=lambda k: (k.split("/")[0], int(k.split("/")[1])),
        )
        for key in keys:
            arrays.setdefault(key.split("/")[0], []).append(npz[key])
    return arrays, meta
