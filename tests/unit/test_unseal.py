"""Restore's view of a sealed archive: a private plaintext copy, or a clear error and nothing left."""

from __future__ import annotations

import asyncio
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint.archive import Member
from shim.checkpoint.sealing import SealKey, write_sealed_archive
from shim.config import EncryptionSettings
from shim.errors import Code, InvalidArgument, ShimError
from shim.restore.unseal import decrypted, plaintext_path

KEY = bytes(range(32))


def setup(tmp_path: Path, key: bytes = KEY) -> tuple[Path, Path, EncryptionSettings]:
    key_file = tmp_path / "key"
    key_file.write_text(key.hex())
    key_file.chmod(0o600)
    archive = tmp_path / "ckpt.tar"
    write_sealed_archive(archive, [Member("spec.dump", data=b"{}" * 5000)], SealKey("k1", KEY), durable=False)
    restore = tmp_path / "restore"
    restore.mkdir(mode=0o700)
    work = restore / "abc"
    work.mkdir()
    return archive, work, EncryptionSettings(key_id="k1", key_file=key_file)


def unseal(archive: Path, work: Path, settings: EncryptionSettings, fail: ShimError | None = None) -> bytes:
    async def run() -> bytes:
        async with decrypted(archive, work, settings) as plain:
            assert plain == plaintext_path(work) and stat.S_IMODE(plain.stat().st_mode) == 0o600
            if fail is not None:
                raise fail
            with tarfile.open(plain) as tar:
                return tar.extractfile("spec.dump").read()  # type: ignore[union-attr]

    return asyncio.run(run())


def test_sealed_archive_decrypted_privately_then_removed(tmp_path: Path) -> None:
    archive, work, settings = setup(tmp_path)
    assert unseal(archive, work, settings) == b"{}" * 5000
    assert not plaintext_path(work).exists()


def test_errors_name_the_archive_not_the_copy(tmp_path: Path) -> None:
    archive, work, settings = setup(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        unseal(archive, work, settings, InvalidArgument(f"checkpoint archive {plaintext_path(work)} is corrupt"))
    assert caught.value.message == f"checkpoint archive {archive} (decrypted) is corrupt"
    assert not plaintext_path(work).exists()


@pytest.mark.parametrize("damage,code,text", [
    ("flip", Code.INVALID_ARGUMENT, "fails authentication"),
    ("truncate", Code.INVALID_ARGUMENT, "truncated"),
    ("wrong_key", Code.FAILED_PRECONDITION, "wrong key"),
    ("no_key", Code.FAILED_PRECONDITION, "no key for key id 'k1'"),
    ("loose_key", Code.FAILED_PRECONDITION, "accessible by group or others"),
])
def test_bad_input_leaves_nothing(tmp_path: Path, damage: str, code: Code, text: str) -> None:
    archive, work, settings = setup(tmp_path)
    raw = bytearray(archive.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x80
        archive.write_bytes(raw)
    elif damage == "truncate":
        archive.write_bytes(raw[:len(raw) - 40])
    elif damage == "wrong_key":
        assert settings.key_file is not None
        settings.key_file.write_text(bytes(range(1, 33)).hex())
    elif damage == "no_key":
        settings = EncryptionSettings()
    elif damage == "loose_key":
        assert settings.key_file is not None
        os.chmod(settings.key_file, 0o644)
    with pytest.raises(ShimError) as caught:
        unseal(archive, work, settings)
    assert caught.value.code == code and text in caught.value.message
    assert sorted(os.listdir(work.parent)) == ["abc"] and not os.listdir(work)
