"""A page source over a sealed archive: the chunks holding a fault's pages, decrypted when asked.

The lazy restore of a sealed archive (format version 2) leaves the memory image
encrypted where it lies in the archive. The page daemon asks this source for
image bytes [offset, offset + length); it opens (authenticates and decrypts)
the chunks that hold them into a window of its own and returns the window's
address, valid until the next `span`. Chunks are opened in place: read from
the archive into the window, decrypted there (shim.sealed.chunks), so a page
is copied out of the page cache once, decrypted once, copied into the process
once. The background fill asks for runs in order, so the window keeps the
last chunk it opened and moves it to its start when the next run begins
inside it: no chunk is decrypted twice on the way through.

A chunk that fails its tag (tampered, or the file cut short under us) raises
CorruptSealedArchive: the daemon fails and its relay ends the restored task.
Memory that did not authenticate is never handed out.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from pathlib import Path

from shim.sealed import Keyring
from shim.sealed.chunks import ChunkIndex, open_sealed
from shim.sealed.format import TAG_SIZE


class SealedImage:
    """`size` plaintext bytes from plaintext offset `offset` of the sealed archive at `path`."""

    def __init__(self, path: Path, offset: int, size: int, keyring: Keyring) -> None:
        label = f"encrypted archive {path}"
        self._fd, self._index, self._opener = open_sealed(path, keyring, label)
        try:
            if offset < 0 or size <= 0 or offset + size > self._index.plain_size:
                raise ValueError(f"memory image in {label}: plaintext bytes {offset}+{size} are outside it")
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size
        self.path = path
        self._base = offset
        self._window: mmap.mmap | None = None
        self._pin: ctypes.c_char | None = None
        self._address = 0
        self._first = 0  # the chunk at the window's start
        self._held = 0  # how many chunks from `_first` the window holds, decrypted
        self._opened = bytearray(self._index.count)
        self.chunks_opened = 0  # distinct chunks opened so far
        self.chunks_total = len(self._index.covering(offset, offset + size))
        self.decrypted = 0  # bytes decrypted, repeats included

    @property
    def index(self) -> ChunkIndex:
        return self._index

    def span(self, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}+{length} are outside the memory image ({self.size} bytes)")
        start = self._base + offset
        wanted = self._index.covering(start, start + length)
        if not (self._first <= wanted.start and wanted.stop <= self._first + self._held):
            self._load(wanted)
        return self._address + start - self._index.starts[self._first]

    def prefetch(self, offset: int, length: int) -> None:
        length = min(length, self.size - offset)
        if length <= 0:
            return
        chunks = self._index.covering(self._base + offset, self._base + offset + length)
        first, last = self._index.words[chunks.start], self._index.words[chunks[-1]]
        os.posix_fadvise(self._fd, first, last - first + self._index.header.chunk_size + 2 * TAG_SIZE,
                         os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pin = None  # the export of the window's buffer goes first, then the mapping
        if self._window is not None:
            with contextlib.suppress(BufferError):  # a view still held by a failed span's traceback
                self._window.close()
            self._window = None

    def _load(self, chunks: range) -> None:
        """Make the window hold `chunks`, decrypted, from its start (keeping what it already holds)."""
        starts, lengths = self._index.starts, self._index.lengths
        need = starts[chunks[-1]] + lengths[chunks[-1]] - starts[chunks.start] + TAG_SIZE
        view = self._room(need)
        kept = 0
        if self._first <= chunks.start < self._first + self._held:  # the run began in the last one opened
            src = starts[chunks.start] - starts[self._first]
            kept = min(self._first + self._held, chunks.stop) - chunks.start
            moved = starts[chunks.start + kept - 1] + lengths[chunks.start + kept - 1] - starts[chunks.start]
            ctypes.memmove(self._address, self._address + src, moved)
        self._first, self._held = chunks.start, kept
        at = starts[chunks.start + kept] - starts[chunks.start] if kept < len(chunks) else 0
        for k in chunks[kept:]:
            self._held = k - chunks.start  # a chunk that fails leaves the window holding only those before it
            self.decrypted += self._opener.open_into(k, view[at:])
            at += lengths[k]
            if not self._opened[k]:
                self._opened[k] = 1
                self.chunks_opened += 1
        self._held = len(chunks)

    def _room(self, need: int) -> memoryview:
        if self._window is None or len(self._window) < need:
            self._pin = None
            if self._window is not None:
                self._window.close()
            size = max(need, 8 << 20)
            size += -size % mmap.PAGESIZE
            self._window = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._pin = ctypes.c_char.from_buffer(self._window)
            self._address = ctypes.addressof(self._pin)
            self._held = 0
        return memoryview(self._window)
