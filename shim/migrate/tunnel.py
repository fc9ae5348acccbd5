"""The page stream of a lazy migration: CRIU's page-server TCP carried inside the nodes' mutual TLS.

CRIU's lazy page server (source: `criu dump --lazy-pages`, through runc) and the target's page
daemon (started by the restore relay: criu-shim's own, shim.restore.remote_pages, or
`criu lazy-pages --page-server`, per the node's `[restore] page_daemon`) speak plain TCP. Neither
end leaves its node's loopback: on each node criu-shim connects the local CRIU end to a second
TLS 1.3 connection between the two nodes (the same node certificates and CA as the migration's
control connection), so the memory crosses the network authenticated and encrypted, and a cut
link or a dead source ends the stream, which ends the target's daemon, which ends the restored
task (shim.runtime.lazy_daemon): never a process running on pages that are not there.

Why not CRIU's own `--tls`: runc passes no TLS options to CRIU (only through a node-wide CRIU
config file), CRIU wants its key as a file it can read, and GnuTLS would check the peer by CN
where the migration channel checks IP SANs; one channel, one set of checks, is easier to trust.

The target's loopback listener takes one connection, and only from a socket of root's (the
page daemon runs as root): an unprivileged process on the node racing the daemon is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shim.errors import FailedPrecondition

CHUNK = 1 << 20
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
               before_close: Callable[[Pumped], Awaitable[None]] | None = None) -> Pumped:
    """Copy both ways until one side ends (EOF or error), then close both; return what moved.

    With `orderly`, the local socket is closed in order only when the remote side ended with an
    EOF and `orderly()` then says so; otherwise it is reset (see abort_on_close). `before_close`
    runs first, while the local end still waits on us."""
    result = Pumped()

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: str, inbound: bool) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
                if inbound:
                    result.to_local += len(chunk)
                else:
                    result.to_remote += len(chunk)
            result.ended_by = result.ended_by or side
        except (ConnectionError, OSError) as exc:  # ssl.SSLError is an OSError
            result.errors.append(f"{side}: {exc.__class__.__name__}: {exc}")
            result.ended_by = result.ended_by or f"error: {side}: {exc}"

    tasks = [asyncio.ensure_future(copy(remote[0], local[1], "remote", True)),
             asyncio.ensure_future(copy(local[0], remote[1], "local", False))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if before_close is not None:
            await before_close(result)
        if orderly is not None:
            calm = result.ended_by == "remote" and await orderly()
            abort_on_close(local[1], abort=not calm)
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in (local, remote):
            writer.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _, writer in (local, remote):
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return result


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


class LoopbackEnd:
    """The target's end for the page daemon: a one-connection listener on the loopback."""

    def __init__(self) -> None:
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def open(self) -> int:
        self._server = await asyncio.start_server(self._on_connect, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._accepted.done() or socket_uid(peer, self.port) != 0:
            writer.close()  # a second caller, or not root's: never the page daemon
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
