"""The splice engine, driven sans-IO: client and upstream bytes in, frames and events out.

Every client header block here is built by a real `hpack.Encoder` (the client's
HPACK state), and what the proxy forwards is decoded by a separate
`hpack.Decoder` that sees only the forwarded bytes (containerd's HPACK state);
what the proxy sends to the client is decoded by the client's own decoder.
That is what makes the HPACK tests meaningful: a dropped or reordered header
block shows up as a decoding failure or wrong headers on the far side.
"""

from __future__ import annotations

import struct

import hpack
import pytest

from shim.errors import Code, NotFound, Unknown
from shim.proxy import grpcwire
from shim.proxy import splice as splice_mod
from shim.proxy.frames import (
    PREFACE,
    ErrorCode,
    Flag,
    Frame,
    FrameBuffer,
    FrameType,
    FramingError,
    Setting,
    build,
    build_settings,
    goaway,
    header_block_fragment,
    parse_settings,
    parse_window_update,
    rst_stream,
    split_data,
    window_update,
)
from shim.proxy.splice import MAX_DIVERTED_BODY, CallCancelled, CallReceived, Splice

INTERCEPTED = "/runtime.v1.RuntimeService/CheckpointContainer"
RELAYED = "/runtime.v1.RuntimeService/ListContainers"


def request_headers(path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]


def headers(stream_id: int, block: bytes, *, end_stream: bool = False, end_headers: bool = True) -> bytes:
    flags = (Flag.END_STREAM if end_stream else 0) | (Flag.END_HEADERS if end_headers else 0)
    return build(FrameType.HEADERS, flags, stream_id, block)


def continuation(stream_id: int, block: bytes, *, end_headers: bool = True) -> bytes:
    return build(FrameType.CONTINUATION, Flag.END_HEADERS if end_headers else 0, stream_id, block)


def data(stream_id: int, payload: bytes, *, end_stream: bool = False) -> bytes:
    return build(FrameType.DATA, Flag.END_STREAM if end_stream else 0, stream_id, payload)


def ping(payload: bytes = b"12345678", ack: bool = False) -> bytes:
    return build(FrameType.PING, Flag.ACK if ack else 0, 0, payload)


def join(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


class Peer:
    """One end's view of the bytes the splice sends it: frames and decoded header blocks."""

    def __init__(self, expect_preface: bool) -> None:
        self.frames = FrameBuffer()
        self.decoder = hpack.Decoder()
        self._want_preface = expect_preface
        self._pending = b""
        self._block: list[Frame] = []

    def feed(self, chunks: list[bytes | memoryview]) -> list[Frame]:
        raw = join(chunks)
        if self._want_preface:
            self._pending += raw
            if len(self._pending) < len(PREFACE):
                return []
            assert self._pending.startswith(PREFACE)
            raw, self._pending, self._want_preface = self._pending[len(PREFACE):], b"", False
        return self.frames.parse(raw)

    def decode(self, frames: list[Frame]) -> list[tuple[int, list[tuple[str, str]]]]:
        """Header blocks among `frames`, decoded in order with this end's HPACK state."""
        out = []
        for f in frames:
            if f.type in (FrameType.HEADERS, FrameType.CONTINUATION):
                self._block.append(f)
                if f.has(Flag.END_HEADERS):
                    block = b"".join(header_block_fragment(x) for x in self._block)
                    out.append((self._block[0].stream_id, [(str(k), str(v)) for k, v in self.decoder.decode(block)]))
                    self._block = []
        return out


class Harness:
    """A Splice with a client (HPACK encoder) and an upstream (HPACK decoder) around it."""

    def __init__(self, intercepts=lambda m: m == INTERCEPTED, handshake: bool = True) -> None:
        self.splice = Splice(intercepts)
        self.enc = hpack.Encoder()  # the client's encoder
        self.up = Peer(expect_preface=True)  # containerd
        self.client = Peer(expect_preface=False)  # kubelet
        self.up_enc = hpack.Encoder()  # containerd's encoder (table size 0, as the proxy asks)
        self.up_enc.header_table_size = 0
        if handshake:
            self.splice.receive_from_client(PREFACE + build_settings([(Setting.INITIAL_WINDOW_SIZE, 1 << 20)]))
            self.splice.receive_from_upstream(build_settings([(Setting.MAX_CONCURRENT_STREAMS, 1000)]))
            self.upstream_frames()
            self.client_frames()

    # client -> splice
    def send(self, *frames: bytes) -> None:
        self.splice.receive_from_client(b"".join(frames))

    def block(self, hdrs: list) -> bytes:
        return self.enc.encode(hdrs)

    def call(self, stream_id: int, path: str, body: bytes | None = b"", *extra: tuple[str, str]) -> bytes:
        """A whole unary request as the client would write it; returns the bytes sent."""
        raw = headers(stream_id, self.block(request_headers(path, *extra)), end_stream=body is None)
        if body is not None:
            raw += data(stream_id, grpcwire.encode_message(body), end_stream=True)
        self.send(raw)
        return raw

    # upstream -> splice
    def reply(self, *frames: bytes) -> None:
        self.splice.receive_from_upstream(b"".join(frames))

    def response_headers(self, stream_id: int, *, end_stream: bool = False) -> bytes:
        return headers(stream_id, self.up_enc.encode(grpcwire.RESPONSE_HEADERS), end_stream=end_stream)

    # splice -> peers
    def upstream_frames(self) -> list[Frame]:
        return self.up.feed(self.splice.data_for_upstream())

    def client_frames(self) -> list[Frame]:
        return self.client.feed(self.splice.data_for_client())

    def events(self) -> list:
        out = []
        while (ev := self.splice.next_event()) is not None:
            out.append(ev)
        return out


def kinds(frames: list[Frame]) -> list[tuple[int, int]]:
    return [(f.type, f.stream_id) for f in frames]


def window_updates(frames: list[Frame]) -> list[tuple[int, int]]:
    return [(f.stream_id, parse_window_update(f)) for f in frames if f.type == FrameType.WINDOW_UPDATE]


def rsts(frames: list[Frame]) -> list[tuple[int, int]]:
    return [(f.stream_id, struct.unpack(">I", f.payload)[0]) for f in frames if f.type == FrameType.RST_STREAM]


def grpc_body(frames: list[Frame], stream_id: int) -> bytes:
    return b"".join(bytes(f.payload) for f in frames if f.type == FrameType.DATA and f.stream_id == stream_id)


def divert(h: Harness, stream_id: int, message: bytes = b"req", *extra: tuple[str, str]) -> CallReceived:
    h.call(stream_id, INTERCEPTED, message, *extra)
    (event,) = h.events()
    assert isinstance(event, CallReceived) and event.stream_id == stream_id
    h.client_frames()  # the window its DATA took, returned (see test_diverted_data_window_returned_to_client)
    return event


# -- relaying -----------------------------------------------------------------


def test_preface_and_forwarded_call_are_byte_identical() -> None:
    h = Harness(handshake=False)
    client_settings = build_settings([(Setting.HEADER_TABLE_SIZE, 4096), (Setting.INITIAL_WINDOW_SIZE, 1 << 20)])
    # The preface split across reads, glued to the SETTINGS.
    h.send(PREFACE[:7])
    assert h.splice.data_for_upstream() == []
    h.send(PREFACE[7:] + client_settings)
    up = join(h.splice.data_for_upstream())
    assert up.startswith(PREFACE)

    request = h.call(1, RELAYED, b"\x0a\x02hi")
    # (a PING ACK passes; the client's own PINGs the proxy answers: see the ping tests below)
    extras = window_update(0, 1 << 20) + ping(ack=True) + build_settings([], flags=Flag.ACK) + window_update(1, 5000)
    h.send(extras)
    assert join(h.splice.data_for_upstream()) == request + extras

    upstream_settings = build_settings([(Setting.MAX_CONCURRENT_STREAMS, 100), (Setting.MAX_FRAME_SIZE, 16384)])
    response = (
        upstream_settings
        + build_settings([], flags=Flag.ACK)
        + ping(ack=True)
        + h.response_headers(1)
        + data(1, grpcwire.encode_message(b"resp"))
        + headers(1, h.up_enc.encode(grpcwire.status_trailers(Code.OK, "")), end_stream=True)
        + window_update(0, 77)
    )
    h.reply(response)
    assert join(h.splice.data_for_client()) == response
    assert h.events() == []


def test_client_settings_rewritten_to_header_table_size_zero() -> None:
    h = Harness(handshake=False)
    sent = [
        (Setting.HEADER_TABLE_SIZE, 65536),
        (Setting.ENABLE_PUSH, 0),
        (Setting.INITIAL_WINDOW_SIZE, 1 << 20),
        (Setting.MAX_HEADER_LIST_SIZE, 8192),
    ]
    h.send(PREFACE + build_settings(sent))
    (frame,) = h.upstream_frames()
    assert frame.type == FrameType.SETTINGS and not frame.has(Flag.ACK)
    got = dict(parse_settings(frame.payload))
    assert got == {
        Setting.HEADER_TABLE_SIZE: 0,
        Setting.ENABLE_PUSH: 0,
        Setting.INITIAL_WINDOW_SIZE: 1 << 20,
        Setting.MAX_HEADER_LIST_SIZE: 8192,
    }
    # A later SETTINGS without HEADER_TABLE_SIZE still gets it (0), and an ACK is untouched.
    h.send(build_settings([(Setting.MAX_FRAME_SIZE, 32768)]) + build_settings([], flags=Flag.ACK))
    settings, ack = h.upstream_frames()
    assert dict(parse_settings(settings.payload)) == {Setting.MAX_FRAME_SIZE: 32768, Setting.HEADER_TABLE_SIZE: 0}
    assert ack.has(Flag.ACK) and len(ack.payload) == 0


def test_non_http2_client_is_relayed_raw() -> None:
    h = Harness(handshake=False)
    h.send(b"PRI * HT")  # looks like the preface so far
    assert h.splice.data_for_upstream() == []
    h.send(b"TP/1.1 nope\r\n\x00\x00\x00garbage")
    assert join(h.splice.data_for_upstream()) == b"PRI * HTTP/1.1 nope\r\n\x00\x00\x00garbage"
    h.send(b"\xff" * 40)  # would be an absurd frame header in HTTP/2
    assert join(h.splice.data_for_upstream()) == b"\xff" * 40
    h.reply(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert join(h.splice.data_for_client()) == b"HTTP/1.1 400 Bad Request\r\n\r\n"
    h.splice.start_draining()  # no GOAWAY into a non-HTTP/2 stream
    assert h.splice.data_for_client() == []
    assert h.events() == []


def test_busy_tracks_open_streams() -> None:
    h = Harness()
    assert not h.splice.busy
    h.call(1, RELAYED)
    h.call(3, RELAYED)
    assert h.splice.busy
    h.reply(h.response_headers(1), data(1, b"\0\0\0\0\0"))
    assert h.splice.busy
    h.reply(headers(1, h.up_enc.encode(grpcwire.status_trailers(Code.OK, "")), end_stream=True))
    assert h.splice.busy  # stream 3 still open
    h.reply(rst_stream(3, ErrorCode.INTERNAL_ERROR))
    assert not h.splice.busy
    h.call(5, RELAYED)
    h.reply(h.response_headers(5), data(5, b"\0\0\0\0\0", end_stream=True))
    assert not h.splice.busy
    # A diverted call is busy until it is answered.
    event = divert(h, 7)
    assert h.splice.busy
    h.splice.respond(event.stream_id, b"ok")
    assert not h.splice.busy


# -- diversion ----------------------------------------------------------------


def test_diverted_call_received_with_method_metadata_body_timeout() -> None:
    h = Harness()
    body = grpcwire.encode_message(b"x" * 100)
    h.send(headers(1, h.block(request_headers(INTERCEPTED, ("grpc-timeout", "250m"), ("x-token", "abc")))))
    h.send(data(1, body[:40]))
    assert h.events() == []  # not complete yet
    h.send(data(1, body[40:]), data(1, b"", end_stream=True))
    (event,) = h.events()
    assert event == CallReceived(
        stream_id=1,
        method=INTERCEPTED,
        metadata=(("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "250m"), ("x-token", "abc")),
        body=body,
        timeout=0.25,
    )
    # Nothing of it reached containerd (the first block inserted into the table: see the HPACK tests).
    assert rsts(h.upstream_frames()) == [(1, ErrorCode.CANCEL)]


def test_diverted_call_without_timeout_and_headers_only() -> None:
    h = Harness()
    h.call(1, INTERCEPTED, None)  # HEADERS with END_STREAM, no DATA at all
    (event,) = h.events()
    assert event.timeout is None and event.body == b"" and event.method == INTERCEPTED


def test_malformed_grpc_timeout_is_answered_invalid_argument() -> None:
    h = Harness()
    h.call(1, INTERCEPTED, b"x", ("grpc-timeout", "soon"))
    assert h.events() == []
    (block,) = h.client.decode(h.client_frames())
    assert ("grpc-status", str(int(Code.INVALID_ARGUMENT))) in block[1]
    assert not h.splice.busy


def test_diverted_block_that_changed_hpack_table_is_forwarded_then_reset() -> None:
    h = Harness()
    sent = h.call(1, INTERCEPTED, b"req", ("x-request-id", "first"))
    hdrs_raw = sent[: len(sent) - len(data(1, grpcwire.encode_message(b"req"), end_stream=True))]
    # Exactly the client's HEADERS frame, then RST_STREAM(CANCEL); never the DATA.
    assert join(h.splice.data_for_upstream()) == hdrs_raw + rst_stream(1, ErrorCode.CANCEL)


def test_diverted_block_that_did_not_change_table_is_not_forwarded() -> None:
    h = Harness()
    divert(h, 1)
    h.upstream_frames()
    # The same headers again: every field is now an index into the dynamic table.
    divert(h, 3)
    assert h.splice.data_for_upstream() == []
    # Never-indexed literals do not touch the table either.
    block = h.enc.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in request_headers(INTERCEPTED, ("x-new", "v"))])
    h.send(headers(5, block, end_stream=True))
    assert [e.stream_id for e in h.events()] == [5]
    assert h.splice.data_for_upstream() == []


def test_table_size_update_in_a_diverted_block_is_forwarded() -> None:
    h = Harness()
    divert(h, 1)
    h.upstream_frames()
    h.enc.header_table_size = 1024  # the next block starts with a dynamic table size update
    divert(h, 3)
    frames = h.upstream_frames()
    assert kinds(frames) == [(FrameType.HEADERS, 3), (FrameType.RST_STREAM, 3)]


def test_forwarded_call_decodes_upstream_after_diversions() -> None:
    """The point of the HPACK handling: containerd's decoder stays in step with the client's encoder."""
    h = Harness()
    up_blocks = []
    divert(h, 1, b"a", ("x-shared", "s1"), ("x-only-diverted", "d1"))  # inserts: forwarded + reset
    up_blocks += h.up.decode(h.upstream_frames())
    divert(h, 3, b"b", ("x-shared", "s1"), ("x-only-diverted", "d1"))  # all indexed: dropped
    up_blocks += h.up.decode(h.upstream_frames())
    # A relayed call whose block indexes entries that only the diverted blocks inserted.
    h.call(5, RELAYED, b"c", ("x-shared", "s1"), ("x-only-diverted", "d1"), ("x-relayed", "r"))
    frames = h.upstream_frames()
    up_blocks += h.up.decode(frames)
    assert [sid for sid, _ in up_blocks] == [1, 5]
    assert up_blocks[1][1] == request_headers(RELAYED, ("x-shared", "s1"), ("x-only-diverted", "d1"), ("x-relayed", "r"))
    assert grpc_body(frames, 5) == grpcwire.encode_message(b"c")
    # And again, with a diverted block in between that inserted a new entry.
    divert(h, 7, b"d", ("x-shared", "s2"))
    h.call(9, RELAYED, b"e", ("x-shared", "s2"), ("x-relayed", "r"))
    blocks = h.up.decode(h.upstream_frames())
    assert [sid for sid, _ in blocks] == [7, 9]
    assert blocks[1][1] == request_headers(RELAYED, ("x-shared", "s2"), ("x-relayed", "r"))


def test_diverted_block_in_continuations_is_handled() -> None:
    h = Harness()
    block = h.block(request_headers(INTERCEPTED, ("x-big", "v" * 300)))
    raw = headers(1, block[:10], end_headers=False) + continuation(1, block[10:50], end_headers=False) + continuation(1, block[50:])
    h.send(raw + data(1, grpcwire.encode_message(b"q"), end_stream=True))
    (event,) = h.events()
    assert ("x-big", "v" * 300) in event.metadata
    assert join(h.splice.data_for_upstream()) == raw + rst_stream(1, ErrorCode.CANCEL)


def test_diverted_data_window_returned_to_client() -> None:
    h = Harness()
    h.send(headers(1, h.block(request_headers(INTERCEPTED))))
    h.client_frames()
    h.send(data(1, b"\0\0\0\0\x10" + b"a" * 10))
    assert window_updates(h.client_frames()) == [(0, 15), (1, 15)]
    h.send(data(1, b"b" * 6, end_stream=True))
    # The stream is over: only the connection window comes back.
    assert window_updates(h.client_frames()) == [(0, 6)]
    assert window_updates(h.upstream_frames()) == []


def test_respond_is_a_valid_grpc_response_leaving_client_table_empty() -> None:
    h = Harness()
    event = divert(h, 1)
    h.splice.respond(event.stream_id, b"the answer")
    frames = h.client_frames()
    assert kinds(frames) == [(FrameType.HEADERS, 1), (FrameType.DATA, 1), (FrameType.HEADERS, 1)]
    assert not frames[0].has(Flag.END_STREAM) and frames[2].has(Flag.END_STREAM)
    assert all(f.has(Flag.END_HEADERS) for f in (frames[0], frames[2]))
    (_, head), (_, trailers) = h.client.decode(frames)
    assert head == [(":status", "200"), ("content-type", "application/grpc")]
    assert trailers == [("grpc-status", "0")]
    assert grpc_body(frames, 1) == b"\x00\x00\x00\x00\x0athe answer"
    assert len(h.client.decoder.header_table.dynamic_entries) == 0
    assert not h.splice.busy
    h.splice.respond(event.stream_id, b"twice")  # already answered: nothing
    assert h.splice.data_for_client() == []


def test_respond_splits_data_at_client_max_frame_size() -> None:
    h = Harness()
    event = divert(h, 1)
    message = bytes(range(256)) * 100  # 25600 bytes: two DATA frames at 16384
    h.splice.respond(event.stream_id, message)
    frames = h.client_frames()
    sizes = [len(f.payload) for f in frames if f.type == FrameType.DATA]
    assert sizes == [16384, len(message) + 5 - 16384]
    assert grpc_body(frames, 1) == grpcwire.encode_message(message)


def test_client_settings_apply_to_injected_frames_once_acknowledged() -> None:
    """A client only relies on its new SETTINGS after the ACK (RFC 9113 6.5.3); neither may the proxy."""
    h = Harness(handshake=False)
    h.send(PREFACE + build_settings([(Setting.MAX_FRAME_SIZE, 1 << 20)]) + window_update(0, 1 << 20))
    message = b"m" * 40_000
    event = divert(h, 1)
    h.splice.respond(event.stream_id, message)  # containerd has not acknowledged yet
    sizes = [len(f.payload) for f in h.client_frames() if f.type == FrameType.DATA]
    assert sizes == [16384, 16384, 40_005 - 2 * 16384]
    h.reply(build_settings([], flags=Flag.ACK))
    assert [f.has(Flag.ACK) for f in h.client_frames()] == [True]  # relayed
    event = divert(h, 3)
    h.splice.respond(event.stream_id, message)
    sizes = [len(f.payload) for f in h.client_frames() if f.type == FrameType.DATA]
    assert sizes == [40_005]


def test_respond_larger_than_client_stream_window_is_resource_exhausted() -> None:
    h = Harness(handshake=False)
    h.send(PREFACE + build_settings([(Setting.INITIAL_WINDOW_SIZE, 100)]))
    h.reply(build_settings([], flags=Flag.ACK))
    event = divert(h, 1)
    h.client_frames()
    h.splice.respond(event.stream_id, b"y" * 200)
    frames = h.client_frames()
    assert [f.type for f in frames] == [FrameType.HEADERS]
    (_, block), = h.client.decode(frames)
    assert ("grpc-status", str(int(Code.RESOURCE_EXHAUSTED))) in block


def test_fail_is_trailers_only_with_percent_encoded_message() -> None:
    h = Harness()
    event = divert(h, 1)
    h.splice.fail(event.stream_id, NotFound("container 100% gone: café\nline2"))
    frames = h.client_frames()
    assert kinds(frames) == [(FrameType.HEADERS, 1)]
    assert frames[0].has(Flag.END_STREAM) and frames[0].has(Flag.END_HEADERS)
    ((_, block),) = h.client.decode(frames)
    assert block == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", str(int(Code.NOT_FOUND))),
        ("grpc-message", "container 100%25 gone: caf%C3%A9%0Aline2"),
    ]
    assert len(h.client.decoder.header_table.dynamic_entries) == 0
    assert not h.splice.busy


def test_fail_with_a_message_longer_than_a_frame_uses_continuations() -> None:
    """CRIU's output can end up in a status message; it must not break the connection."""
    h = Harness()
    event = divert(h, 1)
    message = "criu failed: " + "e" * 40_000
    h.splice.fail(event.stream_id, Unknown(message))
    frames = h.client_frames()
    assert frames[0].type == FrameType.HEADERS and frames[0].has(Flag.END_STREAM)
    assert all(f.type == FrameType.CONTINUATION for f in frames[1:]) and len(frames) > 1
    assert all(len(f.payload) <= 16384 for f in frames)
    ((_, block),) = h.client.decode(frames)
    assert dict(block)["grpc-message"] == message
    assert dict(block)["grpc-status"] == str(int(Code.UNKNOWN))


# -- flow control -------------------------------------------------------------


def test_injected_data_is_withheld_from_the_next_connection_window_update() -> None:
    h = Harness()
    event = divert(h, 1)
    h.upstream_frames()
    h.splice.respond(event.stream_id, b"z" * 95)  # 100 bytes of DATA
    h.client_frames()
    h.send(window_update(0, 60))  # all of it pays the debt
    assert h.upstream_frames() == []
    h.send(window_update(0, 40))  # exactly the rest of the debt
    assert h.upstream_frames() == []
    h.send(window_update(0, 1000))  # debt paid: forwarded unchanged
    assert window_updates(h.upstream_frames()) == [(0, 1000)]

    event = divert(h, 3)
    h.splice.respond(event.stream_id, b"z" * 95)
    h.send(window_update(0, 1000))  # forwarded reduced by the 100 injected bytes
    assert window_updates(h.upstream_frames()) == [(0, 900)]
    h.send(window_update(3, 100))  # stream-level update for a finished diverted stream
    h.send(window_update(0, 5))
    assert window_updates(h.upstream_frames()) == [(0, 5)]


def test_response_waits_for_client_connection_window() -> None:
    h = Harness()
    h.call(1, RELAYED)
    h.upstream_frames()
    # Containerd uses up the client's whole connection window (65535) on stream 1.
    h.reply(h.response_headers(1), *split_data(1, b"r" * 65_535, 16_384, end_stream=False))
    h.client_frames()
    event = divert(h, 3)
    h.client_frames()
    h.splice.respond(event.stream_id, b"w" * 15)  # 20 bytes of DATA
    assert h.splice.data_for_client() == []
    # Control frames for other calls are not held back behind it.
    other = divert(h, 5)
    h.client_frames()  # its DATA's window update
    h.splice.fail(other.stream_id, NotFound("nope"))
    assert kinds(h.client_frames()) == [(FrameType.HEADERS, 5)]
    h.send(window_update(0, 19))  # not enough yet
    assert h.splice.data_for_client() == []
    assert window_updates(h.upstream_frames()) == [(0, 19)]  # no debt yet: relayed as is
    h.send(window_update(0, 1))
    frames = h.client_frames()
    assert kinds(frames) == [(FrameType.HEADERS, 3), (FrameType.DATA, 3), (FrameType.HEADERS, 3)]
    assert grpc_body(frames, 3) == grpcwire.encode_message(b"w" * 15)
    # The update that made room for the answer pays for it at once: containerd must not
    # be told it may send the 20 bytes the proxy just used.
    assert h.upstream_frames() == []
    h.send(window_update(0, 30))
    assert window_updates(h.upstream_frames()) == [(0, 11)]


def test_injection_held_while_upstream_is_inside_a_header_block() -> None:
    h = Harness()
    h.call(1, RELAYED)
    event = divert(h, 3)
    h.client_frames()
    block = h.up_enc.encode(grpcwire.RESPONSE_HEADERS + [("x-long", "l" * 100)])
    h.reply(headers(1, block[:20], end_headers=False))
    h.splice.respond(event.stream_id, b"answer")
    seen = h.client_frames()
    assert kinds(seen) == [(FrameType.HEADERS, 1)]  # containerd's frame only, nothing after it
    h.reply(continuation(1, block[20:60], end_headers=False))
    more = h.client_frames()
    assert kinds(more) == [(FrameType.CONTINUATION, 1)]
    h.reply(continuation(1, block[60:]))
    last = h.client_frames()
    assert kinds(last) == [
        (FrameType.CONTINUATION, 1),
        (FrameType.HEADERS, 3),
        (FrameType.DATA, 3),
        (FrameType.HEADERS, 3),
    ]
    blocks = h.client.decode(seen + more + last)
    assert blocks[0] == (1, grpcwire.RESPONSE_HEADERS + [("x-long", "l" * 100)])
    assert blocks[1] == (3, grpcwire.RESPONSE_HEADERS)
    assert blocks[2] == (3, [("grpc-status", "0")])


def test_injected_goaway_held_while_upstream_is_inside_a_header_block() -> None:
    h = Harness()
    h.call(1, RELAYED)
    block = h.up_enc.encode(grpcwire.RESPONSE_HEADERS)
    h.reply(headers(1, block[:2], end_headers=False))
    h.client_frames()
    h.splice.start_draining()
    assert h.splice.data_for_client() == []
    h.reply(continuation(1, block[2:]))
    assert kinds(h.client_frames()) == [(FrameType.CONTINUATION, 1), (FrameType.GOAWAY, 0)]


# -- cancellation and resets --------------------------------------------------


def test_client_reset_of_a_diverted_call_cancels_it() -> None:
    h = Harness()
    event = divert(h, 1)
    h.upstream_frames()
    h.send(rst_stream(1, ErrorCode.CANCEL))
    assert h.events() == [CallCancelled(1)]
    assert not h.splice.busy
    h.splice.respond(event.stream_id, b"too late")
    h.splice.fail(event.stream_id, NotFound("too late"))
    assert h.splice.data_for_client() == []
    assert h.upstream_frames() == []  # the reset is not containerd's business


def test_client_reset_before_the_request_is_complete() -> None:
    h = Harness()
    h.send(headers(1, h.block(request_headers(INTERCEPTED))), data(1, b"\0\0\0"))
    h.send(rst_stream(1, ErrorCode.CANCEL))
    assert h.events() == [CallCancelled(1)]
    assert not h.splice.busy


def test_client_reset_of_a_relayed_call_is_forwarded() -> None:
    h = Harness()
    h.call(1, RELAYED)
    h.upstream_frames()
    h.send(rst_stream(1, ErrorCode.CANCEL))
    assert rsts(h.upstream_frames()) == [(1, ErrorCode.CANCEL)]
    assert not h.splice.busy


def test_upstream_frames_for_a_stream_the_proxy_reset_are_dropped() -> None:
    h = Harness()
    event = divert(h, 1)
    assert rsts(h.upstream_frames()) == [(1, ErrorCode.CANCEL)]
    # Containerd had already started answering stream 1 before it read the reset.
    h.reply(h.response_headers(1), data(1, b"q" * 300), data(1, b"q" * 12, end_stream=True))
    assert h.splice.data_for_client() == []
    assert window_updates(h.upstream_frames()) == [(0, 300), (0, 12)]
    h.splice.respond(event.stream_id, b"from the proxy")
    frames = h.client_frames()
    ((_, head), (_, trailers)) = h.client.decode(frames)
    assert head[0] == (":status", "200") and trailers == [("grpc-status", "0")]
    # The proxy's answer consumed window; containerd's dropped DATA did not.
    h.send(window_update(0, 19))
    assert h.upstream_frames() == []


def test_upstream_reset_for_a_proxy_reset_stream_is_dropped() -> None:
    h = Harness()
    divert(h, 1)
    h.upstream_frames()
    h.reply(rst_stream(1, ErrorCode.CANCEL))
    assert h.splice.data_for_client() == []


# -- draining -----------------------------------------------------------------


def test_draining_sends_goaway_and_refuses_new_streams() -> None:
    h = Harness()
    h.call(1, RELAYED)
    h.call(3, RELAYED)
    h.upstream_frames()
    h.splice.start_draining()
    frames = h.client_frames()
    assert [bytes(f.raw) for f in frames] == [goaway(3, ErrorCode.NO_ERROR)]
    h.splice.start_draining()  # only once
    assert h.splice.data_for_client() == []

    # A new stream (same headers: no table change) is refused; none of it reaches containerd.
    h.call(5, RELAYED)
    assert rsts(h.client_frames()) == [(5, ErrorCode.REFUSED_STREAM)]
    assert h.upstream_frames() == []
    # A new stream whose block changed the table is refused too, but containerd's HPACK state follows.
    h.call(7, INTERCEPTED, b"x", ("x-fresh", "1"))
    assert rsts(h.client_frames())[0] == (7, ErrorCode.REFUSED_STREAM)
    assert h.events() == []
    assert kinds(h.upstream_frames()) == [(FrameType.HEADERS, 7), (FrameType.RST_STREAM, 7)]
    # The calls in flight go on.
    h.send(window_update(1, 10))
    assert window_updates(h.upstream_frames()) == [(1, 10)]
    h.reply(h.response_headers(1), data(1, b"\0\0\0\0\0", end_stream=True))
    assert kinds(h.client_frames()) == [(FrameType.HEADERS, 1), (FrameType.DATA, 1)]
    assert h.splice.busy
    h.reply(rst_stream(3, ErrorCode.NO_ERROR))
    assert not h.splice.busy


def test_refused_stream_data_gets_its_window_back_and_is_not_forwarded() -> None:
    h = Harness()
    h.call(1, RELAYED)
    h.upstream_frames()
    h.splice.start_draining()
    h.client_frames()
    h.call(3, RELAYED, b"q" * 10)  # HEADERS and DATA in one write, as gRPC clients do
    frames = h.client_frames()
    assert rsts(frames) == [(3, ErrorCode.REFUSED_STREAM)]
    assert (0, 15) in window_updates(frames)
    assert h.upstream_frames() == []


def test_late_client_frames_on_a_finished_diverted_stream_stay_away_from_upstream() -> None:
    h = Harness()
    event = divert(h, 1)
    h.splice.respond(event.stream_id, b"r" * 1000)
    h.upstream_frames()
    # The client acknowledges the response, then resets the (already closed) stream.
    h.send(window_update(1, 1005), rst_stream(1, ErrorCode.NO_ERROR), build(FrameType.PRIORITY, 0, 1, b"\0\0\0\0\x10"))
    assert h.upstream_frames() == []
    assert h.events() == []


# -- broken input -------------------------------------------------------------


def test_frame_larger_than_advertised_max_frame_size_is_a_framing_error() -> None:
    h = Harness()
    with pytest.raises(FramingError):
        h.send(b"\xff\xff\xff" + b"\x00" * 6)  # announces 16 MiB - 1 bytes


def test_frame_size_follows_upstream_settings() -> None:
    h = Harness()
    h.reply(build_settings([(Setting.MAX_FRAME_SIZE, 1 << 20)]))
    h.call(1, RELAYED)
    h.upstream_frames()
    big = data(1, b"b" * 100_000)
    h.send(big)
    assert join(h.splice.data_for_upstream()) == big
    # And the client's MAX_FRAME_SIZE bounds what containerd may send.
    with pytest.raises(FramingError):
        h.reply(data(1, b"c" * 20_000))


def test_header_block_interrupted_by_data_is_a_framing_error() -> None:
    h = Harness()
    block = h.block(request_headers(RELAYED))
    h.send(headers(1, block[:5], end_headers=False))
    with pytest.raises(FramingError):
        h.send(data(1, b"oops"))


def test_continuation_for_another_stream_is_a_framing_error() -> None:
    h = Harness()
    block = h.block(request_headers(RELAYED))
    h.send(headers(1, block[:5], end_headers=False))
    with pytest.raises(FramingError):
        h.send(continuation(3, block[5:]))


def test_undecodable_hpack_is_a_framing_error() -> None:
    h = Harness()
    with pytest.raises(FramingError):
        h.send(headers(1, b"\xfe"))  # indexed field 126: not in the (empty) dynamic table


def test_oversized_diverted_body_is_refused_and_the_rest_swallowed() -> None:
    h = Harness()
    h.send(headers(1, h.block(request_headers(INTERCEPTED))))
    h.upstream_frames()
    chunk = b"\0" * 16_384
    chunks = MAX_DIVERTED_BODY // len(chunk)
    h.send(b"".join(data(1, chunk) for _ in range(chunks)))
    assert [f.type for f in h.client_frames()] == [FrameType.WINDOW_UPDATE] * 2 * chunks
    h.send(data(1, b"\0"))  # one byte too many
    frames = h.client_frames()
    blocks = h.client.decode(frames)
    assert len(blocks) == 1 and ("grpc-status", str(int(Code.RESOURCE_EXHAUSTED))) in blocks[0][1]
    assert frames[-1].has(Flag.END_STREAM)
    h.send(data(1, chunk), data(1, chunk, end_stream=True))
    assert h.upstream_frames() == []
    frames = h.client_frames()
    assert [f.type for f in frames] == [FrameType.WINDOW_UPDATE] * 3  # windows still returned
    assert h.events() == []  # never handed to a handler
    assert not h.splice.busy


def test_max_diverted_body_is_enforced_via_module_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice_mod, "MAX_DIVERTED_BODY", 10)
    h = Harness()
    h.call(1, INTERCEPTED, b"0123456789")  # 15 bytes with the gRPC prefix
    assert h.events() == []
    ((_, block),) = h.client.decode(h.client_frames())
    assert ("grpc-status", str(int(Code.RESOURCE_EXHAUSTED))) in block


# -- pings ----------------------------------------------------------------------


def test_client_ping_is_answered_by_the_proxy_not_forwarded() -> None:
    """containerd must not see pings on a connection whose only call the proxy serves (too_many_pings)."""
    h = Harness()
    divert(h, 1)
    h.upstream_frames()
    h.send(ping(b"12345678"))
    (answer,) = h.client_frames()
    assert answer.type == FrameType.PING and answer.has(Flag.ACK) and bytes(answer.payload) == b"12345678"
    assert h.upstream_frames() == []


def test_upstream_ping_reaches_the_client_and_its_ack_reaches_upstream() -> None:
    h = Harness()
    h.reply(ping(b"abcdefgh"))
    (seen,) = h.client_frames()
    assert seen.type == FrameType.PING and not seen.has(Flag.ACK)
    h.send(ping(b"abcdefgh", ack=True))
    (forwarded,) = h.upstream_frames()
    assert forwarded.type == FrameType.PING and forwarded.has(Flag.ACK) and bytes(forwarded.payload) == b"abcdefgh"


def test_malformed_client_ping_is_left_to_upstream() -> None:
    h = Harness()
    h.send(build(FrameType.PING, 0, 0, b"short"))
    assert kinds(h.upstream_frames()) == [(FrameType.PING, 0)]
    assert h.client_frames() == []


def test_ping_answer_waits_for_an_upstream_header_block_to_end() -> None:
    h = Harness()
    h.call(1, RELAYED)
    block = h.up_enc.encode(grpcwire.RESPONSE_HEADERS)
    h.reply(headers(1, block[:2], end_headers=False))
    h.client_frames()
    h.send(ping(b"87654321"))
    assert h.splice.data_for_client() == []
    h.reply(continuation(1, block[2:]))
    assert kinds(h.client_frames()) == [(FrameType.CONTINUATION, 1), (FrameType.PING, 0)]
