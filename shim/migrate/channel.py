"""The migration channel between two nodes' criu-shim: mutual TLS, framed JSON and raw bytes.

Both ends present a certificate of the cluster's CA (the node certificates): the receiver
accepts only clients whose certificate chains to it, the source checks the receiver's
certificate names the address it dialled (an IP SAN). TLS 1.3 only. Everything on the
wire is inside TLS, so a checkpoint (process memory, keys, tokens) never crosses the
network in the clear, and a cut link is an incomplete read, never a short archive taken
for a whole one.

Framing: a message is a 4-byte big-endian length and a JSON object (at most 64 KiB: the
peer is authenticated but its input is still checked); an archive follows its "restore"
message as exactly `size` raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from typing import Any

from shim import node_tls
from shim.errors import InvalidArgument, Unavailable
from shim.node_tls import Credentials as Credentials  # the migration's name for it

MAX_MESSAGE = 64 * 1024
PROTOCOL = "criu-shim-migrate/1"
_LENGTH = struct.Struct(">I")


def server_context(creds: Credentials) -> ssl.SSLContext:
    """The receiver's side: clients must present a certificate of the CA."""
    return node_tls.server_context(creds)


def client_context(creds: Credentials) -> ssl.SSLContext:
    """The source's side: the receiver's certificate must chain to the CA and name its address."""
    return node_tls.client_context(creds)


def parse_address(value: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT) -> (host, port); InvalidArgument otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


async def connect(address: str, creds: Credentials, timeout: float,
                  idle: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = parse_address(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=client_context(creds), server_hostname=host, limit=MAX_MESSAGE * 2), timeout)
        give_up_after(writer, idle)
        return reader, writer
    except ssl.SSLCertVerificationError as exc:
        raise Unavailable(f"the migration receiver at {address} is not a node of this cluster: "
                          f"{exc.verify_message}") from None
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the migration receiver at {address}: {_reason(exc)} (is "
                          "`criu-shim migrate-receiver` running there, and does it accept this node's "
                          "certificate?)") from None


def give_up_after(writer: asyncio.StreamWriter, idle: float) -> None:
    """Let the kernel end the connection once the peer stops answering for about `idle` seconds,
    so a cut link fails the migration instead of hanging it (shim.node_tls.give_up_after)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        node_tls.give_up_after(sock, idle)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or exc.__class__.__name__


async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    if len(body) > MAX_MESSAGE:
        raise InvalidArgument(f"migration message over {MAX_MESSAGE} bytes")
    try:
        writer.write(_LENGTH.pack(len(body)) + body)
        await writer.drain()
    except (ConnectionError, ssl.SSLError) as exc:
        raise Unavailable(f"the migration peer closed the connection ({_reason(exc)})") from None
    except OSError as exc:  # ETIMEDOUT, or ENETUNREACH/EHOSTUNREACH once the route to the peer is gone
        raise Unavailable(f"the migration peer stopped answering ({exc.strerror or _reason(exc)})") from None


async def receive(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message; Unavailable when the peer went away, InvalidArgument when it is not one."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_MESSAGE:
            raise InvalidArgument(f"migration message of {length} bytes (at most {MAX_MESSAGE})")
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
        raise Unavailable(f"the migration peer closed the connection ({_reason(exc)})") from None
    except OSError as exc:  # ETIMEDOUT (the kernel gave up on a silent peer: give_up_after), ENETUNREACH...
        raise Unavailable(f"the migration peer stopped answering ({exc.strerror or _reason(exc)})") from None
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise InvalidArgument(f"migration message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidArgument("migration message is not a JSON object")
    return message


def field(message: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """message[key], checked to be of `kind` (a peer's message is checked like any input)."""
    if key not in message and optional:
        return None
    value = message.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidArgument(f"migration message field {key!r}: expected {kind.__name__}, got {value!r:.80}")
    return value
