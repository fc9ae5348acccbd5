"""ttrpc, containerd's RPC protocol for shims: a sans-IO engine and an asyncio relay.

`Connection` is the engine (bytes in, events out, no I/O); `Splice` relays one
connection to another, holding the requests its user rewrites; `relay` and
`RelayServer` are the asyncio layer over it, and `Client` makes unary calls. The wire format is documented in
`shim.ttrpc.frame` and `shim.ttrpc.messages`.
"""

from shim.ttrpc.client import Client, TTRPCError
from shim.ttrpc.connection import Connection, LocalProtocolError, Role
from shim.ttrpc.events import (
    ConnectionClosed,
    DataReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    StreamRejected,
)
from shim.ttrpc.frame import MAX_DATA_LENGTH, Flag, MessageType
from shim.ttrpc.messages import (
    Request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shim.ttrpc.relay import Answer, RelayServer, Rewrite, relay, serve_relay
from shim.ttrpc.splice import RewriteRequested, Splice
from shim.ttrpc.status import OK, Code, Status

__all__ = [
    "MAX_DATA_LENGTH",
    "OK",
    "Answer",
    "Client",
    "Code",
    "Connection",
    "ConnectionClosed",
    "DataReceived",
    "Event",
    "Flag",
    "LocalProtocolError",
    "MessageType",
    "RelayServer",
    "Request",
    "RequestReceived",
    "ResponseReceived",
    "Rewrite",
    "RewriteRequested",
    "Role",
    "Splice",
    "Status",
    "StreamRejected",
    "TTRPCError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "relay",
    "serve_relay",
]
