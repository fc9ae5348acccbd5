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

Ahead of the fill: after each run, a worker thread opens the chunks of the
next run in order into a second window while the daemon copies the current
one into the process (UFFDIO_COPY and the file read release the GIL), and the
next `span` takes that window if it asked for what was opened. It starts with
the background fill (the first `prefetch`), not before: during CRIU's restore
the daemon serves only faults, and decrypting ahead then would take CPU from
the restore the process waits for. The thread is
the source's own (started and joined by it); only one thread opens chunks at a
time, and a chunk the worker could not authenticate is never handed out: the
window is dropped and the chunk opened again, and refused, when asked for.

A chunk that fails its tag (tampered, or the file cut short under us) raises
CorruptSealedArchive: the daemon fails and its relay ends the restored task.
Memory that did not authenticate is never handed out.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import mmap
import os
from pathlib import Path

from shim.sealed import Keyring
from shim.sealed.chunks import ChunkIndex, open_sealed
from shim.sealed.format import TAG_SIZE

AHEAD_CHUNKS = 5  # a background run (4 MiB) starting inside a chunk spans five 1 MiB chunks


class _Window:
    """Decrypted chunks [first, first + held), contiguous, in an anonymous mapping of our own."""

    def __init__(self, size: int) -> None:
        size = max(size, 8 << 20)
        size += -size % mmap.PAGESIZE
        self.map: mmap.mmap | None = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._pin: ctypes.c_char | None = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._pin)
        self.size = size
        self.first = 0
        self.held = 0

    def holds(self, chunks: range) -> bool:
        return self.held > 0 and self.first <= chunks.start and chunks.stop <= self.first + self.held

    def view(self) -> memoryview:
        assert self.map is not None
        return memoryview(self.map)

    def close(self) -> None:
        self._pin = None  # the export of the buffer goes first, then the mapping
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still held by a failed span's traceback
                self.map.close()
            self.map = None


class SealedImage:
    """`size` plaintext bytes from plaintext offset `offset` of the sealed archive at `path`."""

    def __init__(self, path: Path, offset: int, size: int, keyring: Keyring, ahead: bool = True) -> None:
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
        mine = self._index.covering(offset, offset + size)
        self._last = mine[-1]  # the image's last chunk
        self._current = _Window(0)
        self._spare = _Window(0)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "sealed-ahead") if ahead else None
        self._pending: concurrent.futures.Future[int] | None = None  # the worker, filling `_spare`...
        self._pending_chunks = range(0)  # ...with these chunks
        self._filling = False  # the background fill has begun (the first prefetch): open ahead from now on
        self._opened = bytearray(self._index.count)
        self.chunks_opened = 0  # distinct chunks opened so far
        self.chunks_total = len(mine)
        self.decrypted = 0  # bytes decrypted, repeats included

    @property
    def index(self) -> ChunkIndex:
        return self._index

    def span(self, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}+{length} are outside the memory image ({self.size} bytes)")
        start = self._base + offset
        wanted = self._index.covering(start, start + length)
        if not self._current.holds(wanted):
            if not self._take_ahead(wanted):
                self._load(wanted)
        window = self._current
        self._open_ahead(wanted[-1])
        return window.address + start - self._index.starts[window.first]

    def prefetch(self, offset: int, length: int) -> None:
        self._filling = True
        length = min(length, self.size - offset)
        if length <= 0:
            return
        chunks = self._index.covering(self._base + offset, self._base + offset + length)
        first, last = self._index.words[chunks.start], self._index.words[chunks[-1]]
        os.posix_fadvise(self._fd, first, last - first + self._index.header.chunk_size + 2 * TAG_SIZE,
                         os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._current.close()
        self._spare.close()

    # Opening chunks: in this thread (_load) or in the worker (_open_ahead); never both at once.

    def _load(self, chunks: range) -> None:
        """Make the current window hold `chunks`, decrypted, from its start (keeping what it holds)."""
        starts, lengths = self._index.starts, self._index.lengths
        window = self._room(self._current, chunks)
        kept = 0
        if window.holds(range(chunks.start, chunks.start + 1)):  # the run began in the last one opened
            kept = min(window.first + window.held, chunks.stop) - chunks.start
            src = starts[chunks.start] - starts[window.first]
            moved = starts[chunks.start + kept - 1] + lengths[chunks.start + kept - 1] - starts[chunks.start]
            ctypes.memmove(window.address, window.address + src, moved)
        window.first, window.held = chunks.start, kept
        at = starts[chunks.start + kept] - starts[chunks.start] if kept < len(chunks) else 0
        view = window.view()
        for k in chunks[kept:]:
            window.held = k - chunks.start  # a chunk that fails leaves only those before it
            self._count(k, self._opener.open_into(k, view[at:]))
            at += lengths[k]
        window.held = len(chunks)

    def _open_ahead(self, after: int) -> None:
        """Start the worker, if idle, on the chunks from `after` on (the fill's next run begins inside
        the last chunk of this one), `after` copied from the current window."""
        window = self._current
        if self._worker is None or not self._filling or self._pending is not None or after >= self._last:
            return
        chunks = range(after, min(after + AHEAD_CHUNKS, self._last + 1))
        if self._spare.holds(chunks):
            return
        spare = self._room(self._spare, chunks)
        spare.held = 0
        self._pending, self._pending_chunks = self._worker.submit(self._fill, window, spare, chunks), chunks

    def _fill(self, window: _Window, spare: _Window, chunks: range) -> int:
        """In the worker: `chunks` into `spare`: those `window` holds copied (it is read-only meanwhile),
        the rest opened. Returns the bytes decrypted."""
        starts, lengths = self._index.starts, self._index.lengths
        held = min(window.first + window.held, chunks.stop)  # `window` holds chunks.start, up to here
        at = starts[held - 1] + lengths[held - 1] - starts[chunks.start]
        ctypes.memmove(spare.address, window.address + starts[chunks.start] - starts[window.first], at)
        view, done = spare.view(), 0
        for k in chunks[held - chunks.start:]:
            done += self._opener.open_into(k, view[at:])
            at += lengths[k]
        return done

    def _take_ahead(self, wanted: range) -> bool:
        """Wait for the worker; swap its window in if it holds `wanted`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        chunks = self._pending_chunks
        try:
            done = pending.result()
        except Exception:  # noqa: BLE001  (a chunk that failed is opened again, here, if asked for)
            return False
        self._spare.first, self._spare.held = chunks.start, len(chunks)
        self.decrypted += done
        for k in chunks:
            self._count(k, 0)
        if not self._spare.holds(wanted):
            return False
        self._current, self._spare = self._spare, self._current
        return True

    def _count(self, k: int, length: int) -> None:
        self.decrypted += length
        if not self._opened[k]:
            self._opened[k] = 1
            self.chunks_opened += 1

    def _room(self, window: _Window, chunks: range) -> _Window:
        """`window`, or a larger one in its place (empty) if `chunks` do not fit."""
        starts, lengths = self._index.starts, self._index.lengths
        need = starts[chunks[-1]] + lengths[chunks[-1]] - starts[chunks.start] + TAG_SIZE
        if window.size >= need:
            return window
        bigger = _Window(need)
        window.close()
        if window is self._current:
            self._current = bigger
        else:
            self._spare = bigger
        return bigger
