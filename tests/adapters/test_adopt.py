"""The in-place archive: the largest image becomes the tar, byte-for-byte what a copy would give."""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint import adopt
from shim.checkpoint.archive import Member, directory_members, write_archive


def _images(root: Path, pages_mb: int) -> Path:
    images = root / "staging" / "checkpoint"
    images.mkdir(parents=True)
    (images / "inventory.img").write_bytes(b"inventory")
    (images / "pages-1.img").write_bytes(os.urandom(1 << 20) * pages_mb)
    return images


def _members(images: Path) -> list[Member]:
    return [Member("spec.dump", data=b'{"ociVersion": "1.0.2"}'), Member("config.dump", data=b"{}"),
            *directory_members("checkpoint", images)]


def _contents(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"<dir>")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_in_place_archive_has_the_same_members_as_a_copy(tmp_path: Path) -> None:
    images = _images(tmp_path, 9)
    copied = tmp_path / "copied.tar"
    write_archive(copied, _members(images))
    expected = _contents(copied)
    pages_inode = (images / "pages-1.img").stat().st_ino
    location = tmp_path / "in-place.tar"
    size = adopt.write_archive_in_place(location, _members(images))
    assert size == location.stat().st_size
    assert location.stat().st_ino == pages_inode  # adopted, not copied
    assert _contents(location) == expected
    assert stat.S_IMODE(location.stat().st_mode) == 0o600
    assert sorted(p.name for p in images.iterdir()) == ["inventory.img"]  # no prefix temp file left


def test_small_images_are_copied(tmp_path: Path) -> None:
    images = _images(tmp_path, 1)  # under MIN_ADOPT_SIZE
    location = tmp_path / "a.tar"
    adopt.write_archive_in_place(location, _members(images))
    assert (images / "pages-1.img").exists()
    assert "checkpoint/pages-1.img" in _contents(location)


def test_filesystem_without_insert_range_falls_back_to_copy(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        images = _images(mnt, 9)
        location = mnt / "a.tar"
        adopt.write_archive_in_place(location, _members(images))
        assert (images / "pages-1.img").exists()  # tmpfs cannot insert ranges: copied
        assert len(_contents(location)["checkpoint/pages-1.img"]) == 9 << 20
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_alignment_header_puts_data_on_a_block_boundary() -> None:
    for offset in range(0, 8192, 512):
        header = adopt._aligned_header("checkpoint/pages-1.img", 123, offset, 4096)
        assert (offset + len(header)) % 4096 == 0
