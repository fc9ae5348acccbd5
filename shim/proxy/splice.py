"""The splice engine: one client HTTP/2 connection relayed to one upstream connection.

Sans-IO, like `h11.Connection`: bytes go in through `receive_from_client` and
`receive_from_upstream`; bytes come out of `data_for_upstream` and
`data_for_client`; calls the proxy answers itself come out of `next_event`.

Theory of operation. Forwarded calls are relayed frame for frame, unchanged,
so the proxy costs a frame-header scan per read and one HPACK decode per
request header block (to learn the method), never a decode/re-encode of
messages. That is what keeps the proxy within a fraction of a millisecond of
talking to containerd directly, and what makes it forward methods it has never
heard of. A call whose method is intercepted is *diverted*: its frames are not
forwarded, and the answer is injected into the client's byte stream. Three
pieces of HTTP/2 state are shared by the two ends and must survive a diversion:

* HPACK. The client's encoder state is owned by containerd's decoder, so a
  diverted header block that changed the dynamic table is still forwarded and
  the upstream stream reset at once (RST_STREAM before any DATA: no handler
  sees a request). In the other direction the proxy rewrites the client's
  SETTINGS to HEADER_TABLE_SIZE=0, so containerd's header blocks never use the
  dynamic table and the proxy can drop or inject header blocks freely; the
  ones it injects are literal-without-indexing.
* Flow control. DATA of a diverted call never reaches containerd, so the proxy
  returns the window to the client itself; DATA the proxy injects consumes the
  client's connection window, so that much of the client's next connection
  WINDOW_UPDATE is withheld from containerd (the "debt").
* Stream ids. Skipped ids are legal: opening a higher id implicitly closes
  lower idle ones (RFC 9113 section 5.1.1).

The client's PINGs are answered by the proxy, not forwarded: while a diverted
call runs, containerd sees no open stream on the connection, and grpc-go
servers take pings without streams as abuse (GOAWAY ENHANCE_YOUR_CALM
"too_many_pings", closing the connection under the diverted call). Pings
measure the path to the proxy then, which is the one that matters; the
proxy's own link to containerd is a local socket it watches itself.
Containerd's pings still reach the client, and the client's ACKs containerd.

A client that does not open with the HTTP/2 preface is relayed raw.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hpack

from shim.errors import Code, ResourceExhausted, ShimError
from shim.proxy import grpcwire
from shim.proxy.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
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
    data_payload,
    goaway,
    header_block_fragment,
    parse_settings,
    parse_window_update,
    rst_stream,
    split_data,
    window_update,
)

# A diverted request larger than this is refused: our methods take small messages.
MAX_DIVERTED_BODY = 16 << 20
# How many finished diverted or refused stream ids are remembered, so that late
# client frames on them (WINDOW_UPDATE, RST_STREAM, DATA) are kept from containerd.
_OWNED_MEMORY = 4096


@dataclass(frozen=True, slots=True)
class CallReceived:
    """A whole request for an intercepted method, ready to be answered."""

    stream_id: int
    method: str
    metadata: tuple[tuple[str, str], ...]
    body: bytes
    timeout: float | None


@dataclass(frozen=True, slots=True)
class CallCancelled:
    """The client reset a diverted call; its answer is no longer wanted."""

    stream_id: int


Event = CallReceived | CallCancelled


@dataclass(slots=True)
class _Diverted:
    method: str
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False  # the client has sent all of the request
    answered: bool = False  # the proxy has sent the final status


class Splice:
    """Relays one HTTP/2 connection, diverting the methods `intercepts` accepts."""

    def __init__(self, intercepts: Callable[[str], bool]) -> None:
        self._intercepts = intercepts
        self._raw_mode = False
        self._preface = bytearray()
        self._preface_done = False
        # Each side may send frames up to what the other advertised (RFC 9113 6.5.2).
        self._from_client = FrameBuffer(DEFAULT_MAX_FRAME_SIZE)
        self._from_upstream = FrameBuffer(DEFAULT_MAX_FRAME_SIZE)
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = 1 << 20
        self._table_adds = 0
        self._watch_table()
        self._block: list[Frame] | None = None  # client header block in progress
        self._upstream_in_block: int | None = None  # upstream header block in progress
        self._to_upstream: list[bytes | memoryview] = []
        self._to_client: list[bytes | memoryview] = []
        self._events: deque[Event] = deque()
        self._open: set[int] = set()
        self._diverted: dict[int, _Diverted] = {}
        # Streams containerd must never hear about from the client again: diverted
        # (answered or not) and refused ones. Superset of `_diverted`'s keys.
        self._owned: set[int] = set()
        self._reset_upstream: set[int] = set()
        self._max_stream = 0
        self._draining = False
        # The client's settings as far as injected frames may rely on them: a
        # client SETTINGS takes effect once containerd's ACK has gone back to it.
        self._client_max_frame = DEFAULT_MAX_FRAME_SIZE
        self._client_stream_window = DEFAULT_WINDOW
        self._unacked_settings: deque[list[tuple[int, int]]] = deque()
        self._client_window = DEFAULT_WINDOW  # the client's connection receive window
        self._debt = 0
        self._pending: deque[tuple[list[bytes], int]] = deque()

    # -- public surface -------------------------------------------------------

    def receive_from_client(self, data: bytes) -> None:
        if self._raw_mode:
            self._to_upstream.append(data)
            return
        if not self._preface_done:
            data = self._take_preface(data)
            if self._raw_mode or not data:
                return
        for frame in self._from_client.parse(data):
            self._client_frame(frame)

    def receive_from_upstream(self, data: bytes) -> None:
        if self._raw_mode:
            self._to_client.append(data)
            return
        for frame in self._from_upstream.parse(data):
            self._upstream_frame(frame)
        self._flush_pending()

    def data_for_upstream(self) -> list[bytes | memoryview]:
        out, self._to_upstream = self._to_upstream, []
        return out

    def data_for_client(self) -> list[bytes | memoryview]:
        out, self._to_client = self._to_client, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def respond(self, stream_id: int, message: bytes) -> None:
        """Answer a diverted call with one response message and status OK."""
        if not self._answer(stream_id):
            return  # cancelled meanwhile
        body = grpcwire.encode_message(message)
        if len(body) > self._client_stream_window:
            self._trailers_only(stream_id, Code.RESOURCE_EXHAUSTED, "response exceeds the client's stream window")
            return
        frames = self._header_frames(stream_id, grpcwire.RESPONSE_HEADERS, end_stream=False)
        frames += split_data(stream_id, body, self._client_max_frame, end_stream=False)
        frames += self._header_frames(stream_id, grpcwire.status_trailers(Code.OK, ""), end_stream=True)
        self._inject(frames, len(body))

    def fail(self, stream_id: int, error: ShimError) -> None:
        """Answer a diverted call with an error status."""
        if self._answer(stream_id):
            self._trailers_only(stream_id, error.code, error.message)

    def start_draining(self) -> None:
        """Tell the client (GOAWAY) that no stream after the current ones will be served."""
        if not self._draining and not self._raw_mode:
            self._draining = True
            self._inject([goaway(self._max_stream, ErrorCode.NO_ERROR)], 0)

    def _answer(self, stream_id: int) -> bool:
        """Mark a diverted call answered; False if there is nothing (left) to answer."""
        call = self._diverted.get(stream_id)
        if call is None or call.answered:
            return False
        call.answered = True
        if call.complete:
            del self._diverted[stream_id]
        return True

    @property
    def busy(self) -> bool:
        """Whether any call, forwarded or diverted, is still in flight."""
        return bool(self._open or self._diverted or self._pending)

    # -- client -> upstream ---------------------------------------------------

    def _take_preface(self, data: bytes) -> bytes:
        need = len(PREFACE) - len(self._preface)
        self._preface += data[:need]
        if not PREFACE.startswith(self._preface):
            self._raw_mode = True
            self._to_upstream.append(bytes(self._preface) + data[need:])
            return b""
        if len(self._preface) < len(PREFACE):
            return b""
        self._preface_done = True
        self._to_upstream.append(PREFACE)
        return data[need:]

    def _client_frame(self, frame: Frame) -> None:
        if self._block is not None:
            if frame.type != FrameType.CONTINUATION or frame.stream_id != self._block[0].stream_id:
                raise FramingError("header block interrupted by another frame")
            self._block.append(frame)
            if frame.has(Flag.END_HEADERS):
                block, self._block = self._block, None
                self._client_header_block(block)
            return
        _CLIENT_HANDLERS.get(frame.type, Splice._forward_up)(self, frame)

    def _forward_up(self, frame: Frame) -> None:
        self._to_upstream.append(frame.raw)

    def _client_ping(self, frame: Frame) -> None:
        if frame.has(Flag.ACK) or frame.stream_id != 0 or len(frame.payload) != 8:
            self._forward_up(frame)  # an ACK of containerd's ping; a malformed one is containerd's to refuse
            return
        self._inject([build(FrameType.PING, Flag.ACK, 0, bytes(frame.payload))], 0)

    def _client_headers(self, frame: Frame) -> None:
        if frame.has(Flag.END_HEADERS):
            self._client_header_block([frame])
        else:
            self._block = [frame]

    def _client_header_block(self, frames: list[Frame]) -> None:
        stream_id = frames[0].stream_id
        adds_before, size_before = self._table_adds, self._decoder.header_table.maxsize
        headers = self._decode(frames)
        table_changed = self._table_adds != adds_before or self._decoder.header_table.maxsize != size_before
        if stream_id in self._diverted or stream_id in self._open:
            self._client_trailers(frames, stream_id)
            return
        method = dict(headers).get(":path", "")
        if self._draining and stream_id > self._max_stream:
            self._inject([rst_stream(stream_id, ErrorCode.REFUSED_STREAM)], 0)
            self._keep_upstream_hpack(frames, table_changed)
            self._own(stream_id)
            return
        self._max_stream = max(self._max_stream, stream_id)
        if not self._intercepts(method):
            self._open.add(stream_id)
            self._to_upstream.extend(f.raw for f in frames)
            return
        self._diverted[stream_id] = _Diverted(method, headers)
        self._own(stream_id)
        self._keep_upstream_hpack(frames, table_changed)
        if frames[0].has(Flag.END_STREAM):
            self._complete(stream_id)

    def _client_trailers(self, frames: list[Frame], stream_id: int) -> None:
        if stream_id in self._open:
            self._to_upstream.extend(f.raw for f in frames)
        elif frames[0].has(Flag.END_STREAM):
            self._complete(stream_id)

    def _keep_upstream_hpack(self, frames: list[Frame], table_changed: bool) -> None:
        """Let containerd's decoder see a header block we do not forward, then reset the stream."""
        if not table_changed:
            return
        stream_id = frames[0].stream_id
        self._to_upstream.extend(f.raw for f in frames)
        self._to_upstream.append(rst_stream(stream_id, ErrorCode.CANCEL))
        self._reset_upstream.add(stream_id)
        if len(self._reset_upstream) > _OWNED_MEMORY:  # containerd answers a reset at once, if at all
            self._reset_upstream = set(sorted(self._reset_upstream)[-_OWNED_MEMORY // 2 :])

    def _own(self, stream_id: int) -> None:
        self._owned.add(stream_id)
        if len(self._owned) > _OWNED_MEMORY:  # forget the oldest finished ones
            newest = sorted(self._owned)[-_OWNED_MEMORY // 2 :]
            self._owned = set(newest) | self._diverted.keys()

    def _decode(self, frames: list[Frame]) -> list[tuple[str, str]]:
        block = b"".join(header_block_fragment(f) for f in frames)
        try:
            return [(str(k), str(v)) for k, v in self._decoder.decode(block)]
        except hpack.HPACKError as exc:
            raise FramingError(f"undecodable header block: {exc}") from exc

    def _client_data(self, frame: Frame) -> None:
        call = self._diverted.get(frame.stream_id)
        if call is None:
            if frame.stream_id not in self._owned:
                self._to_upstream.append(frame.raw)
            elif frame.payload:  # a refused (or finished) stream: still give the window back
                self._inject([window_update(0, len(frame.payload))], 0)
            return
        if frame.payload:  # containerd never sees these bytes: return the window ourselves
            updates = [window_update(0, len(frame.payload))]
            if not frame.has(Flag.END_STREAM):
                updates.append(window_update(frame.stream_id, len(frame.payload)))
            self._inject(updates, 0)
        if not call.answered:
            call.body += data_payload(frame)
            if len(call.body) > MAX_DIVERTED_BODY:
                self.fail(frame.stream_id, ResourceExhausted(f"request exceeds {MAX_DIVERTED_BODY} bytes"))
        if frame.has(Flag.END_STREAM):
            self._complete(frame.stream_id)

    def _complete(self, stream_id: int) -> None:
        call = self._diverted[stream_id]
        call.complete = True
        if call.answered:
            del self._diverted[stream_id]
            return
        metadata = tuple((k, v) for k, v in call.headers if not k.startswith(":"))
        grpc_timeout = dict(call.headers).get("grpc-timeout")
        try:
            timeout = grpcwire.parse_timeout(grpc_timeout) if grpc_timeout else None
        except ShimError as exc:
            self.fail(stream_id, exc)
            return
        self._events.append(CallReceived(stream_id, call.method, metadata, bytes(call.body), timeout))

    def _client_rst(self, frame: Frame) -> None:
        if self._diverted.pop(frame.stream_id, None) is not None:
            self._events.append(CallCancelled(frame.stream_id))
            return
        if frame.stream_id in self._owned:
            return
        self._open.discard(frame.stream_id)
        self._to_upstream.append(frame.raw)

    def _client_window_update(self, frame: Frame) -> None:
        increment = parse_window_update(frame)
        if frame.stream_id != 0:
            if frame.stream_id not in self._owned:
                self._to_upstream.append(frame.raw)
            return
        self._client_window += increment
        # Inject first: an answer this update made room for is paid for by it at
        # once, so containerd is never told it may send the bytes the proxy used.
        self._flush_pending()
        paid = min(increment, self._debt)
        self._debt -= paid
        if paid == 0:
            self._to_upstream.append(frame.raw)
        elif increment > paid:
            self._to_upstream.append(window_update(0, increment - paid))

    def _client_settings(self, frame: Frame) -> None:
        if frame.has(Flag.ACK):
            self._to_upstream.append(frame.raw)
            return
        pairs = [(k, v) for k, v in parse_settings(frame.payload) if k != Setting.HEADER_TABLE_SIZE]
        for key, value in pairs:
            if key == Setting.MAX_FRAME_SIZE:
                self._from_upstream.allow(value)
        self._unacked_settings.append(pairs)
        pairs.append((Setting.HEADER_TABLE_SIZE, 0))
        self._to_upstream.append(build_settings(pairs))

    def _client_priority(self, frame: Frame) -> None:
        if frame.stream_id not in self._owned:
            self._to_upstream.append(frame.raw)

    # -- upstream -> client ---------------------------------------------------

    def _upstream_frame(self, frame: Frame) -> None:
        if frame.stream_id in self._reset_upstream:
            self._drop_upstream(frame)
            return
        if frame.type in (FrameType.HEADERS, FrameType.CONTINUATION):
            self._upstream_in_block = None if frame.has(Flag.END_HEADERS) else frame.stream_id
            if frame.type == FrameType.HEADERS and frame.has(Flag.END_STREAM):
                self._open.discard(frame.stream_id)
        elif frame.type == FrameType.DATA:
            self._client_window -= len(frame.payload)
            if frame.has(Flag.END_STREAM):
                self._open.discard(frame.stream_id)
        elif frame.type == FrameType.RST_STREAM:
            self._open.discard(frame.stream_id)
        elif frame.type == FrameType.SETTINGS:
            if frame.has(Flag.ACK):
                self._client_settings_acked()
            else:
                self._note_upstream_settings(frame)
        self._to_client.append(frame.raw)

    def _drop_upstream(self, frame: Frame) -> None:
        """A frame for a stream we reset upstream: the client never knew it."""
        if frame.type == FrameType.DATA and frame.payload:
            self._to_upstream.append(window_update(0, len(frame.payload)))
        ends = frame.type == FrameType.RST_STREAM or (
            frame.type in (FrameType.HEADERS, FrameType.DATA) and frame.has(Flag.END_STREAM)
        )
        if ends:
            self._reset_upstream.discard(frame.stream_id)

    def _client_settings_acked(self) -> None:
        """Containerd acknowledged the client's oldest SETTINGS: injected frames may now use them."""
        if not self._unacked_settings:
            return
        for key, value in self._unacked_settings.popleft():
            if key == Setting.MAX_FRAME_SIZE:
                self._client_max_frame = value
            elif key == Setting.INITIAL_WINDOW_SIZE:
                self._client_stream_window = value

    def _note_upstream_settings(self, frame: Frame) -> None:
        for key, value in parse_settings(frame.payload):
            if key == Setting.HEADER_TABLE_SIZE:
                self._decoder.max_allowed_table_size = value
            elif key == Setting.MAX_FRAME_SIZE:
                self._from_client.allow(value)

    # -- injection ------------------------------------------------------------

    def _header_frames(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> list[bytes]:
        """HEADERS, plus CONTINUATIONs if the block exceeds the client's frame size
        (a long grpc-message, such as a tool's output, must not fail the answer)."""
        block = grpcwire.encode_headers(headers)
        size = self._client_max_frame
        pieces = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
        last = len(pieces) - 1
        first_flags = (Flag.END_STREAM if end_stream else 0) | (Flag.END_HEADERS if last == 0 else 0)
        frames = [build(FrameType.HEADERS, first_flags, stream_id, pieces[0])]
        frames += [
            build(FrameType.CONTINUATION, Flag.END_HEADERS if i == last else 0, stream_id, piece)
            for i, piece in enumerate(pieces[1:], start=1)
        ]
        return frames

    def _trailers_only(self, stream_id: int, code: Code, message: str) -> None:
        headers = grpcwire.RESPONSE_HEADERS + grpcwire.status_trailers(code, message)
        self._inject(self._header_frames(stream_id, headers, end_stream=True), 0)

    def _inject(self, frames: list[bytes], data_len: int) -> None:
        self._pending.append((frames, data_len))
        self._flush_pending()

    def _flush_pending(self) -> None:
        # Never split an upstream header block, never overrun the client's window.
        # Units are independent (one call's answer, or control frames), so one
        # waiting for window does not hold back the others.
        if self._upstream_in_block is not None:
            return
        waiting: deque[tuple[list[bytes], int]] = deque()
        for frames, data_len in self._pending:
            if data_len > self._client_window:
                waiting.append((frames, data_len))
                continue
            self._client_window -= data_len
            self._debt += data_len
            self._to_client.extend(frames)
        self._pending = waiting

    def _watch_table(self) -> None:
        """Count dynamic-table insertions, to know whether a block changed HPACK state."""
        table: Any = self._decoder.header_table
        add = table.add

        def counting_add(name: bytes, value: bytes) -> Any:
            self._table_adds += 1
            return add(name, value)

        table.add = counting_add


_CLIENT_HANDLERS: dict[int, Callable[[Splice, Frame], None]] = {
    FrameType.HEADERS: Splice._client_headers,
    FrameType.DATA: Splice._client_data,
    FrameType.RST_STREAM: Splice._client_rst,
    FrameType.WINDOW_UPDATE: Splice._client_window_update,
    FrameType.SETTINGS: Splice._client_settings,
    FrameType.PRIORITY: Splice._client_priority,
    FrameType.PING: Splice._client_ping,
}
