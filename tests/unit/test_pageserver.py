"""CRIU's page-server protocol, the page daemon's half (shim.restore.pageserver): the codec alone."""

from __future__ import annotations

import pytest

from shim.restore.pageserver import (
    HEADER,
    PAGE,
    PS_IOV_CLOSE,
    PS_IOV_GET,
    REPLY,
    STATUS,
    Closed,
    CloseWatch,
    Landed,
    Pages,
    PageServerClient,
    ProtocolError,
    Want,
)


def reply(pages: int, vaddr: int, pid: int, cmd: int = REPLY) -> bytes:
    return HEADER.pack(cmd, pages, vaddr, pid)


def test_a_request_is_criu_s_page_server_iov() -> None:
    client: PageServerClient[str] = PageServerClient()
    wire = client.get(7, 0x7F0000000000, 3 * PAGE, "a")
    assert len(wire) == 32  # u32 cmd, 4 bytes of padding, three u64: as CRIU's struct lays it out
    assert HEADER.unpack(wire) == (PS_IOV_GET, 3, 0x7F0000000000, 7)
    assert client.in_flight == 3 * PAGE and client.outstanding == 1


def test_pipelined_replies_land_in_the_order_asked() -> None:
    client: PageServerClient[str] = PageServerClient()
    client.get(7, 0x1000, 2 * PAGE, "first")
    client.get(7, 0x9000, PAGE, "second")
    assert client.wanted() == Want(32, False)
    [pages] = client.feed(reply(2, 0x1000, 7))
    assert isinstance(pages, Pages) and pages.request.tag == "first" and pages.length == 2 * PAGE
    assert client.wanted() == Want(2 * PAGE, True)
    assert client.landed(PAGE) is None  # the transport reads pages in pieces
    done = client.landed(PAGE)
    assert isinstance(done, Landed) and done.request.tag == "first"
    assert client.feed(reply(1, 0x9000, 7)[:10]) == []  # a header in pieces too
    [pages] = client.feed(reply(1, 0x9000, 7)[10:])
    assert isinstance(pages, Pages) and pages.request.tag == "second"
    assert isinstance(client.landed(PAGE), Landed)
    assert client.in_flight == 0 and client.wanted() == Want(0, False)


def test_a_reply_clamped_at_the_end_of_criu_s_iovec_is_shorter() -> None:
    client: PageServerClient[str] = PageServerClient()
    client.get(3, 0x10000, 8 * PAGE, "run")
    [pages] = client.feed(reply(5, 0x10000, 3))
    assert isinstance(pages, Pages) and pages.length == 5 * PAGE
    done = client.landed(5 * PAGE)
    assert isinstance(done, Landed) and done.length == 5 * PAGE and client.in_flight == 0


@pytest.mark.parametrize(("header", "error"), [
    (reply(1, 0x2000, 7), "with 4096 bytes at 0x2000"),  # another address
    (reply(1, 0x1000, 8), "of process 8"),  # another process
    (reply(3, 0x1000, 7), "with 12288 bytes"),  # more than asked
    (reply(0, 0x1000, 7), "with 0 bytes"),
    (reply(1, 0x1000, 7, cmd=PS_IOV_GET), "with command 0x7"),
])
def test_a_reply_that_does_not_answer_the_request_stops_the_fill(header: bytes, error: str) -> None:
    client: PageServerClient[str] = PageServerClient()
    client.get(7, 0x1000, 2 * PAGE, "x")
    with pytest.raises(ProtocolError, match=error):
        client.feed(header)


def test_bytes_nobody_asked_for_are_refused() -> None:
    client: PageServerClient[str] = PageServerClient()
    with pytest.raises(ProtocolError):
        client.feed(reply(1, 0x1000, 7))
    with pytest.raises(ProtocolError):
        client.landed(PAGE)


@pytest.mark.parametrize(("pid", "vaddr", "length"), [(0, 0x1000, PAGE), (7, 0x1001, PAGE), (7, 0x1000, 100),
                                                      (7, 0x1000, 0)])
def test_a_request_that_is_not_whole_pages_is_not_sent(pid: int, vaddr: int, length: int) -> None:
    client: PageServerClient[str] = PageServerClient()
    with pytest.raises(ValueError):
        client.get(pid, vaddr, length, "x")
    assert client.outstanding == 0


def test_close_waits_for_the_replies_owed_then_the_status() -> None:
    client: PageServerClient[str] = PageServerClient()
    client.get(7, 0x1000, PAGE, "last")
    assert HEADER.unpack(client.close()) == (PS_IOV_CLOSE, 0, 0, 0)
    with pytest.raises(ProtocolError):
        client.get(7, 0x2000, PAGE, "late")
    client.feed(reply(1, 0x1000, 7))
    client.landed(PAGE)
    assert client.wanted() == Want(4, False)
    assert client.feed(STATUS.pack(0)) == [Closed(0)]
    assert client.wanted() == Want(0, False)


@pytest.mark.parametrize("step", [1, 7, 32, 33, 1000])
def test_the_close_watch_sees_ps_iov_close_however_the_requests_are_cut(step: int) -> None:
    client: PageServerClient[None] = PageServerClient()
    stream = client.get(5, 4096, 8192, None) + client.get(5, 0x10000, 4096, None) + client.close()
    watch = CloseWatch()
    for i in range(0, len(stream) - 1, step):
        watch.feed(memoryview(stream)[i:min(i + step, len(stream) - 1)])
    assert not watch.closed  # all but the last byte of PS_IOV_CLOSE
    watch.feed(stream[-1:])
    assert watch.closed


def test_the_close_watch_takes_a_get_for_what_it_is() -> None:
    """A GET whose fields hold PS_IOV_CLOSE's value (its pid, its address) is still a GET."""
    client: PageServerClient[None] = PageServerClient()
    watch = CloseWatch()
    watch.feed(client.get(PS_IOV_CLOSE, PS_IOV_CLOSE * PAGE, PAGE, None))
    assert not watch.closed
