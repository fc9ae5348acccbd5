"""HTTP/2 frame layout (RFC 9113 section 4): pure parsing and building, no I/O.

The proxy never terminates HTTP/2 for calls it forwards; it only needs to see
frame boundaries, read a few frame kinds and build a handful of its own. So this
module is deliberately small: a frame header, a buffer that yields whole frames,
and builders for the frames the proxy injects.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_LEN = 9
DEFAULT_MAX_FRAME_SIZE = 16_384
DEFAULT_WINDOW = 65_535
MAX_WINDOW_INCREMENT = 2**31 - 1
# Frames larger than this are refused outright: SETTINGS_MAX_FRAME_SIZE's
# ceiling is 2**24-1, and we never advertise more than the peer does.
MAX_FRAME_SIZE_LIMIT = 2**24 - 1


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(enum.IntFlag):
    END_STREAM = 0x1  # DATA, HEADERS
    ACK = 0x1  # SETTINGS, PING
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8


class FramingError(Exception):
    """The byte stream is not valid HTTP/2 framing; the connection is unusable."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole frame; `raw` is the exact bytes it arrived as (header included)."""

    type: int
    flags: int
    stream_id: int
    payload: memoryview
    raw: memoryview

    def has(self, flag: Flag) -> bool:
        return bool(self.flags & flag)


def pack_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return length.to_bytes(3, "big") + bytes((ftype, flags)) + stream_id.to_bytes(4, "big")


def build(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return pack_header(len(payload), ftype, flags, stream_id) + payload


class FrameBuffer:
    """Turns a byte stream into whole frames (like h2's frame_buffer).

    Bytes that do not yet make a whole frame are kept; a partial frame is not
    re-scanned until enough bytes for it have arrived, so a large frame costs
    one copy, not one per read.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE_LIMIT) -> None:
        self._buf = bytearray()
        self._need = 0
        self._max = max_frame_size

    def parse(self, data: bytes) -> list[Frame]:
        """Every whole frame completed by `data`, in order."""
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            data = bytes(self._buf)
            self._buf.clear()
        view = memoryview(data)
        out: list[Frame] = []
        pos, end = 0, len(view)
        while end - pos >= HEADER_LEN:
            length = int.from_bytes(view[pos : pos + 3], "big")
            if length > self._max:
                raise FramingError(f"frame of {length} bytes exceeds the limit {self._max}")
            size = HEADER_LEN + length
            if end - pos < size:
                break
            stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            out.append(Frame(view[pos + 3], view[pos + 4], stream_id, view[pos + HEADER_LEN : pos + size], view[pos : pos + size]))
            pos += size
        self._keep(view[pos:])
        return out

    def allow(self, max_frame_size: int) -> None:
        """Accept frames up to `max_frame_size` (a SETTINGS_MAX_FRAME_SIZE the receiver sent).

        Only ever raises the limit: a peer may lower its setting, but frames sent
        before the other end saw that are still legal.
        """
        self._max = max(self._max, min(max_frame_size, MAX_FRAME_SIZE_LIMIT))

    def _keep(self, rest: memoryview) -> None:
        self._buf += rest
        self._need = HEADER_LEN
        if len(rest) >= HEADER_LEN:
            self._need += int.from_bytes(rest[:3], "big")

    def __len__(self) -> int:
        return len(self._buf)


def header_block_fragment(frame: Frame) -> bytes:
    """The HPACK fragment of a HEADERS or CONTINUATION frame, without padding and priority."""
    payload = frame.payload
    if frame.type != FrameType.HEADERS:
        return bytes(payload)
    start, end = 0, len(payload)
    if frame.has(Flag.PADDED):
        if not payload:
            raise FramingError("PADDED HEADERS frame without a pad length")
        start, end = 1, end - payload[0]
    if frame.has(Flag.PRIORITY):
        start += 5
    if start > end:
        raise FramingError("HEADERS padding exceeds the frame")
    return bytes(payload[start:end])


def data_payload(frame: Frame) -> bytes:
    """The application bytes of a DATA frame, without padding."""
    payload = frame.payload
    if not frame.has(Flag.PADDED):
        return bytes(payload)
    if not payload or payload[0] >= len(payload):
        raise FramingError("DATA padding exceeds the frame")
    return bytes(payload[1 : len(payload) - payload[0]])


def parse_settings(payload: memoryview | bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise FramingError("SETTINGS payload is not a multiple of 6 bytes")
    return [struct.unpack_from(">HI", payload, i) for i in range(0, len(payload), 6)]


def build_settings(pairs: list[tuple[int, int]], flags: int = 0) -> bytes:
    return build(FrameType.SETTINGS, flags, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(stream_id: int, increment: int) -> bytes:
    return build(FrameType.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def parse_window_update(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise FramingError("WINDOW_UPDATE payload is not 4 bytes")
    return int.from_bytes(frame.payload, "big") & 0x7FFFFFFF


def rst_stream(stream_id: int, error: ErrorCode) -> bytes:
    return build(FrameType.RST_STREAM, 0, stream_id, struct.pack(">I", error))


def goaway(last_stream_id: int, error: ErrorCode, debug: bytes = b"") -> bytes:
    return build(FrameType.GOAWAY, 0, 0, struct.pack(">II", last_stream_id, error) + debug)


def split_data(stream_id: int, data: bytes, max_frame: int, end_stream: bool) -> list[bytes]:
    """DATA frames carrying `data`, none larger than `max_frame`."""
    chunks = [data[i : i + max_frame] for i in range(0, len(data), max_frame)] or [b""]
    last = len(chunks) - 1
    return [
        build(FrameType.DATA, Flag.END_STREAM if (end_stream and i == last) else 0, stream_id, c)
        for i, c in enumerate(chunks)
    ]
