"""Lazy restore, proxy side, on this host: eager runs copied, read-only loop devices over the archive, released.

Root and /dev/loop-control, nothing else (no containerd, no node). Every loop
device a test attaches carries a tag of its own, and is released afterwards
whatever happened.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.restore import lazy, loopdev
from shim.restore.checkpoint_unpack import CheckpointArchive, open_checkpoint
from shim.restore.pagemap import PAGE_SIZE, PE_LAZY, PE_PRESENT
from tests.support.criu import pagemap_image

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                       reason="loop devices need root and /dev/loop-control"),
]

EAGER, LAZY, HOLE = PE_PRESENT, PE_PRESENT | PE_LAZY, 0
# (pages, flags): more than lazy.DEFER_MIN_SIZE present, so that pages-1.img stays in the archive.
RUNS = [(3, EAGER), (1024, LAZY), (5, HOLE), (2, EAGER), (100, LAZY), (1, EAGER), (7, EAGER | PE_LAZY)]
PRESENT_PAGES = sum(n for n, flags in RUNS if flags & PE_PRESENT)
PAGES_SIZE = PRESENT_PAGES * PAGE_SIZE
# In the pages file: eager pages 0-2, lazy 3-1026, eager 1027-1028, lazy 1029-1128, eager 1129, lazy 1130-1136.
EAGER_RANGES = [(0, 3 * PAGE_SIZE), (1027 * PAGE_SIZE, 2 * PAGE_SIZE), (1129 * PAGE_SIZE, PAGE_SIZE)]
CRIU = Path("/usr/local/sbin/criu-for-the-plan")


def page(number: int) -> bytes:
    """Page `number` of pages-1.img: no two alike, none zero."""
    return struct.pack("<QQ", number + 1, 0xC0FFEE) * (PAGE_SIZE // 16)


PAGES = b"".join(page(i) for i in range(PRESENT_PAGES))


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    """A plain checkpoint tar: the required members, then `files` under checkpoint/."""
    members = {"spec.dump": b'{"ociVersion": "1.0.2", "process": {"args": ["/x"], "cwd": "/"}}',
               "config.dump": b'{"id": "x"}', "checkpoint/inventory.img": b"inventory",
               **{f"checkpoint/{name}": data for name, data in files.items()}}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return path


def our_devices(prefix: str) -> list[str]:
    """Attached loop devices whose tag starts with `prefix`."""
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        tag = loopdev.tag_of(f"/dev/{entry.name}")
        if tag is not None and tag.startswith(prefix):
            found.append(f"/dev/{entry.name}")
    return found


def losetup(device: str) -> dict[str, str]:
    out = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET,SIZELIMIT,RO",
                          device], capture_output=True, text=True, check=True).stdout
    [row] = json.loads(out)["loopdevices"]
    return {key: str(value) for key, value in row.items()}


def device_bytes(device: str) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)


def assert_read_only(device: str) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(fd, bytes(PAGE_SIZE), 0)
    finally:
        os.close(fd)  # an open device would outlive its release


@pytest.fixture
def restore_root(tmp_path: Path) -> Iterator[Path]:
    """The work root of this test's restores; their devices are released afterwards, and must be."""
    root = tmp_path / "restore"
    root.mkdir()
    prefix = lazy.tag_prefix(root)
    try:
        yield root
    finally:
        loopdev.release_tagged(prefix)
    assert our_devices(prefix) == []


@pytest.fixture
def tag_root() -> Iterator[str]:
    """A tag prefix for loopdev tests; every device under it is released afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}/"
    try:
        yield prefix
    finally:
        loopdev.release_tagged(prefix)
    assert our_devices(prefix) == []


def unpack(archive: Path, root: Path) -> tuple[Path, CheckpointArchive]:
    work = root / uuid.uuid4().hex
    work.mkdir(mode=0o700)
    return work, open_checkpoint(archive, work, defer=lazy.deferrable)


# --- prepare / release ---------------------------------------------------------------------


def test_prepare_for_our_daemon_names_the_member_in_place_and_attaches_nothing(tmp_path: Path,
                                                                               restore_root: Path) -> None:
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES})
    work, unpacked = unpack(archive, restore_root)
    [member] = unpacked.deferred
    lazy.prepare(archive, work, unpacked.deferred, CRIU, "criu-shim")
    plan = json.loads((work / lazy.PLAN_FILE).read_text())
    assert plan == {"criu": str(CRIU), "daemon": "criu-shim", "pages": [
        {"image": "pages-1.img", "archive": str(archive), "offset": member.offset, "size": PAGES_SIZE, "unlink": False}]}
    assert archive.read_bytes()[member.offset:member.offset + PAGES_SIZE] == PAGES  # what the daemon maps
    assert lazy.attached(work) == []


def test_prepare_for_our_daemon_links_a_decrypted_copy_for_it_alone(tmp_path: Path, restore_root: Path) -> None:
    from shim.restore.unseal import plaintext_path

    work = restore_root / uuid.uuid4().hex
    work.mkdir(mode=0o700)
    plain = write_archive(plaintext_path(work), {"pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES})
    unpacked = open_checkpoint(plain, work, defer=lazy.deferrable)
    lazy.prepare(plain, work, unpacked.deferred, CRIU, "criu-shim")
    data = plain.read_bytes()
    plain.unlink()  # as unseal.decrypted does once unpacked
    [entry] = json.loads((work / lazy.PLAN_FILE).read_text())["pages"]
    link = Path(entry["archive"])
    assert link.parent == work and entry["unlink"] is True
    assert link.read_bytes() == data  # in the private work dir only; the daemon unlinks it once open


def test_prepare_copies_eager_runs_and_attaches_the_archive(tmp_path: Path, restore_root: Path) -> None:
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES})
    work, unpacked = unpack(archive, restore_root)
    [member] = unpacked.deferred
    assert (member.name, member.size) == ("checkpoint/pages-1.img", PAGES_SIZE)

    lazy.prepare(archive, work, unpacked.deferred, CRIU)

    # The sparse file holds the eager runs at their offsets, zeros elsewhere.
    pages = work / "checkpoint" / "pages-1.img"
    expected = bytearray(PAGES_SIZE)
    for offset, length in EAGER_RANGES:
        expected[offset:offset + length] = PAGES[offset:offset + length]
    assert pages.read_bytes() == bytes(expected)
    assert pages.stat().st_blocks * 512 < PAGES_SIZE // 4

    plan = json.loads((work / lazy.PLAN_FILE).read_text())
    [entry] = plan["pages"]
    assert plan == {"criu": str(CRIU), "daemon": "criu", "pages": [{"image": "pages-1.img", "device": entry["device"]}]}
    device = entry["device"]
    assert loopdev.tag_of(device) == lazy.tag(work)
    assert device_bytes(device) == PAGES  # exactly the member: no byte before, none after
    assert losetup(device) == {"name": device, "back-file": str(archive), "offset": str(member.offset),
                               "sizelimit": str(PAGES_SIZE), "ro": "True"}
    assert_read_only(device)

    assert lazy.release(work) == [device]
    assert loopdev.tag_of(device) != lazy.tag(work)
    assert our_devices(lazy.tag(work)) == []
    assert lazy.release(work) == []  # nothing left to release


def test_shared_memory_pages_are_copied_whole(tmp_path: Path, restore_root: Path) -> None:
    # Shared memory has its own pagemap (pagemap-shmem-<shmid>.img) and pages image; CRIU restores it itself.
    shmem = b"".join(page(i + 5000) for i in range(PRESENT_PAGES))
    archive = write_archive(tmp_path / "checkpoint.tar", {
        "pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES,
        "pagemap-shmem-4026532012.img": pagemap_image(2, (PRESENT_PAGES, EAGER)), "pages-2.img": shmem})
    work, unpacked = unpack(archive, restore_root)
    assert len(unpacked.deferred) == 2

    lazy.prepare(archive, work, unpacked.deferred, CRIU)

    assert (work / "checkpoint" / "pages-2.img").read_bytes() == shmem
    plan = json.loads((work / lazy.PLAN_FILE).read_text())
    assert [entry["image"] for entry in plan["pages"]] == ["pages-1.img", "pages-2.img"]
    assert device_bytes(plan["pages"][1]["device"]) == shmem
    assert len(lazy.release(work)) == 2


def test_release_leaves_other_restores_alone(tmp_path: Path, restore_root: Path) -> None:
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES})
    first, unpacked_first = unpack(archive, restore_root)
    second, unpacked_second = unpack(archive, restore_root)
    lazy.prepare(archive, first, unpacked_first.deferred, CRIU)
    lazy.prepare(archive, second, unpacked_second.deferred, CRIU)
    [kept] = our_devices(lazy.tag(second))

    assert len(lazy.release(first)) == 1
    assert our_devices(lazy.tag(first)) == []
    assert loopdev.tag_of(kept) == lazy.tag(second)
    assert device_bytes(kept) == PAGES


@pytest.mark.parametrize(("pagemap", "described"), [
    (pagemap_image(1, *RUNS[:-1]), f"a pagemap of {PAGES_SIZE - 7 * PAGE_SIZE} bytes"),
    (pagemap_image(1, *RUNS, (1, EAGER)), f"a pagemap of {PAGES_SIZE + PAGE_SIZE} bytes"),
    (pagemap_image(2, *RUNS), "no pagemap"),
])
def test_pagemap_not_matching_the_image_is_refused(tmp_path: Path, restore_root: Path, pagemap: bytes,
                                                   described: str) -> None:
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": pagemap, "pages-1.img": PAGES})
    work, unpacked = unpack(archive, restore_root)
    with pytest.raises(InvalidArgument) as caught:
        lazy.prepare(archive, work, unpacked.deferred, CRIU)
    assert caught.value.message == (f"checkpoint image checkpoint/pages-1.img ({PAGES_SIZE} bytes) has {described}: "
                                    "the memory image is inconsistent")
    assert our_devices(lazy.tag_prefix(restore_root)) == []
    assert not (work / lazy.PLAN_FILE).exists()


def test_failure_on_a_later_image_releases_the_earlier_devices(tmp_path: Path, restore_root: Path) -> None:
    # pages-1.img is fine and gets its device; pages-2.img has no pagemap.
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": pagemap_image(1, *RUNS), "pages-1.img": PAGES,
                                                          "pages-2.img": PAGES})
    work, unpacked = unpack(archive, restore_root)
    assert [d.name for d in unpacked.deferred] == ["checkpoint/pages-1.img", "checkpoint/pages-2.img"]
    with pytest.raises(InvalidArgument, match="checkpoint/pages-2.img .* has no pagemap"):
        lazy.prepare(archive, work, unpacked.deferred, CRIU)
    assert our_devices(lazy.tag_prefix(restore_root)) == []
    assert not (work / lazy.PLAN_FILE).exists()


def test_garbage_pagemap_is_refused_before_any_device(tmp_path: Path, restore_root: Path) -> None:
    archive = write_archive(tmp_path / "checkpoint.tar", {"pagemap-1.img": b"\x19\x43\x56\x54junk",
                                                          "pages-1.img": PAGES})
    work, unpacked = unpack(archive, restore_root)
    with pytest.raises(InvalidArgument, match="^checkpoint image pagemap-1.img: not a CRIU pagemap image"):
        lazy.prepare(archive, work, unpacked.deferred, CRIU)
    assert our_devices(lazy.tag_prefix(restore_root)) == []


# --- loopdev ---------------------------------------------------------------------------------


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    path = tmp_path / "backing"
    path.write_bytes(b"".join(page(i) for i in range(4)))
    return path


@pytest.mark.parametrize(("offset", "size"), [(1, PAGE_SIZE), (511, PAGE_SIZE), (4097, PAGE_SIZE), (0, 0),
                                              (512, -512)])
def test_attach_refuses_unaligned_offset_or_empty_size(backing: Path, tag_root: str, offset: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"offset {offset} must be 512-aligned and size {size} positive"):
        loopdev.attach_read_only(backing, offset, size, tag_root + "x")
    assert our_devices(tag_root) == []


def test_attach_shows_the_range(backing: Path, tag_root: str) -> None:
    device = loopdev.attach_read_only(backing, PAGE_SIZE, 2 * PAGE_SIZE, tag_root + "range")
    assert loopdev.tag_of(device) == tag_root + "range"
    assert device_bytes(device) == page(1) + page(2)
    assert_read_only(device)
    assert backing.read_bytes() == b"".join(page(i) for i in range(4))


def test_attach_refuses_a_symlink(backing: Path, tag_root: str, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(backing)
    with pytest.raises(OSError):
        loopdev.attach_read_only(link, 0, PAGE_SIZE, tag_root + "link")
    assert our_devices(tag_root) == []


def test_release_tagged_releases_only_matching_tags(backing: Path, tag_root: str) -> None:
    mine = [loopdev.attach_read_only(backing, 0, PAGE_SIZE, tag_root + "a/1"),
            loopdev.attach_read_only(backing, 0, PAGE_SIZE, tag_root + "a/2")]
    other = loopdev.attach_read_only(backing, 0, PAGE_SIZE, tag_root + "b/1")

    assert sorted(loopdev.release_tagged(tag_root + "a/")) == sorted(mine)

    assert our_devices(tag_root) == [other]
    assert loopdev.tag_of(other) == tag_root + "b/1"
    assert device_bytes(other) == page(0)


def test_detach_twice(backing: Path, tag_root: str) -> None:
    device = loopdev.attach_read_only(backing, 0, PAGE_SIZE, tag_root + "twice")
    # Held open, the device stays ours through both calls (another process cannot take it
    # between them); the kernel releases it at the last close.
    holder = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        loopdev.detach(device)
        loopdev.detach(device)
    finally:
        os.close(holder)
    assert loopdev.tag_of(device) != tag_root + "twice"
    assert our_devices(tag_root) == []


def test_detach_of_an_absent_device_is_a_no_op(tmp_path: Path) -> None:
    loopdev.detach(str(tmp_path / "no-such-device"))
    assert not (tmp_path / "no-such-device").exists()


def test_tag_of_a_path_that_is_no_loop_device(tmp_path: Path) -> None:
    assert loopdev.tag_of(str(tmp_path / "absent")) is None
    assert loopdev.tag_of("/dev/null") is None
