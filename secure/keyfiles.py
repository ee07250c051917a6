"""Reading and writing files that hold keys, with permissions enforced.

Why this module exists: a private key written with the default umask (often
0644) is readable by every local account, and a key file that is half-written
when a process dies is worse than no key at all. So every secret is written to
a temporary file in the target directory, created 0600 from the first byte,
fsynced and then renamed over the target (a rename within one directory is
atomic on POSIX). Readers refuse key files that group or others could read, so
a mistake made by hand (``cp`` with a loose umask) is caught at start-up with
an actionable message instead of silently leaking a key.

Errors are :class:`fedvault.errors.KeyFileError`; they name the path and the
problem but never the file's content.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from fedvault.errors import KeyFileError

__all__ = ["read_secret_file", "write_public_file", "write_secret_file"]

SECRET_MODE = 0o600
"""Owner read/write only: the mode every private key file ends up with."""

PUBLIC_MODE = 0o644
"""World-readable: certificates and public keys, which are meant to be shared."""

_GROUP_OTHER_BITS = stat.S_IRWXG | stat.S_IRWXO


def write_secret_file(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600, whatever the umask.

    Parent directories are created if missing (with the process's default
    mode; the file's own mode is what protects the secret). An existing file at
    ``path`` is replaced in one step, so readers see the old key or the new
    one, never a mixture.
    """
    _atomic_write(path, data, SECRET_MODE)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0644, whatever the umask.

    Used for certificates and public keys: other users and services (e.g. a
    SuperLink running as another account) must be able to read them, and a
    torn write would be as confusing as for secrets.
    """
    _atomic_write(path, data, PUBLIC_MODE)


def read_secret_file(path: Path) -> bytes:
    """Return the bytes of the key file at ``path`` after checking its mode.

    The mode is checked on the opened descriptor (not on the path beforehand)
    so the file that is checked is the file that is read. Symbolic links are
    followed on purpose: secret stores such as Kubernetes mount keys through
    them.

    Raises:
        KeyFileError: the file does not exist, cannot be read, is not a regular
            file, or its mode grants any access to group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except PermissionError:
        raise KeyFileError(
            f"key file {path} is not readable by this user (permission denied)"
        ) from None
    except OSError as exc:
        raise KeyFileError(
            f"key file {path} cannot be opened: {exc.strerror or 'unknown error'}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if os.name == "posix" and mode & _GROUP_OTHER_BITS:
            raise KeyFileError(
                f"key file {path} is readable by group or others "
                f"(mode {mode:#o}); run chmod 600 {path}"
            )
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(
            f"key file {path} cannot be read: {exc.strerror or 'unknown error'}"
        ) from None
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a same-directory temporary file, fsync, then ``os.replace``.

    The temporary file is created with ``O_EXCL`` and mode 0600 so that no
    other process can open it, or read a secret from it, before it is complete;
    ``fchmod`` then sets the final mode exactly, since ``os.open``'s mode is
    filtered by the umask.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            tmp,
            os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0),
            SECRET_MODE,
        )
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or 'unknown error'}") from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyFileError(f"cannot write {path}: {exc.strerror or 'unknown error'}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself, so a crash cannot resurrect the old file.

    Best effort: some platforms and file systems cannot fsync a directory,
    and the data is already safely written by then.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
