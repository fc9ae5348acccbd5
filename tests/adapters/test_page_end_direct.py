"""A lazy migration's page stream without the tunnel: the target's page daemon (shim.restore.remote_pages)
dials the source's page end (shim.migrate.tunnel.SourceEnd) with TLS itself, and the source relays to
'CRIU' (a page server on the loopback answering as CRIU's does: tests.support.page_server).

Real sockets and real TLS with three node certificates of one CA: the source's, the target's, and
another node's that must not get in.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import select
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from shim import node_tls
from shim.errors import FailedPrecondition
from shim.migrate import lazy, tunnel
from shim.node import pki
from shim.restore.pageserver import PAGE
from shim.restore.remote_pages import Pinned, RemotePages, hello
from tests.support.page_server import PID, page

TOKEN = "0123456789abcdef0123456789abcdef"
Nodes = dict[str, node_tls.Credentials]


@pytest.fixture
def nodes(tmp_path: Path) -> Nodes:
    ca = pki.create_ca(tmp_path / "ca", "test cluster")
    made = {}
    for name in ("source", "target", "other"):
        pair = pki.issue(ca, pki.CertPair(tmp_path / f"{name}.crt", tmp_path / f"{name}.key"), name, server=True,
                         client=True, ips=("127.0.0.1",))
        made[name] = node_tls.Credentials(pair.cert, pair.key, ca.cert)
    return made


def _digest(creds: node_tls.Credentials) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(creds.cert.read_text())).hexdigest()


def _pinned(nodes: Nodes, who: str = "target", certificate: str | None = None, token: str = TOKEN) -> Pinned:
    return Pinned(nodes[who], certificate if certificate is not None else _digest(nodes["source"]), token, 5.0)


def _fill(remote: RemotePages[str], asks: list[tuple[int, int]]) -> list[bytes]:
    """Ask for every (vaddr, pages) at once; the replies, as the daemon's loop reads them (poll + pending)."""
    for vaddr, count in asks:
        remote.request(PID, vaddr, count * PAGE, hex(vaddr))
    got: list[bytes] = []
    while len(got) < len(asks):
        if not remote.pending():
            assert select.select([remote], [], [], 5)[0], "no reply within 5 s"
        remote.receive(lambda tag, address, length: got.append(ctypes.string_at(address, length)), budget=PAGE)
    return got


async def _source(nodes: Nodes, criu_port: int, daemon: Callable[[int], object]) -> tuple[tunnel.Pumped, object]:
    """The source's page end for the target, relaying to 'CRIU'; `daemon(port)` runs in a thread meanwhile."""
    end = tunnel.SourceEnd(_digest(nodes["target"]), TOKEN, 5.0)
    await end.open("127.0.0.1", nodes["source"])
    criu_end = await asyncio.open_connection("127.0.0.1", criu_port)
    try:
        pumping = asyncio.ensure_future(lazy._Direct(end).pump(criu_end, None, 10.0))  # type: ignore[arg-type]
        outcome = await asyncio.to_thread(daemon, end.port)
        return await asyncio.wait_for(pumping, 10), outcome
    finally:
        end.close()
        criu_end[1].close()


def test_the_daemon_fills_through_the_source_end_and_criu_ends_in_order(
        nodes: Nodes, served: tuple[int, Callable[[], object]]) -> None:
    port, after = served

    def daemon(source_port: int) -> list[bytes]:
        remote: RemotePages[str] = RemotePages("127.0.0.1", source_port, _pinned(nodes))
        # Replies read a page at a time (budget): the rest waits decrypted in TLS, where poll() cannot see it.
        got = _fill(remote, [(0x10000, 4), (0x14000, 8), (0x1C000, 4)])
        remote.finish()
        return got

    pumped, got = asyncio.run(_source(nodes, port, daemon))
    assert got == [b"".join(page(v + i * PAGE) for i in range(n)) for v, n in [(0x10000, 4), (0x14000, 8), (0x1C000, 4)]]
    assert pumped.ended_by == "remote" and pumped.to_remote >= 16 * PAGE
    assert after() == b""  # PS_IOV_CLOSE went through: CRIU's end closed in order, the transfer is complete


def test_a_daemon_gone_without_closing_the_session_resets_criu(
        nodes: Nodes, served: tuple[int, Callable[[], object]]) -> None:
    port, after = served

    def daemon(source_port: int) -> None:
        remote: RemotePages[str] = RemotePages("127.0.0.1", source_port, _pinned(nodes))
        _fill(remote, [(0x10000, 2)])
        remote.close()  # a failed fill: no PS_IOV_CLOSE

    pumped, _ = asyncio.run(_source(nodes, port, daemon))
    assert pumped.ended_by.startswith("error: remote") or pumped.ended_by == "remote"
    assert after() == "reset"  # CRIU lets the source run again


def test_only_the_target_with_the_token_gets_in(nodes: Nodes, served: tuple[int, Callable[[], object]]) -> None:
    """Another node of the cluster (its certificate chains to the same CA), or the target with another
    migration's token, is closed at once; the end still waits for the right daemon, which gets in."""
    port, after = served

    def daemon(source_port: int) -> list[bytes]:
        for intruder in (_pinned(nodes, who="other"), _pinned(nodes, token="f" * 32)):
            remote: RemotePages[str] = RemotePages("127.0.0.1", source_port, intruder)
            with pytest.raises(ConnectionError):
                _fill(remote, [(0x10000, 1)])
            remote.close()
        remote = RemotePages("127.0.0.1", source_port, _pinned(nodes))
        got = _fill(remote, [(0x10000, 1)])
        remote.finish()
        return got

    pumped, got = asyncio.run(_source(nodes, port, daemon))
    assert got == [page(0x10000)] and pumped.ended_by == "remote"
    assert after() == b""


def test_the_daemon_refuses_a_source_end_with_another_certificate(nodes: Nodes) -> None:
    """A page end presenting any certificate but the source's (here another node's) gets no hello: the
    daemon fails before it says which migration it serves."""
    heard: list[bytes] = []

    async def run() -> None:
        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.append(await reader.read(64))
            writer.close()

        server = await asyncio.start_server(impostor, "127.0.0.1", 0, ssl=node_tls.server_context(nodes["other"]))
        async with server:
            where = server.sockets[0].getsockname()[1]
            with pytest.raises(ConnectionRefusedError, match="other than the source node's"):
                await asyncio.to_thread(RemotePages, "127.0.0.1", where, _pinned(nodes))
            await asyncio.sleep(0)  # let the impostor's read see the close
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(run())
    assert hello(TOKEN) not in b"".join(heard)


def test_a_source_end_nobody_dials_says_so() -> None:
    async def run() -> tunnel.Pumped:
        end = tunnel.SourceEnd("0" * 64, TOKEN, 5.0)  # never opened: nothing can dial it
        return await lazy._Direct(end).pump((asyncio.StreamReader(), None), None, 0.05)  # type: ignore[arg-type]

    pumped = asyncio.run(run())
    assert pumped.ended_by.startswith("error: the restore's page daemon did not connect"), pumped.ended_by



def test_the_source_end_listens_on_the_port_asked_for_or_says_why_not(nodes: Nodes) -> None:
    async def run() -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        try:
            busy = taken.getsockname()[1]
            end = tunnel.SourceEnd(_digest(nodes["target"]), TOKEN, 5.0)
            with pytest.raises(FailedPrecondition, match=f"cannot listen for the page daemon on 127.0.0.1:{busy}: "):
                await end.open("127.0.0.1", nodes["source"], busy)
            end.close()
        finally:
            taken.close()
        end = tunnel.SourceEnd(_digest(nodes["target"]), TOKEN, 5.0)
        try:
            assert await end.open("127.0.0.1", nodes["source"], busy) == busy  # free again: there it is
        finally:
            end.close()

    asyncio.run(run())
