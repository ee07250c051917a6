"""The gateway serves a model's raw schema columns: one OIP input per column.

Against the real gateway (uvicorn and grpc.aio on loopback, sealed registry
models whose lineage carries their schema): REST JSON, REST binary data and
gRPC (stock tritonclient in a child process, as its protobuf descriptors
clash with ours in one process; our own stubs for ``bytes_contents``). The
expected outputs come from the partner side's path — text cells through
:func:`fedvault.encoding.parse_cells`, the encoding, the model's scaler and
forward pass — so the gateway is checked to see a row as training saw it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from fedvault.datasets import load_table
from fedvault.encoding import encoding_for, parse_cells
from fedvault.modelspec import forward
from fedvault.schema import DataSchema, builtin_schema
from server.gateway.pb import grpc_service_pb2 as pb
from server.gateway.pb import grpc_service_pb2_grpc as pb_grpc
from server.gateway.rest import create_rest_app
from server.gateway.tensors import MAX_BYTES_ELEMENTS, MAX_BYTES_ITEM
from tests.gateway_support import (
    MODEL,
    Harness,
    build,
    expected_logits,
    features,
    grpc_server,
    register_schema_model,
)
from tests.he_support import live_server

ROOT = Path(__file__).resolve().parents[1]
FLCHAIN = builtin_schema("flchain")
DIAMONDS = builtin_schema("diamonds")
FL = "flchain-logreg"
DIA = "diamonds-linreg"

Columns = list[tuple[str, str, NDArray[Any]]]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("gw-raw"))
    register_schema_model(h, FL, FLCHAIN, seed=1)
    register_schema_model(h, DIA, DIAMONDS, seed=2)
    h.gw.service.repository.load_all()
    h.tokens["columns"], _ = h.gw.store.create_key("analyst", models=frozenset({FL, DIA, MODEL}))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness) -> Iterator[str]:
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


@pytest.fixture(scope="module")
def grpc_address(harness: Harness) -> Iterator[str]:
    with grpc_server(harness) as address:
        yield address


def _auth(h: Harness) -> dict[str, str]:
    return {"Authorization": f"Bearer {h.tokens['columns']}"}


# ------------------------------------------------------------------- the data
def _rows(table: str, picks: list[int]) -> list[list[str]]:
    """Feature cells of rows ``picks`` of a built-in table, as a partner's file has them."""
    raw = load_table(table)
    width = len(raw.schema.features)
    return [raw.rows[i][:width] for i in picks]


FL_ROWS = _rows("flchain", [0, 1, 2, 15, 21, 3])  # rows 15 and 21 lack creatinine ("NA")
DIA_ROWS = _rows("diamonds", [0, 1, 2, 3])


def frame(schema: DataSchema, rows: list[list[str]]) -> pd.DataFrame:
    """A DataFrame of text cells with the schema's pandas types (missing: NaN/None)."""
    df = pd.DataFrame(rows, columns=list(schema.feature_names))
    df = df.replace({cell: None for cell in schema.missing_values})
    for spec in schema.features:
        if spec.type == "boolean":
            df[spec.name] = df[spec.name].map({"1": True, "0": False})
        elif spec.numeric:
            df[spec.name] = pd.to_numeric(df[spec.name])
    return df


def frame_columns(df: pd.DataFrame, schema: DataSchema) -> Columns:
    """A DataFrame → one OIP input per column, as the model's metadata lists them.

    The mapping a client writes: categoricals as BYTES (UTF-8, "" when
    missing), booleans as BOOL, numbers as FP32 with NaN for a missing value.
    """
    out: Columns = []
    for spec in schema.features:
        column = df[spec.name]
        if spec.type == "categorical":
            texts = [b"" if pd.isna(v) else str(v).encode("utf-8") for v in column]
            out.append((spec.name, "BYTES", np.array(texts, dtype=np.object_)))
        elif spec.type == "boolean":
            out.append((spec.name, "BOOL", column.to_numpy(dtype=np.bool_)))
        else:
            out.append((spec.name, "FP32", column.to_numpy(dtype=np.float32)))
    return out


def expected(h: Harness, name: str, schema: DataSchema, rows: list[list[str]]) -> NDArray[Any]:
    """What training's path makes of these text rows: logits, or the value in target units."""
    model = h.gw.service.repository.resolve(name, None)
    encoding = encoding_for(schema)
    missing = frozenset(schema.missing_values)
    typed = [
        parse_cells(spec, [row[j] for row in rows], missing)
        for j, spec in enumerate(schema.features)
    ]
    out = forward(model.spec, model.params, model.scaler.apply(encoding.encode(typed)))
    return encoding.decode_target(out[:, 0]) if schema.is_regression else out


def _json_inputs(columns: Columns) -> list[dict[str, Any]]:
    items = []
    for name, datatype, arr in columns:
        if datatype == "BYTES":
            data: list[Any] = [v.decode("utf-8") for v in arr]
        else:  # JSON has no NaN: null is a missing number
            data = [None if isinstance(v, float) and math.isnan(v) else v for v in arr.tolist()]
        items.append({"name": name, "datatype": datatype, "shape": [len(arr)], "data": data})
    return items


def _infer(url: str, h: Harness, model: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, headers=_auth(h))


def _output(response: httpx.Response, name: str) -> NDArray[Any]:
    assert response.status_code == 200, response.text
    (out,) = [o for o in response.json()["outputs"] if o["name"] == name]
    return np.asarray(out["data"]).reshape(out["shape"])


# ------------------------------------------------------------------- metadata
def test_metadata_lists_one_input_per_column(harness: Harness, url: str, grpc_address: str) -> None:
    def meta(model: str) -> dict[str, Any]:
        r = httpx.get(f"{url}/v2/models/{model}", headers=_auth(harness))
        assert r.status_code == 200, r.text
        return dict(r.json())

    fl = meta(FL)
    assert fl["inputs"] == [
        {"name": "age", "datatype": "FP32", "shape": [-1]},
        {"name": "sex", "datatype": "BYTES", "shape": [-1]},
        {"name": "sample.yr", "datatype": "FP32", "shape": [-1]},
        {"name": "kappa", "datatype": "FP32", "shape": [-1]},
        {"name": "lambda", "datatype": "FP32", "shape": [-1]},
        {"name": "flc.grp", "datatype": "FP32", "shape": [-1]},
        {"name": "creatinine", "datatype": "FP32", "shape": [-1]},
        {"name": "mgus", "datatype": "BOOL", "shape": [-1]},
    ]
    assert [o["name"] for o in fl["outputs"]] == ["logits", "probabilities", "class"]
    dia = meta(DIA)
    assert [(i["name"], i["datatype"]) for i in dia["inputs"][:4]] == [
        ("carat", "FP32"),
        ("cut", "BYTES"),
        ("color", "BYTES"),
        ("clarity", "BYTES"),
    ]
    assert dia["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1]}]
    # All-numeric columns that refuse missing values: today's matrix, as before.
    assert meta(MODEL)["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 30]}]
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        m = stub.ModelMetadata(
            pb.ModelMetadataRequest(name=FL),
            metadata=(("authorization", _auth(harness)["Authorization"]),),
        )
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs][:2] == [
        ("age", "FP32", [-1]),
        ("sex", "BYTES", [-1]),
    ]


# ------------------------------------------------------------------ REST JSON
def test_rest_json_columns_match_training(harness: Harness, url: str) -> None:
    columns = frame_columns(frame(FLCHAIN, FL_ROWS), FLCHAIN)
    inputs = _json_inputs(columns)
    inputs[0].update(datatype="INT64")  # any numeric datatype, for an int column
    inputs.reverse()  # inputs are matched by name, not position
    r = _infer(url, harness, FL, {"inputs": inputs})
    want = expected(harness, FL, FLCHAIN, FL_ROWS)
    np.testing.assert_allclose(_output(r, "logits"), want, rtol=1e-5, atol=1e-5)
    assert _output(r, "class").tolist() == want.argmax(axis=1).tolist()
    # [-1, 1] columns are columns too.
    for item in inputs:
        item["shape"] = [len(FL_ROWS), 1]
    r = _infer(url, harness, FL, {"inputs": inputs, "outputs": [{"name": "logits"}]})
    np.testing.assert_allclose(_output(r, "logits"), want, rtol=1e-5, atol=1e-5)


def test_encoding_by_hand(harness: Harness, url: str) -> None:
    """One row encoded by hand: log1p, one-hot sex, creatinine imputed with its indicator."""
    row = ["60", "M", "1995", "1.2", "1.5", "3", "NA", "1"]
    x = np.array(
        [[60, 0, 1, 1995, math.log1p(1.2), math.log1p(1.5), 3, np.nan, 1, 1]], dtype=np.float32
    )
    model = harness.gw.service.repository.resolve(FL, None)
    want = forward(model.spec, model.params, model.scaler.apply(x))
    np.testing.assert_allclose(want, expected(harness, FL, FLCHAIN, [row]), rtol=1e-5, atol=1e-6)
    r = _infer(
        url, harness, FL, {"inputs": _json_inputs(frame_columns(frame(FLCHAIN, [row]), FLCHAIN))}
    )
    np.testing.assert_allclose(_output(r, "logits"), want, rtol=1e-5, atol=1e-5)


def test_missing_creatinine_is_imputed_missing_age_is_400(harness: Harness, url: str) -> None:
    df = frame(FLCHAIN, FL_ROWS)
    assert df["creatinine"].isna().sum() == 2  # the policy is mean: imputed
    r = _infer(url, harness, FL, {"inputs": _json_inputs(frame_columns(df, FLCHAIN))})
    np.testing.assert_allclose(
        _output(r, "logits"), expected(harness, FL, FLCHAIN, FL_ROWS), rtol=1e-5, atol=1e-5
    )
    window = harness.gw.metrics.windows[(FL, "1")].snapshot()
    assert len(window) > 0
    assert np.isfinite(window).all()  # drift sees an imputed value as 0
    df.loc[1, "age"] = np.nan  # the policy is refuse
    r = _infer(url, harness, FL, {"inputs": _json_inputs(frame_columns(df, FLCHAIN))})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "urn:fedvault:problem:invalid-request"
    detail = r.json()["detail"]
    assert "input 'age', row 2: missing value" in detail


def test_unknown_category_names_column_and_row(harness: Harness, url: str) -> None:
    df = frame(FLCHAIN, FL_ROWS)
    df.loc[2, "sex"] = "Q"
    r = _infer(url, harness, FL, {"inputs": _json_inputs(frame_columns(df, FLCHAIN))})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "input 'sex', row 3: unknown category 'Q'" in detail
    for other in ("97", "1997", "5.7"):  # row 1's values are not echoed
        assert other not in detail


def test_diamonds_regression_returns_value(harness: Harness, url: str) -> None:
    columns = frame_columns(frame(DIAMONDS, DIA_ROWS), DIAMONDS)
    r = _infer(url, harness, DIA, {"inputs": _json_inputs(columns)})
    value = _output(r, "value")
    want = expected(harness, DIA, DIAMONDS, DIA_ROWS)
    assert value.shape == (len(DIA_ROWS),)
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=0.5)
    assert ((value >= 0) & (value <= 20000)).all()  # the target's public range
    assert len(set(value.tolist())) > 1
    r = _infer(
        url, harness, DIA, {"inputs": _json_inputs(columns), "outputs": [{"name": "logits"}]}
    )
    assert r.status_code == 400, r.text
    assert "outputs are ['value']" in r.json()["detail"]


def test_the_sdk_sends_a_dataframe_or_dicts_as_the_metadata_says(
    harness: Harness, url: str
) -> None:
    from fedvault.errors import DataError, InvalidRequestError
    from fedvault.gateway_client import GatewayClient

    df = frame(FLCHAIN, FL_ROWS)
    want = expected(harness, FL, FLCHAIN, FL_ROWS)
    with GatewayClient(url, api_key=harness.tokens["columns"]) as gw:
        out = gw.infer(FL, df)  # two rows lack creatinine (NaN): imputed
        np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-5)
        assert out["class"].tolist() == want.argmax(axis=1).tolist()  # class indices
        # The same rows as dicts, extra columns ignored, None for a gap.
        records = [
            {**{k: (None if pd.isna(v) else v) for k, v in row.items()}, "id": i}
            for i, row in enumerate(df.to_dict("records"))
        ]
        np.testing.assert_allclose(gw.infer(FL, records)["logits"], want, rtol=1e-5, atol=1e-5)
        value = gw.infer(DIA, frame(DIAMONDS, DIA_ROWS))["value"]
        np.testing.assert_allclose(
            value, expected(harness, DIA, DIAMONDS, DIA_ROWS), rtol=1e-4, atol=0.5
        )
        # A numeric-matrix model still takes its (n, d) array.
        x = features(3)
        np.testing.assert_allclose(
            gw.infer(MODEL, x)["logits"], expected_logits(harness, "2", x), rtol=1e-5, atol=1e-5
        )
        # The gateway's refusal comes back typed, naming the column and the row.
        df.loc[2, "sex"] = "Q"
        with pytest.raises(InvalidRequestError, match=r"input 'sex', row 3: unknown category"):
            gw.infer(FL, df)
        with pytest.raises(DataError, match="row 1 has no value") as info:
            gw.infer(FL, [{"age": 70}])
        assert info.value.column == "sex"


def test_legacy_features_matrix_still_serves_breast_cancer(harness: Harness, url: str) -> None:
    x = features(4)
    body = {
        "inputs": [{"name": "features", "shape": [4, 30], "datatype": "FP32", "data": x.tolist()}]
    }
    r = _infer(url, harness, MODEL, body)
    want = expected_logits(harness, "2", x)
    np.testing.assert_allclose(_output(r, "logits"), want, rtol=1e-5, atol=1e-5)
    # The same rows as raw columns (FP64 here) give the same answer.
    names = builtin_schema("breast-cancer").feature_names
    inputs = [
        {"name": n, "shape": [4], "datatype": "FP64", "data": x[:, j].astype(np.float64).tolist()}
        for j, n in enumerate(names)
    ]
    np.testing.assert_allclose(
        _output(_infer(url, harness, MODEL, {"inputs": inputs}), "logits"),
        want,
        rtol=1e-5,
        atol=1e-5,
    )
    # A value outside the schema's public bounds is named by column and row.
    x[1, 3] = -5.0
    body["inputs"][0]["data"] = x.tolist()  # type: ignore[index]
    r = _infer(url, harness, MODEL, body)
    assert r.status_code == 400, r.text
    assert "input 'features', column 4 ('mean_area'), row 2: value -5 outside" in r.json()["detail"]


def test_a_model_with_categoricals_takes_no_matrix(harness: Harness, url: str) -> None:
    body = {
        "inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]
    }
    r = _infer(url, harness, FL, body)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "missing 'age', 'sex'" in detail
    assert "unknown 'features'" in detail


def _inputs(columns: Columns) -> list[dict[str, Any]]:
    return _json_inputs(columns)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda ins: ins.pop(1), "missing 'sex'"),
        (lambda ins: ins.append({**ins[0], "name": "height"}), "unknown 'height'"),
        (lambda ins: ins.append(dict(ins[0])), "repeated 'age'"),
        (lambda ins: ins[1].update(datatype="FP32", data=[0.0] * 6), "'sex' is categorical"),
        (lambda ins: ins[0].update(datatype="BOOL", data=[True] * 6), "'age' must be numeric"),
        (lambda ins: ins[0].update(shape=[3, 2]), "'age' must have shape [-1]"),
        (
            lambda ins: ins[2].update(shape=[5], data=ins[2]["data"][:5]),
            "'sample.yr' has 5 rows, input 'age' has 6",
        ),
        (
            lambda ins: ins[1].update(data=["F", "M", 3, "F", "F", "F"]),
            "BYTES data must be strings",
        ),
        (lambda ins: ins[1].update(data=["F"] * 5), "5 data elements do not fill shape [6]"),
        (lambda ins: ins[7].update(datatype="INT32", data=[0, 1, 2, 0, 0, 0]), "'mgus', row 3"),
        (lambda ins: ins[3].update(data=[1e9] * 6), "'kappa', row 1: value 1000000000 outside"),
        (
            lambda ins: ins[1].update(data=["F"] * 5 + ["x" * (MAX_BYTES_ITEM + 1)]),
            f"element 6 is longer than {MAX_BYTES_ITEM} bytes",
        ),
        (
            lambda ins: ins[1].update(shape=[MAX_BYTES_ELEMENTS + 1]),
            f"more than {MAX_BYTES_ELEMENTS} BYTES elements in one request",
        ),
    ],
)
def test_bad_column_requests_are_400(harness: Harness, url: str, mutate: Any, needle: str) -> None:
    inputs = _inputs(frame_columns(frame(FLCHAIN, FL_ROWS), FLCHAIN))
    mutate(inputs)
    r = _infer(url, harness, FL, {"inputs": inputs})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "urn:fedvault:problem:invalid-request"
    assert needle in r.json()["detail"], r.json()["detail"]


# ---------------------------------------------------------------- REST binary
def _binary_body(columns: Columns, *, corrupt: str | None = None) -> tuple[bytes, str]:
    """A binary-extension body: JSON header, then each input's bytes (BYTES length-prefixed)."""
    head: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, datatype, arr in columns:
        if datatype == "BYTES":
            items = list(arr)
            if corrupt == "utf8" and name == "sex":
                items[1] = b"\xff\xfe"
            blob = b"".join(len(v).to_bytes(4, "little") + v for v in items)
            if corrupt == "length" and name == "sex":
                blob = blob[:-1]
        else:
            blob = arr.astype({"FP32": "<f4", "BOOL": "?"}[datatype]).tobytes()
        head.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": [len(arr)],
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = json.dumps({"inputs": head}).encode()
    return header + b"".join(blobs), str(len(header))


def test_rest_binary_bytes(harness: Harness, url: str) -> None:
    columns = frame_columns(frame(FLCHAIN, FL_ROWS), FLCHAIN)
    target = f"{url}/v2/models/{FL}/infer"

    def post(body: bytes, length: str) -> httpx.Response:
        headers = {**_auth(harness), "Inference-Header-Content-Length": length}
        return httpx.post(target, content=body, headers=headers)

    r = post(*_binary_body(columns))
    np.testing.assert_allclose(
        _output(r, "logits"), expected(harness, FL, FLCHAIN, FL_ROWS), rtol=1e-5, atol=1e-5
    )
    r = post(*_binary_body(columns, corrupt="utf8"))
    assert r.status_code == 400, r.text
    assert "input 'sex', row 2: not valid UTF-8 text" in r.json()["detail"]
    r = post(*_binary_body(columns, corrupt="length"))
    assert r.status_code == 400, r.text
    assert "tensor 'sex': BYTES data ends inside element 6" in r.json()["detail"]


# ------------------------------------------------------------- gRPC (our stubs)
def test_grpc_typed_bytes_contents(harness: Harness, grpc_address: str) -> None:
    columns = frame_columns(frame(FLCHAIN, FL_ROWS), FLCHAIN)
    req = pb.ModelInferRequest(model_name=FL, id="cols")
    for name, datatype, arr in columns:
        t = req.inputs.add(name=name, datatype=datatype, shape=[len(arr)])
        if datatype == "BYTES":
            t.contents.bytes_contents.extend(arr.tolist())
        elif datatype == "BOOL":
            t.contents.bool_contents.extend(arr.tolist())
        else:
            t.contents.fp32_contents.extend(arr.tolist())
    md = (("authorization", _auth(harness)["Authorization"]),)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(req, metadata=md)
        logits = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(-1, 2)
        np.testing.assert_allclose(
            logits, expected(harness, FL, FLCHAIN, FL_ROWS), rtol=1e-5, atol=1e-5
        )
        req.inputs[1].contents.bytes_contents[3] = b"\xc3"  # truncated UTF-8
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'sex', row 4: not valid UTF-8 text" in (err.value.details() or "")


# ---------------------------------------------------- stock tritonclient (child)
TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

job = json.loads(sys.stdin.read())
auth = "Bearer " + job["token"]
h = httpclient.InferenceServerClient(job["http"])
g = grpcclient.InferenceServerClient(job["grpc"])
DTYPES = {"FP32": np.float32, "BOOL": np.bool_}


def arrays(columns):
    for name, datatype, data in columns:
        if datatype == "BYTES":
            yield name, datatype, np.array([s.encode("utf-8") for s in data], dtype=np.object_)
        else:
            yield name, datatype, np.array(data, dtype=DTYPES[datatype])


out = {}
for call in job["calls"]:
    model, output, key = call["model"], call["output"], call["key"]
    for binary in (True, False):
        inputs = []
        for name, datatype, arr in arrays(call["columns"]):
            i = httpclient.InferInput(name, list(arr.shape), datatype)
            i.set_data_from_numpy(arr, binary_data=binary)
            inputs.append(i)
        where = key + ("/http-binary" if binary else "/http-json")
        try:
            res = h.infer(model, inputs, headers={"Authorization": auth})
            out[where] = res.as_numpy(output).tolist()
        except InferenceServerException as exc:
            out[where] = {"status": str(exc.status()), "message": exc.message()}
    inputs = []
    for name, datatype, arr in arrays(call["columns"]):
        i = grpcclient.InferInput(name, list(arr.shape), datatype)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    try:
        res = g.infer(model, inputs, headers={"authorization": auth})
        out[key + "/grpc"] = res.as_numpy(output).tolist()
    except InferenceServerException as exc:
        out[key + "/grpc"] = {"status": str(exc.status()), "message": exc.message()}
print(json.dumps(out))
"""


def _wire(columns: Columns) -> list[list[Any]]:
    return [
        [name, datatype, [v.decode("utf-8") for v in arr] if datatype == "BYTES" else arr.tolist()]
        for name, datatype, arr in columns
    ]


def test_stock_tritonclient_http_and_grpc(harness: Harness, url: str, grpc_address: str) -> None:
    fl = frame(FLCHAIN, FL_ROWS)
    bad = fl.copy()
    bad.loc[4, "sex"] = "unknown"
    job = {
        "http": url.removeprefix("http://"),
        "grpc": grpc_address,
        "token": harness.tokens["columns"],
        "calls": [
            {
                "key": "fl",
                "model": FL,
                "output": "logits",
                "columns": _wire(frame_columns(fl, FLCHAIN)),
            },
            {
                "key": "dia",
                "model": DIA,
                "output": "value",
                "columns": _wire(frame_columns(frame(DIAMONDS, DIA_ROWS), DIAMONDS)),
            },
            {
                "key": "bad",
                "model": FL,
                "output": "logits",
                "columns": _wire(frame_columns(bad, FLCHAIN)),
            },
        ],
    }
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    want_fl = expected(harness, FL, FLCHAIN, FL_ROWS)
    want_dia = expected(harness, DIA, DIAMONDS, DIA_ROWS)
    for via in ("http-binary", "http-json", "grpc"):
        np.testing.assert_allclose(out[f"fl/{via}"], want_fl, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[f"dia/{via}"], want_dia, rtol=1e-4, atol=0.5)
        assert "input 'sex', row 5: unknown category 'unknown'" in out[f"bad/{via}"]["message"]
    assert out["bad/http-binary"]["status"] == "400"
    assert out["bad/grpc"]["status"] == "StatusCode.INVALID_ARGUMENT"
