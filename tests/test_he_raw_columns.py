"""Encrypted inference from raw columns: the caller encodes, the answers match plaintext.

Everything is real: sealed registry models trained (here: initialised) on the
flchain schema (a categorical, a ``missing = "mean"`` feature, ``log1p``, a
boolean) and on diamonds (regression), the gateway on uvicorn serving both
the plaintext OIP endpoints and the HE extension, the stand-alone ``he serve``
app over the same registry, TenSEAL on the caller's side, and ``fedvault he
predict`` as a child process. Each encrypted answer is compared with the
plaintext gateway's answer for the same raw rows: the caller's encoding
(one-hot, the published DP imputation means, the indicator) must reproduce
exactly the vector the gateway builds, or the two would differ by far more
than CKKS noise.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedvault.encoding import encoding_for
from fedvault.errors import ConfigError, DataError
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.schema import DataSchema, builtin_schema, to_json
from fedvault.stats import Scaler
from secure.client import HEClient, RawEncoder
from secure.he.plan import compile_plan
from server.gateway.rest import create_rest_app
from server.he_api import RegistryCatalog, create_app, registry_model_source
from server.registry import ModelRegistry, load_model_keys
from server.store import FederationStore
from tests.gateway_support import LINEAGE, Harness, build
from tests.he_support import live_server
from tests.test_gateway_raw_columns import DIA_ROWS, FL_ROWS, _json_inputs, frame, frame_columns

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FLCHAIN = builtin_schema("flchain")
DIAMONDS = builtin_schema("diamonds")
FL = "flchain-he"
DIA = "diamonds-he"
DIA_MLP = "diamonds-he-mlp"
TOL = 1e-3  # CKKS at scale 2^40 against the gateway's float32: ~1e-5 in practice


def _register(h: Harness, name: str, schema: DataSchema, spec: ModelSpec, seed: int) -> str:
    """A model on ``schema``'s encoded inputs whose scaler is *not* the bounds' centre.

    A random DP-like mean per input makes the imputation mean matter: encoding a
    missing cell with anything but the published mean changes the answer.
    """
    encoding = encoding_for(schema)
    rng = np.random.default_rng(seed)
    centre, radius = (encoding.lo + encoding.hi) / 2, (encoding.hi - encoding.lo) / 2
    scaler = Scaler(
        mean=centre + radius * rng.uniform(-0.5, 0.5, encoding.width),
        std=radius * rng.uniform(0.3, 0.8, encoding.width),
    )
    # Small enough weights that a regression's predictions stay inside the
    # target's range (the decoding clips; a clipped value would hide errors).
    scale = 0.1 if schema.is_regression else 2.0
    params = [scale * p for p in init_parameters(spec, seed)]
    lineage = {**LINEAGE, "dataset": schema.name, "task": schema.task}
    lineage["schema"] = json.loads(to_json(schema))
    store = FederationStore(h.home / "federation.db")
    try:
        registry = ModelRegistry(store, h.home / "registry", load_model_keys(h.home / "keys"))
        return registry.register(
            name=name, run_id="run-gw", spec=spec, params=params, scaler=scaler, lineage=lineage
        )
    finally:
        store.close()


def _spec(schema: DataSchema, **kw: Any) -> ModelSpec:
    regression = schema.is_regression
    return ModelSpec(
        n_features=encoding_for(schema).width,
        n_classes=schema.n_outputs,
        task="regression" if regression else "classification",
        loss="squared" if regression else "cross-entropy",
        **kw,
    )


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("he-raw"))
    h.ids[FL] = _register(h, FL, FLCHAIN, _spec(FLCHAIN, kind="logreg"), 1)
    h.ids[DIA] = _register(h, DIA, DIAMONDS, _spec(DIAMONDS, kind="logreg"), 2)
    mlp = _spec(DIAMONDS, kind="mlp", hidden=8, activation="quad", quad_alpha=0.5)
    h.ids[DIA_MLP] = _register(h, DIA_MLP, DIAMONDS, mlp, 3)
    h.gw.service.repository.load_all()
    h.tokens["he"], _ = h.gw.store.create_key("analyst", models=frozenset({FL, DIA, DIA_MLP}))
    yield h
    h.gw.he_service.close()
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness) -> Iterator[str]:
    """The gateway: plaintext OIP and the HE extension, behind API keys."""
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


@pytest.fixture(scope="module")
def standalone(harness: Harness) -> Iterator[str]:
    """``fedvault he serve``'s app over the same registry (asserted caller header)."""

    def open_registry() -> tuple[FederationStore, ModelRegistry]:
        store = FederationStore(harness.home / "federation.db")
        keys = load_model_keys(harness.home / "keys", signing=False)
        return store, ModelRegistry(store, harness.home / "registry", keys)

    from secure.he.service import HEService

    service = HEService(registry_model_source(open_registry))
    try:
        with live_server(create_app(service, RegistryCatalog(open_registry))) as base:
            yield base
    finally:
        service.close()


def _auth(h: Harness) -> dict[str, str]:
    return {"Authorization": f"Bearer {h.tokens['he']}"}


def _plaintext(url: str, h: Harness, model: str, schema: DataSchema, rows: list[list[str]]) -> Any:
    """The plaintext gateway's answer for raw text rows: logits, or the value in target units."""
    inputs = _json_inputs(frame_columns(frame(schema, rows), schema))
    r = httpx.post(f"{url}/v2/models/{model}/infer", json={"inputs": inputs}, headers=_auth(h))
    assert r.status_code == 200, r.text
    out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    return out["value"] if schema.is_regression else out["logits"]


def _records(schema: DataSchema, rows: list[list[str]]) -> list[dict[str, Any]]:
    """Rows as dicts of Python values (None: missing), as a caller's JSON would hold them."""
    records = frame(schema, rows).astype(object).to_dict(orient="records")
    return [{k: (None if v is None or v != v else v) for k, v in r.items()} for r in records]


class Recorder(httpx.HTTPTransport):
    """A real HTTP transport that remembers what it sent (method, path)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return super().handle_request(request)


# ------------------------------------------------------------------ metadata
def test_metadata_publishes_schema_and_dp_imputation_means(harness: Harness, url: str) -> None:
    with HEClient(url, api_key=harness.tokens["he"]) as client:
        fl, dia = client.metadata(FL), client.metadata(DIA)
    encoding = encoding_for(FLCHAIN)
    assert fl["features"] == list(encoding.names)
    assert fl["schema"] == json.loads(to_json(FLCHAIN))
    scaler = harness.gw.service.repository.resolve(FL, None).scaler
    j = encoding.names.index("creatinine")
    # Exactly the scaler's mean of the (log1p-encoded) imputed input, nothing else.
    assert fl["encoding"]["missing_means"] == {"creatinine": float(scaler.mean[j])}
    assert "post-processing" in fl["encoding"]["privacy"]
    assert fl["output"]["task"] == "classification"
    assert fl["output"]["classes"] == ["0", "1"]
    assert dia["output"]["task"] == "regression"
    assert dia["output"]["n_outputs"] == 1
    assert dia["output"]["classes"] == []
    assert dia["output"]["target"] == {
        "column": "price",
        "min": 0.0,
        "max": 20000.0,
        "centre": 10000.0,
        "radius": 10000.0,
    }
    assert dia["encoding"]["missing_means"] == {}  # diamonds imputes nothing


# --------------------------------------------------------------- classification
@pytest.mark.parametrize("layout", ["vector", "batch"])
def test_encrypted_raw_rows_match_plaintext_gateway(
    harness: Harness, url: str, layout: str
) -> None:
    """flchain: one-hot sex, log1p, two rows lacking creatinine (DP mean + indicator)."""
    df = frame(FLCHAIN, FL_ROWS)
    assert df["creatinine"].isna().sum() == 2
    want = _plaintext(url, harness, FL, FLCHAIN, FL_ROWS)
    with HEClient(url, api_key=harness.tokens["he"]) as client:
        result = client.predict(FL, df, layout=layout)  # type: ignore[arg-type]
        assert result.layout == layout
        np.testing.assert_allclose(result.logits, want, atol=TOL)
        assert result.classes == [FLCHAIN.classes[i] for i in want.argmax(axis=1)]
        assert result.values is None
        if layout == "batch":  # a list of dicts is the same rows
            again = client.predict(FL, _records(FLCHAIN, FL_ROWS), layout="batch")
            np.testing.assert_allclose(again.logits, want, atol=TOL)


def test_the_imputed_mean_matters(harness: Harness) -> None:
    """Guard of the test above: another fill for the missing creatinine changes the answer."""
    model = harness.gw.service.repository.resolve(FL, None)
    plan = compile_plan(model.spec, model.params, model.scaler)
    j = encoding_for(FLCHAIN).names.index("creatinine")
    encoder = RawEncoder(FLCHAIN, {"creatinine": float(model.scaler.mean[j])})
    x = encoder.encode_rows(_records(FLCHAIN, [FL_ROWS[3]]))
    assert FL_ROWS[3][6] == "NA"
    assert x[0, j] == model.scaler.mean[j]
    assert x[0, j + 1] == 1.0  # the indicator
    imputed = plan.forward(x)
    for fill in (0.0, encoder.encoding.hi[j]):  # what a caller unaware of the mean might send
        x[0, j] = fill
        assert np.abs(plan.forward(x) - imputed).max() > 20 * TOL


# ------------------------------------------------------------------ regression
@pytest.mark.parametrize(("model", "layout"), [(DIA, "vector"), (DIA, "batch"), (DIA_MLP, "batch")])
def test_encrypted_regression_matches_plaintext(
    harness: Harness, url: str, model: str, layout: str
) -> None:
    rows = DIA_ROWS[:1] if layout == "vector" else DIA_ROWS
    want = _plaintext(url, harness, model, DIAMONDS, rows)
    assert len(set(want.tolist())) == len(rows)  # distinct values, none clipped
    assert ((want > 0) & (want < 20000)).all()
    with HEClient(url, api_key=harness.tokens["he"]) as client:
        result = client.predict(model, frame(DIAMONDS, rows), layout=layout)  # type: ignore[arg-type]
    assert result.classes == []
    assert result.logits.shape == (len(rows), 1)
    assert result.values is not None
    np.testing.assert_allclose(result.values, want, atol=0.5)  # dollars; radius 10,000
    # The undecoded output is the rescaled target: value = 10000 + 10000 · output.
    np.testing.assert_allclose(10000 + 10000 * result.logits[:, 0], result.values, atol=1e-6)


# --------------------------------------------------------------------- refusals
def test_unknown_category_is_refused_before_anything_is_sent(harness: Harness, url: str) -> None:
    df = frame(FLCHAIN, FL_ROWS)
    df.loc[2, "sex"] = "Q"
    transport = Recorder()
    with (
        HEClient(url, api_key=harness.tokens["he"], transport=transport) as client,
        pytest.raises(DataError) as err,
    ):
        client.predict(FL, df)
    message = str(err.value)
    assert "column 'sex'" in message
    assert "row 3: unknown category 'Q'" in message
    assert "no 'other' category" in message
    assert err.value.column == "sex"
    # One metadata read; no context registered, no ciphertext sent.
    assert transport.sent == [("GET", f"/v2/models/{FL}/he")]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"age": None}, "column 'age': row 2: missing value"),  # missing = refuse
        ({"age": 200}, "column 'age': row 2: value 200 outside the schema range [40, 110]"),
        ({"mgus": "maybe"}, "column 'mgus': row 2: expected true or false"),
        ({"kappa": [1]}, "column 'kappa': row 2: expected a number, got a list"),
    ],
)
def test_bad_records_name_column_and_row(
    harness: Harness, url: str, change: dict[str, Any], needle: str
) -> None:
    records = _records(FLCHAIN, FL_ROWS[:3])
    records[1].update(change)
    transport = Recorder()
    with (
        HEClient(url, api_key=harness.tokens["he"], transport=transport) as client,
        pytest.raises(DataError, match=re.escape(needle)),
    ):
        client.predict(FL, records)
    assert [method for method, _ in transport.sent] == ["GET"]


def test_absent_column_and_schemaless_model(harness: Harness, url: str) -> None:
    records = _records(FLCHAIN, FL_ROWS[:2])
    del records[1]["creatinine"]
    with HEClient(url, api_key=harness.tokens["he"]) as client:
        with pytest.raises(DataError, match=r"column 'creatinine': row 2 has no value"):
            client.predict(FL, records)
        with pytest.raises(DataError, match=r"lack column\(s\) 'mgus'"):
            client.predict(FL, frame(FLCHAIN, FL_ROWS).drop(columns=["mgus"]))
        with pytest.raises(ConfigError, match="NaN"):  # the numeric path never encrypts NaN
            client.predict(FL, np.full((1, encoding_for(FLCHAIN).width), np.nan))


# ------------------------------------------------------------ README, verbatim
def _recipe(name: str) -> str:
    match = re.search(rf"<!-- he-recipe:{name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README lost its {name} recipe"
    return match.group(1)


def test_readme_plain_tenseal_raw_recipe(harness: Harness, url: str, standalone: str) -> None:
    """The plain-TenSEAL block (no fedvault import) against the stand-alone HE server."""
    code = _recipe("raw")
    assert "fedvault" not in code
    assert "secure" not in code
    h = {"X-Fedvault-Caller": "me"}
    for model, schema, row in (
        (FL, FLCHAIN, FL_ROWS[3]),  # creatinine missing: the DP mean and the indicator
        (FL, FLCHAIN, FL_ROWS[0]),
        (DIA, DIAMONDS, DIA_ROWS[1]),
    ):
        scope: dict[str, Any] = {
            "URL": standalone,
            "MODEL": harness.ids[model],
            "H": h,
            "row": _records(schema, [row])[0],
        }
        exec(compile(code, "README:raw", "exec"), scope)  # noqa: S102
        want = _plaintext(url, harness, model, schema, [row])
        if schema.is_regression:
            assert abs(scope["prediction"] - float(want[0])) < 0.5
        else:
            np.testing.assert_allclose(scope["out"], want[0], atol=TOL)
            assert scope["prediction"] == schema.classes[int(want[0].argmax())]


def test_readme_sdk_raw_call(harness: Harness, url: str, standalone: str) -> None:
    scope: dict[str, Any] = {"URL": standalone, "MODEL": harness.ids[FL]}
    exec(compile(_recipe("sdk-raw"), "README:sdk-raw", "exec"), scope)  # noqa: S102
    row = ["71", "F", "1997", "1.2", "1.5", "5", "NA", "0"]
    want = _plaintext(url, harness, FL, FLCHAIN, [row])
    np.testing.assert_allclose(scope["result"].logits, want, atol=TOL)


# ------------------------------------------------------------------------ CLI
def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _cli(args: list[str], key_file: Path) -> subprocess.CompletedProcess[str]:
    fedvault = str(Path(sys.executable).parent / "fedvault")
    env = {k: v for k, v in os.environ.items() if k != "FEDVAULT_API_KEY"}
    return subprocess.run(
        [fedvault, "he", "predict", *args, "--api-key-file", str(key_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_predict_takes_a_csv_of_raw_columns(harness: Harness, url: str, tmp_path: Path) -> None:
    key = tmp_path / "analyst.key"
    key.write_text(harness.tokens["he"] + "\n")
    key.chmod(0o600)
    # Columns in another order, with the label: a partner's file as it is.
    header = ["death", *reversed(FLCHAIN.feature_names)]
    body = [["0", *reversed(r)] for r in FL_ROWS]
    rows = _csv(tmp_path / "flchain.csv", header, body)
    done = _cli(["--model", FL, "--csv", str(rows), "--url", url, "--json"], key)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    want = _plaintext(url, harness, FL, FLCHAIN, FL_ROWS)
    got = np.array([p["logits"] for p in out["predictions"]])
    np.testing.assert_allclose(got, want, atol=TOL)
    dia = _csv(tmp_path / "diamonds.csv", list(DIAMONDS.feature_names), DIA_ROWS)
    done = _cli(["--model", DIA, "--csv", str(dia), "--url", url], key)
    assert done.returncode == 0, done.stderr
    values = [float(line.split("\t")[1]) for line in done.stdout.splitlines()]
    np.testing.assert_allclose(values, _plaintext(url, harness, DIA, DIAMONDS, DIA_ROWS), atol=0.5)
    body[2][-2] = "Q"  # sex of the third data row, file line 4
    bad = _csv(tmp_path / "bad.csv", header, body)
    done = _cli(["--model", FL, "--csv", str(bad), "--url", url], key)
    assert done.returncode == 3, done.stderr  # DataError
    assert f"file {bad}, line 4, column 'sex': unknown category 'Q'" in done.stderr
    assert "Traceback" not in done.stderr
