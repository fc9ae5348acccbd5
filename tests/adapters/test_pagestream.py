"""The page stream, with a writer process standing in for CRIU: images land in the tar in place."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from shim.checkpoint import dumpgate, orphandump, pagestream
from shim.checkpoint.archive import Member
from shim.checkpoint.compression import Compression
from shim.checkpoint.stream_archive import ARCHIVE_NAME, StreamedArchive

# Writes the FIFOs as CRIU does: opened O_WRONLY (blocking until a reader has it), written, closed.
WRITER = """
import os, sys
for spec in sys.argv[1:]:
    path, size = spec.rsplit(":", 1)
    fd = os.open(path, os.O_WRONLY)
    data = (path.encode() * (int(size) // len(path) + 1))[:int(size)]
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.close(fd)
"""
# Opens image 2 while image 1 is still open and unfinished: out of order, must not deadlock.
INTERLEAVED = """
import os, sys
a = os.open(sys.argv[1], os.O_WRONLY); os.write(a, b"A" * 100000)
b = os.open(sys.argv[2], os.O_WRONLY); os.write(b, b"B" * 300000); os.close(b)
os.write(a, b"A" * 100000); os.close(a)
"""


def content(path: Path, size: int) -> bytes:
    return (str(path).encode() * (size // len(str(path)) + 1))[:size]


def run_dump(staging: Path, script: str, args: list[str], processes: int = 1,
             compression: Compression | None = None) -> StreamedArchive:
    streamed = StreamedArchive.open(staging, processes, compression=compression)
    assert streamed is not None
    subprocess.run([sys.executable, "-c", script, *args], check=True, timeout=60)
    streamed.dump_ended()
    return streamed


def test_images_stream_into_the_archive_at_block_aligned_offsets(tmp_path: Path) -> None:
    images = tmp_path / "checkpoint"
    sizes = {1: 5 * 1024 * 1024 + 123, 2: 0, 3: 4096}
    specs = [f"{images / f'pages-{i}.img'}:{n}" for i, n in sizes.items()]
    streamed = run_dump(tmp_path, WRITER, specs, processes=3)
    (images / "inventory.img").write_bytes(b"inv")
    assert not any(stat.S_ISFIFO(os.lstat(p).st_mode) for p in images.iterdir())  # all FIFOs gone
    location = tmp_path / "out.tar"
    size = streamed.complete(location, [Member("checkpoint", is_dir=True), Member("checkpoint/inventory.img",
                                                                                  source=images / "inventory.img"),
                                        Member("spec.dump", data=b"{}")], durable=False)
    streamed.close()
    assert location.stat().st_size == size and stat.S_IMODE(location.stat().st_mode) == 0o600
    assert not (tmp_path / ARCHIVE_NAME).exists()
    block = os.statvfs(tmp_path).f_bsize
    with tarfile.open(location) as tar:
        names = tar.getnames()
        assert names[0] == "checkpoint" and names.count("checkpoint") == 1
        assert set(names) == {"checkpoint", "checkpoint/pages-1.img", "checkpoint/pages-2.img",
                              "checkpoint/pages-3.img", "checkpoint/inventory.img", "spec.dump"}
        for index, expected in sizes.items():
            member = tar.getmember(f"checkpoint/pages-{index}.img")
            assert member.size == expected and member.mode == 0o600 and member.uid == 0
            assert tar.extractfile(member).read() == content(images / f"pages-{index}.img", expected)  # type: ignore[union-attr]
            if expected:
                assert member.offset_data % block == 0  # a loop device / page cache sees whole pages
        assert tar.extractfile("checkpoint/inventory.img").read() == b"inv"  # type: ignore[union-attr]


def test_an_image_opened_out_of_turn_is_spilled_not_deadlocked(tmp_path: Path) -> None:
    images = tmp_path / "checkpoint"
    streamed = run_dump(tmp_path, INTERLEAVED, [str(images / "pages-1.img"), str(images / "pages-2.img")],
                        processes=2)
    location = tmp_path / "out.tar"
    streamed.complete(location, [Member("checkpoint", is_dir=True)], durable=False)
    streamed.close()
    with tarfile.open(location) as tar:
        assert tar.extractfile("checkpoint/pages-1.img").read() == b"A" * 200000  # type: ignore[union-attr]
        assert tar.extractfile("checkpoint/pages-2.img").read() == b"B" * 300000  # type: ignore[union-attr]


def test_a_full_disk_fails_the_stream_but_never_blocks_the_writer(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        images = small / "checkpoint"
        streamed = StreamedArchive.open(small, 1)
        assert streamed is not None
        # 8 MiB into a 1 MiB filesystem: the writer must still finish (CRIU would hold the container frozen).
        subprocess.run([sys.executable, "-c", WRITER, f"{images / 'pages-1.img'}:{8 << 20}"], check=True, timeout=60)
        with pytest.raises(OSError) as caught:
            streamed.dump_ended()
        assert caught.value.errno == 28  # ENOSPC, for the engine to report as RESOURCE_EXHAUSTED
        streamed.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_unused_fifos_never_reach_the_archive_and_close_is_idempotent(tmp_path: Path) -> None:
    streamed = StreamedArchive.open(tmp_path, 2)
    assert streamed is not None
    fifos = sorted((tmp_path / "checkpoint").iterdir())
    assert len(fifos) == 2 + pagestream.MARGIN and all(stat.S_ISFIFO(os.lstat(p).st_mode) for p in fifos)
    streamed.close()
    streamed.close()
    assert list((tmp_path / "checkpoint").iterdir()) == []


def test_an_orphaned_writer_of_pages_is_made_to_fail_never_let_through(tmp_path: Path) -> None:
    """criu-shim died: CRIU opening its next page FIFO sleeps with no reader; recovery fails its write
    (a reader that drained it would let a stop-after dump finish and end the container)."""
    images = tmp_path / "checkpoint"
    images.mkdir()
    pagestream.prepare(images, 0)
    criu = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(15, b'criu', 0, 0, 0); "
            "d = os.open(sys.argv[1], os.O_RDONLY); fd = os.open(sys.argv[2], os.O_WRONLY)\n"
            "try:\n    os.write(fd, bytes(1 << 20))\nexcept BrokenPipeError:\n    sys.exit(41)")
    writer = subprocess.Popen([sys.executable, "-c", criu, str(images), str(images / "pages-1.img")])
    try:
        deadline = time.monotonic() + 10
        while dumpgate.wait_channel(writer.pid) != orphandump.WAITING_FOR_READER:
            assert time.monotonic() < deadline, "the writer never slept in its open"
        assert orphandump.fail_waiting(images) == [writer.pid]
        assert writer.wait(timeout=30) == 41
    finally:
        writer.kill()
        writer.wait()
