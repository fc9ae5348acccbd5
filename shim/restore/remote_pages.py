"""A lazy migration's memory from the source node: the page daemon's network page source.

The target's page daemon (shim.runtime.page_daemon) dials the source node's page end itself with
the nodes' mutual TLS (`Pinned`: the source's certificate pinned, the migration's token said first;
shim.migrate.tunnel.SourceEnd relays to CRIU's page server there) and speaks CRIU's page-server
protocol (shim.restore.pageserver, the codec; this module is its thin transport). Decrypting here,
in the process that copies the pages in, saves the receiver's relay and the target's loopback: a
Python hop per page. (Without `Pinned`: plain TCP to a page tunnel's loopback end.) Unlike a local image, bytes here arrive later than they are
asked for, so the source is driven by the plan's claims (shim.restore.fillplan keeps them in
flight): the daemon asks (`request`) for each copy it claims, faults at once and the background
fill while less than a window (shim.restore.fillpace) is on the way, and copies each reply into the process when
it has landed (`receive`), straight from one receive buffer. With several large requests on the
wire the link sets the rate, not the round trips through both tunnel ends.

Why a page daemon that asks, and not a source node that pushes: CRIU's page server already
takes pipelined requests of up to one page-pipe iovec (819 pages) and answers them in order, so
the target alone decides the order (faults first) with no change to the source, and the source's
end keeps CRIU's own meaning of a session's end (PS_IOV_CLOSE: transfer complete, the source's
tasks end; a reset: failed, CRIU lets them run again). The socket resets on close (SO_LINGER 0,
also when the daemon dies) unless `finish` ended the session in order.

In a lazy migration's images the lazy runs have no data (PE_LAZY without PE_PRESENT): a run's
"image offset" here is its dump-time address, which is what the page server is asked for (an
mremap on the target moves the plan's addresses, not the offsets).
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import mmap
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from shim import node_tls
from shim.restore.fillpace import FAR_WINDOW
from shim.restore.pageserver import Closed, Pages, PageServerClient, ProtocolError

BUFFER = 4 << 20  # the largest request (fillplan.BACKGROUND_RUN)
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 30.0

T = TypeVar("T")
_NOT_YET = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


@dataclass(frozen=True)
class Pinned:
    """The source node's page end, reached directly: mutual TLS with this node's credentials, the
    peer's certificate the one the source showed on the migration's control connection (its
    SHA-256), then the migration's token (`hello`). `idle`: a silent peer ends the stream after it."""

    creds: node_tls.Credentials
    certificate: str
    token: str
    idle: float


def hello(token: str) -> bytes:
    """The first bytes on a pinned page connection, inside TLS: which migration it serves."""
    return f"{token}\n".encode()


def token_matches(received: bytes, token: str) -> bool:
    return hmac.compare_digest(received, hello(token))


class RemotePages(Generic[T]):
    """One page-server connection, shared by every process of the restore (requests name the pid)."""

    def __init__(self, address: str, port: int, pinned: Pinned | None = None) -> None:
        sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
        try:
            # Reset unless ended in order (finish): CRIU takes an orderly end for a finished transfer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock: socket.socket = sock if pinned is None else _pinned(sock, address, pinned)
            self._tls = pinned is not None
            self._sock.setblocking(not self._tls)  # TLS reads without waiting, as MSG_DONTWAIT does for TCP
            self._buffer = mmap.mmap(-1, BUFFER)
        except BaseException:
            sock.close()
            raise
        self._buffer.write(bytes(BUFFER))  # faulted in once, not during the first receives
        self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(self._buffer)
        self._address = ctypes.addressof(self._anchor)
        self._view = memoryview(self._buffer)
        self._scratch = memoryview(bytearray(64))  # headers and the status: the codec's bytes
        self._codec: PageServerClient[T] = PageServerClient()
        self._filled = 0  # bytes of the current reply in the buffer
        self._status: int | None = None
        self.requests = 0
        self.received = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def room(self, window: int) -> bool:
        """Whether the background fill may ask for more now, keeping at most `window` on the way (faults
        always may: shim.restore.fillpace sizes the window)."""
        return self._codec.in_flight < window

    @property
    def in_flight(self) -> int:
        return self._codec.in_flight

    def request(self, pid: int, vaddr: int, length: int, tag: T) -> None:
        """Ask for `length` bytes of process `pid` from dump-time address `vaddr`; `tag` comes back with them."""
        if length > BUFFER:
            raise ValueError(f"a request of {length} bytes is over the receive buffer ({BUFFER})")
        self._send(self._codec.get(pid, vaddr, length, tag))
        self.requests += 1

    def pending(self) -> bool:
        """Bytes TLS has already decrypted and `receive` left for next time: poll() does not see them."""
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    def receive(self, landed: Callable[[T, int, int], None], budget: int = FAR_WINDOW) -> None:
        """Read what has arrived, without waiting; `landed(tag, address, length)` for each complete reply, its
        bytes at `address` until it returns. ConnectionError when the stream ends, ProtocolError for nonsense."""
        while budget > 0:
            want = self._codec.wanted()
            if want.size == 0:  # nothing owed: the server may only end the stream now
                count = self._read(self._scratch[:1])
                if count:
                    raise ProtocolError("the page server sent bytes nobody asked for")
            elif want.pages:
                count = self._read(self._view[self._filled:self._filled + want.size])
            else:
                count = self._read(self._scratch[:want.size])
                data = bytes(self._scratch[:count or 0])
            if count is None:
                return
            if count == 0:
                raise ConnectionError("the page stream from the source node ended before memory was complete")
            self.received += count
            budget -= count
            if want.pages:
                self._filled += count
                done = self._codec.landed(count)
                if done is not None:
                    self._filled = 0
                    landed(done.request.tag, self._address, done.length)
                continue
            for event in self._codec.feed(data):
                if isinstance(event, Closed):
                    self._status = event.status
                elif isinstance(event, Pages) and event.length > BUFFER:  # cannot be: length <= asked <= BUFFER
                    raise ProtocolError(f"a reply of {event.length} bytes")

    def finish(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End the session in order (memory complete): PS_IOV_CLOSE, the replies still owed are read and
        dropped, the server's status, then an orderly close. Raises if the server does not say 0."""
        self._send(self._codec.close())
        deadline = time.monotonic() + timeout
        while self._status is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self.pending() and not select.select([self._sock], [], [], left)[0]:
                raise TimeoutError(f"the source's page server did not answer the end of the session in {timeout:.0f} s")
            self.receive(lambda tag, address, length: None)
        if self._status != 0:
            raise ProtocolError(f"the source's page server ended the session with status {self._status}")
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
        self.close()

    def _read(self, view: memoryview) -> int | None:
        """Bytes read into `view` (0: the stream ended), or None when none have come yet."""
        try:
            if self._tls:
                return self._sock.recv_into(view, len(view))
            return self._sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
        except _NOT_YET:
            return None

    def _send(self, data: bytes) -> None:
        if not self._tls:
            self._sock.sendall(data)
            return
        view = memoryview(data)
        while view:  # a non-blocking TLS socket: what it could not take now, again once it can
            try:
                view = view[self._sock.send(view):]
            except _NOT_YET:
                if not select.select([], [self._sock], [], CLOSE_TIMEOUT)[1]:
                    raise TimeoutError(f"the source's page end took no request for {CLOSE_TIMEOUT:.0f} s") from None

    def close(self) -> None:
        """Close (a reset, unless `finish` ended the session in order); idempotent."""
        self._sock.close()
        if self._anchor is not None:
            self._anchor = None
            self._view.release()
            with contextlib.suppress(BufferError):
                self._buffer.close()


def _pinned(sock: socket.socket, address: str, pinned: Pinned) -> ssl.SSLSocket:
    """TLS over `sock` to the source's page end: handshake, the pin, the hello (all within CONNECT_TIMEOUT)."""
    node_tls.give_up_after(sock, pinned.idle)  # as the migration's own connections
    tls = node_tls.client_context(pinned.creds, check_hostname=False).wrap_socket(sock)
    try:
        shown = node_tls.digest(tls)
        if not hmac.compare_digest(shown, pinned.certificate):
            raise ConnectionRefusedError(f"the page end at {address} presented a certificate (sha256 {shown[:16]}...) "
                                         "other than the source node's")
        tls.sendall(hello(pinned.token))
    except BaseException:
        tls.close()
        raise
    return tls

