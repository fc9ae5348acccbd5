"""zstd-compressed checkpoint archives, written while CRIU dumps (one pass, nothing read back).

Whether: `[checkpoint] compression = "zstd"` (level `compression_level`) is the
node's default; a pod (or one container) may say otherwise with the annotation
`checkpoint.criu-shim.io/compression: "zstd" | "none"`. Compression is no
security matter (the archive stays 0600, and sealing still applies), so
annotations are not restricted by policy.

The archive is then `archive.tar.zst` in all but name: a zstd stream of the
same tar an uncompressed checkpoint writes (Podman's `--compress zstd` is
the same thing), so `zstd -d`, Podman's and containerd's readers and
checkpointctl read it. The page stream needs one thing a compressor does
not offer: a tar header written *before* its member's data although its size
is known only after it (the `reserve`/`fill` of shim.sealed.SealedFile). So
each reserved header ends the current zstd frame and gets room of its own in
the file, enough for the header compressed as one frame in the worst case;
when it is filled, the frame is written there and the rest of the room is a
zstd *skippable frame* (RFC 8878, section 3.1.2: every decoder skips it).
Data resumes in a new frame after the room. Frames concatenate: decoding
the file yields the tar, byte for byte.

With encryption, the compressed stream is what is sealed (compress, then
seal: ciphertext does not compress), and the sealed header says
`application/x-tar+zstd`. zstd's own worker threads compress while the page
stream's thread reads the next pages from CRIU's pipe.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard

from shim.annotations import CHECKPOINT_PREFIX, COMPRESSION
from shim.checkpoint.options import annotation
from shim.config import COMPRESSION_NONE, COMPRESSION_ZSTD, COMPRESSIONS, CheckpointDefaults
from shim.errors import InvalidArgument

OPTION = COMPRESSION.removeprefix(CHECKPOINT_PREFIX)  # the option's name, for per-container keys
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878, 3.1.1
_SKIPPABLE = struct.Struct("<II")  # magic, payload size (RFC 8878, 3.1.2)
_SKIPPABLE_MAGIC = 0x184D2A50
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Compression:
    level: int
    threads: int = -1  # zstd worker threads: -1 = one per CPU (they overlap with reading CRIU's pipe)


def wanted(defaults: CheckpointDefaults, annotations: Mapping[str, str], container: str) -> Compression | None:
    """The compression of this checkpoint: node default, then pod, then container annotation."""
    value = defaults.compression
    for scope in (None, container):
        key = annotation(OPTION, scope)
        if key in annotations:
            value = annotations[key].strip().lower()
            if value not in COMPRESSIONS:
                raise InvalidArgument(f"annotation {key}: expected one of {list(COMPRESSIONS)}, "
                                      f"got {annotations[key]!r}")
    if value == COMPRESSION_NONE:
        return None
    assert value == COMPRESSION_ZSTD
    return Compression(defaults.compression_level)


class ByteSink(Protocol):
    """Where a stream of archive bytes goes, in order; `reserve`d room is `fill`ed later."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def reserve(self, length: int) -> Any: ...
    def fill(self, slot: Any, data: bytes) -> None: ...
    def close(self) -> int: ...
    def abort(self) -> None: ...


class ArchiveStream(ByteSink, Protocol):
    """What the page stream writes the archive through (SealedFile, ZstdFile)."""

    plaintext: int

    def read_from(self, fd: int, limit: int) -> int: ...


class FileSink:
    """A ByteSink over a file descriptor: bytes appended at `start` onwards, reserved room left as a hole."""

    def __init__(self, fd: int, start: int = 0) -> None:
        self._fd = fd
        self._offset = start

    def write(self, data: bytes | bytearray | memoryview) -> None:
        _pwrite_all(self._fd, data, self._offset)
        self._offset += len(data)

    def reserve(self, length: int) -> int:
        slot, self._offset = self._offset, self._offset + length
        return slot

    def fill(self, slot: int, data: bytes) -> None:
        _pwrite_all(self._fd, data, slot)

    def close(self) -> int:
        return self._offset

    @property
    def offset(self) -> int:
        """Where the next byte goes."""
        return self._offset

    def abort(self) -> None:
        pass


@dataclass(frozen=True)
class _Room:
    slot: Any  # the sink's
    length: int  # plaintext (tar) bytes it stands for
    size: int  # compressed bytes reserved


class ZstdFile:
    """Compresses a tar stream into a ByteSink as it is written; `reserve`/`fill` as SealedFile's."""

    def __init__(self, sink: ByteSink, compression: Compression) -> None:
        self._sink = sink
        self._streaming = zstandard.ZstdCompressor(level=compression.level, threads=compression.threads,
                                                   write_checksum=True)
        # A filled header is one small frame: no worker threads for it.
        self._single = zstandard.ZstdCompressor(level=compression.level, write_checksum=True)
        self._frame: Any = None  # the open frame's compressobj, if any
        self._buffer = bytearray(_READ_CHUNK)
        self.plaintext = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._frame is None:
            self._frame = self._streaming.compressobj()
        try:
            out = self._frame.compress(data)
        except zstandard.ZstdError as exc:  # an OSError, so the page stream discards the rest, as for a full disk
            raise OSError(errno.EIO, f"zstd compression failed: {exc}") from None
        if out:
            self._sink.write(out)
        self.plaintext += len(data)

    def read_from(self, fd: int, limit: int) -> int:
        """Read up to `limit` bytes of `fd` and compress them; 0 at end of file (BlockingIOError passes)."""
        count = os.readv(fd, [memoryview(self._buffer)[:min(limit, len(self._buffer))]])
        if count:
            self.write(memoryview(self._buffer)[:count])
        return count

    def reserve(self, length: int) -> _Room:
        """Room for `length` tar bytes that follow what was written so far: the frame so far ends here."""
        self._end_frame()
        size = room_for(length)
        room = _Room(self._sink.reserve(size), length, size)
        self.plaintext += length
        return room

    def fill(self, room: _Room, data: bytes) -> None:
        if len(data) != room.length:
            raise ValueError(f"{len(data)} bytes for a reserved room of {room.length}")
        frame = self._single.compress(data)
        pad = room.size - len(frame) - _SKIPPABLE.size
        if pad < 0:  # room_for is zstd's own bound: this cannot happen
            raise ValueError(f"a compressed frame of {len(frame)} bytes does not fit its room of {room.size}")
        self._sink.fill(room.slot, frame + _SKIPPABLE.pack(_SKIPPABLE_MAGIC, pad) + bytes(pad))

    def close(self) -> int:
        """End the last frame, close the sink; return the file's size."""
        if self._frame is None and not self.plaintext:
            self._frame = self._streaming.compressobj()  # an empty stream is still one valid frame
        self._end_frame()
        return self._sink.close()

    def abort(self) -> None:
        self._frame = None
        self._sink.abort()

    def resumable_at(self) -> int | None:
        """End the open frame and say where the file ends: another ZstdFile over the same file may go
        on from there (zstd frames concatenate; readers read across them). None over a sealed sink."""
        self._end_frame()
        return self._sink.offset if isinstance(self._sink, FileSink) else None

    def _end_frame(self) -> None:
        if self._frame is not None:
            frame, self._frame = self._frame, None
            try:
                out = frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
            except zstandard.ZstdError as exc:
                raise OSError(errno.EIO, f"zstd compression failed: {exc}") from None
            self._sink.write(out)


def room_for(length: int) -> int:
    """Bytes to reserve for `length` bytes compressed as one frame, plus a skippable frame's header.

    ZSTD_COMPRESSBOUND (zstd.h), which includes the frame header, plus the 4-byte checksum.
    """
    bound = length + (length >> 8) + (((128 << 10) - length) >> 11 if length < (128 << 10) else 0)
    return bound + 4 + _SKIPPABLE.size


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        count = os.pwrite(fd, view, offset)
        view = view[count:]
        offset += count
