"""Lazy restore, proxy side, the parts without devices: which members stay in the archive, tags, pagemaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.restore import lazy
from shim.restore.lazy import DEFER_MIN_SIZE, deferrable, tag, tag_prefix
from shim.restore.loopdev import TAG_PREFIX
from shim.restore.pagemap import PAGE_SIZE, PE_LAZY, PE_PRESENT
from tests.support.criu import pagemap_image

# --- deferrable -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["checkpoint/pages-1.img", "checkpoint/pages-42.img", "./checkpoint/pages-3.img",
                                  "checkpoint/pages-123456789.img"])
def test_large_page_images_are_deferred(name: str) -> None:
    assert deferrable(name, DEFER_MIN_SIZE)
    assert deferrable(name, 64 << 30)


@pytest.mark.parametrize("name", ["checkpoint/pages-1.img", "checkpoint/pages-7.img"])
def test_small_page_images_are_copied(name: str) -> None:
    assert not deferrable(name, DEFER_MIN_SIZE - 1)
    assert not deferrable(name, 0)


@pytest.mark.parametrize("name", [
    "checkpoint/pagemap-1.img",
    "checkpoint/pages-1.img.bak",
    "checkpoint/pages-1.img/x",
    "checkpoint/pages-.img",
    "checkpoint/pages-x.img",
    "checkpoint/pages-1234567890.img",  # more digits than CRIU's ids ever have
    "checkpoint/core-1.img",
    "checkpoint/inventory.img",
    "pages-1.img",
    "other/pages-1.img",
    "checkpoint/sub/pages-1.img",
    "rootfs-diff.tar",
    "checkpoint/../pages-1.img",
    ".checkpoint/pages-1.img",  # a leading dot is part of a name, not a "./" to drop
    "..checkpoint/pages-1.img",
    "/checkpoint/pages-1.img",
])
def test_other_members_are_copied_whatever_their_size(name: str) -> None:
    assert not deferrable(name, 1 << 30)


# --- tags ---------------------------------------------------------------------------------


def test_tag_is_stable_and_under_its_root_prefix() -> None:
    root = Path("/var/lib/criu-shim/restore")
    work = root / ("ab" * 16)
    assert tag(work) == tag(Path(str(work)))
    assert tag_prefix(root) == tag_prefix(Path("/var/lib/criu-shim/restore"))
    assert tag(work).startswith(tag_prefix(root))
    assert tag(work) == tag_prefix(root) + work.name


def test_tags_differ_per_work_root_and_per_restore() -> None:
    a, b = Path("/var/lib/criu-shim/restore"), Path("/var/tmp/other-node/restore")
    assert tag_prefix(a) != tag_prefix(b)
    assert not tag(b / "x").startswith(tag_prefix(a))
    assert tag(a / "x") != tag(a / "y")


def test_tag_fits_the_loop_device_name() -> None:
    # lo_file_name holds 64 bytes with its NUL: a longer tag would be cut and stop matching.
    work = Path("/var/lib/a/very/deep/restore/work/directory/for/criu-shim/restore") / ("f" * 32)  # a uuid4 hex
    assert len(TAG_PREFIX + tag(work).encode()) < 64
    assert len(tag_prefix(work.parent)) == 9 and tag_prefix(work.parent).endswith("/")


# --- the pagemaps prepare() reads ----------------------------------------------------------


def test_task_and_shared_memory_pagemaps_are_read(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(pagemap_image(1, (2, PE_PRESENT), (3, PE_PRESENT | PE_LAZY)))
    # Shared memory has its own pagemap and pages-N.img; without it that image would look inconsistent.
    (tmp_path / "pagemap-shmem-4026532012.img").write_bytes(pagemap_image(2, (1024, PE_PRESENT)))
    (tmp_path / "pages-1.img").write_bytes(b"")
    (tmp_path / "core-1.img").write_bytes(b"core")
    (tmp_path / "pagemap-9.img.bak").write_bytes(b"junk that is not parsed")
    (tmp_path / "pagemap-7.img").symlink_to(tmp_path / "pagemap-1.img")  # never followed
    maps = lazy._pagemaps(tmp_path)
    assert sorted(maps) == [1, 2]
    assert maps[1].data_size == 5 * PAGE_SIZE
    assert maps[2].data_size == 1024 * PAGE_SIZE


def test_two_pagemaps_of_one_pages_image_refused(tmp_path: Path) -> None:
    (tmp_path / "pagemap-1.img").write_bytes(pagemap_image(3, (1, PE_PRESENT)))
    (tmp_path / "pagemap-2.img").write_bytes(pagemap_image(3, (1, PE_PRESENT)))
    with pytest.raises(InvalidArgument, match="two pagemaps name pages-3.img"):
        lazy._pagemaps(tmp_path)


def test_garbage_pagemap_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "pagemap-12.img").write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match=r"^checkpoint image pagemap-12.img: not a CRIU pagemap image"):
        lazy._pagemaps(tmp_path)


def test_oversized_pagemap_refused_unread(tmp_path: Path) -> None:
    with (tmp_path / "pagemap-1.img").open("wb") as f:
        f.truncate(lazy._MAX_PAGEMAP + 1)  # sparse: no need for the bytes
    with pytest.raises(InvalidArgument, match=f"checkpoint image pagemap-1.img is over {lazy._MAX_PAGEMAP} bytes"):
        lazy._pagemaps(tmp_path)


def _images(tmp_path: Path, pages: int, present: int) -> Path:
    images = tmp_path / "checkpoint"
    images.mkdir()
    (images / "pagemap-1.img").write_bytes(pagemap_image(1, (present, PE_PRESENT), (7, 0)))
    (images / "pages-1.img").write_bytes(b"\0" * pages * PAGE_SIZE)
    return tmp_path


def test_memory_image_matching_its_pagemap_is_accepted(tmp_path: Path) -> None:
    lazy.check_memory_images(_images(tmp_path, 3, 3))


@pytest.mark.parametrize("pages", [0, 2, 4])
def test_memory_image_not_matching_its_pagemap_is_refused_before_criu(tmp_path: Path, pages: int) -> None:
    with pytest.raises(InvalidArgument, match=r"pages-1\.img .*pagemap of 12288 bytes.*inconsistent"):
        lazy.check_memory_images(_images(tmp_path, pages, 3))


def test_a_memory_image_left_in_the_archive_is_checked_by_prepare_not_here(tmp_path: Path) -> None:
    work = _images(tmp_path, 0, 3)
    lazy.check_memory_images(work, (lazy.Deferred("checkpoint/pages-1.img", 512, 3 * PAGE_SIZE),))


def test_missing_memory_image_of_a_pagemap_with_data_is_refused(tmp_path: Path) -> None:
    work = _images(tmp_path, 3, 3)
    (work / "checkpoint" / "pages-1.img").unlink()
    with pytest.raises(InvalidArgument, match="inconsistent"):
        lazy.check_memory_images(work)
