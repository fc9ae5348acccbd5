"""What a Request or Response frame's data is: the `ttrpc.Request` / `ttrpc.Response` envelope.

Stateless helpers, so that a relay can look at one request, swap its payload
and re-frame it under the same stream id without a `Connection`. Encoding
matches ttrpc's Go peer byte for byte: a successful Response carries no status
field at all (the Go server sends none), an error one carries its status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from shim.api.own import ttrpc_pb2
from shim.errors import InvalidArgument
from shim.ttrpc.status import OK, Status


@dataclass(frozen=True, slots=True)
class Request:
    service: str  # fully qualified proto service, e.g. containerd.task.v2.Task
    method: str  # bare method name, e.g. Create
    payload: bytes  # the serialized method request
    timeout_nano: int = 0  # relative deadline; 0 = none
    metadata: tuple[tuple[str, str], ...] = ()  # repeated keys allowed, order kept


def decode_request(data: bytes | memoryview) -> Request:
    """The envelope of a Request frame; raises `InvalidArgument` if it does not decode."""
    pb = _parse(ttrpc_pb2.Request, data, "request")
    metadata = tuple((kv.key, kv.value) for kv in pb.metadata)
    return Request(pb.service, pb.method, pb.payload, pb.timeout_nano, metadata)


def encode_request(request: Request) -> bytes:
    pb = ttrpc_pb2.Request(service=request.service, method=request.method, payload=request.payload,
                           timeout_nano=request.timeout_nano)
    for key, value in request.metadata:
        pb.metadata.add(key=key, value=value)
    return bytes(pb.SerializeToString())


def replace_payload(data: bytes | memoryview, payload: bytes) -> bytes:
    """A Request envelope with its payload swapped, everything else (unknown fields too) kept."""
    pb = _parse(ttrpc_pb2.Request, data, "request")
    pb.payload = payload
    return bytes(pb.SerializeToString())


def decode_response(data: bytes | memoryview) -> tuple[Status, bytes]:
    """(status, payload) of a Response frame; an absent status means OK."""
    pb = _parse(ttrpc_pb2.Response, data, "response")
    status = Status.from_pb(pb.status) if pb.HasField("status") else OK
    return status, pb.payload


def encode_response(payload: bytes = b"", status: Status = OK) -> bytes:
    pb = ttrpc_pb2.Response(payload=payload)
    if not status.ok:
        status.fill_pb(pb.status)
    return bytes(pb.SerializeToString())


def _parse(message: Any, data: bytes | memoryview, what: str) -> Any:
    try:
        return message.FromString(bytes(data))
    except DecodeError as exc:
        raise InvalidArgument(f"unmarshal {what} error: {exc}") from None
