"""The console's models page in raw columns: each version's data schema and its task's metrics.

A regression model registered with its schema (as a coordinator's run stores
it) shows R², RMSE and MAE — never accuracy — and its feature table; operator
text (a column and a category spelled like markup) reaches the page escaped;
models registered before schemas travelled with them still render, from the
built-in schema their lineage names or with a note that none is recorded.
The gateway is the real one (tests.gateway_support.build).
"""

from __future__ import annotations

import html
import json
import re
import tomllib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fedvault.metrics import summarise
from fedvault.modelspec import ModelSpec, init_parameters
from fedvault.schema import DataSchema, builtin_schema, parse_schema, schema_hash, to_json
from fedvault.stats import Scaler
from server.console.modelview import metrics_view, schema_view
from server.gateway.rest import create_rest_app
from server.registry import ModelRegistry, load_model_keys
from server.store import FederationStore
from tests.gateway_support import LINEAGE, MODEL, Harness, build, register_schema_model
from tests.test_console import login

HOSTILE = '<script>alert("col")</script>'
HOSTILE_CATEGORY = "<script>alert(1)</script>"
PRICES = f"""
name = "gems"
description = "Prices <b>per</b> stone"
task = "regression"
label = "price"
ignore = ["row_id"]

[target]
min = 0
max = 20000

[[features]]
name = "carat"
type = "float"
min = 0
max = 6
log1p = true

[[features]]
name = "depth"
type = "float"
min = 40
max = 80
bounds = "dp"
out_of_range = "clip"

[[features]]
name = '{HOSTILE}'
type = "categorical"
categories = ["Good", "Ideal", "{HOSTILE_CATEGORY}", "other"]
other = "other"

[[features]]
name = "certified"
type = "boolean"
missing = "constant"
fill = false

[[features]]
name = "age"
type = "int"
min = 0
max = 200
missing = "mean"
"""
REGRESSION = "gems-logreg"
LEGACY = "legacy-logreg"


def _regression_metrics() -> dict[str, Any]:
    """Held-out metrics as a coordinator records them, from real summed errors."""
    spec = ModelSpec(kind="logreg", n_features=1, n_classes=1, task="regression", loss="squared")
    # 4 test rows, targets summing to 10 (squares 30): spread 5; SSE 0.5 -> R² 0.9.
    final = {"evaluated_round": 2, **summarise(spec, [4.0, 0.2, 0.5, 1.0, 10.0, 30.0])}
    earlier = {"evaluated_round": 1, **summarise(spec, [4.0, 0.8, 2.5, 3.0, 10.0, 30.0])}
    initial = {"evaluated_round": 0, **summarise(spec, [4.0, 2.0, 9.0, 6.0, 10.0, 30.0])}
    rounds: list[dict[str, Any]] = [
        {"round": r + 1, **m, "partners": ["alpha", "beta"], "failed": [], "epsilon": {}}
        for r, m in enumerate((initial, earlier))
    ]
    return {"final": final, "rounds": rounds}


@pytest.fixture(scope="module")
def schema() -> DataSchema:
    return parse_schema(tomllib.loads(PRICES), source="test")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, schema: DataSchema) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("console-schema"))
    register_schema_model(
        h, REGRESSION, schema, lineage={"metrics": _regression_metrics(), "rounds_completed": 2}
    )
    # A model registered before lineages carried a schema, task or new metrics.
    spec = ModelSpec(kind="logreg", n_features=3, n_classes=2)
    store = FederationStore(h.home / "federation.db")
    try:
        ModelRegistry(store, h.home / "registry", load_model_keys(h.home / "keys")).register(
            name=LEGACY,
            run_id="run-gw",
            spec=spec,
            params=init_parameters(spec, 0),
            scaler=Scaler(mean=np.zeros(3, np.float32), std=np.ones(3, np.float32)),
            lineage={
                **LINEAGE,
                "dataset": "legacy-table",
                "metrics": {
                    "final": {"evaluated_round": 3, "eval_accuracy": 0.95, "eval_loss": 0.2}
                },
            },
        )
    finally:
        store.close()
    h.gw.service.repository.load_all()
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def page(harness: Harness) -> str:
    response = login(create_rest_app(harness.gw), harness.tokens["admin"]).get("/console/models")
    assert response.status_code == 200
    return str(response.text)


def _section(page: str, name: str) -> str:
    """The models page's panel of one model."""
    found = re.search(
        rf"<section[^>]*>\s*<h2[^>]*><code>{re.escape(name)}</code>.*?</section>", page, re.S
    )
    assert found, f"no section for {name}"
    return found.group(0)


def _cells(fragment: str) -> list[list[str]]:
    """Rows of the fragment's tables as unescaped text cells."""
    rows: list[list[str]] = []
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", fragment, re.S):
        cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)
        rows.append([html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cells])
    return rows


def _facts(fragment: str) -> dict[str, str]:
    pairs = re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", fragment, re.S)
    return {html.unescape(k): html.unescape(re.sub(r"<[^>]+>", "", v)).strip() for k, v in pairs}


def test_regression_model_shows_r2_rmse_mae_not_accuracy(page: str) -> None:
    section = _section(page, REGRESSION)
    version_row = next(r for r in _cells(section) if r and r[0] == "v1")
    assert "regression" in version_row
    assert "R² 0.9000" in version_row  # the summary `fedvault models list` shows
    facts = _facts(section)
    assert facts["task"] == "regression"
    assert facts["R²"] == "0.9"
    assert facts["RMSE"] == "0.3536"
    assert facts["MAE"] == "0.25"
    assert facts["evaluated round"] == "2"
    assert not {"accuracy", "balanced accuracy", "ROC AUC", "log loss"} & set(facts)
    assert not [cell for cell in version_row if "acc" in cell or "auc" in cell]
    # Per round: the initial model (round 0) left out, the final evaluation last.
    rounds = section.split('<table class="metrics">')[1].split("</table>")[0]
    rows = _cells(rounds)
    assert rows[0] == ["Model after round", "R²", "RMSE", "MAE", "loss (rescaled target)"]
    assert [r[:2] for r in rows[1:]] == [["1", "0.5"], ["2", "0.9"]]


def test_regression_schema_in_raw_columns(page: str, schema: DataSchema) -> None:
    section = _section(page, REGRESSION)
    part = section.split('<details class="schema">')[1].split("</details>")[0]
    assert "5 features, regression" in part
    facts = _facts(part)
    assert facts["label column"] == "price"
    assert facts["target range"] == "[0, 20000] (domain knowledge), out of range: refuse"
    assert facts["ignored columns"] == "row_id"
    assert facts["source"] == "recorded with the model"
    assert facts["schema SHA-256"] == schema_hash(schema)
    assert "classes" not in facts
    rows = {r[0]: r[1:] for r in _cells(part)[1:]}
    assert list(rows) == ["carat", "depth", HOSTILE, "certified", "age"]
    # type, bounds, bounds from, log1p, categories, other, missing, out of range
    assert rows["carat"] == [
        "float",
        "[0, 6]",
        "domain knowledge",
        "yes",
        "—",
        "—",
        "refuse",
        "refuse",
    ]
    assert rows["depth"] == ["float", "[40, 80]", "DP quantiles", "no", "—", "—", "refuse", "clip"]
    assert rows[HOSTILE][:2] == ["categorical", "—"]
    assert rows[HOSTILE][4:] == [f"Good, Ideal, {HOSTILE_CATEGORY}, other", "other", "refuse", "—"]
    assert rows["certified"][0] == "boolean"
    assert rows["certified"][6] == "constant (fill false)"
    assert rows["age"][1:3] == ["[0, 200]", "domain knowledge"]
    assert rows["age"][6] == "DP mean + missing indicator"


def test_operator_text_is_escaped(page: str) -> None:
    assert "<script>alert" not in page
    assert "<b>per</b>" not in page
    assert "&lt;script&gt;alert(&#34;col&#34;)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Prices &lt;b&gt;per&lt;/b&gt; stone" in page


def test_legacy_models_still_render(page: str) -> None:
    # Lineage names a built-in table: its shipped schema, said to be that.
    builtin = _section(page, MODEL)
    part = builtin.split('<details class="schema">')[1].split("</details>")[0]
    facts = _facts(part)
    assert facts["source"].startswith("the built-in 'breast-cancer' schema")
    assert facts["classes"] == "malignant, benign"
    assert facts["schema SHA-256"] == schema_hash(builtin_schema("breast-cancer"))
    assert any(r[:3] == ["mean_radius", "float", "[0, 50]"] for r in _cells(part))
    assert "binary classification" in _cells(builtin)[1]
    # Lineage names no known table and carries no task: a note, classification metrics.
    legacy = _section(page, LEGACY)
    assert "No schema is recorded for this model" in legacy
    assert '<table class="schema-features">' not in legacy
    facts = _facts(legacy)
    assert facts["task"] == "classification"
    assert facts["accuracy"] == "0.95"
    assert facts["log loss"] == "0.2"
    assert "acc 0.9500" in _cells(legacy)[1]
    assert "R²" not in legacy


def test_partner_and_analyst_see_the_schema_of_their_models(harness: Harness) -> None:
    app = create_rest_app(harness.gw)
    partner = login(app, harness.tokens["partner"]).get("/console/models").text
    assert "recorded with the model" in _section(partner, REGRESSION)
    analyst = login(app, harness.tokens["analyst"]).get("/console/models").text
    assert "mean_radius" in _section(analyst, MODEL)
    assert REGRESSION not in analyst


# ------------------------------------------------------------------ pure parts
def test_multiclass_metrics_name_their_auc_and_headline_accuracy() -> None:
    digits = builtin_schema("digits")
    lineage = {
        "dataset": "digits",
        "metrics": {"final": {"eval_accuracy": 0.9, "roc_auc": 0.99, "balanced_accuracy": 0.89}},
    }
    shown, note = schema_view(lineage)
    assert note is None
    assert shown is not None
    assert shown.task == "multiclass classification"
    assert len(shown.features) == len(digits.features)
    view = metrics_view(lineage, shown)
    assert view.final == [
        ("accuracy", "0.9"),
        ("balanced accuracy", "0.89"),
        ("ROC AUC (mean one-vs-rest)", "0.99"),
    ]
    assert view.summary == "acc 0.9000, auc 0.9900"
    assert view.rounds == []


def test_schema_hash_mismatch_and_unreadable_schema_are_reported(schema: DataSchema) -> None:
    stored = json.loads(to_json(schema))
    shown, _ = schema_view({"schema": stored, "schema_hash": "0" * 64})
    assert shown is not None
    assert shown.warning is not None
    assert "does not match" in shown.warning
    assert shown.schema_hash == schema_hash(schema)
    older, _ = schema_view({"dataset": "breast-cancer", "schema_hash": "f" * 64})
    assert older is not None
    assert older.warning is not None
    assert "different version of the built-in schema" in older.warning
    broken, note = schema_view({"schema": {**stored, "task": "ranking"}})
    assert broken is None
    assert note is not None
    assert note.startswith("The schema stored with this model cannot be read")


# ----------------------------------------------------------------------- models show
def test_models_show_states_the_task_and_the_raw_columns(harness: Harness) -> None:
    from tests.cli_support import run_cli

    listed = run_cli("models", "list", "--json", "--home", harness.home)
    assert listed.returncode == 0, listed.stderr
    ids = {m["name"]: m["model_id"] for m in json.loads(listed.stdout)}
    wide = {"COLUMNS": "1000"}  # one table row a line
    shown = run_cli("models", "show", ids[REGRESSION], "--home", harness.home, env=wide)
    assert shown.returncode == 0, shown.stderr
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in shown.stdout.splitlines()
        if line.count("│") == 3
    }
    assert rows["task"] == "regression: label price in [0.0, 20000.0]"
    assert rows["inputs"].startswith("5 columns: carat (float), depth (float), ")
    assert rows["inputs"].endswith(", certified (boolean), age (int)")
    legacy = run_cli("models", "show", ids[LEGACY], "--home", harness.home)
    assert legacy.returncode == 0, legacy.stderr
    assert "columns:" not in legacy.stdout  # a lineage without a schema shows none
