"""The ttrpc engine: one connection's bytes in, events out; `send_*` return bytes. No I/O.

Like `h11.Connection`: `receive_data` buffers what the peer sent (b"" = EOF),
`next_event` hands out what it meant, `send_request` / `send_response` /
`send_data` return the bytes to write. A server also answers some streams
itself (bad stream ids, oversized frames, undecodable requests), as
containerd/ttrpc's server does; those answers wait in `data_to_send`, and a
`StreamRejected` event says which stream failed.

Theory of operation. ttrpc has no connection-level errors: every fault the
peer can commit is scoped to one stream and answered on that stream id, and
the connection goes on. So there is no ERROR state; the only connection-level
happening is EOF. Per stream, each end is either open or closed for sending;
`_TRANSITIONS` is the whole state machine (a unary call is a stream that opens
with the client already closed and finishes with the Response).

Server rules, in containerd/ttrpc's order (`server.go`): an oversized frame
gets RESOURCE_EXHAUSTED; an even stream id gets INVALID_ARGUMENT; then
Request and Data are handled, any other message type is ignored. A Request
id must exceed every earlier one. The client side ignores frames for streams
it does not have open, as ttrpc's client does.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from shim.errors import Code, ShimError
from shim.ttrpc.events import (
    ConnectionClosed,
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamRejected,
)
from shim.ttrpc.frame import (
    Flag,
    Frame,
    FrameBuffer,
    MessageType,
    Oversized,
    encode_frame,
)
from shim.ttrpc.messages import (
    Request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shim.ttrpc.status import OK, Status

MAX_STREAM_ID = 2**32 - 1


class Role(enum.Enum):
    CLIENT = "client"  # opened the connection; opens streams (odd ids)
    SERVER = "server"  # accepted it; answers streams


class LocalProtocolError(Exception):
    """This end asked the engine for something the protocol forbids."""


class _State(enum.Enum):
    OPEN = "open"  # both ends may still send
    LOCAL_CLOSED = "local closed"  # we sent our last; the peer may still send
    REMOTE_CLOSED = "remote closed"  # the peer sent its last; we may still send


class _Input(enum.Enum):
    SEND = "send"
    SEND_LAST = "send last"
    RECEIVE = "receive"
    RECEIVE_LAST = "receive last"
    RESPONSE = "response"  # sent by a server or received by a client: always final


# (state, input) -> next state, None = finished. A missing pair is forbidden.
_TRANSITIONS: dict[tuple[_State, _Input], _State | None] = {
    (_State.OPEN, _Input.SEND): _State.OPEN,
    (_State.OPEN, _Input.SEND_LAST): _State.LOCAL_CLOSED,
    (_State.OPEN, _Input.RECEIVE): _State.OPEN,
    (_State.OPEN, _Input.RECEIVE_LAST): _State.REMOTE_CLOSED,
    (_State.OPEN, _Input.RESPONSE): None,
    (_State.LOCAL_CLOSED, _Input.RECEIVE): _State.LOCAL_CLOSED,
    (_State.LOCAL_CLOSED, _Input.RECEIVE_LAST): None,
    (_State.LOCAL_CLOSED, _Input.RESPONSE): None,
    (_State.REMOTE_CLOSED, _Input.SEND): _State.REMOTE_CLOSED,
    (_State.REMOTE_CLOSED, _Input.SEND_LAST): None,
    (_State.REMOTE_CLOSED, _Input.RESPONSE): None,
}


class Connection:
    """One ttrpc connection seen from `role`'s end."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self._frames = FrameBuffer()
        self._events: deque[Event] = deque()
        self._outbound: list[bytes] = []
        self._streams: dict[int, _State] = {}
        self._next_stream_id = 1  # client: the id the next request gets
        self._last_request_id = 0  # server: ids must increase
        self._closed = False

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; b"" means the peer closed the connection."""
        if self._closed:
            raise LocalProtocolError("data received after the connection closed")
        if not data:
            self._closed = True
            truncated = self._frames.pending
            self._events.append(ConnectionClosed(f"connection closed {truncated} bytes into a frame"
                                                 if truncated else None))
            return
        for frame in self._frames.parse(data):
            if isinstance(frame, Oversized):
                self._oversized(frame)
            elif self.role is Role.SERVER and frame.stream_id % 2 == 0:  # whatever the type
                self._refuse(frame.stream_id, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            else:
                _HANDLERS.get((self.role, frame.type), Connection._ignore)(self, frame)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Bytes the engine decided to send by itself (a server's rejections)."""
        out = b"".join(self._outbound)
        self._outbound.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_streams(self) -> frozenset[int]:
        return frozenset(self._streams)

    # -- sending --------------------------------------------------------------

    @property
    def next_stream_id(self) -> int:
        """The id `send_request` will give the next stream."""
        return self._next_stream_id

    def send_request(self, service: str, method: str, payload: bytes = b"", *, timeout_nano: int = 0,
                     metadata: tuple[tuple[str, str], ...] = (), flags: int = 0) -> bytes:
        """Open a stream with a Request. Flags: 0 unary, REMOTE_OPEN to stream Data after it,
        REMOTE_CLOSED for a server-streaming call. The id is `next_stream_id` as it was."""
        self._require(Role.CLIENT, "send requests")
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new connection")
        body = encode_request(Request(service, method, payload, timeout_nano, metadata))
        frame = encode_frame(stream_id, MessageType.REQUEST, flags, body)
        self._next_stream_id += 2
        self._streams[stream_id] = _State.OPEN if flags & Flag.REMOTE_OPEN else _State.LOCAL_CLOSED
        return frame

    def send_response(self, stream_id: int, payload: bytes = b"", status: Status = OK) -> bytes:
        """Finish a stream with a Response: the payload on success, else an error status."""
        self._require(Role.SERVER, "send responses")
        frame = encode_frame(stream_id, MessageType.RESPONSE, 0, encode_response(payload, status))
        self._advance(stream_id, _Input.RESPONSE, "respond on")
        return frame

    def send_data(self, stream_id: int, payload: bytes | None, *, end_stream: bool = False) -> bytes:
        """A streamed message (None: a frame with no message, as a bare end of stream)."""
        flags = (Flag.REMOTE_CLOSED if end_stream else 0) | (Flag.NO_DATA if payload is None else 0)
        frame = encode_frame(stream_id, MessageType.DATA, flags, payload or b"")
        self._advance(stream_id, _Input.SEND_LAST if end_stream else _Input.SEND, "send data on")
        return frame

    # -- internals ------------------------------------------------------------

    def _require(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise LocalProtocolError(f"a {self.role.value} cannot {what}")

    def _advance(self, stream_id: int, event: _Input, what: str) -> None:
        state = self._streams.get(stream_id)
        if state is None or (state, event) not in _TRANSITIONS:
            where = "an unknown stream" if state is None else f"a {state.value} stream"
            raise LocalProtocolError(f"cannot {what} {where} ({stream_id})")
        self._step(stream_id, state, event)

    def _step(self, stream_id: int, state: _State, event: _Input) -> None:
        following = _TRANSITIONS[(state, event)]
        if following is None:
            del self._streams[stream_id]
        else:
            self._streams[stream_id] = following

    def _reject(self, stream_id: int, code: Code, message: str) -> None:
        """Fail a frame on `stream_id` in the engine, ending that stream if it is open."""
        self._refuse(stream_id, code, message, ended=self._streams.pop(stream_id, None) is not None)

    def _refuse(self, stream_id: int, code: Code, message: str, *, ended: bool = False) -> None:
        """A server answers a refused frame on its stream id; open streams are left alone
        (a re-used id is refused without touching the stream that holds it)."""
        if self.role is Role.SERVER:
            body = encode_response(b"", Status(code, message))
            self._outbound.append(encode_frame(stream_id, MessageType.RESPONSE, 0, body))
        self._events.append(StreamRejected(stream_id, code, message, ended))

    def _oversized(self, frame: Oversized) -> None:
        if self.role is Role.CLIENT and frame.stream_id not in self._streams:
            return
        if frame.type == MessageType.REQUEST:
            self._refuse(frame.stream_id, Code.RESOURCE_EXHAUSTED, frame.message)
        else:
            self._reject(frame.stream_id, Code.RESOURCE_EXHAUSTED, frame.message)

    def _ignore(self, frame: Frame) -> None:
        """Unknown message types (and frames for streams a client does not have) are ignored."""

    # -- server side ----------------------------------------------------------

    def _server_request(self, frame: Frame) -> None:
        if frame.stream_id <= self._last_request_id:
            self._refuse(frame.stream_id, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return
        self._last_request_id = frame.stream_id
        try:
            request = decode_request(frame.data)
        except ShimError as exc:
            self._refuse(frame.stream_id, exc.code, exc.message)
            return
        self._streams[frame.stream_id] = _State.OPEN if frame.has(Flag.REMOTE_OPEN) else _State.REMOTE_CLOSED
        self._events.append(RequestReceived(frame.stream_id, request.service, request.method, request.payload,
                                            request.timeout_nano, request.metadata, frame.flags))

    def _server_data(self, frame: Frame) -> None:
        state = self._streams.get(frame.stream_id)
        last = frame.has(Flag.REMOTE_CLOSED)
        event = _Input.RECEIVE_LAST if last else _Input.RECEIVE
        if state is None or (state, event) not in _TRANSITIONS:
            self._reject(frame.stream_id, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        elif last and frame.data:
            self._reject(frame.stream_id, Code.INVALID_ARGUMENT, "data close message cannot include data")
        else:
            self._step(frame.stream_id, state, event)
            self._events.append(DataReceived(frame.stream_id, _data_payload(frame), last))

    # -- client side ----------------------------------------------------------

    def _client_response(self, frame: Frame) -> None:
        if frame.stream_id not in self._streams:
            return
        try:
            status, payload = decode_response(frame.data)
        except ShimError as exc:
            self._reject(frame.stream_id, Code.INTERNAL, exc.message)
            return
        del self._streams[frame.stream_id]
        self._events.append(ResponseReceived(frame.stream_id, status.code, status.message, payload, status.details))

    def _client_data(self, frame: Frame) -> None:
        state = self._streams.get(frame.stream_id)
        last = frame.has(Flag.REMOTE_CLOSED)
        event = _Input.RECEIVE_LAST if last else _Input.RECEIVE
        if state is None or (state, event) not in _TRANSITIONS:
            return
        self._step(frame.stream_id, state, event)
        self._events.append(DataReceived(frame.stream_id, _data_payload(frame), last))


def _data_payload(frame: Frame) -> bytes | None:
    return None if frame.has(Flag.NO_DATA) else bytes(frame.data)


_HANDLERS: dict[tuple[Role, int], Callable[[Connection, Frame], None]] = {
    (Role.SERVER, MessageType.REQUEST): Connection._server_request,
    (Role.SERVER, MessageType.DATA): Connection._server_data,
    (Role.CLIENT, MessageType.RESPONSE): Connection._client_response,
    (Role.CLIENT, MessageType.DATA): Connection._client_data,
}
