"""``fedvault he``: encrypted inference from the command line.

``serve`` runs the thin HE endpoint (``server.he_api``) over the federation's
model registry until the gateway absorbs it; ``predict`` is the caller's side:
it reads rows from a CSV, encodes them, encrypts them with keys made in memory
(or kept in a 0600 key file), calls the endpoint and prints decrypted
predictions (a class, or a regression's value in the target's units). The
server never sees features, outputs or the secret key.

The CSV holds either the model's raw schema columns (``sex`` = ``F``, an
empty or ``NA`` cell for a missing value), checked and encoded here exactly as
a partner's file is (:class:`secure.client.RawEncoder`), or its encoded
numeric inputs (``sex=F``, ``sex=M``, …), as the metadata's ``features`` name them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer

from fedvault.cli.options import (
    HeaderTimeoutOpt,
    IdleTimeoutOpt,
    LogFormatOpt,
    MaxConnectionsOpt,
    connection_limits,
    connection_overrides,
)
from fedvault.errors import ConfigError, DataError
from fedvault.logs import LogFormat, configure_logging, uvicorn_log_config
from fedvault.settings import load_settings
from fedvault.urls import bearer_token, check_service_url

if TYPE_CHECKING:
    from secure.client import HEKeys, RawEncoder

he_app = typer.Typer(help="Encrypted inference (CKKS via TenSEAL).", no_args_is_help=True)


@he_app.command("serve")
def serve(
    home: Annotated[Path | None, typer.Option("--home", help="Federation state directory.")] = None,
    host: Annotated[str, typer.Option(help="Listen address (keep it on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8080,
    context_ttl_s: Annotated[float, typer.Option(help="Lifetime of registered contexts.")] = 3600,
    header_timeout: HeaderTimeoutOpt = None,
    idle_timeout: IdleTimeoutOpt = None,
    max_connections: MaxConnectionsOpt = None,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Serve the HE endpoints for the registry's models (no gateway auth yet: loopback only).

    Models are addressed by id or by name (its newest version); also answers
    /v2/health/live, /v2/health/ready and POST /v2/repository/index.
    """
    import asyncio

    import uvicorn

    from secure.he.service import HEService
    from server.he_api import RegistryCatalog, create_app, registry_model_source
    from server.http_serving import check_bind, serve_until_signal
    from server.registry import ModelRegistry, load_model_keys
    from server.store import FederationStore

    configure_logging(log_format)
    settings = load_settings(
        home=home, **connection_overrides(header_timeout, idle_timeout, max_connections)
    )
    check_bind(host, port, "HE requests")
    keys = load_model_keys(
        settings.keys_dir, encryption_key_b64=os.environ.get(settings.model_key_env), signing=False
    )

    def open_registry() -> tuple[FederationStore, ModelRegistry]:
        store = FederationStore(
            settings.federation_location, password_file=settings.federation_store_password_file
        )
        return store, ModelRegistry(store, settings.registry_dir, keys)

    service = HEService(registry_model_source(open_registry), context_ttl_s=context_ttl_s)
    config = uvicorn.Config(
        create_app(service, RegistryCatalog(open_registry)),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        log_config=uvicorn_log_config(),
    )
    try:
        # SIGTERM returns here, so the pool is closed.
        asyncio.run(serve_until_signal(config, connection_limits(settings)))
    finally:
        service.close()  # the evaluation pool's processes and the /dev/shm spool


@dataclass(frozen=True)
class _Table:
    """A CSV's header and rows as text: what can be checked before the model is known."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (line number in the file, fields)


def _read_csv(path: Path) -> _Table:
    """The CSV at ``path``, read whole before anything connects.

    Which columns are features is only known from the model's metadata, but
    a file that is missing, is not UTF-8 text or is not CSV at all is the
    caller's to fix and must be reported before a server is asked anything.
    A byte-order mark (spreadsheet exports) is accepted.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        with handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if row]  # blank lines skipped
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (not a CSV file)") from None
    except csv.Error as exc:  # its messages name the problem, never the data
        raise ConfigError(f"{path} is not a CSV file (line {reader.line_num}: {exc})") from None
    if header is None:
        raise DataError("empty file: no header of feature names", path=str(path))
    if not rows:
        raise DataError("no data rows", path=str(path))
    return _Table(path, header, rows)


def _features(
    table: _Table, features: list[str]
) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
    """Rows of ``table`` in the model's feature order (extra columns, e.g. a label, ignored)."""
    path = str(table.path)
    missing = [f for f in features if f not in table.header]
    if missing:
        raise DataError(
            f"missing feature columns {missing[:5]}{'...' if len(missing) > 5 else ''}",
            path=path,
            line=1,
        )
    columns = [table.header.index(f) for f in features]
    values: list[list[float]] = []
    for line, row in table.rows:
        try:
            values.append([float(row[c]) for c in columns])
        except (IndexError, ValueError):
            raise DataError("a feature value is not a number", path=path, line=line) from None
    return np.asarray(values, dtype=np.float64)


def _raw_columns(table: _Table, encoder: RawEncoder) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Rows of raw schema columns, checked and encoded as a partner's node reads its file."""
    path = str(table.path)
    index = {name: table.header.index(name) for name in encoder.columns}
    width = max(index.values()) + 1
    for line, row in table.rows:
        if len(row) < width:
            raise DataError(
                f"row has {len(row)} fields, the header names {len(table.header)}",
                path=path,
                line=line,
            )
    cells = {name: [row[c] for _, row in table.rows] for name, c in index.items()}
    return encoder.encode_cells(cells, path=path, lines=[line for line, _ in table.rows])


def _model_input(table: _Table, meta: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The model's numeric input for the CSV: raw columns when the header has them all
    (and the model publishes its schema), else the encoded columns of ``features``."""
    from secure.client import RawEncoder

    encoder = RawEncoder.from_metadata(meta)
    features = list(meta["features"])
    if encoder is not None:
        absent = [c for c in encoder.columns if c not in table.header]
        if not absent:
            return _raw_columns(table, encoder)
        if any(f not in table.header for f in features):
            raise DataError(
                f"missing columns {absent[:5]}{'...' if len(absent) > 5 else ''} (the model's "
                "raw columns; a CSV of its encoded inputs, as its HE metadata lists them, "
                "works too)",
                path=str(table.path),
                line=1,
            )
    return _features(table, features)


API_KEY_ENV = "FEDVAULT_API_KEY"


def _api_key(path: Path | None) -> str | None:
    """The gateway API key from ``path`` or ``$FEDVAULT_API_KEY`` (never echoed or logged)."""
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
        return bearer_token(data, path, "API key file")
    return os.environ.get(API_KEY_ENV, "").strip() or None


def _existing_keys(key_file: Path | None) -> HEKeys | None:
    """Keys from an existing ``--key-file``, loaded before anything connects (None: none yet)."""
    from secure.client import HEKeys

    if key_file is None or not key_file.exists():
        return None
    return HEKeys.load(key_file)


@he_app.command("predict")
def predict(
    model: Annotated[
        str, typer.Option("--model", help="Model id, or name (its default or newest version).")
    ],
    csv_path: Annotated[
        Path,
        typer.Option(
            "--csv", help="CSV with a header: the model's raw columns, or its encoded features."
        ),
    ],
    url: Annotated[
        str, typer.Option("--url", help="HE endpoint base URL.")
    ] = "http://127.0.0.1:8080",
    caller: Annotated[
        str, typer.Option("--caller", help="Caller identity (stand-alone `he serve` only).")
    ] = "cli",
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help=f"File holding the gateway API key (default: ${API_KEY_ENV}); "
            "never pass a key on the command line.",
        ),
    ] = None,
    layout: Annotated[str, typer.Option(help="auto, vector or batch.")] = "auto",
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            help="Keep the secret key in this 0600 file (created if missing); "
            "default: in memory only.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Encode and encrypt a CSV's rows, infer under encryption, decrypt and print predictions.

    Every local input (options, URL, CSV, API key, key file) is checked before
    the first request: a typo is then a usage error, not a round trip.
    """
    from secure.client import HEClient, HEKeys, params_from_metadata

    if layout not in ("auto", "vector", "batch"):
        raise ConfigError(f"--layout must be auto, vector or batch, got {layout!r}")
    chosen: Literal["auto", "vector", "batch"] = (
        "vector" if layout == "vector" else "batch" if layout == "batch" else "auto"
    )
    base_url = check_service_url(url, "--url")
    table = _read_csv(csv_path)
    api_key = _api_key(api_key_file)
    keys = _existing_keys(key_file)
    with HEClient(base_url, api_key=api_key, caller=None if api_key else caller) as client:
        meta = client.metadata(model)
        x = _model_input(table, meta)  # a bad cell stops here, before any key is sent
        if key_file is not None and keys is None:
            keys = HEKeys.create(
                params_from_metadata(meta),
                galois=True,
                relin=bool(meta["keys"]["relin_keys"]),
            )
            keys.save(key_file)
        result = client.predict(model, x, layout=chosen, keys=keys)
    records: list[dict[str, Any]]
    if result.values is not None:  # regression: the value in the target's units
        records = [
            {"row": i, "value": round(float(v), 6), "output": round(float(out[0]), 6)}
            for i, (v, out) in enumerate(zip(result.values, result.logits, strict=True))
        ]
        lines = [f"{r['row']}\t{r['value']}" for r in records]
    else:
        records = [
            {"row": i, "class": cls, "logits": [round(float(v), 6) for v in logits]}
            for i, (cls, logits) in enumerate(zip(result.classes, result.logits, strict=True))
        ]
        lines = [f"{r['row']}\t{r['class']}" for r in records]
    if as_json:
        typer.echo(json.dumps({"model_id": model, "layout": result.layout, "predictions": records}))
        return
    for line in lines:
        typer.echo(line)
