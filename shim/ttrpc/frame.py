"""ttrpc framing (containerd/ttrpc PROTOCOL.md): pure encoding and decoding, no I/O.

A frame is a 10-byte header and `length` bytes of data. All integers are
big-endian and unsigned:

    bytes 0-3  data length (u32)   at most MAX_DATA_LENGTH, so byte 0 is always 0
    bytes 4-7  stream id (u32)     odd: opened by the client (the only kind in use)
    byte  8    message type (u8)   1 Request, 2 Response, 3 Data
    byte  9    flags (u8)          meaning depends on the type

There is no preface, no handshake, no ping and no flow control. A receiver
that sees a frame longer than MAX_DATA_LENGTH reads and discards its data,
then answers that stream with RESOURCE_EXHAUSTED; the connection stays up.
`FrameBuffer` does the discarding and reports an `Oversized` in the frame's
place, once its last byte has gone by (as ttrpc's `channel.recv` does).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from shim.errors import ResourceExhausted

HEADER_LENGTH = 10
MAX_DATA_LENGTH = 4 << 20  # ttrpc's messageLengthMax: 4 MiB
_HEADER = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    REQUEST = 0x1
    RESPONSE = 0x2
    DATA = 0x3


class Flag(enum.IntFlag):
    REMOTE_CLOSED = 0x1  # Request and Data: the sender will send nothing more on this stream
    REMOTE_OPEN = 0x2  # Request: non-unary, data frames will follow
    NO_DATA = 0x4  # Data: the frame carries no message (unlike an empty one)


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole frame. `type` is an int: a type we do not know is kept, to be ignored.

    `raw` is the exact bytes the frame arrived as, header included, so a relay
    forwards it without re-encoding.
    """

    stream_id: int
    type: int
    flags: int
    data: memoryview
    raw: memoryview

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True, slots=True)
class Oversized:
    """A frame whose data exceeded MAX_DATA_LENGTH; its bytes were discarded."""

    stream_id: int
    type: int
    flags: int
    length: int

    @property
    def message(self) -> str:
        return f"message length {self.length} exceed maximum message size of {MAX_DATA_LENGTH}"


def encode_header(length: int, stream_id: int, mtype: int, flags: int) -> bytes:
    return _HEADER.pack(length, stream_id, mtype, flags)


def decode_header(header: bytes | memoryview) -> tuple[int, int, int, int]:
    """(length, stream id, message type, flags) of the first HEADER_LENGTH bytes."""
    length, stream_id, mtype, flags = _HEADER.unpack_from(header)
    return length, stream_id, mtype, flags


def encode_frame(stream_id: int, mtype: int, flags: int, data: bytes = b"") -> bytes:
    """Header plus data. Refuses data the peer would discard, like ttrpc's `channel.send`."""
    if len(data) > MAX_DATA_LENGTH:
        raise ResourceExhausted(f"message length {len(data)} exceed maximum message size of {MAX_DATA_LENGTH}")
    return encode_header(len(data), stream_id, mtype, flags) + data


class FrameBuffer:
    """Turns a byte stream into whole frames (like h2's frame_buffer).

    Bytes that do not yet make a whole frame are kept; a partial frame is not
    re-scanned until enough bytes for it have arrived. The frames' memoryviews
    point into immutable copies, so they stay valid after the next `parse`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = HEADER_LENGTH  # bytes `_buf` must hold before parsing is worth trying
        self._discard = 0  # data bytes of an oversized frame still to drop
        self._oversized: Oversized | None = None

    def parse(self, data: bytes) -> list[Frame | Oversized]:
        """Every whole frame (or discarded oversized one) completed by `data`, in order."""
        out: list[Frame | Oversized] = []
        data = self._drop(data, out)
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return out
            data = bytes(self._buf)
            self._buf.clear()
        view = memoryview(data)
        pos, end = 0, len(view)
        while end - pos >= HEADER_LENGTH:
            length, stream_id, mtype, flags = decode_header(view[pos:])
            if length > MAX_DATA_LENGTH:
                self._discard = length
                self._oversized = Oversized(stream_id, mtype, flags, length)
                return out + self.parse(bytes(view[pos + HEADER_LENGTH :]))
            size = HEADER_LENGTH + length
            if end - pos < size:
                break
            out.append(Frame(stream_id, mtype, flags, view[pos + HEADER_LENGTH : pos + size], view[pos : pos + size]))
            pos += size
        self._keep(view[pos:])
        return out

    def _drop(self, data: bytes, out: list[Frame | Oversized]) -> bytes:
        """Swallow what is left of an oversized frame; report it once it is all gone."""
        if not self._discard:
            return data
        taken = min(self._discard, len(data))
        self._discard -= taken
        if not self._discard and self._oversized is not None:
            out.append(self._oversized)
            self._oversized = None
        return data[taken:]

    def _keep(self, rest: memoryview) -> None:
        self._buf += rest
        self._need = HEADER_LENGTH
        if len(rest) >= HEADER_LENGTH:
            self._need += decode_header(rest)[0]  # never oversized: the loop saw this header

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame (or still to discard): nonzero at EOF means truncation."""
        return len(self._buf) + self._discard
