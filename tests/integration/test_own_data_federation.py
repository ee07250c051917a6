"""Partners' own tables through a real federation: a schema file, categorical and
missing values, a regression target, and a partner whose file does not match."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.data import count_valid_rows
from fedvault.cli import federation as fed
from fedvault.cli.processes import ProcessGroup, free_port
from fedvault.datasets import split_dataset
from fedvault.encoding import encoding_for
from fedvault.schema import builtin_schema, to_toml
from server.audit.records import decode_entry
from server.audit.storage import open_storage
from server.store import FederationStore

from .conftest import Federation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTNERS = ["alpha", "beta", "gamma"]
DIAMOND_SITES = ["delta", "epsilon", "zeta"]


def _drop_column(path: Path, column: str) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    keep = [i for i, name in enumerate(rows[0]) if name != column]
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([[r[i] for i in keep] for r in rows])


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """flchain split over 3 partners; gamma's files lack the creatinine column."""
    home = tmp_path_factory.mktemp("own-data")
    paths = fed.FederationPaths(home)
    fed.init_federation(paths, [*PARTNERS, *DIAMOND_SITES], ["127.0.0.1", "localhost"])
    split_dataset("flchain", home / "data", partners=3, alpha=1.0, seed=0)
    for part in ("train", "test"):
        _drop_column(home / "data" / "partner-2" / f"{part}.csv", "creatinine")
    # The operator's own schema file (a copy of flchain's, under another name).
    schema = builtin_schema("flchain").model_copy(update={"name": "cohort"})
    (home / "schema.toml").write_text(to_toml(schema), encoding="utf-8")
    (home / "training.toml").write_text(
        '[training]\nschema = "schema.toml"\nrounds = 2\nmin_partners = 2\n', encoding="utf-8"
    )
    with ProcessGroup() as group:
        port = free_port()
        fed.start_superlink(group, paths, "127.0.0.1", port)
        f = Federation(paths, group, f"127.0.0.1:{port}", home / "data")
        for i, partner in enumerate(PARTNERS):
            f.start_node(partner, i, cap=100.0)
        time.sleep(3)
        yield f


def test_a_schema_file_trains_and_a_mismatched_partner_is_refused(own_data: Federation) -> None:
    code, summary, err = own_data.train(
        "--config", str(own_data.paths.home / "training.toml"), timeout=400
    )
    assert code == 0, err
    assert summary["status"] == "finished", summary
    # gamma's file lacks a column: refused at round 0, named in the run's status.
    assert set(summary["epsilon_by_partner"]) == {"alpha", "beta"}
    assert "gamma (data-invalid" in summary["message"]
    assert "missing column(s) 'creatinine'" in summary["message"]
    final = summary["final_metrics"]
    assert final["roc_auc"] > 0.7
    assert final["eval_accuracy"] > 0.7
    # ... and in the audit log, with the round and the partner.
    storage = open_storage(own_data.paths.home / "audit.db")
    try:
        records = [decode_entry(e) for _, e in storage.entries(0, storage.size())]
    finally:
        storage.close()
    refused = [r for r in records if r.action == "train.partner.refused"]
    assert [(r.partner, r.round, r.outcome) for r in refused] == [("gamma", 0, "data-invalid")]
    # The model carries its schema: the gateway and the console read raw columns with it.
    store = FederationStore(own_data.paths.db)
    try:
        lineage = store.model(summary["model_id"])["lineage"]
    finally:
        store.close()
    assert lineage["dataset"] == "cohort"
    assert lineage["schema"]["features"][1]["categories"] == ["F", "M"]


def test_dp_bounds_come_from_the_federation_and_are_charged(
    own_data: Federation, tmp_path: Path
) -> None:
    from fedvault.schema import load_schema

    sample = own_data.data / "partner-0" / "train.csv"
    out = tmp_path / "drafted.toml"
    result = own_data.cli(
        "schema", "draft", "--csv", str(sample), "--label", "death", "--name", "cohort",
        "--dp-bounds", "--epsilon", "0.5", "--out", str(out), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    draft = load_schema(out, allow_draft=True)
    age = next(f for f in draft.features if f.name == "age")
    assert (age.bounds, age.out_of_range) == ("dp", "clip")
    assert age.min is not None
    assert age.max is not None
    assert 30 <= age.min <= 51
    assert 100 <= age.max <= 140
    assert "ε = 0.5" in out.read_text(encoding="utf-8")
    # gamma's file lacks creatinine: it refuses; alpha and beta are charged,
    # in the federation's ledger and each in its own.
    store = FederationStore(own_data.paths.db)
    try:
        run = next(r for r in store.runs() if r.config.get("job") == "dp-bounds")
        rows = store.ledger(run.run_id)
    finally:
        store.close()
    assert sorted(r.partner for r in rows) == ["alpha", "beta"]
    assert all(r.charge.mechanism == "gaussian-histogram" for r in rows)
    assert all(abs(r.charge.epsilon_after - 0.5) < 0.01 for r in rows)
    assert "gamma (data-invalid" in run.message
    shown = own_data.cli("ledger", "show", run.run_id)
    assert shown.returncode == 0, shown.stderr
    assert "views agree" in shown.stdout


def test_a_regression_run_trains_where_the_files_fit(own_data: Federation) -> None:
    """Three more sites hold diamonds files: a diamonds run trains on them, and
    the flchain sites each refuse the schema their files do not match. One site
    gives its node 1 MiB per table, so its encoded training table (larger:
    checked) spills to its state directory and trains from disk; nothing of
    it is left there."""
    split_dataset("diamonds", own_data.paths.home / "diamonds", partners=3, alpha=1.0, seed=0)
    own_data.data = own_data.paths.home / "diamonds"
    schema = builtin_schema("diamonds")
    rows = count_valid_rows(own_data.data / "partner-1" / "train.csv", schema)
    assert rows * encoding_for(schema).width * 4 > 1 << 20
    for i, partner in enumerate(DIAMOND_SITES):
        extra = {"memory-mb": 1} if partner == "epsilon" else None
        own_data.start_node(partner, i, cap=100.0, extra=extra)
    time.sleep(3)
    code, summary, err = own_data.train("--dataset", "diamonds", "--rounds", "2", timeout=400)
    assert code == 0, err
    assert summary["status"] == "finished", summary
    assert set(summary["epsilon_by_partner"]) == set(DIAMOND_SITES)
    for site in PARTNERS:
        assert f"{site} (data-invalid" in summary["message"]
    final = summary["final_metrics"]
    assert final["r2"] > 0.3
    assert final["rmse"] > 0
    spill_dir = own_data.paths.node_dir("epsilon")
    assert not [p for p in spill_dir.iterdir() if p.name.startswith(".fedvault-spill-")]
