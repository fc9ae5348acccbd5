"""The page tunnel's ends: bytes both ways, and how the source's end of CRIU's page server closes.

CRIU's lazy page server ends the source container on an orderly end of its client's connection
and lets it run on after a reset: the tunnel must close in order only when told the target has
everything, and reset otherwise (and when its process dies: SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from shim.migrate import tunnel

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _pair() -> tuple[Stream, Stream, asyncio.Server]:
    """Two connected loopback TCP streams (ours, theirs)."""
    accepted: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), tunnel.LOOPBACK, 0)
    ours = await asyncio.open_connection(tunnel.LOOPBACK, server.sockets[0].getsockname()[1])
    return ours, await accepted, server


async def _criu_sees(orderly: Callable[[], Awaitable[bool]] | None) -> tuple[bytes, str, tunnel.Pumped]:
    """Our end of 'CRIU' (local) and of 'the target' (remote); the target ends; what does CRIU read?"""
    local, criu, s1 = await _pair()
    remote, target, s2 = await _pair()
    tunnel.abort_on_close(local[1])
    pumping = asyncio.ensure_future(tunnel.pump(local, remote, orderly))
    target[1].write(b"page request")
    await target[1].drain()
    got = await criu[0].readexactly(12)
    criu[1].write(b"pages")
    await criu[1].drain()
    assert await target[0].readexactly(5) == b"pages"
    target[1].close()  # the target's end closes
    pumped = await pumping
    try:
        end = "eof" if await criu[0].read() == b"" else "data"
    except ConnectionResetError:
        end = "reset"
    for server in (s1, s2):
        server.close()
    criu[1].close()
    return got, end, pumped


@pytest.mark.parametrize(("complete", "end"), [(True, "eof"), (False, "reset")])
def test_criu_sees_an_orderly_end_only_when_the_target_has_everything(complete: bool, end: str) -> None:
    async def said() -> bool:
        return complete

    got, seen, pumped = asyncio.run(_criu_sees(said))
    assert got == b"page request" and seen == end
    assert pumped.ended_by == "remote" and pumped.to_local == 12 and pumped.to_remote == 5


def test_without_orderly_the_end_is_a_reset() -> None:
    _, seen, _ = asyncio.run(_criu_sees(None))
    assert seen == "reset"  # abort_on_close stays: the source's death looks the same to CRIU


def test_socket_uid_finds_a_loopback_socket_of_ours() -> None:
    import os

    async def check() -> int | None:
        ours, theirs, server = await _pair()
        peer = theirs[1].get_extra_info("peername")
        port = theirs[1].get_extra_info("sockname")[1]
        uid = tunnel.socket_uid(peer, port)
        ours[1].close()
        theirs[1].close()
        server.close()
        return uid

    assert asyncio.run(check()) == os.geteuid()
