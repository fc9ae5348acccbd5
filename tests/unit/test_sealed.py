"""The sealed archive format: round trip, tampering anywhere, truncation, keys (shim.sealed)."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest

from shim.errors import Code
from shim.sealed import (
    CorruptSealedArchive,
    Keyring,
    KeyUnavailable,
    SealedFile,
    WrongKey,
    decrypt_to,
    is_encrypted,
    new_header,
    open_decrypted,
    read_header,
)
from shim.sealed import format as sealed_format
from shim.sealed.format import MAGIC, TAG_SIZE, WORD_SIZE, Opener, Sealer

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
CHUNK = 1000


def _key_file(tmp_path: Path, key: bytes, name: str = "key", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(key.hex() + "\n")
    path.chmod(mode)
    return path


def _seal(tmp_path: Path, plaintext: bytes, key: bytes = KEY, chunk: int = CHUNK, reserve_at: int | None = None,
          name: str = "a.sealed") -> Path:
    header, data_key = new_header("node-key-1", key, chunk_size=chunk)
    path = tmp_path / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sealed = SealedFile(fd, header, data_key)
        if reserve_at is None:
            sealed.write(plaintext)
        else:  # a slot whose content is known only later, as the page stream does for tar headers
            sealed.write(plaintext[:reserve_at])
            slot = sealed.reserve(10)
            sealed.write(plaintext[reserve_at + 10:])
            sealed.fill(slot, plaintext[reserve_at:reserve_at + 10])
        size = sealed.close()
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def _keyring(tmp_path: Path, key: bytes = KEY) -> Keyring:
    return Keyring({"node-key-1": _key_file(tmp_path, key, name=f"key-{key[0]}")})


def _plain(path: Path, keyring: Keyring) -> bytes:
    out = path.with_suffix(".out")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        decrypt_to(path, keyring, fd)
    finally:
        os.close(fd)
    return out.read_bytes()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_round_trip(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = _seal(tmp_path, data)
    assert is_encrypted(path) and path.read_bytes().startswith(MAGIC)
    assert data not in path.read_bytes() or size < 16
    assert _plain(path, _keyring(tmp_path)) == data
    with open_decrypted(path, _keyring(tmp_path)) as reader:
        assert io.BufferedReader(reader).read() == data


def test_reserved_slot_round_trip(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 5)
    path = _seal(tmp_path, data, reserve_at=CHUNK + 7)
    assert _plain(path, _keyring(tmp_path)) == data


def test_header_names_key_id_without_a_key(tmp_path: Path) -> None:
    header = read_header(_seal(tmp_path, b"x" * 10))
    assert (header.key_id, header.chunk_size) == ("node-key-1", CHUNK)
    assert not is_encrypted(tmp_path / "missing")
    (tmp_path / "plain.tar").write_bytes(b"\0" * 1024)
    assert not is_encrypted(tmp_path / "plain.tar")


def test_every_byte_flipped_is_detected(tmp_path: Path) -> None:
    """Header, chunk words, ciphertext, tags, the final chunk: a flipped bit anywhere fails."""
    data = os.urandom(2 * 64 + 9)
    path = _seal(tmp_path, data, chunk=64)
    original = path.read_bytes()
    keyring = _keyring(tmp_path)
    for index in range(len(original)):
        damaged = bytearray(original)
        damaged[index] ^= 0x01
        path.write_bytes(damaged)
        with pytest.raises((CorruptSealedArchive, WrongKey, KeyUnavailable)) as caught:
            _plain(path, keyring)
        assert caught.value.code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION), index


def test_truncation_at_every_length_is_detected(tmp_path: Path) -> None:
    data = os.urandom(3 * 64)
    path = _seal(tmp_path, data, chunk=64)
    original = path.read_bytes()
    keyring = _keyring(tmp_path)
    header_end = original.index(b"}") + 1
    frame = WORD_SIZE + 64 + TAG_SIZE
    for length in range(len(original)):
        path.write_bytes(original[:length])
        with pytest.raises(CorruptSealedArchive) as caught:
            _plain(path, keyring)
        if length > header_end and (length - header_end) % frame == 0:  # cut at a chunk boundary
            assert "truncated" in caught.value.message and "before the final chunk" in caught.value.message


def test_data_after_the_final_chunk(tmp_path: Path) -> None:
    path = _seal(tmp_path, b"abc" * 100, chunk=64)
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(CorruptSealedArchive, match="after the final chunk"):
        _plain(path, _keyring(tmp_path))


def test_reordered_chunks_fail(tmp_path: Path) -> None:
    path = _seal(tmp_path, os.urandom(3 * 64), chunk=64)
    raw = path.read_bytes()
    start = raw.index(b"}") + 1
    frame = WORD_SIZE + 64 + TAG_SIZE
    first, second = raw[start:start + frame], raw[start + frame:start + 2 * frame]
    path.write_bytes(raw[:start] + second + first + raw[start + 2 * frame:])
    with pytest.raises(CorruptSealedArchive, match="chunk 0 at byte .* fails authentication"):
        _plain(path, _keyring(tmp_path))


def test_wrong_key(tmp_path: Path) -> None:
    path = _seal(tmp_path, b"secret" * 100)
    with pytest.raises(WrongKey, match="wrong key.*'node-key-1'") as caught:
        _plain(path, _keyring(tmp_path, OTHER))
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert OTHER.hex() not in caught.value.message and KEY.hex() not in caught.value.message


def test_missing_key(tmp_path: Path) -> None:
    path = _seal(tmp_path, b"secret")
    with pytest.raises(KeyUnavailable, match="no key for key id 'node-key-1'"):
        _plain(path, Keyring({"other": _key_file(tmp_path, KEY)}))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_loose_key_file_refused(tmp_path: Path, mode: int) -> None:
    path = _seal(tmp_path, b"secret")
    keyring = Keyring({"node-key-1": _key_file(tmp_path, KEY, mode=mode)})
    with pytest.raises(KeyUnavailable, match=f"accessible by group or others \\(mode {mode:04o}\\).*chmod 600"):
        _plain(path, keyring)


def test_key_file_formats(tmp_path: Path) -> None:
    import base64

    path = _seal(tmp_path, b"secret")
    for name, content in (("hex", KEY.hex().encode()), ("b64", base64.b64encode(KEY) + b"\n"), ("raw", KEY)):
        key = tmp_path / name
        key.write_bytes(content)
        key.chmod(0o600)
        assert _plain(path, Keyring({"node-key-1": key})) == b"secret"
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(KeyUnavailable, match="not a 256-bit key"):
        _plain(path, Keyring({"node-key-1": bad}))


def test_key_command(tmp_path: Path) -> None:
    path = _seal(tmp_path, b"secret")
    script = tmp_path / "kms"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      f"if sys.argv[1] != 'node-key-1':\n    sys.exit('unknown key ' + sys.argv[1])\n"
                      f"print('{KEY.hex()}')\n")
    script.chmod(stat.S_IRWXU)
    assert _plain(path, Keyring(command=[str(script)])) == b"secret"
    other = _seal(tmp_path, b"x", name="b.sealed")
    assert _plain(other, Keyring(command=[str(script)])) == b"x"
    failing = tmp_path / "failing"
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('kms: access denied for ' + sys.argv[1])\n")
    failing.chmod(stat.S_IRWXU)
    with pytest.raises(KeyUnavailable, match="exit status 1.*kms: access denied for node-key-1"):
        _plain(path, Keyring(command=[str(failing)]))


def test_not_sealed_and_bad_headers(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar"
    plain.write_bytes(b"\0" * 2048)
    with pytest.raises(CorruptSealedArchive, match="not an encrypted checkpoint archive"):
        _plain(plain, _keyring(tmp_path))
    huge = tmp_path / "huge"
    huge.write_bytes(MAGIC + (1 << 30).to_bytes(4, "big"))
    with pytest.raises(CorruptSealedArchive, match="header of 1073741824 bytes"):
        _plain(huge, _keyring(tmp_path))
    path = _seal(tmp_path, b"secret")
    raw = path.read_bytes()
    for old, new in ((b'"version":2', b'"version":3'), (b'"chunk_size":1000', b'"chunk_size":99999999')):
        path.write_bytes(raw.replace(old, new))
        with pytest.raises(CorruptSealedArchive, match="encrypted archive header"):
            _plain(path, _keyring(tmp_path))


def test_sealer_on_any_stream() -> None:
    """The chunk AEAD without a file: what a network transfer of the page stream uses."""
    header, data_key = new_header("k", KEY, chunk_size=16)
    raw = header.encode()
    sealer, opener = Sealer(raw, header.nonce_prefix, data_key), Opener(raw, header, data_key, "stream")
    frames = [sealer.seal(b"a" * 16), sealer.seal(b"b" * 3, final=True)]
    out = b"".join(opener.open(f[:WORD_SIZE], f[WORD_SIZE:], 0) for f in frames)
    assert out == b"a" * 16 + b"b" * 3 and opener.ended


def test_writer_failure_is_raised_and_never_blocks(tmp_path: Path) -> None:
    """A full disk in the sealer's writer thread: the caller gets ENOSPC soon after, never a hang."""
    import errno

    header, data_key = new_header("node-key-1", KEY, chunk_size=CHUNK)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as caught:
            sealed = SealedFile(fd, header, data_key)
        assert caught.value.errno == errno.ENOSPC  # the header itself
        fd2 = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
        sealed = SealedFile(fd2, header, data_key)
        os.dup2(fd, fd2)  # from now on every write of the writer thread fails
        with pytest.raises(OSError) as caught:
            for _ in range(100):
                sealed.write(b"x" * CHUNK)
            sealed.close()
        assert caught.value.errno == errno.ENOSPC
        sealed.abort()
        os.close(fd2)
    finally:
        os.close(fd)


@pytest.mark.parametrize("in_place", ["as the library allows", "through a copy"])
@pytest.mark.parametrize("length", [0, 1, 4096, (1 << 20)])
def test_sealing_in_place_is_the_same_chunk(length: int, in_place: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # SealedFile encrypts each chunk where it was read where cryptography allows it (45-50; 51 refuses
    # overlapping input and output, shim.sealed.format.IN_PLACE), else through a copy: the same chunk.
    if in_place == "through a copy":
        monkeypatch.setattr(sealed_format, "IN_PLACE", False)
    header, data_key = new_header("k1", KEY)
    raw = header.encode()
    plaintext = os.urandom(length)
    frame = bytearray(WORD_SIZE + length + TAG_SIZE)
    frame[WORD_SIZE:WORD_SIZE + length] = plaintext
    in_place = Sealer(raw, header.nonce_prefix, data_key).seal_in_place(frame, length, final=True, counter=7)
    assert bytes(in_place) == Sealer(raw, header.nonce_prefix, data_key).seal(plaintext, final=True, counter=7)
    opener = Opener(raw, header, data_key, "x")
    opener.counter = 7
    assert opener.open(bytes(in_place[:WORD_SIZE]), bytes(in_place[WORD_SIZE:]), 0) == plaintext
