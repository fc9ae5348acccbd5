"""The archive location: refused before anything is frozen, with a message naming the problem."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shim.checkpoint.location import staging_dir, validate
from shim.errors import InvalidArgument

CONTAINER_ID = "0123456789abcdef0123456789abcdef"


def refused(path: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        validate(path)
    return caught.value.message


def test_valid_path_is_returned(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.tar"
    assert validate(str(target)) == target
    assert not target.exists()  # validation creates nothing


def test_existing_regular_file_is_accepted(tmp_path: Path) -> None:
    # The archive replaces it atomically, like containerd's and CRI-O's.
    target = tmp_path / "checkpoint.tar"
    target.write_bytes(b"old")
    assert validate(str(target)) == target


def test_empty() -> None:
    assert "checkpoint location is empty" in refused("")


@pytest.mark.parametrize("path", ["checkpoint.tar", "./checkpoint.tar", "var/lib/cp.tar"])
def test_relative(path: str) -> None:
    message = refused(path)
    assert repr(path) in message
    assert "not an absolute path" in message


@pytest.mark.parametrize("suffix", ["/../cp.tar", "/sub/../cp.tar", "/.."])
def test_dot_dot(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "sub").mkdir()
    path = f"{tmp_path}{suffix}"
    message = refused(path)
    assert repr(path) in message
    assert "'..'" in message


def test_root_is_not_a_file_name() -> None:
    assert "must name a file" in refused("/")


def test_missing_directory(tmp_path: Path) -> None:
    path = str(tmp_path / "nope" / "cp.tar")
    message = refused(path)
    assert f"directory {tmp_path / 'nope'} does not exist" in message


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "does not exist" in refused(str(tmp_path / "file" / "cp.tar"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes os.access(W_OK) on a 0500 directory; "
                    "the branch is covered by test_non_writable_directory_reported_by_access")
def test_non_writable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert f"directory {locked} is not writable" in refused(str(locked / "cp.tar"))
    finally:
        locked.chmod(0o700)


def test_non_writable_directory_reported_by_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root a 0500 directory is still writable, so simulate what os.access says for a non-root
    # caller (or a read-only mount); the check must ask for both write and search permission.
    asked: list[tuple[Path, int]] = []

    def access(path: Path, mode: int) -> bool:
        asked.append((Path(path), mode))
        return False

    monkeypatch.setattr(os, "access", access)  # as seen by shim.checkpoint.location
    assert f"directory {tmp_path} is not writable" in refused(str(tmp_path / "cp.tar"))
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]


def test_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "cp.tar"
    target.mkdir()
    message = refused(str(target))
    assert repr(str(target)) in message
    assert "is a directory or a symlink" in message


@pytest.mark.parametrize("kind", ["to-file", "dangling", "to-dir"])
def test_symlink(tmp_path: Path, kind: str) -> None:
    victim = tmp_path / "victim"
    if kind == "to-file":
        victim.write_text("precious")
    elif kind == "to-dir":
        victim.mkdir()
    link = tmp_path / "cp.tar"
    link.symlink_to(victim)
    assert "is a directory or a symlink" in refused(str(link))
    if kind == "to-file":
        assert victim.read_text() == "precious"


def test_staging_dir_is_private_beside_the_location_and_removed(tmp_path: Path) -> None:
    target = tmp_path / "cp.tar"
    with staging_dir(target, CONTAINER_ID) as staging:
        assert staging.parent == tmp_path
        assert staging.name.startswith(f".criu-shim-{CONTAINER_ID[:12]}-")
        st = staging.lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700
        (staging / "checkpoint").mkdir()
        (staging / "checkpoint" / "pages-1.img").write_bytes(b"\0" * 100)
    assert list(tmp_path.iterdir()) == []


def test_staging_dirs_are_unique(tmp_path: Path) -> None:
    target = tmp_path / "cp.tar"
    with staging_dir(target, CONTAINER_ID) as first, staging_dir(target, CONTAINER_ID) as second:
        assert first != second
    assert list(tmp_path.iterdir()) == []


def test_staging_dir_is_removed_on_exception(tmp_path: Path) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), staging_dir(tmp_path / "cp.tar", CONTAINER_ID) as staging:
        (staging / "work").mkdir()
        (staging / "work" / "dump.log").write_text("log")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_staging_dir_is_removed_on_base_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), staging_dir(tmp_path / "cp.tar", CONTAINER_ID):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
