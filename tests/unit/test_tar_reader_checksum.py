"""A compressed archive's own checksum is checked to its end (shim.restore.tar_reader.TarInput).

A byte flipped inside an incompressible member decompresses without error (zstd stores such data
as raw blocks, gzip's deflate as stored blocks); only the stream's checksum says the data is not
what was written. gzip's CRC comes after the tar's end-of-archive blocks and went unread before
TarInput drained the stream (the gzip case failed then); zstd's frame checksum was reached anyway
here, and stays checked.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from shim.errors import InvalidArgument
from shim.restore.tar_reader import TarInput

DATA = os.urandom(256 << 10)  # incompressible: stored as it is inside the compressed stream


def _tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("checkpoint/pages-1.img")
        info.size = len(DATA)
        tar.addfile(info, io.BytesIO(DATA))
    return out.getvalue()


def _compressed(kind: str) -> bytes:
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(_tar())
    return gzip.compress(_tar())


def _read_all(path: Path) -> bytes:
    with TarInput(path, f"checkpoint archive {path}") as tar:
        out = b""
        for member in tar.members():
            out += b"".join(tar.chunks(member, 1 << 16))
        return out


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_an_intact_archive_reads_whole(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "a.tar"
    path.write_bytes(_compressed(kind))
    assert _read_all(path) == DATA


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_a_byte_flipped_in_stored_data_is_found_by_the_checksum(tmp_path: Path, kind: str) -> None:
    data = bytearray(_compressed(kind))
    at = data.find(DATA[100_000:100_064])  # inside the member's data, stored as it is
    assert at > 0, "the member's data should be stored uncompressed"
    data[at] ^= 0x40
    path = tmp_path / "a.tar"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument, match=f"checkpoint archive {path} is truncated or corrupt"):
        _read_all(path)
