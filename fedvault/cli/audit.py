"""``fedvault audit``: keys, a development server, verification, search and export.

The verifier trusts one thing only, the verifier key given with ``--key`` (a
key line or a file holding one), obtained out of band — never the key the
server publishes; ``fedvault audit public-key --home H`` prints it on the
gateway's host, any time. It remembers the last checkpoint it verified, in
the user's data directory (``--state`` or ``FEDVAULT_AUDIT_VERIFIER_STATE``
to put it elsewhere), so that a rewritten or rolled-back history fails on the
next run.

``search`` and ``export`` read up to the tree size of the checkpoint taken
when they start: a gateway audits every read of its log, so each page read
appends an entry, and "read until an empty page" never ended.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer

from fedvault.cli.options import (
    HeaderTimeoutOpt,
    HomeOpt,
    IdleTimeoutOpt,
    LogFormatOpt,
    MaxConnectionsOpt,
    connection_limits,
    connection_overrides,
)
from fedvault.errors import ConfigError, IntegrityError, NotFoundError
from fedvault.logs import LogFormat, configure_logging, json_logging_enabled, uvicorn_log_config
from fedvault.settings import load_settings
from fedvault.urls import bearer_token, check_service_url

if TYPE_CHECKING:
    from secure.signed_note import NoteVerifier
    from server.audit.log import AuditLog
    from server.audit.records import AuditRecord
    from server.audit.verifier import BundleSource, LogSource, VerifierState

audit_app = typer.Typer(
    help="Tamper-evident audit log: keys, verification, search, export.", no_args_is_help=True
)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Base URL of the API serving /v2/audit.")]
BundleOpt = Annotated[
    Path | None, typer.Option("--bundle", help="Offline bundle written by --export.")
]
TokenOpt = Annotated[
    Path | None, typer.Option("--token-file", help="File holding the bearer token (0600).")
]
KeyOpt = Annotated[
    str, typer.Option("--key", help="Verifier key line <name>+<id>+<key>, or a file holding it.")
]


def _verifier(key: str) -> NoteVerifier:
    from secure.signed_note import NoteVerifier

    path = Path(key)
    if "+" not in key or path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read verifier key {path}: {exc.strerror}") from None
        try:
            key = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(
                f"verifier key file {path} is not UTF-8 text (not a verifier key file)"
            ) from None
    return NoteVerifier.parse(key)


def _token(path: Path | None) -> str | None:
    if path is None:
        return None
    from secure.keyfiles import read_secret_file

    return bearer_token(read_secret_file(path), path, "token file")


def _bundle(directory: Path) -> BundleSource:
    """The bundle at ``directory``; one whose files are not text is not a bundle (exit 2)."""
    from server.audit.verifier import BundleSource

    try:
        return BundleSource(directory)
    except UnicodeDecodeError:
        raise ConfigError(
            f"not an audit bundle: {directory} (checkpoint.txt or entries.jsonl is not UTF-8 text)"
        ) from None


def _source(url: str | None, bundle: Path | None, token: Path | None) -> LogSource:
    from server.audit.verifier import HttpSource

    if bundle is not None and url is None:
        return _bundle(bundle)
    if url is None or bundle is not None:
        raise ConfigError("give exactly one of --url or --bundle")
    return HttpSource(check_service_url(url, "--url"), token=_token(token))


@audit_app.command("keygen")
def keygen(
    name: Annotated[str, typer.Option("--name", help="Log origin / key name, e.g. org/audit.")],
    out: Annotated[Path, typer.Option("--out", help="Private key file to create (0600).")],
) -> None:
    """Create a checkpoint signing key; print the verifier key to publish."""
    from secure.signed_note import generate_note_key, save_note_signer

    if out.exists():
        raise ConfigError(f"{out} exists; refusing to overwrite a signing key")
    signer = generate_note_key(name)
    save_note_signer(out, signer)
    typer.echo(signer.verifier.line)


@audit_app.command("public-key")
def public_key(
    home: HomeOpt = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            help="A signing key file elsewhere (default: HOME/keys/gateway-audit.key).",
        ),
    ] = None,
) -> None:
    """Print the verifier key of the gateway's audit log (public; for `audit verify --key`).

    The gateway prints it only when it creates the key, on its first start;
    a compliance officer needs it later. Derived from the signing key file,
    so it is the key the log is really signed with; only the public key line
    is printed, never private material.
    """
    from secure.signed_note import load_note_signer

    path = key_file if key_file is not None else load_settings(home=home).audit_key_file
    if not path.exists():
        raise NotFoundError(
            f"no audit signing key at {path} yet: `fedvault gateway start` creates it on its "
            "first start (give that gateway's --home), or `fedvault audit keygen` for a log "
            "of your own"
        )
    typer.echo(load_note_signer(path).verifier.line)


PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="File holding the PostgreSQL password (a postgresql:// --db never carries one).",
    ),
]


PreviousKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--previous-key",
        help=(
            "Rotating the signing key: the old verifier key line, whose checkpoints "
            "the store still ends with (needed until the new key has signed one)."
        ),
    ),
]


def _open_log(db: str, key: Path, password_file: Path | None, previous_key: str | None) -> AuditLog:
    """The log at ``db``, signed with ``key``; the keys are loaded before the store is opened.

    Opening a SQLite store creates its file, so a mistyped key path used to
    leave a new, empty audit database behind.
    """
    from secure.signed_note import NoteVerifier, load_note_signer
    from server.audit.log import AuditLog
    from server.audit.storage import open_storage

    signer = load_note_signer(key)
    previous = NoteVerifier.parse(previous_key) if previous_key else None
    storage = open_storage(db, password_file=password_file)
    try:
        return AuditLog(storage, signer, previous_key=previous, key_source=f"--key {key}")
    except BaseException:
        storage.close()
        raise


@audit_app.command("checkpoint")
def checkpoint(
    db: Annotated[str, typer.Option("--db", help="SQLite path or postgresql:// URL.")],
    key: Annotated[Path, typer.Option("--key", help="Signing key file (0600).")],
    password_file: PasswordFileOpt = None,
    previous_key: PreviousKeyOpt = None,
) -> None:
    """Sign a checkpoint now (on demand) and print it, after re-hashing every entry.

    Why every entry: the gateway refuses to sign over a log whose stored entry
    no longer matches its leaf hash, and this command must not be the way
    around that. The check is O(entries) (about 3 s per million here), which
    an on-demand signature can afford; a damaged log is refused with the
    first altered index.
    """
    log = _open_log(db, key, password_file, previous_key)
    try:
        log.start_integrity_checks(state_file=None, entries_per_interval=0)
        problem = log.integrity.problem()
        if problem is not None:
            raise IntegrityError(f"not signed: {problem}")
        typer.echo(log.checkpoint(force=True), nl=False)
    finally:
        log.close()


@audit_app.command("serve")
def serve(
    db: Annotated[str, typer.Option("--db", help="SQLite path or postgresql:// URL.")],
    key: Annotated[Path, typer.Option("--key", help="Signing key file (0600).")],
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="0 picks a free port.")] = 0,
    token_file: TokenOpt = None,
    password_file: PasswordFileOpt = None,
    previous_key: PreviousKeyOpt = None,
    header_timeout: HeaderTimeoutOpt = None,
    idle_timeout: IdleTimeoutOpt = None,
    max_connections: MaxConnectionsOpt = None,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Serve the audit API alone (development; the gateway mounts the same router)."""
    import asyncio

    import uvicorn
    from fastapi import FastAPI

    from server.audit.api import bearer_token_auth, create_audit_router, require_auditor
    from server.http_serving import check_bind, serve_until_signal
    from server.problem import install_problem_handlers

    from .processes import free_port

    configure_logging(log_format)
    token = _token(token_file)
    if token is None and host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError("--token-file is required when serving beyond loopback")
    limits = connection_limits(
        load_settings(**connection_overrides(header_timeout, idle_timeout, max_connections))
    )
    port = port or free_port()  # an IPv4 probe; check_bind then tries the real host
    check_bind(host, port, "the audit API")
    log = _open_log(db, key, password_file, previous_key)
    try:
        # No state file: a development server re-hashes every entry at start.
        log.start_integrity_checks(state_file=None)
    except BaseException:
        log.close()
        raise
    app = FastAPI(title="fedvault audit log")
    install_problem_handlers(app)
    app.include_router(create_audit_router(log))
    app.dependency_overrides[require_auditor] = bearer_token_auth(token)
    log.start_checkpointing()
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    url = f"http://{shown}:{port}/v2/audit"
    if json_logging_enabled():  # every line a JSON record, for the log shipper
        logging.getLogger("fedvault.audit").info(json.dumps({"event": "serving", "url": url}))
    else:
        typer.echo(f"serving {url}", err=False)
        sys.stdout.flush()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        log_config=uvicorn_log_config(),
    )
    try:
        # Not uvicorn.run: it re-raises SIGTERM before this finally, and the
        # log's committer and checkpoint thread would stop without closing.
        asyncio.run(serve_until_signal(config, limits))
    finally:
        log.close()


def _state_dir(state: Path | None, name: str, key_id: int) -> tuple[Path, Path | None]:
    """Where the verifier's state for this log and key lives, and a legacy place to read.

    The user's data directory (``FEDVAULT_AUDIT_VERIFIER_STATE`` or the XDG
    data home), one directory per origin and key id. Earlier versions kept it
    under HOME (``./.fedvault`` by default: the current directory), where a
    run from another directory silently started over; a state found there is
    taken over once, so its rollback protection is not lost.
    """
    if state is not None:
        return state, None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    settings = load_settings()
    leaf = f"{safe}-{key_id:08x}"
    legacy = settings.home / "audit-verifier" / leaf
    return settings.audit_verifier_dir / leaf, legacy


@audit_app.command("verify")
def verify(
    key: KeyOpt,
    url: UrlOpt = None,
    bundle: BundleOpt = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            help="Directory keeping the last verified checkpoint of this log. Default: the "
            "user's data directory, $XDG_DATA_HOME/fedvault/audit-verifier/ORIGIN-KEYID "
            "(~/.local/share/...); FEDVAULT_AUDIT_VERIFIER_STATE moves that root.",
        ),
    ] = None,
    export: Annotated[
        Path | None, typer.Option("--export", help="Also write an offline bundle here.")
    ] = None,
    token_file: TokenOpt = None,
) -> None:
    """Recompute the tree from every entry and check it against the signed checkpoint."""
    from server.audit.verifier import BundleWriter, VerifierState, verify_log

    verifier = _verifier(key)
    source = _source(url, bundle, token_file)
    # An archived bundle is checked on its own unless a state is named explicitly.
    state_dir, legacy = (
        (state, None) if bundle is not None else _state_dir(state, verifier.name, verifier.key_id)
    )
    previous = _load_state(state_dir, verifier) if state_dir is not None else None
    if previous is None and legacy is not None and legacy != state_dir:
        previous = _load_state(legacy, verifier)
        if previous is not None:
            typer.echo(
                f"using the verifier state found in {legacy} (an earlier version's place); "
                f"from now on it is kept in {state_dir}",
                err=True,
            )
    writer = BundleWriter(export, verifier.line) if export is not None else None
    try:
        result = verify_log(source, verifier, previous, bundle=writer)
    finally:
        if writer is not None:
            writer.close()
    if state_dir is not None:
        VerifierState(result.note, result.checkpoint, result.leaves).save(state_dir)
    cp = result.checkpoint
    since = (
        f"; consistent with the checkpoint of size {result.previous_size} seen before"
        if result.previous_size is not None
        else ""
    )
    typer.echo(f"verified {cp.size} entries of {cp.origin} (signed root matches{since})")


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _load_state(directory: Path, verifier: NoteVerifier) -> VerifierState | None:
    from server.audit.verifier import VerifierState

    try:
        return VerifierState.load(directory, verifier)
    except UnicodeDecodeError:
        raise ConfigError(
            f"verifier state {directory / 'checkpoint'} is not UTF-8 text "
            "(not a verifier state file)"
        ) from None


OUTCOMES: Final = (
    # Gateway requests (server.gateway.audit.outcome_of) and the log's own records.
    "ok",
    "denied",
    "error",
    "client-disconnected",  # server.gateway.audit.CLIENT_DISCONNECTED
    # Training (server.audit.training via server.coordinator): runs, rounds, charges,
    # models; a run's end carries its final status (server.store).
    "started",
    "resumed",
    "committed",
    "aborted",
    "charged",
    "registered",
    "finished",
    "failed",
    "stopped",
)
"""Every outcome fedvault records: a filter on any other value could only match nothing."""


class _Reading:
    """Entries up to the tree size of the checkpoint taken when reading starts.

    Why a checkpoint and not "until an empty page": a gateway audits every
    read of ``/v2/audit/entries``, so each page read appends one more entry
    and the log never runs out; a search or export only ended at the rate
    limit (or grew the log by 150,000 entries in 10 minutes without one).
    The checkpoint's signature is not checked here (that is ``verify``); its
    size is only where to stop, and it is said in the output.
    """

    def __init__(self, source: LogSource) -> None:
        self.source = source
        self.size: int | None = None
        self.read = 0

    def records(self) -> Iterator[tuple[int, AuditRecord]]:
        from secure.signed_note import parse_checkpoint
        from server.audit.records import InvalidEntry, decode_entry
        from server.audit.verifier import iter_entries

        note = self.source.checkpoint()
        try:
            size = parse_checkpoint(note[: note.rfind("\n\n") + 1]).size
        except IntegrityError as exc:
            raise IntegrityError(f"the log's checkpoint is malformed: {exc}") from None
        self.size = size
        for index, entry in iter_entries(self.source, size):
            self.read += 1
            try:
                yield index, decode_entry(entry)
            except InvalidEntry as exc:
                raise IntegrityError(f"FAILED at index {index}: {exc}") from None

    def summary(self) -> str:
        return (
            f"read {self.read} entries, up to the checkpoint of tree size {self.size} "
            "taken at start"
        )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt like Ctrl-C does, so ``finally`` and cleanup run.

    By default they end the process on the spot, and an export stopped by
    ``timeout`` or a closed terminal left its temporary file (33 MB seen)
    beside the target.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@audit_app.command("search")
def search(
    url: UrlOpt = None,
    bundle: BundleOpt = None,
    actor: Annotated[str | None, typer.Option("--actor")] = None,
    action: Annotated[str | None, typer.Option("--action")] = None,
    resource: Annotated[str | None, typer.Option("--resource")] = None,
    outcome: Annotated[
        str | None,
        typer.Option(
            "--outcome",
            help="Gateway requests: ok, denied or error; training: started, committed, "
            "charged, finished, … (any other value is refused).",
        ),
    ] = None,
    role: Annotated[str | None, typer.Option("--role")] = None,
    request_id: Annotated[
        str | None,
        typer.Option(
            "--request-id",
            help="The X-Request-ID / x-request-id the gateway echoed (or the caller sent).",
        ),
    ] = None,
    protocol: Annotated[str | None, typer.Option("--protocol", help="rest or grpc.")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="HTTP status (503) or gRPC code (UNAVAILABLE).")
    ] = None,
    error_type: Annotated[
        str | None,
        typer.Option("--error-type", help="Problem type URI, or its last part (rate-limited)."),
    ] = None,
    peer: Annotated[
        str | None, typer.Option("--peer", help="Peer address, or a prefix of it (10.0.0.).")
    ] = None,
    mtls_subject: Annotated[
        str | None, typer.Option("--mtls-subject", help="Text the mTLS subject contains.")
    ] = None,
    min_latency_ms: Annotated[
        float | None, typer.Option("--min-latency-ms", help="Slow requests only.")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO 8601, inclusive.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="ISO 8601, exclusive.")] = None,
    token_file: TokenOpt = None,
) -> None:
    """Print matching entries as JSON Lines (run `verify` first to trust them).

    Reads up to the checkpoint taken at the start and says so on stderr: a
    gateway appends an entry for each page read, so "until the end" would
    never come.

    Exact matches except where a reviewer rarely knows the whole value: the
    peer (prefix: a subnet), the mTLS subject (substring: a CN) and the error
    type (the URI or its last part).
    """
    if outcome is not None and outcome not in OUTCOMES:
        raise ConfigError(f"--outcome must be one of {', '.join(OUTCOMES)}; got {outcome!r}")
    lo, hi = _parse_time(since), _parse_time(until)
    source = _source(url, bundle, token_file)
    wanted = {
        "actor": actor,
        "action": action,
        "resource": resource,
        "outcome": outcome,
        "role": role,
        "request_id": request_id,
        "protocol": protocol,
        "status": status,
    }
    reading = _Reading(source)
    with _interruptible():
        _print_matches(reading, wanted, lo, hi, peer, mtls_subject, error_type, min_latency_ms)
    typer.echo(reading.summary(), err=True)


def _print_matches(
    reading: _Reading,
    wanted: dict[str, str | None],
    lo: datetime | None,
    hi: datetime | None,
    peer: str | None,
    mtls_subject: str | None,
    error_type: str | None,
    min_latency_ms: float | None,
) -> None:
    for index, record in reading.records():
        if any(v is not None and getattr(record, k) != v for k, v in wanted.items()):
            continue
        if (lo is not None and record.time < lo) or (hi is not None and record.time >= hi):
            continue
        if peer is not None and not (record.peer or "").startswith(peer):
            continue
        if mtls_subject is not None and mtls_subject not in (record.mtls_subject or ""):
            continue
        if error_type is not None and error_type not in (
            record.error_type,
            (record.error_type or "").rsplit(":", 1)[-1],
        ):
            continue
        if min_latency_ms is not None and (record.latency_ms or 0.0) < min_latency_ms:
            continue
        typer.echo(json.dumps({"index": index, **record.to_json_dict()}, ensure_ascii=False))


def _export_target(out: Path) -> tuple[Path, bool]:
    """The file ``--out`` names, and whether it must be written in place.

    Checked before anything is read. A device, pipe or descriptor alias
    (``/dev/stdout``, ``/proc/self/fd/1``, a FIFO) is written in place: it
    cannot be replaced by a rename, and resolving it would name the shell's
    redirect target (or a ``pipe:[N]`` that does not exist) instead.
    """
    try:
        existing = os.stat(out)  # through symbolic links
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out}: {exc.strerror}") from None
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise ConfigError(f"cannot write the export to {out}: it is a directory")
    alias = os.path.abspath(out).startswith(("/dev/", "/proc/"))
    if existing is not None and (alias or not stat.S_ISREG(existing.st_mode)):
        return out, True
    target = Path(os.path.realpath(out))
    if not target.parent.exists():
        raise ConfigError(
            f"cannot write the export to {out}: its directory {out.parent} does not exist"
        )
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write the export to {out}: {out.parent} is not a directory")
    return target, False


def _write_in_place(lines: Iterator[str], out: Path, target: Path) -> int:
    count = 0
    try:
        with target.open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                count += 1
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out}: {exc.strerror}") from None
    return count


def _write_lines(lines: Iterator[str], out: Path, target: Path, *, in_place: bool) -> int:
    """Write ``lines`` to ``target`` whole or not at all; how many were written.

    Into a new file beside it, renamed over it at the end: a failure part-way
    (an entry that does not decode, a server that goes away) used to leave
    ``target`` truncated — an earlier export destroyed. The new file gets the
    mode a plain ``open(..., "w")`` would have given: the old file's, else
    0666 less the umask. Audit records are not secret (digests, never bodies
    or credentials; ``search`` prints the same to stdout), so nothing tighter
    is imposed. A device or pipe is written in place (see
    :func:`_export_target`), and so is a writable file in a directory where no
    new file may be made (the only way it could be written at all).
    """
    if in_place:
        return _write_in_place(lines, out, target)
    try:
        existing = target.stat()
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out}: {exc.strerror}") from None
    if existing is not None and not os.access(target, os.W_OK):
        # A rename would replace a file the user may not write: refuse as open() did.
        raise ConfigError(f"cannot write the export to {out}: permission denied")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        if existing is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return _write_in_place(lines, out, target)
        raise ConfigError(f"cannot write the export to {out}: {exc.strerror}") from None
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        if existing is not None:
            os.chmod(tmp, stat.S_IMODE(existing.st_mode))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


@audit_app.command("export")
def export_jsonl(
    out: Annotated[Path, typer.Option("--out", help="JSON Lines file to write.")],
    url: UrlOpt = None,
    bundle: BundleOpt = None,
    token_file: TokenOpt = None,
) -> None:
    """Write every entry, decoded, as JSON Lines (one record per line, with its index).

    The file appears whole when every entry decoded; on any failure or
    interruption (Ctrl-C, SIGTERM, SIGHUP) an earlier file at ``--out`` is
    left as it was and no temporary file stays behind. Entries are read up to
    the checkpoint taken at the start (a gateway logs each read as it goes).
    """
    target, in_place = _export_target(out)
    source = _source(url, bundle, token_file)
    reading = _Reading(source)
    lines = (
        json.dumps({"index": index, **record.to_json_dict()}, ensure_ascii=False) + "\n"
        for index, record in reading.records()
    )
    with _interruptible():
        count = _write_lines(lines, out, target, in_place=in_place)
    # Written to a device (`--out /dev/stdout`): the summary must not join the lines.
    typer.echo(f"wrote {count} entries to {out} ({reading.summary()})", err=in_place)
