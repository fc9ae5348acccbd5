"""A migration connection whose peer goes silent fails instead of hanging (shim.migrate.channel).

A lazy target whose page requests were all acknowledged before the link was cut only waits: with
TCP_USER_TIMEOUT alone nothing was unacknowledged, so nothing ever timed out and its task waited on
memory that never came. Keepalive probes make the kernel give up on a silent peer on that end too,
and the timed-out read is a migration error, not an unexpected exception.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from shim.errors import Unavailable
from shim.migrate import channel


def test_the_kernel_is_told_to_give_up_on_a_silent_peer_even_when_nothing_is_unacknowledged() -> None:
    async def main() -> list[int]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        channel.give_up_after(writer, 10.0)
        sock = writer.get_extra_info("socket")
        options = [sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                   sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)]
        writer.close()
        server.close()
        await server.wait_closed()
        return options

    # unacknowledged for 10 s, or silent through probes every 2 s (5 of them): about 10 s either way
    assert asyncio.run(main()) == [10_000, 1, 2, 2, 5]


def test_a_connection_the_kernel_timed_out_is_a_migration_error() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        await channel.receive(reader)

    with pytest.raises(Unavailable, match=r"the migration peer stopped answering \(Connection timed out\)"):
        asyncio.run(main())
