"""The page daemon's network source (shim.restore.remote_pages) against a page server on the loopback that
answers as CRIU's does (criu/page-xfer.c): in order, clamped at an iovec, PS_IOV_CLOSE with a status."""

from __future__ import annotations

import ctypes
import select
import socket
from collections.abc import Callable

import pytest

from shim.restore.pageserver import HEADER, PAGE, REPLY
from shim.restore.remote_pages import RemotePages
from tests.support.page_server import PID, exactly, page


def _receive_all(remote: RemotePages[str], count: int) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    while len(got) < count:
        select.select([remote], [], [], 5)
        remote.receive(lambda tag, address, length: got.append((tag, ctypes.string_at(address, length))))
    return got


def test_pipelined_requests_land_whole_in_order_and_the_session_ends_in_order(
        served: tuple[int, Callable[[], object]]) -> None:
    port, after = served
    remote: RemotePages[str] = RemotePages("127.0.0.1", port)
    remote.request(PID, 0x10000, 4 * PAGE, "a")
    remote.request(PID, 0x14000, 4 * PAGE, "b")
    remote.request(PID, 0x1E000, 4 * PAGE, "c")  # two pages left in the iovec: CRIU answers two
    assert remote.in_flight == 12 * PAGE
    got = _receive_all(remote, 3)
    assert [tag for tag, _ in got] == ["a", "b", "c"]
    assert got[0][1] == b"".join(page(0x10000 + i * PAGE) for i in range(4))
    assert got[2][1] == page(0x1E000) + page(0x1F000)
    assert remote.in_flight == 0
    remote.finish()
    assert after() == b""  # CRIU's meaning: transfer complete


def test_replies_still_owed_are_read_before_the_status(served: tuple[int, Callable[[], object]]) -> None:
    port, after = served
    remote: RemotePages[str] = RemotePages("127.0.0.1", port)
    remote.request(PID, 0x10000, 8 * PAGE, "dropped")
    remote.finish()
    assert after() == b""


def test_a_close_without_finish_resets(served: tuple[int, Callable[[], object]]) -> None:
    port, after = served
    remote: RemotePages[str] = RemotePages("127.0.0.1", port)
    remote.request(PID, 0x10000, PAGE, "a")
    _receive_all(remote, 1)
    remote.close()  # a failed fill: CRIU must see a reset and let the source run again
    remote.close()  # idempotent
    assert after() == "reset"


def _dies_after_a_header(sock: socket.socket) -> None:
    HEADER.unpack(exactly(sock, HEADER.size))
    sock.sendall(HEADER.pack(REPLY, 2, 0x10000, PID) + page(0x10000))  # one page of two, then gone
    raise EOFError


@pytest.mark.parametrize("served", [_dies_after_a_header], indirect=True)
def test_a_stream_that_ends_mid_reply_is_an_error(served: tuple[int, Callable[[], object]]) -> None:
    port, _ = served
    remote: RemotePages[str] = RemotePages("127.0.0.1", port)
    remote.request(PID, 0x10000, 2 * PAGE, "a")
    with pytest.raises(ConnectionError, match="ended before memory was complete"):
        for _ in range(100):
            select.select([remote], [], [], 5)
            remote.receive(lambda tag, address, length: pytest.fail("half a reply landed"))
    remote.close()
