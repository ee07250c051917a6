"""fedvault.datasets.split_dataset: files, determinism, coverage, skew, arguments."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from clients.data import load_partner_csv
from fedvault.datasets import SplitManifest, load_builtin, split_dataset
from fedvault.errors import ConfigError
from fedvault.schema import builtin_schema, from_json, schema_hash


def _read_exact(path: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Rows as float64 exactly as written (repr round trip), plus class indices."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    body = rows[1:]
    features = np.array([[float(c) for c in row[:-1]] for row in body], dtype=np.float64)
    labels = np.array([classes.index(row[-1]) for row in body], dtype=np.int64)
    return features, labels


def _sorted_rows(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    table = np.column_stack([features, labels])
    return table[np.lexsort(table.T[::-1])]


@pytest.fixture(scope="module")
def bc_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SplitManifest]:
    out = tmp_path_factory.mktemp("split") / "bc"
    return out, split_dataset("breast-cancer", out)


def test_layout_schema_and_manifest(bc_split: tuple[Path, SplitManifest]) -> None:
    out, manifest = bc_split
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "partner-0",
        "partner-1",
        "partner-2",
        "schema.json",
    ]
    for i in range(3):
        assert sorted(p.name for p in (out / f"partner-{i}").iterdir()) == ["test.csv", "train.csv"]
    schema = from_json((out / "schema.json").read_text())
    assert schema == builtin_schema("breast-cancer")
    on_disk = SplitManifest.model_validate_json((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest.schema_hash == schema_hash(schema)
    assert (manifest.dataset, manifest.partners, manifest.seed) == ("breast-cancer", 3, 0)
    assert (manifest.alpha, manifest.test_fraction, manifest.total_rows) == (1.0, 0.2, 569)
    assert [p.partner for p in manifest.partner_splits] == ["partner-0", "partner-1", "partner-2"]
    # No temporary directories are left next to out_dir.
    assert [p.name for p in out.parent.iterdir()] == ["bc"]


def test_csvs_load_back_with_shipped_schema(bc_split: tuple[Path, SplitManifest]) -> None:
    out, manifest = bc_split
    schema = from_json((out / "schema.json").read_text())
    for i, stats in enumerate(manifest.partner_splits):
        for kind, rows, counts in (
            ("train", stats.train_rows, stats.train_class_counts),
            ("test", stats.test_rows, stats.test_class_counts),
        ):
            data = load_partner_csv(out / f"partner-{i}" / f"{kind}.csv", schema)
            assert data.n_rows == rows
            got = np.bincount(data.labels, minlength=2)
            assert {c: int(got[k]) for k, c in enumerate(schema.classes)} == counts


def test_header_and_number_format(bc_split: tuple[Path, SplitManifest]) -> None:
    out, _ = bc_split
    lines = (out / "partner-0" / "train.csv").read_text().splitlines()
    assert lines[0] == ",".join(builtin_schema("breast-cancer").columns)
    assert lines[1].rsplit(",", 1)[1] in ("malignant", "benign")


@pytest.mark.parametrize(
    ("dataset", "partners", "alpha"), [("breast-cancer", 3, 1.0), ("digits", 4, 0.5)]
)
def test_partitions_cover_every_row_exactly_once(
    tmp_path: Path, dataset: str, partners: int, alpha: float
) -> None:
    manifest = split_dataset(dataset, tmp_path / "out", partners=partners, alpha=alpha, seed=3)  # type: ignore[arg-type]
    features, labels, schema = load_builtin(dataset)  # type: ignore[arg-type]
    parts = [
        _read_exact(tmp_path / "out" / f"partner-{i}" / f"{kind}.csv", schema.classes)
        for i in range(partners)
        for kind in ("train", "test")
    ]
    assert sum(len(lab) for _, lab in parts) == len(labels) == manifest.total_rows
    joined = _sorted_rows(
        np.concatenate([f for f, _ in parts]), np.concatenate([lab for _, lab in parts])
    )
    np.testing.assert_array_equal(joined, _sorted_rows(features, labels))
    if dataset == "digits":  # ints are written as ints
        line = (tmp_path / "out" / "partner-0" / "train.csv").read_text().splitlines()[1]
        assert all(cell.isdigit() for cell in line.split(","))


def test_rows_are_disjoint_when_rows_are_unique(bc_split: tuple[Path, SplitManifest]) -> None:
    out, _ = bc_split
    features, _, schema = load_builtin("breast-cancer")
    assert len({tuple(r) for r in features.tolist()}) == len(features)  # rows are distinct
    seen: set[tuple[float, ...]] = set()
    for i in range(3):
        for kind in ("train", "test"):
            part, _ = _read_exact(out / f"partner-{i}" / f"{kind}.csv", schema.classes)
            rows = {tuple(r) for r in part.tolist()}
            assert len(rows) == len(part)
            assert not rows & seen
            seen |= rows
    assert len(seen) == len(features)


def test_min_examples_and_stratified_test(bc_split: tuple[Path, SplitManifest]) -> None:
    _, manifest = bc_split
    for stats in manifest.partner_splits:
        total = stats.train_rows + stats.test_rows
        assert total >= 20
        assert stats.test_rows == round(total * 0.2) or abs(stats.test_rows - total * 0.2) <= 0.5
        for c, n_test in stats.test_class_counts.items():
            n_class = n_test + stats.train_class_counts[c]
            assert abs(n_test - n_class * 0.2) < 1 + 1e-9


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    a = split_dataset("digits", tmp_path / "a", partners=4, alpha=0.5, seed=7)
    b = split_dataset("digits", tmp_path / "b", partners=4, alpha=0.5, seed=7)
    c = split_dataset("digits", tmp_path / "c", partners=4, alpha=0.5, seed=8)
    assert a == b
    assert a != c
    for name in ("manifest.json", "schema.json", "partner-0/train.csv", "partner-3/test.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "partner-0/train.csv").read_bytes() != (
        tmp_path / "c" / "partner-0/train.csv"
    ).read_bytes()


def _skew(manifest: SplitManifest) -> float:
    """Mean total-variation distance between each partner's labels and the global mix."""
    counts = np.array(
        [
            [s.train_class_counts[c] + s.test_class_counts[c] for c in sorted(s.train_class_counts)]
            for s in manifest.partner_splits
        ],
        dtype=np.float64,
    )
    overall = counts.sum(axis=0) / counts.sum()
    shares = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(shares - overall).sum(axis=1)))


def test_smaller_alpha_is_more_skewed(tmp_path: Path) -> None:
    skew: dict[float, float] = {}
    for alpha in (0.1, 1.0, 100.0):
        values = [
            _skew(
                split_dataset("digits", tmp_path / f"{alpha}-{s}", partners=5, alpha=alpha, seed=s)
            )
            for s in range(3)
        ]
        skew[alpha] = float(np.mean(values))
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.4
    assert skew[100.0] < 0.1


def test_single_partner(tmp_path: Path) -> None:
    manifest = split_dataset("breast-cancer", tmp_path / "one", partners=1)
    (stats,) = manifest.partner_splits
    assert stats.train_rows + stats.test_rows == 569
    assert stats.test_rows == round(569 * 0.2)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"partners": 0}, "partners"),
        ({"partners": 29}, "partners"),  # 569 // 20 = 28
        ({"partners": 2.5}, "partners"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"test_fraction": 0}, "test_fraction"),
        ({"test_fraction": 1}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"seed": -1}, "seed"),
        ({"min_examples": 1}, "min_examples"),
        ({"dataset": "iris"}, "dataset"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], argument: str) -> None:
    args: dict[str, object] = {"dataset": "breast-cancer", "out_dir": tmp_path / "out", **kwargs}
    with pytest.raises(ConfigError, match=rf"^{argument}:"):
        split_dataset(**args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_max_partners_is_allowed(tmp_path: Path) -> None:
    manifest = split_dataset("breast-cancer", tmp_path / "o", partners=28, alpha=1000.0)
    assert min(s.train_rows + s.test_rows for s in manifest.partner_splits) >= 20


def test_impossible_dirichlet_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        split_dataset("breast-cancer", tmp_path / "out", partners=20, alpha=0.001)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    split_dataset("breast-cancer", out)  # empty existing directory is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(ConfigError, match="overwrite"):
        split_dataset("breast-cancer", out, seed=1)
    assert (out / "stale.txt").exists()
    manifest = split_dataset("breast-cancer", out, seed=1, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["seed"] == manifest.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="out_dir"):
        split_dataset("breast-cancer", target, overwrite=True)
    with pytest.raises(ConfigError, match="out_dir"):
        split_dataset("breast-cancer", target / "sub")
