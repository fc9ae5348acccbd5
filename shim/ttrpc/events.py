"""What a `Connection` tells its user, one small frozen value per happening."""

from __future__ import annotations

from dataclasses import dataclass

from shim.errors import Code
from shim.ttrpc.status import Status


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server side: a client opened a stream. `flags` say whether Data frames will follow."""

    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client side: the server finished a stream (absent status on the wire = OK)."""

    stream_id: int
    status_code: Code
    status_message: str
    payload: bytes
    status_details: tuple[bytes, ...] = ()

    @property
    def status(self) -> Status:
        return Status(self.status_code, self.status_message, self.status_details)


@dataclass(frozen=True, slots=True)
class DataReceived:
    """A streamed message. `payload` is None for a NO_DATA frame (unlike b"", an empty message)."""

    stream_id: int
    payload: bytes | None
    end_stream: bool  # the sender flagged REMOTE_CLOSED: it sends nothing more on this stream


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """The engine itself refused a frame on `stream_id` (the peer broke a rule, or a size limit).

    Server side the engine has already queued the error Response (`data_to_send`);
    client side it is the call's outcome (an oversized or undecodable response).
    `ended`: a stream the user had open under this id is over, stop working on it.
    Otherwise nothing of the user's was touched (say, a Request re-using a live id).
    """

    stream_id: int
    code: Code
    message: str
    ended: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection. `error` if it did so in the middle of a frame."""

    error: str | None = None


Event = RequestReceived | ResponseReceived | DataReceived | StreamRejected | ConnectionClosed
