"""A page server on the loopback that answers as CRIU's does (criu/page-xfer.c): in order, clamped at
an iovec, PS_IOV_CLOSE with a status; and the `served` fixture running one (tests/adapters/conftest.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from shim.restore.pageserver import HEADER, PAGE, PS_IOV_CLOSE, PS_IOV_GET, REPLY, STATUS

PID = 42
MEMORY = {0x10000: 16}  # an iovec of 16 pages at 0x10000
Server = Callable[[socket.socket], None]


def page(vaddr: int) -> bytes:
    return vaddr.to_bytes(8, "little") * (PAGE // 8)


def criu_like(sock: socket.socket) -> None:
    """Answer GETs in order (clamped at the end of the iovec) until PS_IOV_CLOSE; then wait for the client's close."""
    while True:
        cmd, nr_pages, vaddr, pid = HEADER.unpack(exactly(sock, HEADER.size))
        if cmd == PS_IOV_CLOSE:
            sock.sendall(STATUS.pack(0))
            return
        assert cmd == PS_IOV_GET and pid == PID
        base, count = next((b, n) for b, n in MEMORY.items() if b <= vaddr < b + n * PAGE)
        nr_pages = min(nr_pages, (base + count * PAGE - vaddr) // PAGE)
        sock.sendall(HEADER.pack(REPLY, nr_pages, vaddr, pid) + b"".join(page(vaddr + i * PAGE)
                                                                         for i in range(nr_pages)))


def exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def served(request: pytest.FixtureRequest) -> Iterator[tuple[int, Callable[[], object]]]:
    """A one-connection server running `request.param` (default criu_like); what it saw after the session."""
    serve: Server = getattr(request, "param", criu_like)
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                serve(conn)
                seen["after"] = conn.recv(1)  # b"": the client closed in order
            except ConnectionResetError:
                seen["after"] = "reset"
            except EOFError:
                seen["after"] = "eof"

    thread = threading.Thread(target=run)
    thread.start()
    def after() -> object:
        thread.join(10)
        return seen.get("after")

    yield listener.getsockname()[1], after
    thread.join(10)
    listener.close()
