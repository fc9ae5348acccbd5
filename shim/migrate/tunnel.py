"""The page stream of a lazy migration: CRIU's page-server TCP carried inside the nodes' mutual TLS.

CRIU's lazy page server (source: `criu dump --lazy-pages`, through runc) speaks plain TCP on the
source's loopback; criu-shim connects to it at once (it serves one client) and relays. The
target's page daemon (started by the restore relay, per the node's `[restore] page_daemon`)
reaches that relay in one of two ways:

- criu-shim's own (the default, shim.restore.remote_pages) dials the source's `SourceEnd` itself
  with TLS 1.3 and the node certificates: the source pins the target's certificate (the one
  shown on the migration's control connection) and the migration's token, the daemon pins the
  source's. One Python hop per page: the relay here, which closes CRIU's end in order only once
  the daemon asked CRIU to end the session (shim.restore.pageserver.CloseWatch).
- CRIU's (`criu lazy-pages --page-server`, plain TCP only) goes through the tunnel: the source
  opens a second TLS connection to the receiver, which joins it to a `LoopbackEnd` that takes one
  connection, and only from a socket of root's (an unprivileged process racing the daemon is
  refused). Two Python hops per page, and the receiver tells the source on the control connection
  whether the daemon finished.

Either way the memory crosses the network authenticated and encrypted, and a cut link or a dead
source ends the stream, which ends the target's daemon, which has the restored task ended before
it lets go of its memory (shim.runtime.lazy_daemon): never a process running on pages that are
not there.

Why not CRIU's own `--tls`: runc passes no TLS options to CRIU (only through a CRIU config file),
CRIU wants its key as a file it can read, GnuTLS would check the peer by CN or not at all where
ours pins the one certificate the migration's peer showed, and the relay here is where the
source sees how the stream ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from ssl import SSLContext

from shim import node_tls
from shim.errors import FailedPrecondition
from shim.restore import remote_pages

CHUNK = 1 << 20
CLOSE_WAIT = 5.0  # a peer that never lets the connection close does not hold the tunnel
LOOPBACK = "127.0.0.1"


@dataclass
class Pumped:
    """What crossed a tunnel: bytes each way, and which end stopped first."""

    to_local: int = 0  # pages arriving (target) or requests arriving (source)
    to_remote: int = 0
    ended_by: str = ""  # "local", "remote" or "error: ..."
    errors: list[str] = field(default_factory=list)


def abort_on_close(writer: asyncio.StreamWriter, abort: bool = True) -> None:
    """SO_LINGER 0: closing the socket, also by our death, sends a reset instead of an orderly end.

    On the source this matters: CRIU's lazy page server takes an orderly end of its client's
    connection for a finished transfer and ends the container (criu/page-xfer.c: "Session over",
    then the tasks are killed); a reset fails the transfer and CRIU lets the container run again.
    So the source's end of the page server resets unless the target said its memory is complete.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(abort), 0))


async def pump(local: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               remote: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               orderly: Callable[[], Awaitable[bool]] | None = None,
               before_close: Callable[[Pumped], Awaitable[None]] | None = None,
               watch: Callable[[memoryview], None] | None = None) -> Pumped:
    """Copy both ways until one side ends (EOF or error), then close both; return what moved.

    With `orderly`, the local socket is closed in order only when the remote side ended with an
    EOF and `orderly()` then says so; otherwise it is reset (see abort_on_close). `before_close`
    runs first, while the local end still waits on us. `watch` sees what the remote side sends.

    The streams' transports are taken over by protocols that read into a buffer of their own and
    hand it to the other transport: no StreamReader copies in between. Through a stream each chunk
    was copied three times beside TLS (into the reader's buffer, out of it, into the writer's), and
    the two tunnel ends in Python were what limited the lazy fill (README "Live migration").
    """
    result = Pumped()
    over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ends = (_End("local", result, over), _End("remote", result, over, watch))
    try:
        for end, stream in zip(ends, (local, remote), strict=True):
            end.take_over(*stream)
        ends[0].join(ends[1])
        for end, stream in zip(ends, (local, remote), strict=True):
            await end.start(stream[0])
        await over
        if before_close is not None:
            await before_close(result)
        if orderly is not None:
            calm = result.ended_by == "remote" and await orderly()
            abort_on_close(local[1], abort=not calm)
    finally:
        for end in ends:
            end.close()
        for end in ends:
            await end.closed()
    return result


class _End(asyncio.BufferedProtocol):
    """One connection of a tunnel: what it reads goes straight to the other connection's transport."""

    def __init__(self, side: str, result: Pumped, over: asyncio.Future[None],
                 watch: Callable[[memoryview], None] | None = None) -> None:
        self.side = side
        self._watch = watch
        self._result = result
        self._over = over
        self._other: _End | None = None
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._ended_before = False  # the stream had seen the connection's end before the take-over
        self._lost: asyncio.Future[None] = over.get_loop().create_future()
        self._view = memoryview(bytearray(CHUNK))

    def take_over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = transport.get_extra_info("sslcontext") is not None
        # asyncio.StreamReader says "EOF seen" publicly only once its buffer is empty (at_eof()).
        self._ended_before = bool(getattr(reader, "_eof", False))
        stream_protocol = transport.get_protocol()
        transport.set_protocol(self)
        transport.set_write_buffer_limits(high=CHUNK)
        # The stream is over as far as it knows: its reader ends after what it holds, and the
        # writer's wait_closed() returns (its protocol would never hear of the transport again).
        stream_protocol.connection_lost(None)

    def join(self, other: _End) -> None:
        self._other, other._other = other, self

    async def start(self, reader: asyncio.StreamReader) -> None:
        """Pass on what the stream had read before the take-over; then read on (or end, if it had ended)."""
        assert self._transport is not None
        try:
            held = await reader.read()
        except (ConnectionError, OSError) as exc:
            self.connection_lost(exc)
            return
        if held:
            self._pass_on(memoryview(held))
        if self._ended_before:
            self._end(None)
        elif not self._transport.is_reading():  # the stream had paused it (its buffer was full)
            self._transport.resume_reading()

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._pass_on(self._view[:nbytes])

    def eof_received(self) -> bool:
        self._end(None)
        return not self._tls  # we close it ourselves (in order, or with a reset: abort_on_close); TLS closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:  # our transport is full: stop reading what would go into it
        if self._other is not None and self._other._transport is not None:
            self._other._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._other is not None and self._other._transport is not None and not self._other._transport.is_closing():
            self._other._transport.resume_reading()

    # the tunnel

    def _pass_on(self, data: memoryview) -> None:
        if self._watch is not None:
            self._watch(data)
        if self.side == "remote":
            self._result.to_local += len(data)
        else:
            self._result.to_remote += len(data)
        if self._other is not None and self._other._write(data):
            self._view = memoryview(bytearray(CHUNK))  # it may still hold ours: read into a fresh one

    def _write(self, data: memoryview) -> bool:
        """Write `data`; whether our transport may still refer to it (then it must not be reused).

        A plain transport keeps what it could not send at once (3.11 copies it, later Pythons keep a
        view), a TLS one what it could not encrypt yet; either counts it in its write buffer size. A
        fresh 1 MiB buffer costs its page faults, so ours is reused whenever that size is 0 (a TLS
        transport encrypts at once and hands the records on, unless the socket below is full)."""
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(data)
        return self._transport.get_write_buffer_size() > 0

    def _end(self, exc: BaseException | None) -> None:
        if exc is not None:
            self._result.errors.append(f"{self.side}: {exc.__class__.__name__}: {exc}")
        if not self._result.ended_by:
            self._result.ended_by = self.side if exc is None else f"error: {self.side}: {exc}"
        if not self._over.done():
            self._over.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def closed(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_WAIT)


def socket_uid(peer: tuple[str, int], local_port: int) -> int | None:
    """The uid owning the loopback TCP socket at `peer` connected to our `local_port` (/proc/net/tcp)."""
    want_local = f"{_hex_address(peer[0])}:{peer[1]:04X}"
    want_remote = f"{_hex_address(LOOPBACK)}:{local_port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
            return int(fields[7])
    return None


def _hex_address(ip: str) -> str:
    return socket.inet_aton(ip)[::-1].hex().upper()


class _OneConnection:
    """A listener that takes one connection, the first its `_admits` lets in, then stops listening."""

    def __init__(self) -> None:
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _listen(self, host: str, ssl: SSLContext | None = None, port: int = 0) -> int:
        try:
            self._server = await asyncio.start_server(self._on_connect, host, port, ssl=ssl)
        except OSError as exc:  # EADDRINUSE, EADDRNOTAVAIL...
            raise FailedPrecondition(f"cannot listen for the page daemon on {host}:{port}: {exc.strerror or exc}"
                                     ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _admits(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        raise NotImplementedError

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._accepted.done() or not await self._admits(reader, writer) or self._accepted.done():
            writer.close()
            return
        self._accepted.set_result((reader, writer))
        self.close()

    async def accepted(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(asyncio.shield(self._accepted), timeout)
        except TimeoutError:
            raise FailedPrecondition(f"the restore's page daemon did not connect within {timeout:.0f} s") from None

    def close(self) -> None:
        """Stop listening; a page connection still waiting for the daemon gives up (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if not self._accepted.done():
            self._accepted.set_exception(FailedPrecondition("the migration ended before its page daemon connected"))
            self._accepted.exception()  # retrieved: nobody may be waiting


class LoopbackEnd(_OneConnection):
    """The target's end for CRIU's page daemon: a one-connection listener on the loopback, root's only."""

    async def open(self) -> int:
        return await self._listen(LOOPBACK)

    async def _admits(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return socket_uid(writer.get_extra_info("peername"), self.port) == 0  # not root's: never the page daemon


class SourceEnd(_OneConnection):
    """The source's page end for criu-shim's page daemon on the target, which dials it itself: one
    mutual-TLS connection with the target node's certificate (the one it showed on the migration's
    control connection, pinned) that names the migration's token (shim.restore.remote_pages.hello).
    The daemon then speaks CRIU's page-server protocol to CRIU's page server through `pump`: one
    Python hop per page (this one) where the tunnel has two, and no loopback on the target."""

    def __init__(self, certificate: str, token: str, idle: float) -> None:
        super().__init__()
        self._certificate = certificate
        self._token = token
        self._idle = idle

    async def open(self, host: str, creds: node_tls.Credentials, port: int = 0) -> int:
        return await self._listen(host, node_tls.server_context(creds), port)

    async def _admits(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if not hmac.compare_digest(node_tls.digest(writer.get_extra_info("ssl_object")), self._certificate):
            return False  # another node of the cluster: not the target of this migration
        sock = writer.get_extra_info("socket")
        if sock is not None:
            node_tls.give_up_after(sock, self._idle)
        try:
            said = await asyncio.wait_for(reader.readexactly(len(remote_pages.hello(self._token))), self._idle)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
            return False
        return remote_pages.token_matches(said, self._token)
