"""CRIU's page-server protocol, the lazy-pages half, as a sans-I/O codec: bytes in, events out.

A lazy migration's source runs `criu dump --lazy-pages --page-server` (through runc): CRIU keeps
the lazy memory in its page pipe and answers a page daemon's requests (criu/page-xfer.c). The
facts this codec is built on, read from CRIU's source:

- every message starts with `struct page_server_iov` {u32 cmd; u64 nr_pages, vaddr, dst_id}, 32
  bytes with the padding after `cmd`; a request is PS_IOV_GET (nr_pages from vaddr of the process
  dst_id, its pid in the images);
- the server takes one command at a time, in arrival order (`page_server_serve`), so requests can
  be sent ahead (pipelined) and the answers come in the order asked; CRIU's own daemon keeps one
  background request in flight per process (criu/uffd.c, `handle_remaining_pages`), each a round
  trip, and that is what made a migration's fill slow through our tunnel;
- the answer is a PS_IOV_ADD_F | PE_PRESENT header with the pages it sends, then their bytes: at
  most the rest of the page-pipe iovec holding vaddr (`page_pipe_read` clamps the request there;
  an iovec is one pagemap entry, at most 819 pages), so a reply may be shorter than asked;
- an address the page pipe does not hold ends the session with an error (never asked: the plan
  asks only for runs the pagemap lists as lazy);
- PS_IOV_CLOSE ends it in order: the server answers a 4-byte status and then waits for our close.
  CRIU takes that for a finished transfer and ends the source's tasks; a reset is a failed one.

The transport reads a reply's pages straight to where they are wanted (`wanted` says how many
bytes are the codec's and how many are pages); the codec checks each header against the request
it answers, so a confused or hostile stream stops the fill instead of filling wrong memory.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

PAGE = 4096
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_CMD_BITS = 16
PE_PRESENT = 1 << 2
HEADER = struct.Struct("<I4xQQQ")  # struct page_server_iov
STATUS = struct.Struct("<i")
REPLY = PE_PRESENT << PS_CMD_BITS | PS_IOV_ADD_F

T = TypeVar("T")


class ProtocolError(RuntimeError):
    """The page server said something that is not an answer to what we asked."""


@dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """`length` bytes of process `pid`'s memory from `vaddr` (dump-time addresses); `tag` is the caller's."""

    pid: int
    vaddr: int
    length: int
    tag: T


@dataclass(frozen=True, slots=True)
class Pages(Generic[T]):
    """A reply's header: the next `length` bytes of the stream are `request`'s memory from its start."""

    request: Request[T]
    length: int


@dataclass(frozen=True, slots=True)
class Landed(Generic[T]):
    """All of a reply's `length` bytes were read to where the transport put them."""

    request: Request[T]
    length: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The server answered PS_IOV_CLOSE with `status` (0: it has ended the session in order)."""

    status: int


@dataclass(frozen=True, slots=True)
class Want:
    """What the codec needs next: `size` bytes, for it (`pages` False) or the reply's memory (True)."""

    size: int
    pages: bool


class PageServerClient(Generic[T]):
    """The page daemon's end of one page-server connection."""

    def __init__(self) -> None:
        self._asked: deque[Request[T]] = deque()
        self._closing = False
        self._closed = False
        self._header = bytearray()
        self._reply: Pages[T] | None = None
        self._left = 0  # of the current reply's pages
        self.in_flight = 0  # bytes asked for and not yet landed

    @property
    def outstanding(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._asked)

    def get(self, pid: int, vaddr: int, length: int, tag: T) -> bytes:
        """The bytes of a PS_IOV_GET for `length` bytes (whole pages) from `vaddr` of process `pid`."""
        if self._closing:
            raise ProtocolError("no request after PS_IOV_CLOSE")
        if pid <= 0 or vaddr % PAGE or length <= 0 or length % PAGE:
            raise ValueError(f"not a page request: pid {pid}, {length} bytes at {vaddr:#x}")
        self._asked.append(Request(pid, vaddr, length, tag))
        self.in_flight += length
        return HEADER.pack(PS_IOV_GET, length // PAGE, vaddr, pid)

    def close(self) -> bytes:
        """The bytes of PS_IOV_CLOSE: the answers still owed come first, then the server's status."""
        self._closing = True
        return HEADER.pack(PS_IOV_CLOSE, 0, 0, 0)

    def wanted(self) -> Want:
        if self._reply is not None:
            return Want(self._left, True)
        if self._asked:
            return Want(HEADER.size - len(self._header), False)
        if self._closing and not self._closed:
            return Want(STATUS.size - len(self._header), False)
        return Want(0, False)

    def feed(self, data: bytes) -> list[Pages[T] | Closed]:
        """Bytes of headers (or the final status), never more than `wanted` asked for."""
        want = self.wanted()
        if want.pages or len(data) > want.size:
            raise ProtocolError(f"{len(data)} bytes where the codec wanted {want}")
        self._header += data
        if self._asked and len(self._header) == HEADER.size:
            return [self._start_reply()]
        if not self._asked and self._closing and len(self._header) == STATUS.size:
            (status,) = STATUS.unpack(self._header)
            self._header.clear()
            self._closed = True
            return [Closed(status)]
        return []

    def landed(self, count: int) -> Landed[T] | None:
        """`count` bytes of the current reply's pages were read; its Landed once all are."""
        if self._reply is None or not 0 < count <= self._left:
            raise ProtocolError(f"{count} bytes of pages where {self._left} were due")
        self._left -= count
        if self._left:
            return None
        reply, self._reply = self._reply, None
        self.in_flight -= reply.request.length
        return Landed(reply.request, reply.length)

    def _start_reply(self) -> Pages[T]:
        cmd, nr_pages, vaddr, dst_id = HEADER.unpack(self._header)
        self._header.clear()
        request = self._asked.popleft()
        if cmd != REPLY:
            raise ProtocolError(f"the page server answered a request for {request.length} bytes at "
                                f"{request.vaddr:#x} with command {cmd:#x}")
        length = nr_pages * PAGE
        if dst_id != request.pid or vaddr != request.vaddr or not 0 < length <= request.length:
            raise ProtocolError(f"the page server answered a request for {request.length} bytes at {request.vaddr:#x} "
                                f"of process {request.pid} with {length} bytes at {vaddr:#x} of process {dst_id}")
        self._reply, self._left = Pages(request, length), length
        return self._reply


class CloseWatch:
    """The server's end of the requests, watched: has the daemon ended the session in order?

    A lazy migration's source relays the daemon's requests to CRIU without reading them, except for
    this: CRIU takes an orderly end of its connection after PS_IOV_CLOSE for a finished transfer
    (and ends the source's tasks), so the relay closes CRIU's end in order only once the daemon,
    whose stream is authenticated, has asked for that. Our daemon's requests are all one header.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self.closed = False

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view and not self.closed:
            take = HEADER.size - len(self._header)
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == HEADER.size:
                self.closed = HEADER.unpack(self._header)[0] == PS_IOV_CLOSE
                self._header.clear()
