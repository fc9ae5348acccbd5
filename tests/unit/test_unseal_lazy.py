"""A sealed archive restored lazily: everything but the memory images decrypted up front, the
images' chunks left encrypted (holes in the private copy), filled where CRIU reads them itself
(shim.restore.unseal_lazy)."""

from __future__ import annotations

import asyncio
import os
import random
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint.archive import Member
from shim.checkpoint.sealing import SealKey, write_sealed_archive
from shim.config import EncryptionSettings
from shim.errors import InvalidArgument
from shim.restore.lazy import deferrable
from shim.restore.unseal import plaintext_path
from shim.restore.unseal_lazy import PartlyDecrypted, decrypted_partly, servable
from shim.sealed import CorruptSealedArchive

KEY = bytes(range(32))
PAGES = random.Random(3).randbytes(9 << 20)  # over lazy.DEFER_MIN_SIZE: stays in the archive


def setup(tmp_path: Path) -> tuple[Path, Path, EncryptionSettings]:
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o600)
    archive = tmp_path / "ckpt.tar"
    members = [Member("spec.dump", data=b"{}" * 5000), Member("checkpoint/pages-1.img", data=PAGES),
               Member("checkpoint/pagemap-1.img", data=b"p" * 300)]
    write_sealed_archive(archive, members, SealKey("k1", KEY), durable=False)
    restore = tmp_path / "restore"
    restore.mkdir(mode=0o700)
    work = restore / "abc"
    work.mkdir()
    return archive, work, EncryptionSettings(key_id="k1", key_file=key_file)


def partly(archive: Path, work: Path, settings: EncryptionSettings, check: object) -> None:
    async def run() -> None:
        async with decrypted_partly(archive, work, settings, deferrable) as partial:
            assert partial.plain == plaintext_path(work)
            check(partial)  # type: ignore[operator]

    asyncio.run(run())


def test_only_the_memory_image_is_left_encrypted(tmp_path: Path) -> None:
    archive, work, settings = setup(tmp_path)
    assert servable(archive)

    def check(partial: PartlyDecrypted) -> None:
        with tarfile.open(partial.plain) as tar:
            assert tar.extractfile("spec.dump").read() == b"{}" * 5000  # type: ignore[union-attr]
            assert tar.extractfile("checkpoint/pagemap-1.img").read() == b"p" * 300  # type: ignore[union-attr]
            pages = tar.getmember("checkpoint/pages-1.img")
        left_out = sum(len(r) for r in partial.holes)
        assert left_out >= 7 and partial.chunks_opened == partial.index.count - left_out
        raw = partial.plain.read_bytes()
        image = raw[pages.offset_data:pages.offset_data + pages.size]
        assert image != PAGES and image.count(0) > 7 << 20  # holes: nothing of the memory in the clear
        partial.check_holes([("checkpoint/pages-1.img", pages.offset_data, pages.size)])
        partial.fill(pages.offset_data + (3 << 20) + 5, 4096)  # a run CRIU reads itself
        raw = partial.plain.read_bytes()
        at = pages.offset_data + (3 << 20) + 5
        assert raw[at:at + 4096] == PAGES[(3 << 20) + 5:(3 << 20) + 5 + 4096]
        with pytest.raises(InvalidArgument, match="belong to no memory image"):
            partial.check_holes([])
        assert partial.key_sources() == {"key_files": {"k1": str(settings.key_file)}, "key_command": []}  # no key

    partly(archive, work, settings, check)
    assert not plaintext_path(work).exists()


def test_tampered_header_chunk_fails_before_anything(tmp_path: Path) -> None:
    archive, work, settings = setup(tmp_path)
    raw = bytearray(archive.read_bytes())
    raw[-10] ^= 1  # the final chunk: always opened up front
    archive.write_bytes(raw)
    with pytest.raises(CorruptSealedArchive, match="fails authentication"):
        partly(archive, work, settings, lambda p: None)
    assert not plaintext_path(work).exists()


def test_truncated_fails_before_anything(tmp_path: Path) -> None:
    archive, work, settings = setup(tmp_path)
    os.truncate(archive, archive.stat().st_size - 5000)
    with pytest.raises(CorruptSealedArchive, match="is truncated at byte"):
        partly(archive, work, settings, lambda p: None)
    assert not plaintext_path(work).exists()
