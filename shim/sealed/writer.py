"""Writing a sealed archive while its plaintext is produced: one pass, chunk by chunk.

`SealedFile` takes plaintext in order (`write`, or `read_from` a pipe straight
into its chunk buffer) and writes sealed chunks to a file descriptor at
offsets it assigns in order. `reserve` keeps room for a piece of plaintext
known only later (a tar header whose size is filled in when its member ends):
the slot is a chunk of its own, at a fixed file offset and counter, sealed by
`fill`. So the page stream encrypts memory as CRIU writes it, and nothing is
read back. For a stream that cannot seek (a socket), use `format.Sealer`.

Pipelined: a chunk is sealed as soon as it is full, by the thread that read
it (its bytes are still in that core's cache: read, encrypted in place, done),
and handed to a writer thread that writes it into the page cache while the
caller reads the next one into another buffer (a few in flight). Each buffer
is the whole chunk as it goes to the file (word, plaintext, room for the tag),
so a page is copied twice (out of CRIU's pipe, into the page cache) and
encrypted once, in place, and nothing else. Measured (README, "Encryption at
rest"): sealing in the writer thread instead made the stream 1.4x slower
than the unencrypted splice; sealing in the reader, as here, is as fast. The
writer thread owns the cipher; a failure there (a full disk) is raised by the
caller's next call, and buffers keep coming back even after it, so the
caller, and CRIU behind it, never blocks on a writer that gave up.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

from shim.sealed.format import TAG_SIZE, WORD_SIZE, Header, Sealer

IN_FLIGHT = 6  # chunk buffers: one being filled, the others being written


@dataclass(frozen=True)
class Slot:
    counter: int
    offset: int
    length: int
    plain_offset: int = 0  # where its plaintext lies in the stream (in the chunk's AAD, format version 2)


@dataclass(frozen=True)
class _Job:
    frame: bytearray  # word | plaintext (length bytes) | room for the tag; sealed in place
    length: int
    counter: int
    offset: int
    plain_offset: int
    final: bool
    recycle: bool  # a chunk buffer of the pool (returned after use), not a slot's own bytes
    sealed: bool  # sealed already (a full chunk, by the caller's thread); a slot is sealed by the writer


class SealedFile:
    def __init__(self, fd: int, header: Header, data_key: bytes, start: int = 0) -> None:
        raw = header.encode()
        _pwrite_all(fd, raw, start)
        self._fd = fd
        # One cipher context per thread: the caller's seals chunks, the writer's seals filled slots.
        self._sealer = Sealer(raw, header.nonce_prefix, data_key, header.version)
        writer_sealer = Sealer(raw, header.nonce_prefix, data_key, header.version)
        self._chunk = header.chunk_size
        self._next_counter = 0
        self._offset = start + len(raw)  # where the next chunk goes
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(IN_FLIGHT):
            self._free.put(bytearray(WORD_SIZE + self._chunk + TAG_SIZE))
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._buffer = self._free.get()
        self._fill = 0
        self._open_slots: set[int] = set()
        self._error: BaseException | None = None
        self._closed = False
        self._writer: threading.Thread | None = threading.Thread(target=self._write_loop, args=(writer_sealer,),
                                                                 name="sealer", daemon=True)
        self._writer.start()
        self.plaintext = 0  # plaintext bytes taken so far, reserved slots included

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        view = memoryview(data).cast("B")
        while view:
            take = min(self._chunk - self._fill, len(view))
            start = WORD_SIZE + self._fill
            self._buffer[start:start + take] = view[:take]
            self._fill += take
            self.plaintext += take
            view = view[take:]
            if self._fill == self._chunk:
                self._hand_off(final=False)

    def read_from(self, fd: int, limit: int) -> int:
        """Read up to `limit` bytes from `fd` straight into the chunk buffer; 0 at end of file.

        BlockingIOError passes through (a non-blocking pipe with nothing in it); the writer's
        failure, if any, is raised here (the caller then discards the rest of its input)."""
        self._check()
        room = min(limit, self._chunk - self._fill)
        start = WORD_SIZE + self._fill
        count = os.readv(fd, [memoryview(self._buffer)[start:start + room]])
        self._fill += count
        self.plaintext += count
        if self._fill == self._chunk:
            self._hand_off(final=False)
        return count

    def reserve(self, length: int) -> Slot:
        """Room for `length` bytes of plaintext that follow what was written so far; `fill` later."""
        if not 0 < length <= self._chunk:
            raise ValueError(f"a reserved slot holds 1..{self._chunk} bytes, not {length}")
        self._check()
        if self._fill:
            self._hand_off(final=False)
        slot = Slot(self._take_counter(), self._offset, length, self.plaintext)
        self._offset += WORD_SIZE + length + TAG_SIZE
        self.plaintext += length
        self._open_slots.add(slot.counter)
        return slot

    def fill(self, slot: Slot, data: bytes) -> None:
        if len(data) != slot.length or slot.counter not in self._open_slots:
            raise ValueError(f"slot {slot.counter}: {len(data)} bytes for a slot of {slot.length}, or filled twice")
        self._check()
        frame = bytearray(WORD_SIZE + len(data) + TAG_SIZE)
        frame[WORD_SIZE:WORD_SIZE + len(data)] = data
        self._jobs.put(_Job(frame, len(data), slot.counter, slot.offset, slot.plain_offset, False, recycle=False,
                            sealed=False))
        self._open_slots.discard(slot.counter)

    def close(self) -> int:
        """Seal what is buffered as the final chunk, wait for the writer; return the file's size.

        Every slot must be filled. Raises what the writer failed with."""
        if self._closed:
            return self._offset
        if self._open_slots:
            self.abort()
            raise ValueError(f"sealed file closed with {len(self._open_slots)} reserved slot(s) never filled")
        self._check()
        self._hand_off(final=True, last=True)
        self._stop_writer()
        self._closed = True
        self._check()
        return self._offset

    def abort(self) -> None:
        """Stop the writer without sealing the end (on failure paths; idempotent)."""
        self._closed = True
        self._stop_writer()

    @property
    def size(self) -> int:
        """Bytes of the file written or reserved so far (the final chunk not counted until close)."""
        return self._offset

    def _take_counter(self) -> int:
        counter, self._next_counter = self._next_counter, self._next_counter + 1
        return counter

    def _hand_off(self, final: bool, last: bool = False) -> None:
        length, counter = self._fill, self._take_counter()
        plain_offset = self.plaintext - length  # self.plaintext counted this chunk's bytes as they came
        self._sealer.seal_in_place(self._buffer, length, final, counter, plain_offset)
        self._jobs.put(_Job(self._buffer, length, counter, self._offset, plain_offset, final, recycle=True,
                            sealed=True))
        self._offset += WORD_SIZE + length + TAG_SIZE
        self._fill = 0
        if not last:
            self._buffer = self._free.get()  # the writer returns every buffer, failed or not

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._jobs.put(None)
            writer.join()

    def _write_loop(self, sealer: Sealer) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    if job.sealed:
                        frame = memoryview(job.frame)[:WORD_SIZE + job.length + TAG_SIZE]
                    else:
                        frame = sealer.seal_in_place(job.frame, job.length, job.final, job.counter,
                                                     job.plain_offset)
                    _pwrite_all(self._fd, frame, job.offset)
            except BaseException as exc:  # raised by the caller's next call
                self._error = exc
            finally:
                if job.recycle:
                    self._free.put(job.frame)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count
