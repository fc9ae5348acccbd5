"""Random access to sealed archives (shim.sealed.chunks) and the page source over them
(shim.restore.sealed_pages): any byte range, authenticated; truncation, tampering and a shifted
chunk refused; version 1 archives not opened out of order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from shim.errors import InvalidArgument
from shim.restore.sealed_pages import SealedImage
from shim.sealed import CorruptSealedArchive, Keyring, SealedFile, decrypt_to, new_header
from shim.sealed import chunks as sealed_chunks
from shim.sealed.chunks import ChunkIndex, open_sealed
from shim.sealed.format import TAG_SIZE, WORD, WORD_SIZE, Header

KEY = bytes(range(32))
CHUNK = 4096


def _keyring(tmp_path: Path) -> Keyring:
    path = tmp_path / "key"
    path.write_text(KEY.hex())
    path.chmod(0o600)
    return Keyring({"k1": path})


def _seal(path: Path, data: bytes, version: int = 2, slot_at: int | None = None) -> None:
    header, data_key = new_header("k1", KEY, chunk_size=CHUNK)
    if version != 2:
        header = Header(header.key_id, header.wrapped_key, header.nonce_prefix, header.chunk_size, header.content,
                        version)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sealed = SealedFile(fd, header, data_key)
        if slot_at is None:
            sealed.write(data)
        else:  # a slot (a tar header known later) makes a short chunk: chunk offsets are not k * CHUNK
            sealed.write(data[:slot_at])
            slot = sealed.reserve(100)
            sealed.write(data[slot_at + 100:])
            sealed.fill(slot, data[slot_at:slot_at + 100])
        os.ftruncate(fd, sealed.close())
    finally:
        os.close(fd)


def _data(size: int = 20 * CHUNK + 123) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("in_place", ["as the library allows", "through a copy"])
def test_any_span_is_the_plaintext(tmp_path: Path, in_place: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if in_place == "through a copy":  # what cryptography 51+ makes of it (shim.sealed.format.IN_PLACE)
        monkeypatch.setattr(sealed_chunks, "IN_PLACE", False)
    data = _data()
    _seal(tmp_path / "a", data, slot_at=5000)
    image = SealedImage(tmp_path / "a", 1000, len(data) - 1000, _keyring(tmp_path))
    rng = random.Random(1)
    try:
        spans = [(0, 4096), (4096, 3 * CHUNK), (3 * CHUNK + 4096, 5 * CHUNK), (len(data) - 1001, 1)]
        spans += [(o, rng.randint(1, 6 * CHUNK)) for o in (rng.randrange(len(data) - 1000) for _ in range(200))]
        for offset, length in spans:
            length = min(length, image.size - offset)
            address = image.span(offset, length)
            assert ctypes_read(address, length) == data[1000 + offset:1000 + offset + length]
        assert image.chunks_opened == image.chunks_total == image.index.count
    finally:
        image.close()


def ctypes_read(address: int, length: int) -> bytes:
    import ctypes
    return ctypes.string_at(address, length)


def test_in_order_runs_open_each_chunk_once(tmp_path: Path) -> None:
    data = _data()
    _seal(tmp_path / "a", data)
    image = SealedImage(tmp_path / "a", 0, len(data), _keyring(tmp_path))
    image.prefetch(0, len(data))
    try:
        for offset in range(0, len(data), 3 * CHUNK + 512):  # runs that begin inside a chunk already opened
            length = min(3 * CHUNK + 512, len(data) - offset)
            assert ctypes_read(image.span(offset, length), length) == data[offset:offset + length]
        assert image.decrypted == len(data)
    finally:
        image.close()


def test_a_tampered_chunk_fails_when_opened_and_others_still_serve(tmp_path: Path) -> None:
    data = _data()
    _seal(tmp_path / "a", data)
    index = _index(tmp_path / "a")
    raw = bytearray((tmp_path / "a").read_bytes())
    raw[index.words[7] + WORD_SIZE + 10] ^= 1
    (tmp_path / "a").write_bytes(raw)
    image = SealedImage(tmp_path / "a", 0, len(data), _keyring(tmp_path))
    try:
        assert ctypes_read(image.span(0, CHUNK), CHUNK) == data[:CHUNK]
        with pytest.raises(CorruptSealedArchive, match=f"chunk 7 at byte {index.words[7]} fails authentication"):
            image.span(6 * CHUNK + 100, 2 * CHUNK)
        with pytest.raises(CorruptSealedArchive, match="chunk 7"):  # never served from the window afterwards
            image.span(7 * CHUNK, 10)
    finally:
        image.close()


def test_a_shortened_earlier_chunk_cannot_shift_later_ones(tmp_path: Path) -> None:
    """Chunk 2's word and body cut by 1000 bytes alike: the scan finds chunk 5 where it was, but
    its plaintext offset is now 1000 lower. Version 2 binds that offset: chunk 5 fails its tag
    rather than serving its bytes 1000 bytes early (version 1 could not tell)."""
    data = _data()
    _seal(tmp_path / "a", data)
    index = _index(tmp_path / "a")
    raw = bytearray((tmp_path / "a").read_bytes())
    at = index.words[2]
    raw[at:at + WORD_SIZE] = WORD.pack(CHUNK - 1000)
    del raw[at + WORD_SIZE:at + WORD_SIZE + 1000]
    (tmp_path / "a").write_bytes(raw)
    image = SealedImage(tmp_path / "a", 0, len(data) - 1000, _keyring(tmp_path))
    try:
        with pytest.raises(CorruptSealedArchive, match="chunk 5 .* fails authentication"):
            image.span(5 * CHUNK - 1000, 100)
    finally:
        image.close()


@pytest.mark.parametrize("cut", [1, TAG_SIZE, CHUNK, 3 * CHUNK + 7])
def test_truncation_is_refused_by_the_scan(tmp_path: Path, cut: int) -> None:
    data = _data()
    _seal(tmp_path / "a", data)
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(raw[:-cut])
    with pytest.raises(CorruptSealedArchive, match="is truncated at byte"):
        SealedImage(tmp_path / "a", 0, 100, _keyring(tmp_path))
    (tmp_path / "a").write_bytes(raw + b"x")
    with pytest.raises(CorruptSealedArchive, match="data after the final chunk"):
        SealedImage(tmp_path / "a", 0, 100, _keyring(tmp_path))


def test_version_1_is_read_in_order_only(tmp_path: Path) -> None:
    data = _data()
    _seal(tmp_path / "a", data, version=1)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        decrypt_to(tmp_path / "a", _keyring(tmp_path), fd)  # archives sealed before version 2 still restore
    finally:
        os.close(fd)
    assert out.read_bytes() == data
    with pytest.raises(InvalidArgument, match="format version 1 cannot be read out of order"):
        SealedImage(tmp_path / "a", 0, 100, _keyring(tmp_path))


def _index(path: Path) -> ChunkIndex:
    fd = os.open(path, os.O_RDONLY)
    try:
        return ChunkIndex.scan(fd, str(path))
    finally:
        os.close(fd)


def test_open_sealed_closes_on_a_bad_header(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"not sealed" * 10)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CorruptSealedArchive, match="not an encrypted checkpoint archive"):
        open_sealed(tmp_path / "a", _keyring(tmp_path), "x")
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("ahead", [True, False])
def test_in_order_runs_over_a_tampered_chunk_fail_at_it(tmp_path: Path, ahead: bool) -> None:
    """The worker opening chunks ahead of the fill meets the tampered chunk first: nothing of it is
    served; the run that needs it fails, every run before it is intact."""
    data = _data()
    _seal(tmp_path / "a", data)
    index = _index(tmp_path / "a")
    raw = bytearray((tmp_path / "a").read_bytes())
    raw[index.words[9] + WORD_SIZE + 1] ^= 1
    (tmp_path / "a").write_bytes(raw)
    image = SealedImage(tmp_path / "a", 0, len(data), _keyring(tmp_path), ahead=ahead)
    image.prefetch(0, len(data))  # the background fill began: the worker opens ahead
    run = 2 * CHUNK + 700
    try:
        for offset in range(0, len(data), run):
            length = min(run, len(data) - offset)
            if offset + length > 9 * CHUNK:
                with pytest.raises(CorruptSealedArchive, match="chunk 9 at byte"):
                    image.span(offset, length)
                break
            assert ctypes_read(image.span(offset, length), length) == data[offset:offset + length]
        else:
            raise AssertionError("no run reached the tampered chunk")
    finally:
        image.close()
