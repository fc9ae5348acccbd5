"""Random access to a sealed archive: its chunk index, and any chunk opened on its own.

A lazy restore serves a page fault from the one or two chunks that hold the
page, not from a decrypted copy of the whole archive. That needs two things a
sequential reader does not:

* Where chunk k is, without opening chunks 0..k-1: `ChunkIndex.scan` walks the
  4-byte words (one small read per chunk, nothing decrypted; 1,025 reads for a
  1 GiB archive) and checks the framing as it goes: every length within the
  chunk size, the last chunk flagged final, nothing after it. A truncated file
  is refused here, before anything is restored.
* That what chunk k decrypts to really is plaintext bytes [p_k, p_k + n_k): the
  offsets come from unauthenticated words, so format version 2 binds each
  chunk's plaintext offset into its AAD (shim.sealed.format). `ChunkOpener`
  opens chunk k with counter k and offset p_k: a tag that passes proves the
  chunk is the k-th, its length and its place. Version 1 archives have no such
  binding and are not opened here (`Header.random_access`).

Every byte returned has passed its chunk's tag; a chunk that fails raises
CorruptSealedArchive naming the chunk and its file offset, and its buffer must
not be used (OpenSSL may have decrypted into it before checking the tag).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shim.errors import InvalidArgument
from shim.sealed.format import (
    FINAL,
    IN_PLACE,
    MAGIC,
    MAX_HEADER,
    TAG_SIZE,
    WORD,
    WORD_SIZE,
    CorruptSealedArchive,
    Header,
    aad,
    parse_header,
    unwrap,
)
from shim.sealed.keys import Keyring


@dataclass(frozen=True)
class ChunkIndex:
    """Where each chunk of a sealed archive is: file offsets of the words, plaintext offsets, lengths."""

    header: Header
    raw_header: bytes
    words: tuple[int, ...]  # file offset of chunk k's word
    starts: tuple[int, ...]  # plaintext offset of chunk k
    lengths: tuple[int, ...]  # plaintext length of chunk k
    plain_size: int

    @classmethod
    def scan(cls, fd: int, label: str) -> ChunkIndex:
        """Read the header and walk the words of the sealed file open at `fd` (hostile input)."""
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(MAGIC) + WORD_SIZE + MAX_HEADER, 0)
        header, offset = parse_header(head, label)
        raw = head[:offset]
        words: list[int] = []
        starts: list[int] = []
        lengths: list[int] = []
        plain = 0
        while True:
            count = len(words)
            word = os.pread(fd, WORD_SIZE, offset) if offset < size else b""
            if len(word) < WORD_SIZE:
                where = f"inside chunk {count}" if word else (
                    f"after chunk {count - 1}, before the final chunk" if count else "before the first chunk")
                raise CorruptSealedArchive(f"{label} is truncated at byte {offset + len(word)} ({where})")
            (value,) = WORD.unpack(word)
            length = value & ~FINAL
            if length > header.chunk_size:
                raise CorruptSealedArchive(f"{label}: chunk {count} at byte {offset} claims {length} bytes, more "
                                           f"than the chunk size {header.chunk_size} (tampered or corrupt)")
            end = offset + WORD_SIZE + length + TAG_SIZE
            if end > size:
                raise CorruptSealedArchive(f"{label} is truncated at byte {size} (inside chunk {count})")
            words.append(offset)
            starts.append(plain)
            lengths.append(length)
            plain += length
            offset = end
            if value & FINAL:
                break
        if offset != size:
            raise CorruptSealedArchive(f"{label}: data after the final chunk at byte {offset} (appended or tampered)")
        return cls(header, raw, tuple(words), tuple(starts), tuple(lengths), plain)

    @property
    def count(self) -> int:
        return len(self.words)

    def covering(self, start: int, end: int) -> range:
        """The chunks holding plaintext bytes [start, end) (end > start, within the plaintext)."""
        if not 0 <= start < end <= self.plain_size:
            raise ValueError(f"plaintext bytes {start}..{end} are outside the archive ({self.plain_size} bytes)")
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, end - 1) - 1
        return range(first, last + 1)

    def inside(self, start: int, end: int) -> range:
        """The chunks whose plaintext lies wholly within bytes [start, end)."""
        first = bisect.bisect_left(self.starts, start)
        last = first
        while last < self.count and self.starts[last] + self.lengths[last] <= end:
            last += 1
        return range(first, last)


class ChunkOpener:
    """Opens any chunk of an indexed sealed archive on its own, authenticated (format version 2)."""

    def __init__(self, fd: int, index: ChunkIndex, data_key: bytes, label: str) -> None:
        if not index.header.random_access:
            raise InvalidArgument(f"{label}: format version {index.header.version} cannot be read out of order")
        self._fd = fd
        self._index = index
        self._aead = AESGCM(data_key)
        self._digest = hashlib.sha256(index.raw_header).digest()
        self._prefix = index.header.nonce_prefix
        self._label = label

    def open_into(self, k: int, out: memoryview) -> int:
        """Chunk k's plaintext into out[:n] (out has room for n + TAG_SIZE: decrypted in place); n."""
        length, at = self._index.lengths[k], self._index.words[k]
        frame = out[:length + TAG_SIZE]
        got = os.preadv(self._fd, [frame], at + WORD_SIZE)
        if got != len(frame):  # the file changed under us since the scan
            raise CorruptSealedArchive(f"{self._label} is truncated at byte {at + WORD_SIZE + got} (inside chunk {k})")
        word = WORD.pack(length | (FINAL if k == self._index.count - 1 else 0))
        nonce = self._prefix + k.to_bytes(8, "big")
        try:
            associated = aad(self._digest, word, self._index.starts[k], 2)
            if IN_PLACE:
                self._aead.decrypt_into(nonce, frame, associated, out[:length])
            else:  # cryptography 51+ decrypts into another buffer only
                out[:length] = self._aead.decrypt(nonce, frame, associated)
        except InvalidTag:
            raise CorruptSealedArchive(f"{self._label}: chunk {k} at byte {at} fails authentication: the archive "
                                       "was modified or is corrupt") from None
        return length


def open_sealed(path: Path, keyring: Keyring, label: str) -> tuple[int, ChunkIndex, ChunkOpener]:
    """The archive open read-only, its index and an opener (the key comes from `keyring`, as always)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptSealedArchive(f"{label} is not a regular file")
        index = ChunkIndex.scan(fd, label)
        data_key = unwrap(index.header, keyring.key(index.header.key_id), label)
        return fd, index, ChunkOpener(fd, index, data_key, label)
    except BaseException:
        os.close(fd)
        raise
