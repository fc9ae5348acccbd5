"""The page tunnel end to end over real sockets: 'CRIU' <-> source end <-> TLS <-> target end <-> 'daemon'.

Both ends are tunnel.pump over the streams the migration made (a plain loopback connection on each
node, the nodes' mutual TLS between them), as in a lazy migration; the pump takes their transports
over, so what the streams had already read, and an end they had already seen, must not be lost.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from shim.migrate import channel, tunnel
from shim.node import pki

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
MIB = 1 << 20


@pytest.fixture
def creds(tmp_path: Path) -> channel.Credentials:
    ca = pki.create_ca(tmp_path / "ca", "test cluster")
    pair = pki.issue(ca, pki.CertPair(tmp_path / "n.crt", tmp_path / "n.key"), "node", server=True, client=True,
                     ips=("127.0.0.1",))
    return channel.Credentials(pair.cert, pair.key, ca.cert)


async def _pair() -> tuple[Stream, Stream, asyncio.Server]:
    accepted: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), tunnel.LOOPBACK, 0)
    ours = await asyncio.open_connection(tunnel.LOOPBACK, server.sockets[0].getsockname()[1])
    return ours, await accepted, server


def _pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * (MIB // 32)


async def _criu(criu: Stream, pages: int) -> None:
    """Answers one request line with `pages` MiB, then waits for the tunnel to close."""
    assert await criu[0].readexactly(8) == b"request\n"
    for i in range(pages):
        criu[1].write(_pattern(i))
        await criu[1].drain()
    await criu[0].read()


async def _tunnel(creds: channel.Credentials, pages: int, early: bytes) -> tuple[bytes, tunnel.Pumped, tunnel.Pumped]:
    """What the daemon received (its digest), and what each end's pump says."""
    daemon_side, daemon, s1 = await _pair()  # the target's loopback: our end, the daemon's
    criu_side, criu, s2 = await _pair()  # the source's loopback: our end, CRIU's
    target_pumped: asyncio.Future[tunnel.Pumped] = asyncio.get_running_loop().create_future()

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert (await channel.receive(reader))["op"] == "pages"
        pumped = await tunnel.pump(daemon_side, (reader, writer))
        # The stream hears of the end although the pump took its transport (else this waits forever).
        await asyncio.wait_for(writer.wait_closed(), 10)
        target_pumped.set_result(pumped)

    server = await asyncio.start_server(receiver, "127.0.0.1", 0, ssl=channel.server_context(creds))
    pages_conn = await channel.connect(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", creds, 5, 5)
    # The hello and the first bytes in one write: the receiver's stream reads them together.
    pages_conn[1].write(b"".join([(len(b := b'{"op": "pages"}')).to_bytes(4, "big"), b, early]))
    source = asyncio.ensure_future(tunnel.pump(criu_side, pages_conn))
    answering = asyncio.ensure_future(_criu(criu, pages))
    if early:
        assert await daemon[0].readexactly(len(early)) == early
    daemon[1].write(b"request\n")
    digest = hashlib.sha256()
    for _ in range(pages):
        digest.update(await daemon[0].readexactly(MIB))
    daemon[1].close()  # the daemon ends: the target's end ends, then the source's
    target = await target_pumped
    source_pumped = await source
    await answering
    for s in (s1, s2, server):
        s.close()
    criu[1].close()
    return digest.digest(), source_pumped, target


def test_pages_cross_both_ends_whole_and_in_order(creds: channel.Credentials) -> None:
    got, source, target = asyncio.run(asyncio.wait_for(_tunnel(creds, 64, b""), 60))
    want = hashlib.sha256(b"".join(_pattern(i) for i in range(64))).digest()
    assert got == want
    assert target.ended_by == "local" and target.to_local == 64 * MIB and target.to_remote == 8
    assert source.ended_by == "remote" and source.to_local == 8 and source.to_remote == 64 * MIB


def test_bytes_read_with_the_hello_reach_the_daemon_first(creds: channel.Credentials) -> None:
    got, _, target = asyncio.run(asyncio.wait_for(_tunnel(creds, 2, b"early bytes"), 30))
    assert got == hashlib.sha256(_pattern(0) + _pattern(1)).digest()
    assert target.to_local == 2 * MIB + len(b"early bytes")


def test_an_end_seen_before_the_pump_started_ends_it() -> None:
    async def check() -> tunnel.Pumped:
        local, peer, s1 = await _pair()
        remote, other, s2 = await _pair()
        peer[1].write(b"last words")
        peer[1].close()
        await local[0].readexactly(1)
        while not getattr(local[0], "_eof", False):  # until the stream holds the rest and has seen the end
            await asyncio.sleep(0.001)
        pumped = await asyncio.wait_for(tunnel.pump(local, remote), 10)
        assert await other[0].read() == b"ast words"  # passed on, then the remote end closed in order
        for s in (s1, s2):
            s.close()
        other[1].close()
        return pumped

    pumped = asyncio.run(check())
    assert pumped.ended_by == "local" and pumped.to_remote == len(b"ast words")
