"""The relay engine: one client ttrpc connection spliced to one upstream connection. Sans-IO.

Bytes go in through `receive_from_client` and `receive_from_upstream`; bytes
come out of `data_for_upstream` and `data_for_client`; requests the relay's
user wants to rewrite come out of `next_event`, and go back in through
`forward` (with the new payload), `answer` (a successful Response made here)
or `fail` (an error Response made here); answered ones are never sent on.

Theory of operation. Frames are relayed whole and unchanged, as the exact
bytes they arrived as; the only frames decoded are Requests (to learn the
service and method). A Request to rewrite is *held*: it keeps its stream id,
and everything the client sends after it waits behind it, because a ttrpc
server refuses a Request whose id is not above every earlier one ("StreamID
cannot be re-used and must increment"): a later request overtaking a held one
would make the held one unsendable. So a rewrite holds up the rest of its
connection until it is done; rewrites are meant to be quick. Responses are
not held: upstream answers in any order and ids tell them apart.

Frames over ttrpc's 4 MiB limit are answered with RESOURCE_EXHAUSTED on their
stream, as either peer would; their bytes go nowhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shim.errors import Code, ShimError
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
    encode_response,
    replace_payload,
)
from shim.ttrpc.status import OK, Status


@dataclass(frozen=True, slots=True)
class RewriteRequested:
    """A Request the user chose to rewrite; end it with `Splice.forward`, `Splice.answer` or `Splice.fail`."""

    stream_id: int
    request: Request


@dataclass(slots=True)
class _Held:
    frame: Frame
    request: Request
    out: bytes | memoryview | None = None  # what goes upstream in its place, once done
    done: bool = False


class Splice:
    """Relays one ttrpc connection, holding the Requests `intercepts(service, method)` accepts."""

    def __init__(self, intercepts: Callable[[str, str], bool]) -> None:
        self._intercepts = intercepts
        self._from_client = FrameBuffer()
        self._from_upstream = FrameBuffer()
        self._to_upstream: list[bytes | memoryview] = []
        self._to_client: list[bytes | memoryview] = []
        self._queue: deque[_Held | bytes | memoryview] = deque()  # client frames behind a held one
        self._held: dict[int, _Held] = {}
        self._events: deque[RewriteRequested] = deque()
        self._in_flight: set[int] = set()  # streams upstream (or a rewrite) has yet to finish

    # -- public surface -------------------------------------------------------

    def receive_from_client(self, data: bytes) -> None:
        for frame in self._from_client.parse(data):
            if isinstance(frame, Oversized):
                self._answer(frame.stream_id, Status(Code.RESOURCE_EXHAUSTED, frame.message))
            elif frame.type == MessageType.REQUEST:
                self._client_request(frame)
            else:
                self._send_up(frame.raw)

    def receive_from_upstream(self, data: bytes) -> None:
        for frame in self._from_upstream.parse(data):
            if isinstance(frame, Oversized):
                self._answer(frame.stream_id, Status(Code.RESOURCE_EXHAUSTED, frame.message))
                continue
            if frame.type == MessageType.RESPONSE or (frame.type == MessageType.DATA and frame.has(Flag.REMOTE_CLOSED)):
                self._in_flight.discard(frame.stream_id)
            self._to_client.append(frame.raw)

    def data_for_upstream(self) -> list[bytes | memoryview]:
        out, self._to_upstream = self._to_upstream, []
        return out

    def data_for_client(self) -> list[bytes | memoryview]:
        out, self._to_client = self._to_client, []
        return out

    def next_event(self) -> RewriteRequested | None:
        return self._events.popleft() if self._events else None

    def forward(self, stream_id: int, payload: bytes) -> None:
        """Send a held Request upstream, under its own stream id, with `payload` in it."""
        held = self._held.get(stream_id)
        if held is None:
            return
        if payload == held.request.payload:
            out: bytes | memoryview = held.frame.raw  # unchanged: the very bytes the client sent
        else:
            try:
                out = encode_frame(stream_id, held.frame.type, held.frame.flags,
                                   replace_payload(held.frame.data, payload))
            except ShimError as exc:  # the rewritten request exceeds the frame limit
                self.fail(stream_id, Status.of(exc))
                return
        del self._held[stream_id]
        held.out, held.done = out, True
        self._release()

    def answer(self, stream_id: int, payload: bytes) -> None:
        """Answer a held Request here with success and `payload` as its reply; upstream never sees it."""
        try:
            frame = _response_frame(stream_id, payload, OK)
        except ShimError as exc:  # a reply over the frame limit: the error the peer would send
            self.fail(stream_id, Status.of(exc))
            return
        self._end_here(stream_id, frame)

    def fail(self, stream_id: int, status: Status) -> None:
        """Answer a held Request here with an error `status`; upstream never sees it."""
        self._end_here(stream_id, _response_frame(stream_id, b"", status))

    @property
    def busy(self) -> bool:
        """Whether any call is still in flight (held, or sent on and not yet answered)."""
        return bool(self._in_flight)

    # -- internals ------------------------------------------------------------

    def _client_request(self, frame: Frame) -> None:
        try:
            request = decode_request(frame.data)
        except ShimError:
            self._send_up(frame.raw)  # upstream answers it (INVALID_ARGUMENT), as it would directly
            return
        self._in_flight.add(frame.stream_id)
        if frame.stream_id in self._held or not self._intercepts(request.service, request.method):
            self._send_up(frame.raw)  # a re-used held id: upstream refuses it, as it would directly
            return
        held = _Held(frame, request)
        self._held[frame.stream_id] = held
        self._queue.append(held)
        self._events.append(RewriteRequested(frame.stream_id, request))

    def _send_up(self, raw: bytes | memoryview) -> None:
        if self._queue:
            self._queue.append(raw)
        else:
            self._to_upstream.append(raw)

    def _release(self) -> None:
        """Send on, in order, everything no longer waiting for a rewrite."""
        while self._queue:
            item = self._queue[0]
            if isinstance(item, _Held):
                if not item.done:
                    return
                if item.out is not None:
                    self._to_upstream.append(item.out)
            else:
                self._to_upstream.append(item)
            self._queue.popleft()

    def _end_here(self, stream_id: int, response: bytes) -> None:
        held = self._held.pop(stream_id, None)
        if held is None:
            return
        held.done = True
        self._in_flight.discard(stream_id)
        self._to_client.append(response)
        self._release()

    def _answer(self, stream_id: int, status: Status) -> None:
        self._in_flight.discard(stream_id)
        self._to_client.append(_response_frame(stream_id, b"", status))


def _response_frame(stream_id: int, payload: bytes, status: Status) -> bytes:
    return encode_frame(stream_id, MessageType.RESPONSE, 0, encode_response(payload, status))
