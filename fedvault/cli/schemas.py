"""``fedvault schema …`` and ``fedvault data check``: writing a schema, checking a file.

Drafting reads a file's header and cell *shapes* (number, integer, yes/no,
text) to propose a type per column. It never writes bounds, category lists or
class names taken from the values: those are public domain knowledge the
operator fills in, and a draft leaves placeholders (``bounds =
"placeholder"``) that training refuses until they are replaced.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedvault.errors import ConfigError, DataError
from fedvault.schema import (
    DEFAULT_MISSING_VALUES,
    FALSE_WORDS,
    PLACEHOLDER_CLASS,
    TRUE_WORDS,
    DataSchema,
    FeatureSpec,
    TargetSpec,
    to_json,
    to_toml,
)

schema_app = typer.Typer(
    help="Write and check the federation's data schema (schema.toml).", no_args_is_help=True
)
out = Console(markup=False, soft_wrap=True)
console = Console(stderr=True, markup=False, soft_wrap=True)

_SAMPLE_ROWS = 10_000


@schema_app.command("json-schema")
def schema_json_schema(
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of schema.toml (for editors' completion and checks)."""
    from fedvault.schema import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if out_file is None:
        out.print(text, end="")
        return
    out_file.write_text(text, encoding="utf-8")
    console.print(f"wrote {out_file}")


@schema_app.command("check")
def schema_check(
    path: Annotated[Path, typer.Argument(help="A schema.toml.")],
    draft: Annotated[bool, typer.Option(help="Accept placeholders (a draft).")] = False,
) -> None:
    """Validate a schema file and show the model input it implies."""
    from fedvault.encoding import encoding_for
    from fedvault.schema import load_schema, schema_hash

    schema = load_schema(path, allow_draft=draft)
    out.print(f"{path}: schema {schema.name!r} ({schema.task}), hash {schema_hash(schema)[:16]}")
    if schema.placeholders:
        out.print(f"draft: placeholders left for {', '.join(schema.placeholders)}")
        return
    encoding = encoding_for(schema)
    out.print(
        f"{len(schema.features)} feature column(s) -> {encoding.width} model input(s); "
        f"ignored: {', '.join(schema.ignore) or 'none'}"
    )


def _shape(cells: list[str], missing: frozenset[str]) -> str:
    """int, float, boolean or categorical from the cells' form (not their values)."""
    present = [c.strip() for c in cells if c.strip() not in missing]
    if not present:
        return "float"
    if all(c.lower() in TRUE_WORDS | FALSE_WORDS for c in present) and not all(
        c in ("0", "1") for c in present
    ):
        return "boolean"
    try:
        numbers = [float(c) for c in present]
    except ValueError:
        return "categorical"
    if all(n.is_integer() for n in numbers):
        return "boolean" if set(numbers) <= {0.0, 1.0} else "int"
    return "float"


def draft_schema(
    header: list[str], rows: list[list[str]], *, name: str, label: str
) -> tuple[DataSchema, list[str]]:
    """A draft schema for columns ``header`` sampled by ``rows``, and the columns with gaps.

    Types come from the cells' form; every bound, category list and class
    name is a placeholder.
    """
    if label not in header:
        raise ConfigError(f"--label {label!r} is not a column of the file")
    for position, column in enumerate(header, start=1):
        if not column:
            raise ConfigError(
                f"column {position} has no name (a row-id column written by R or pandas?); "
                "name it or remove it, then draft again"
            )
    missing = frozenset(DEFAULT_MISSING_VALUES)
    columns = list(zip(*rows, strict=False)) if rows else [() for _ in header]
    shapes = {h: _shape(list(col), missing) for h, col in zip(header, columns, strict=False)}
    gaps = [
        h
        for h, col in zip(header, columns, strict=False)
        if h != label and any(c.strip() in missing for c in col)
    ]
    features = [
        FeatureSpec(name=column, type=shapes.get(column, "float"), bounds="placeholder")  # type: ignore[arg-type]
        if shapes.get(column, "float") != "boolean"
        else FeatureSpec(name=column, type="boolean")
        for column in header
        if column != label
    ]
    if shapes.get(label) in ("float", "int"):
        schema = DataSchema(
            name=name,
            task="regression",
            label=label,
            target=TargetSpec(min=0, max=1, bounds="placeholder"),
            features=tuple(features),
        )
    else:
        schema = DataSchema(
            name=name,
            task="binary",
            label=label,
            classes=(f"{PLACEHOLDER_CLASS}1", f"{PLACEHOLDER_CLASS}2"),
            features=tuple(features),
        )
    return schema, gaps


def render_draft(schema: DataSchema, gaps: list[str], provenance: list[str]) -> str:
    """The draft as a commented schema.toml."""
    lines = [
        "# Draft schema written by `fedvault schema draft`. Column types were guessed from",
        "# the form of the cells; no value of the file was copied. Before training:",
        '#  - give each feature marked bounds = "placeholder" its public bounds (min, max)',
        '#    or categories from domain knowledge, and mark it bounds = "domain";',
    ]
    if schema.is_regression:
        lines.append("#  - set [target] min and max (the target's public range);")
    else:
        lines.append("#  - set task (binary or multiclass) and the declared class names;")
    lines += [
        "#  - choose each column's missing-value policy (refuse, constant + fill, mean);",
        "#  - list row ids, free text and columns that leak the outcome under ignore.",
        "# Check it with `fedvault schema check schema.toml`; training refuses a draft.",
    ]
    if gaps:
        lines.append(f"# Columns with gaps in the sample: {', '.join(gaps)}.")
    lines += [f"# {line}" for line in provenance]
    return "\n".join(lines) + "\n" + to_toml(schema)


def _sample(csv_file: Path) -> tuple[list[str], list[list[str]]]:
    from clients.data import detect_delimiter

    try:
        with csv_file.open(encoding="utf-8-sig", newline="") as handle:
            sample = handle.read(1 << 20)
    except FileNotFoundError:
        raise DataError("file not found", path=str(csv_file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise DataError(f"cannot read the file ({reason})", path=str(csv_file)) from None
    first = sample.splitlines()[0] if sample else ""
    delimiter = detect_delimiter(first)
    reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        rows = [
            r for _, r in zip(range(_SAMPLE_ROWS), reader, strict=False) if len(r) == len(header)
        ]
    except (StopIteration, csv.Error):
        raise DataError("no readable CSV header", path=str(csv_file), line=1) from None
    return header, rows


@schema_app.command("draft")
def schema_draft(
    csv_file: Annotated[Path, typer.Option("--csv", help="A partner's CSV to read the shape of.")],
    label: Annotated[str, typer.Option(help="The column to predict.")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the draft.")] = Path(
        "schema.toml"
    ),
    name: Annotated[str | None, typer.Option(help="The table's name.")] = None,
    overwrite: bool = False,
    dp_bounds: Annotated[
        bool,
        typer.Option(
            "--dp-bounds",
            help="Ask the running federation for DP bounds of the numeric columns "
            "(charged to every partner's ledger).",
        ),
    ] = False,
    epsilon: Annotated[
        float, typer.Option(help="ε the bounds query spends per partner (with --dp-bounds).")
    ] = 0.5,
    delta: Annotated[float, typer.Option(help="δ of that ε.")] = 1e-5,
    min_partners: Annotated[int, typer.Option(help="Partners that must answer.")] = 2,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Federation state directory (with --dp-bounds)."),
    ] = None,
) -> None:
    """Propose a schema.toml from a CSV's header and cell types, with placeholders.

    With --dp-bounds the numeric columns' bounds come from the federation: each
    partner releases noisy histograms of its own values (a Gaussian mechanism
    charged to its ledger); the bounds are the 0.5 % and 99.5 % quantiles of
    their sum, marked bounds = "dp", and values beyond them are clipped.
    """
    if out_file.exists() and not overwrite:
        raise ConfigError(f"{out_file} exists; pass --overwrite to replace it")
    header, rows = _sample(csv_file)
    schema, gaps = draft_schema(header, rows, name=name or csv_file.stem, label=label)
    provenance: list[str] = []
    if dp_bounds:
        schema, provenance = _with_dp_bounds(
            schema, home=home, epsilon=epsilon, delta=delta, min_partners=min_partners
        )
    out_file.write_text(render_draft(schema, gaps, provenance), encoding="utf-8")
    console.print(
        f"wrote draft {out_file}: column types"
        + (", DP bounds" if dp_bounds else "")
        + ". Fill in every placeholder (bounds, categories, classes) from domain knowledge, "
        "not from the data: training refuses a draft. Check it with `fedvault schema check`."
    )


def _with_dp_bounds(
    schema: DataSchema, *, home: Path | None, epsilon: float, delta: float, min_partners: int
) -> tuple[DataSchema, list[str]]:
    """The schema with the federation's DP bounds filled in, and a note of their cost."""
    import time

    from fedvault.privacy import GaussianEvent, calibrate_noise_multiplier
    from fedvault.settings import load_settings
    from server.bounds_job import BoundsJob
    from server.store import FINISHED, FederationStore

    from . import federation as fed
    from .watch import wait_for_run

    settings = load_settings(home=home)
    paths = fed.FederationPaths(
        settings.home,
        connect_retries=settings.connect_retries,
        connect_backoff_s=settings.connect_backoff_s,
    )
    fed.read_address(paths)
    columns = [f.name for f in schema.features if f.numeric]
    if schema.is_regression:
        columns.append(schema.label)
    if not columns:
        raise ConfigError("the file has no numeric column to ask bounds for")
    sigma = calibrate_noise_multiplier(epsilon, delta, [GaussianEvent(1.0, 1.0, 1)])
    job = BoundsJob(
        columns=columns,
        target_epsilon=epsilon,
        delta=delta,
        noise_multiplier=sigma,
        min_partners=min_partners,
    )
    run_id = fed.new_run_id()
    fed.submit_run(
        paths,
        run_id=run_id,
        config=None,
        audit_store=settings.audit_store,
        audit_store_password_file=settings.audit_store_password_file,
        federation_store=settings.federation_store,
        federation_store_password_file=settings.federation_store_password_file,
        extra={"job": "dp-bounds", "bounds": job.model_dump_json(), "schema": to_json(schema)},
    )
    console.print(f"submitted bounds query {run_id} (ε = {epsilon:g} per partner, δ = {delta:g})")
    deadline = time.monotonic() + 60
    while settings.federation_store is None and not paths.db.exists():
        if time.monotonic() > deadline:
            raise ConfigError("the coordinator did not start the bounds query")
        time.sleep(0.2)
    with FederationStore(
        settings.federation_location, password_file=settings.federation_store_password_file
    ) as store:
        record = wait_for_run(store, run_id, rounds=1, console=console, show_progress=False)
    if record.status != FINISHED:
        raise DataError(f"bounds query {run_id} {record.status}: {record.message}")
    found = (record.final_metrics or {}).get("bounds", {})
    features = []
    for spec in schema.features:
        if spec.name in found:
            lo, hi, _ = found[spec.name]
            spec = spec.model_copy(
                update={"min": lo, "max": hi, "bounds": "dp", "out_of_range": "clip"}
            )
            spec = FeatureSpec.model_validate(spec.model_dump())
        features.append(spec)
    update: dict[str, object] = {"features": tuple(features)}
    if schema.is_regression and schema.label in found:
        lo, hi, _ = found[schema.label]
        update["target"] = TargetSpec(min=lo, max=hi, bounds="dp", out_of_range="clip")
    filled = DataSchema.model_validate({**schema.model_dump(), **update})
    partners = ", ".join((record.final_metrics or {}).get("partners", []))
    note = [
        f'Bounds marked bounds = "dp" come from bounds query {run_id}: noisy histograms',
        f"released by {partners} (Gaussian, σ = {sigma:.3f}, ε = {epsilon:g} at δ = {delta:g}",
        "per partner, in every ledger); each is the 0.5 %-99.5 % quantile range, rounded",
        'out to a 1/8-decade grid; values beyond are clipped (out_of_range = "clip").',
    ]
    return filled, note


def data_check(
    files: Annotated[list[Path], typer.Argument(help="CSV or Parquet files to check.")],
    schema_file: Annotated[
        Path | None, typer.Option("--schema", help="The federation's schema.toml.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="A built-in table instead of --schema.")
    ] = None,
    per_column: Annotated[int, typer.Option(help="Problems listed per column.", min=1)] = 3,
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: detect).")] = None,
    encoding: Annotated[str, typer.Option(help="CSV text encoding.")] = "utf-8",
) -> None:
    """List the first problems per column of partner files, before the site joins.

    Exit 0 when every file is valid, 3 (data error) otherwise.
    """
    from clients.data import CsvFormat, count_valid_rows, iter_problems
    from fedvault.schema import builtin_schema, load_schema

    if (schema_file is None) == (dataset is None):
        raise ConfigError("give exactly one of --schema FILE or --dataset NAME")
    schema = load_schema(schema_file) if schema_file else builtin_schema(str(dataset))
    fmt = CsvFormat(delimiter, encoding)
    bad = 0
    for path in files:
        # The fast validating pass first (a valid file is read once); only a
        # file with problems is read again by the exact path that lists them.
        try:
            rows = count_valid_rows(path, schema, fmt)
        except DataError as first:
            problems = list(iter_problems(path, schema, fmt, per_column=per_column)) or [first]
        else:
            out.print(f"{path}: {rows} rows valid against schema {schema.name!r}")
            continue
        bad += 1
        out.print(f"{path}: {len(problems)} problem(s) (first {per_column} per column):")
        for problem in problems:
            out.print(f"  {problem}")
    if bad:
        raise DataError(f"{bad} of {len(files)} file(s) do not match schema {schema.name!r}")
