"""``fedvault he``: encrypted inference from the command line.

``serve`` runs the thin HE endpoint (``server.he_api``) over the federation's
model registry until the gateway absorbs it; ``predict`` is the caller's side:
it reads raw features from a CSV, encrypts them with keys made in memory (or
kept in a 0600 key file), calls the endpoint and prints decrypted predictions.
The server never sees features, logits or the secret key.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from fedvault.errors import ConfigError, DataError
from fedvault.settings import load_settings

he_app = typer.Typer(help="Encrypted inference (CKKS via TenSEAL).", no_args_is_help=True)


@he_app.command("serve")
def serve(
    home: Annotated[Path | None, typer.Option("--home", help="Federation state directory.")] = None,
    host: Annotated[str, typer.Option(help="Listen address (keep it on loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8080,
    context_ttl_s: Annotated[float, typer.Option(help="Lifetime of registered contexts.")] = 3600,
) -> None:
    """Serve the HE endpoints for the registry's models (no gateway auth yet: loopback only)."""
    import asyncio

    import uvicorn

    from secure.he.service import HEService
    from server.he_api import create_app, registry_model_source
    from server.http_serving import check_bind, serve_until_signal
    from server.registry import ModelRegistry, load_model_keys
    from server.store import FederationStore

    settings = load_settings(home=home)
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
        create_app(service), host=host, port=port, log_level="warning", access_log=False
    )
    try:
        asyncio.run(serve_until_signal(config))  # SIGTERM returns here, so the pool is closed
    finally:
        service.close()  # the evaluation pool's processes and the /dev/shm spool


def _read_features(
    path: Path, features: list[str]
) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
    """Rows of ``path`` in the model's feature order (extra columns, e.g. a label, ignored)."""
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        missing = [f for f in features if f not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"missing feature columns {missing[:5]}{'...' if len(missing) > 5 else ''}",
                path=str(path),
                line=1,
            )
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            try:
                rows.append([float(row[f]) for f in features])
            except (TypeError, ValueError):
                raise DataError(
                    "a feature value is not a number", path=str(path), line=line
                ) from None
    if not rows:
        raise DataError("no data rows", path=str(path))
    return np.asarray(rows, dtype=np.float64)


API_KEY_ENV = "FEDVAULT_API_KEY"


def _api_key(path: Path | None) -> str | None:
    """The gateway API key from ``path`` or ``$FEDVAULT_API_KEY`` (never echoed or logged)."""
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the API key file {path}: {type(exc).__name__}"
            ) from None
        if not key:
            raise ConfigError(f"the API key file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


@he_app.command("predict")
def predict(
    model: Annotated[str, typer.Option("--model", help="Model id.")],
    csv_path: Annotated[Path, typer.Option("--csv", help="CSV with a header of feature names.")],
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
    """Encrypt a CSV's rows, infer under encryption, decrypt and print predictions."""
    from secure.client import HEClient, HEKeys, params_from_metadata

    if layout not in ("auto", "vector", "batch"):
        raise ConfigError(f"--layout must be auto, vector or batch, got {layout!r}")
    chosen: Literal["auto", "vector", "batch"] = (
        "vector" if layout == "vector" else "batch" if layout == "batch" else "auto"
    )
    api_key = _api_key(api_key_file)
    with HEClient(url, api_key=api_key, caller=None if api_key else caller) as client:
        meta = client.metadata(model)
        x = _read_features(csv_path, list(meta["features"]))
        keys = None
        if key_file is not None:
            if key_file.exists():
                keys = HEKeys.load(key_file)
            else:
                keys = HEKeys.create(
                    params_from_metadata(meta),
                    galois=True,
                    relin=bool(meta["keys"]["relin_keys"]),
                )
                keys.save(key_file)
        result = client.predict(model, x, layout=chosen, keys=keys)
    records = [
        {"row": i, "class": cls, "logits": [round(float(v), 6) for v in logits]}
        for i, (cls, logits) in enumerate(zip(result.classes, result.logits, strict=True))
    ]
    if as_json:
        typer.echo(json.dumps({"model_id": model, "layout": result.layout, "predictions": records}))
        return
    for record in records:
        typer.echo(f"{record['row']}\t{record['class']}")
