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
from fedvault.schema import DEFAULT_MISSING_VALUES, FALSE_WORDS, TRUE_WORDS

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


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def draft_schema(header: list[str], rows: list[list[str]], *, name: str, label: str) -> str:
    """The text of a draft schema.toml for columns ``header`` sampled by ``rows``."""
    if label not in header:
        raise ConfigError(f"--label {label!r} is not a column of the file")
    missing = frozenset(DEFAULT_MISSING_VALUES)
    columns = list(zip(*rows, strict=False)) if rows else [() for _ in header]
    shapes = {h: _shape(list(col), missing) for h, col in zip(header, columns, strict=False)}
    gaps = {
        h for h, col in zip(header, columns, strict=False) if any(c.strip() in missing for c in col)
    }
    label_shape = shapes.get(label, "categorical")
    lines = [
        "# Draft schema written by `fedvault schema draft`. Column types were guessed from",
        "# the form of the cells; no value of the file was copied. Before training:",
        "#  - set each placeholder's public bounds (min/max) or categories from domain",
        '#    knowledge, and change its bounds to "domain";',
        "#  - choose each column's missing-value policy (refuse, constant + fill, mean);",
        "#  - list row ids, free text and columns that leak the outcome under ignore.",
        f"name = {_q(name)}",
    ]
    if label_shape in ("float", "int"):
        lines += [
            'task = "regression"',
            f"label = {_q(label)}",
            "ignore = []",
            "",
            "[target]  # the target's public range",
            "min = 0  # placeholder",
            "max = 1  # placeholder",
            'bounds = "placeholder"',
        ]
    else:
        lines += [
            'task = "binary"  # or "multiclass"',
            f"label = {_q(label)}",
            'classes = ["PLACEHOLDER-1", "PLACEHOLDER-2"]  # the declared class names, in order',
            "ignore = []",
        ]
    for column in header:
        if column == label:
            continue
        kind = shapes.get(column, "float")
        lines += ["", "[[features]]", f"name = {_q(column)}", f"type = {_q(kind)}"]
        if kind in ("int", "float"):
            lines += ["# min = ?  max = ?   (public bounds)", 'bounds = "placeholder"']
        elif kind == "categorical":
            lines += ['# categories = ["...", "..."]', 'bounds = "placeholder"']
        if column in gaps:
            lines.append(
                'missing = "refuse"  # the sample has gaps: choose refuse, constant or mean'
            )
    return "\n".join(lines) + "\n"


@schema_app.command("draft")
def schema_draft(
    csv_file: Annotated[Path, typer.Option("--csv", help="A partner's CSV to read the shape of.")],
    label: Annotated[str, typer.Option(help="The column to predict.")],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the draft.")] = Path(
        "schema.toml"
    ),
    name: Annotated[str | None, typer.Option(help="The table's name.")] = None,
    overwrite: bool = False,
) -> None:
    """Propose a schema.toml from a CSV's header and cell types, with placeholders."""
    if out_file.exists() and not overwrite:
        raise ConfigError(f"{out_file} exists; pass --overwrite to replace it")
    try:
        with csv_file.open(encoding="utf-8-sig", newline="") as handle:
            sample = handle.read(1 << 20)
    except FileNotFoundError:
        raise DataError("file not found", path=str(csv_file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise DataError(f"cannot read the file ({reason})", path=str(csv_file)) from None
    first = sample.splitlines()[0] if sample else ""
    delimiter = max((",", ";", "\t", "|"), key=first.count) if first else ","
    reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        rows = [
            r for _, r in zip(range(_SAMPLE_ROWS), reader, strict=False) if len(r) == len(header)
        ]
    except (StopIteration, csv.Error):
        raise DataError("no readable CSV header", path=str(csv_file), line=1) from None
    text = draft_schema(header, rows, name=name or csv_file.stem, label=label)
    out_file.write_text(text, encoding="utf-8")
    console.print(
        f"wrote draft {out_file}: column types only. Fill in every placeholder (bounds, "
        "categories, classes) from domain knowledge, not from the data: training refuses "
        "a draft. Check it with `fedvault schema check`."
    )


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
    from clients.data import CsvFormat, iter_problems, load_partner_data
    from fedvault.schema import builtin_schema, load_schema

    if (schema_file is None) == (dataset is None):
        raise ConfigError("give exactly one of --schema FILE or --dataset NAME")
    schema = load_schema(schema_file) if schema_file else builtin_schema(str(dataset))
    fmt = CsvFormat(delimiter, encoding)
    bad = 0
    for path in files:
        problems = list(iter_problems(path, schema, fmt, per_column=per_column))
        if not problems:
            rows = load_partner_data(path, schema, fmt).n_rows
            out.print(f"{path}: {rows} rows valid against schema {schema.name!r}")
            continue
        bad += 1
        out.print(f"{path}: {len(problems)} problem(s) (first {per_column} per column):")
        for problem in problems:
            out.print(f"  {problem}")
    if bad:
        raise DataError(f"{bad} of {len(files)} file(s) do not match schema {schema.name!r}")
