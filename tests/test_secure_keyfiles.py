"""Key files are written atomically with exact modes and read only when private."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvault.errors import KeyFileError
from secure.keyfiles import read_secret_file, write_public_file, write_secret_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask0", "umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under several umasks: modes must not depend on them."""
    value: int = request.param
    old = os.umask(value)
    try:
        yield value
    finally:
        os.umask(old)


def test_secret_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "a" / "b" / "secret.key"
    write_secret_file(path, b"s3cret")
    assert path.read_bytes() == b"s3cret"
    assert _mode(path) == 0o600
    assert read_secret_file(path) == b"s3cret"


def test_public_file_is_0644_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "nested" / "ca.crt"
    write_public_file(path, b"cert")
    assert path.read_bytes() == b"cert"
    assert _mode(path) == 0o644


def test_overwriting_a_loose_file_tightens_it(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"old")
    path.chmod(0o666)
    write_secret_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    for i in range(3):
        write_secret_file(tmp_path / "k", bytes([i]) * 1000)
    write_public_file(tmp_path / "p", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "p"]


def test_large_and_empty_contents_round_trip(tmp_path: Path) -> None:
    big = os.urandom(3 * 1024 * 1024 + 7)
    write_secret_file(tmp_path / "big", big)
    write_secret_file(tmp_path / "empty", b"")
    assert read_secret_file(tmp_path / "big") == big
    assert read_secret_file(tmp_path / "empty") == b""


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="does not exist") as info:
        read_secret_file(path)
    assert str(info.value) == f"key file {path} does not exist"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700 | 0o010, 0o601])
def test_over_permissive_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "loose.key"
    path.write_bytes(b"topsecretmaterial")
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        read_secret_file(path)
    message = str(info.value)
    assert message == (
        f"key file {path} is readable by group or others (mode {mode:#o}); run chmod 600 {path}"
    )
    assert "topsecretmaterial" not in message


def test_0644_message_is_exactly_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"\(mode 0o644\); run chmod 600 "):
        read_secret_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x")
    path.chmod(mode)
    assert read_secret_file(path) == b"x"


def test_directory_is_not_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_secret_file(tmp_path / "d")


def test_symlink_to_private_file_is_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    write_secret_file(target, b"k")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert read_secret_file(link) == b"k"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"x")
    path.chmod(0o000)
    with pytest.raises(KeyFileError, match="not readable"):
        read_secret_file(path)


def test_write_into_a_file_instead_of_a_directory_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(KeyFileError, match="cannot create"):
        write_secret_file(blocker / "k", b"x")
