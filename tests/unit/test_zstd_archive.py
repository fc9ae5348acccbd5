"""Hostile zstd archives at restore: truncated, bit-flipped, not zstd after the magic, bombs: each a
clear error, nothing unpacked. And the node config and annotations that ask for zstd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard

from shim.checkpoint.compression import Compression, room_for, wanted
from shim.config import CheckpointDefaults, parse
from shim.errors import InvalidArgument
from shim.restore.checkpoint_unpack import open_checkpoint
from tests.unit.test_restore_archive import checkpoint_entries, dest, refused, reg, tar_bytes  # noqa: F401

PACKED = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(
    tar_bytes(checkpoint_entries(**{"checkpoint/pages-2.img": os.urandom(300_000)})))


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "a.tar.zst"
    path.write_bytes(data)
    return path


def test_a_good_zstd_archive_unpacks(tmp_path: Path, dest: Path) -> None:  # noqa: F811
    archive = open_checkpoint(write(tmp_path, PACKED), dest)
    assert archive.compression == "zstd"
    assert (dest / "checkpoint" / "inventory.img").read_bytes() == b"inventory"


@pytest.mark.parametrize("cut", [10, len(PACKED) // 2, len(PACKED) - 5])
def test_truncated_zstd(tmp_path: Path, dest: Path, cut: int) -> None:  # noqa: F811
    refused(lambda: open_checkpoint(write(tmp_path, PACKED[:cut]), dest), "is truncated or corrupt")
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("at", [5, len(PACKED) // 3, len(PACKED) - 2])
def test_bit_flip_in_zstd(tmp_path: Path, dest: Path, at: int) -> None:  # noqa: F811
    flipped = bytearray(PACKED)
    flipped[at] ^= 0x10
    # zstd's frame checksum (written by criu-shim) or its block decoder catches it; a flip that leaves
    # a decodable stream changes tar bytes, and the tar reader refuses those.
    with pytest.raises(InvalidArgument):
        open_checkpoint(write(tmp_path, bytes(flipped)), dest)
    assert list(dest.iterdir()) == []


def test_zstd_magic_then_garbage(tmp_path: Path, dest: Path) -> None:  # noqa: F811
    refused(lambda: open_checkpoint(write(tmp_path, b"\x28\xb5\x2f\xfd" + os.urandom(4000)), dest),
            "is truncated or corrupt")
    assert list(dest.iterdir()) == []


def test_zstd_bomb_stops_at_the_size_limit(tmp_path: Path, dest: Path) -> None:  # noqa: F811
    # 64 MiB of zeros packs into a few KiB: refused once the member passes the limit, nothing left.
    bomb = zstandard.ZstdCompressor(level=1).compress(
        tar_bytes(checkpoint_entries(**{"checkpoint/pages-9.img": bytes(64 << 20)})))
    assert len(bomb) < 64 << 10
    refused(lambda: open_checkpoint(write(tmp_path, bomb), dest, max_size=1 << 20),
            "takes the unpacked size over the limit of 1048576 bytes")
    assert list(dest.iterdir()) == []


def test_zstd_bomb_of_headers_stops_at_the_stream_limit(tmp_path: Path, dest: Path) -> None:  # noqa: F811
    # Member data within the budget, but each member carries a huge pax header: the decompressed
    # stream is bounded too (limit = size limit + members x 4 KiB + 1 MiB).
    entries = checkpoint_entries()
    for index in range(4):
        info, data = reg(f"x{index}", b"")
        info.pax_headers = {"comment": "." * (900 << 10)}
        entries.append((info, data))
    bomb = zstandard.ZstdCompressor(level=1).compress(tar_bytes(entries))
    refused(lambda: open_checkpoint(write(tmp_path, bomb), dest, max_size=1 << 20, max_members=20),
            "decompresses to more than", "compression bomb")
    assert list(dest.iterdir()) == []


def test_zstd_frame_asking_for_a_huge_window(tmp_path: Path, dest: Path) -> None:  # noqa: F811
    # Window log 31 (2 GiB): the decoder would allocate it; refused at zstd's default limit instead.
    params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # no size known: window as asked
    packed = stream.compress(tar_bytes(checkpoint_entries())) + stream.flush()
    assert zstandard.get_frame_parameters(packed).window_size == 1 << 31
    refused(lambda: open_checkpoint(write(tmp_path, packed), dest), "is truncated or corrupt")
    assert list(dest.iterdir()) == []


def test_config_compression() -> None:
    config = parse({"checkpoint": {"compression": "zstd", "compression_level": 7}})
    assert (config.checkpoint.compression, config.checkpoint.compression_level) == ("zstd", 7)
    assert parse({}).checkpoint.compression == "none"
    for bad, text in ((("gzip", 3), "checkpoint.compression must be one of ['none', 'zstd']"),
                      (("zstd", 0), "compression_level must be a zstd level 1..19"),
                      (("zstd", 22), "compression_level must be a zstd level 1..19"),
                      (("zstd", True), "compression_level must be a zstd level"),
                      (("zstd", "3"), "compression_level must be a zstd level")):
        with pytest.raises(InvalidArgument) as info:
            parse({"checkpoint": {"compression": bad[0], "compression_level": bad[1]}})
        assert text in info.value.message


def test_annotation_over_the_node_default() -> None:
    node = CheckpointDefaults(compression="zstd", compression_level=5)
    assert wanted(node, {}, "app") == Compression(5)
    assert wanted(node, {"checkpoint.criu-shim.io/compression": "none"}, "app") is None
    assert wanted(CheckpointDefaults(), {"checkpoint.criu-shim.io/compression": "ZSTD "}, "app") == Compression(3)
    assert wanted(node, {"checkpoint.criu-shim.io/compression": "zstd",
                         "app.checkpoint.criu-shim.io/compression": "none"}, "app") is None
    with pytest.raises(InvalidArgument) as info:
        wanted(node, {"app.checkpoint.criu-shim.io/compression": "lz4"}, "app")
    assert "annotation app.checkpoint.criu-shim.io/compression: expected one of ['none', 'zstd'], got 'lz4'" \
        in info.value.message


@pytest.mark.parametrize("length", [1, 1536, 4096, 200_000])
def test_a_reserved_header_always_fits_its_room(length: int) -> None:
    worst = os.urandom(length)  # incompressible: the bound's case
    frame = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(worst)
    assert len(frame) + 8 <= room_for(length)
