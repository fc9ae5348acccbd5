"""Reading sealed archives: detect, read the header (no key needed), decrypt as a stream.

Everything read here is hostile: lengths are bounded before anything is
allocated, and every chunk is authenticated before a byte of it is returned.
A reader returns data only from chunks that passed; it reports a stream cut
short (no final chunk), data after the final chunk, and any tampered chunk as
CorruptSealedArchive (INVALID_ARGUMENT) naming the chunk and byte offset.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

from shim.errors import NotFound
from shim.sealed.format import (
    MAGIC,
    MAX_HEADER,
    TAG_SIZE,
    WORD,
    WORD_SIZE,
    CorruptSealedArchive,
    Header,
    Opener,
    parse_header,
    unwrap,
)
from shim.sealed.keys import Keyring


def is_encrypted(path: Path) -> bool:
    """Whether the file starts like a sealed archive (False for a missing or short file)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path: Path) -> Header:
    """The header of the sealed archive at `path`: format, key id, chunk size. No key needed."""
    with _open(path) as f:
        return read_header_from(f, str(path))[0]


def read_header_from(source: BinaryIO, label: str) -> tuple[Header, bytes]:
    """Read the header from the stream's start; returns it and its exact bytes (bound into every AAD)."""
    head = _read_upto(source, len(MAGIC) + WORD_SIZE)
    if not head.startswith(MAGIC[:len(head)]) or len(head) < len(MAGIC):
        raise CorruptSealedArchive(f"{label} is not an encrypted checkpoint archive (no sealed header)")
    if len(head) < len(MAGIC) + WORD_SIZE:
        raise CorruptSealedArchive(f"{label} is truncated inside its header")
    (length,) = WORD.unpack_from(head, len(MAGIC))
    if length > MAX_HEADER:
        raise CorruptSealedArchive(f"{label}: encrypted archive header of {length} bytes (at most {MAX_HEADER})")
    raw = head + _read_upto(source, length)
    header, _ = parse_header(raw, label)
    return header, raw


def open_decrypted(path: Path, keyring: Keyring) -> DecryptingReader:
    """A readable stream of the archive's plaintext (a tar), authenticated chunk by chunk.

    Raises at once for a missing file, a bad header, a missing or wrong key; data
    errors (tampering, truncation) surface from `read` when the reader reaches them.
    Read it to its end (`verify_to_end`) before trusting that nothing was cut off.
    """
    source = _open(path)
    try:
        return DecryptingReader(source, keyring, f"encrypted archive {path}")
    except BaseException:
        source.close()
        raise


def decrypt_to(path: Path, keyring: Keyring, out_fd: int) -> int:
    """Decrypt the whole archive at `path` into `out_fd` (at its position); return plaintext bytes.

    Every chunk is authenticated, the final one included, before this returns; on
    an error part of the plaintext may have been written: the caller discards it.
    """
    with open_decrypted(path, keyring) as reader:
        return reader.copy_to(out_fd)


class DecryptingReader(io.RawIOBase):
    """The plaintext of a sealed stream (a file, a pipe, a socket's file object)."""

    def __init__(self, source: BinaryIO, keyring: Keyring, label: str) -> None:
        super().__init__()
        self._source = source
        self._label = label
        self.header, raw = read_header_from(source, label)
        data_key = unwrap(self.header, keyring.key(self.header.key_id), label)
        self._opener = Opener(raw, self.header, data_key, label)
        self._offset = len(raw)  # of the next chunk in the file
        self._pending = memoryview(b"")
        self._frame = bytearray(self.header.chunk_size + TAG_SIZE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._next()
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def copy_to(self, out_fd: int) -> int:
        """Write the rest of the plaintext to `out_fd`; return how much."""
        total = 0
        while True:
            chunk = bytes(self._pending) if self._pending else self._next()
            self._pending = memoryview(b"")
            if chunk is None:
                return total
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view):]
            total += len(chunk)

    def verify_to_end(self) -> int:
        """Read (and authenticate) everything left, discarding it; return the plaintext bytes skipped."""
        skipped = len(self._pending)
        self._pending = memoryview(b"")
        while (chunk := self._next()) is not None:
            skipped += len(chunk)
        return skipped

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()

    def _next(self) -> bytes | None:
        """The next chunk's plaintext; None after the final one (checking nothing follows it)."""
        if self._opener.ended:
            if self._source.read(1):
                self._opener.length(b"\0" * WORD_SIZE, self._offset)  # raises: data after the final chunk
            return None
        word = _read_upto(self._source, WORD_SIZE)
        if len(word) < WORD_SIZE:
            raise self._opener.truncated(self._offset + len(word), inside=bool(word))
        length, _ = self._opener.length(word, self._offset)
        view = memoryview(self._frame)[:length + TAG_SIZE]
        got = _readinto_upto(self._source, view)
        if got < len(view):
            raise self._opener.truncated(self._offset + WORD_SIZE + got, inside=True)
        plaintext = self._opener.open(word, view, self._offset)
        self._offset += WORD_SIZE + len(view)
        return plaintext


def _open(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"encrypted archive {path} does not exist") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptSealedArchive(f"encrypted archive {path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _read_upto(source: BinaryIO, count: int) -> bytes:
    parts, got = [], 0
    while got < count:
        part = source.read(count - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _readinto_upto(source: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        count = source.readinto(view[got:])  # type: ignore[attr-defined]
        if not count:
            break
        got += count
    return got
