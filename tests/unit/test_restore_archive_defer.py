"""Unpacking for a lazy restore: large page images of a plain tar stay in it, created sparse and listed."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.restore import lazy
from shim.restore.checkpoint_unpack import open_checkpoint
from shim.restore.lazy import DEFER_MIN_SIZE, Deferred
from tests.unit.test_restore_archive import Entry, checkpoint_entries, reg, special, tar_bytes, write_tar

PAGES_SIZE = DEFER_MIN_SIZE + 2 * 4096
# Not all zeros, so that a copy, a hole and the archive's bytes tell apart.
PAGES = (bytes(range(1, 256)) * (PAGES_SIZE // 255 + 1))[:PAGES_SIZE]
SMALL = b"\x5a" * 8192


def entries(pages_name: str = "checkpoint/pages-1.img") -> list[Entry]:
    """The smallest checkpoint, with one large page image and one small one."""
    base = [entry for entry in checkpoint_entries() if entry[0].name != "checkpoint/pages-1.img"]
    return [*base, reg(pages_name, PAGES), reg("checkpoint/pages-2.img", SMALL)]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "unpacked"
    path.mkdir(mode=0o700)
    return path


def member_offset(archive: Path, name: str) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember(name).offset_data


def test_large_page_image_stays_in_a_plain_tar(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", entries())

    unpacked = open_checkpoint(archive, dest, defer=lazy.deferrable)

    pages = dest / "checkpoint" / "pages-1.img"
    st = pages.stat()
    assert st.st_size == PAGES_SIZE
    assert st.st_blocks * 512 < 64 << 10  # sparse: the data was not written
    with pages.open("rb") as f:
        assert f.read(4096) == bytes(4096)
    offset = member_offset(archive, "checkpoint/pages-1.img")
    assert unpacked.deferred == (Deferred("checkpoint/pages-1.img", offset, PAGES_SIZE),)
    assert offset % 512 == 0
    with archive.open("rb") as f:
        f.seek(offset)
        assert f.read(PAGES_SIZE) == PAGES
    # Everything else is copied as usual, the small page image too.
    assert (dest / "checkpoint" / "pages-2.img").read_bytes() == SMALL
    assert (dest / "checkpoint" / "inventory.img").read_bytes() == b"inventory"


def test_names_given_to_defer_are_normalised(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", entries("./checkpoint//pages-1.img"))
    asked: list[tuple[str, int]] = []

    def defer(name: str, size: int) -> bool:
        asked.append((name, size))
        return lazy.deferrable(name, size)

    unpacked = open_checkpoint(archive, dest, defer=defer)
    assert ("checkpoint/pages-1.img", PAGES_SIZE) in asked
    assert ("checkpoint/pages-2.img", len(SMALL)) in asked
    assert all(not name.startswith(("./", "/")) and "//" not in name for name, _ in asked)
    assert [d.name for d in unpacked.deferred] == ["checkpoint/pages-1.img"]
    assert unpacked.deferred[0].offset == member_offset(archive, "./checkpoint//pages-1.img")


def test_gzip_archive_is_copied_whole(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "a.tar.gz", entries(), compress=True)
    asked: list[str] = []

    def defer(name: str, size: int) -> bool:
        asked.append(name)
        return True

    unpacked = open_checkpoint(archive, dest, defer=defer)
    assert unpacked.deferred == ()
    assert asked == []  # offsets in a compressed stream mean nothing: not even asked
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == PAGES


def test_without_defer_everything_is_copied(tmp_path: Path, dest: Path) -> None:
    unpacked = open_checkpoint(write_tar(tmp_path / "a.tar", entries()), dest)
    assert unpacked.deferred == ()
    pages = dest / "checkpoint" / "pages-1.img"
    assert pages.read_bytes() == PAGES
    assert pages.stat().st_blocks * 512 >= PAGES_SIZE


def test_archive_cut_inside_a_deferred_member_is_refused(tmp_path: Path, dest: Path) -> None:
    # Its data is never copied, so the archive's end must be noticed by the tar reader.
    path = write_tar(tmp_path / "cut.tar", entries())
    offset = member_offset(path, "checkpoint/pages-1.img")
    path.write_bytes(path.read_bytes()[:offset + PAGES_SIZE // 2])
    with pytest.raises(InvalidArgument, match=f"checkpoint archive {path} is truncated or corrupt"):
        open_checkpoint(path, dest, defer=lazy.deferrable)
    assert list(dest.iterdir()) == []


def test_failure_after_a_deferred_member_leaves_nothing(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "evil.tar", [*entries(), special("checkpoint/tty", tarfile.CHRTYPE)])
    with pytest.raises(InvalidArgument, match="'checkpoint/tty' is a character device"):
        open_checkpoint(archive, dest, defer=lazy.deferrable)
    assert list(dest.iterdir()) == []


def test_deferred_members_count_against_the_size_limit(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", entries())
    with pytest.raises(InvalidArgument, match="'checkpoint/pages-1.img' takes the unpacked size over the limit"):
        open_checkpoint(archive, dest, max_size=PAGES_SIZE, defer=lazy.deferrable)
    assert list(dest.iterdir()) == []


def test_deferred_member_listed_twice_is_refused(tmp_path: Path, dest: Path) -> None:
    archive = write_tar(tmp_path / "a.tar", [*entries(), reg("checkpoint/pages-1.img", PAGES)])
    with pytest.raises(InvalidArgument, match="'checkpoint/pages-1.img' appears twice"):
        open_checkpoint(archive, dest, defer=lazy.deferrable)
    assert list(dest.iterdir()) == []


def test_gzip_magic_decides_not_the_name(tmp_path: Path, dest: Path) -> None:
    # A plain tar named .tar.gz is still plain: deferred. A gzip named .tar is still compressed: copied.
    plain = write_tar(tmp_path / "plain.tar.gz", entries())
    assert len(open_checkpoint(plain, dest, defer=lazy.deferrable).deferred) == 1
    packed = tmp_path / "packed.tar"
    packed.write_bytes(gzip.compress(tar_bytes(entries())))
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    assert open_checkpoint(packed, other, defer=lazy.deferrable).deferred == ()
