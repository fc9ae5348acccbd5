"""Writing a sealed archive while its plaintext is produced: one pass, chunk by chunk.

`SealedFile` takes plaintext in order (`write`, or `read_from` a pipe straight
into its chunk buffer) and writes sealed chunks to a file descriptor at
offsets it tracks. `reserve` keeps room for a piece of plaintext known only
later (a tar header whose size is filled in when its member ends): the slot is
a chunk of its own, at a fixed file offset and counter, sealed by `fill`. So
the page stream encrypts memory as CRIU writes it, and nothing is read back.
For a stream that cannot seek (a socket), use `format.Sealer` directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shim.sealed.format import TAG_SIZE, WORD_SIZE, Header, Sealer


@dataclass(frozen=True)
class Slot:
    counter: int
    offset: int
    length: int


class SealedFile:
    def __init__(self, fd: int, header: Header, data_key: bytes, start: int = 0) -> None:
        raw = header.encode()
        _pwrite_all(fd, raw, start)
        self._fd = fd
        self._sealer = Sealer(raw, header.nonce_prefix, data_key)
        self._offset = start + len(raw)  # where the next chunk goes
        self._buffer = bytearray(header.chunk_size)
        self._fill = 0
        self._out = bytearray(WORD_SIZE + header.chunk_size + TAG_SIZE)
        self._open_slots: set[int] = set()
        self._closed = False
        self.plaintext = 0  # plaintext bytes taken so far, reserved slots included

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            room = len(self._buffer) - self._fill
            take = min(room, len(view))
            self._buffer[self._fill:self._fill + take] = view[:take]
            self._fill += take
            self.plaintext += take
            view = view[take:]
            if self._fill == len(self._buffer):
                self._seal(final=False)

    def read_from(self, fd: int, limit: int) -> int:
        """Read up to `limit` bytes from `fd` straight into the chunk buffer; 0 at end of file.

        BlockingIOError passes through (a non-blocking pipe with nothing in it)."""
        room = min(limit, len(self._buffer) - self._fill)
        count = os.readv(fd, [memoryview(self._buffer)[self._fill:self._fill + room]])
        self._fill += count
        self.plaintext += count
        if self._fill == len(self._buffer):
            self._seal(final=False)
        return count

    def reserve(self, length: int) -> Slot:
        """Room for `length` bytes of plaintext that follow what was written so far; `fill` later."""
        if not 0 < length <= len(self._buffer):
            raise ValueError(f"a reserved slot holds 1..{len(self._buffer)} bytes, not {length}")
        if self._fill:
            self._seal(final=False)
        slot = Slot(self._sealer.counter, self._offset, length)
        self._sealer.counter += 1
        self._offset += WORD_SIZE + length + TAG_SIZE
        self.plaintext += length
        self._open_slots.add(slot.counter)
        return slot

    def fill(self, slot: Slot, data: bytes) -> None:
        if len(data) != slot.length or slot.counter not in self._open_slots:
            raise ValueError(f"slot {slot.counter}: {len(data)} bytes for a slot of {slot.length}, or filled twice")
        _pwrite_all(self._fd, self._sealer.seal(data, counter=slot.counter), slot.offset)
        self._open_slots.discard(slot.counter)

    def close(self) -> int:
        """Seal what is buffered as the final chunk; return the file's size. Every slot must be filled."""
        if self._closed:
            return self._offset
        if self._open_slots:
            raise ValueError(f"sealed file closed with {len(self._open_slots)} reserved slot(s) never filled")
        self._seal(final=True)
        self._closed = True
        return self._offset

    @property
    def size(self) -> int:
        """Bytes of the file written or reserved so far (the final chunk not counted until close)."""
        return self._offset

    def _seal(self, final: bool) -> None:
        frame = self._sealer.seal_into(memoryview(self._buffer)[:self._fill], self._out, final)
        _pwrite_all(self._fd, frame, self._offset)
        self._offset += len(frame)
        self._fill = 0


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count
