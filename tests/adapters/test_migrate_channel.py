"""The migration channel over real TLS sockets on loopback, and the receiver's archive intake."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.errors import InvalidArgument, NotFound, ShimError, Unavailable
from shim.migrate import channel, receiver
from shim.migrate.runtime import PodView
from shim.node import pki


def _node(pki_dir: Path, ca: pki.CertPair, name: str) -> channel.Credentials:
    pair = pki.issue(ca, pki.CertPair(pki_dir / f"{name}.crt", pki_dir / f"{name}.key"), name, server=True,
                     client=True, ips=("127.0.0.1",))
    return channel.Credentials(pair.cert, pair.key, ca.cert)


@pytest.fixture
def cluster(tmp_path: Path) -> tuple[channel.Credentials, channel.Credentials]:
    ca = pki.create_ca(tmp_path / "ca", "test cluster")
    return _node(tmp_path, ca, "node-a"), _node(tmp_path, ca, "node-b")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _with_server(creds: channel.Credentials, handler: Handler,
                       client: Callable[[str], Awaitable[object]]) -> object:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=channel.server_context(creds))
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await client(f"127.0.0.1:{port}")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        message = await channel.receive(reader)
        await channel.send(writer, {"echo": message, "peer": writer.get_extra_info("peercert")["subject"]})
    except ShimError as exc:
        await channel.send(writer, {"error": exc.message})
    finally:
        writer.close()


def test_nodes_of_one_cluster_talk_and_see_each_other(cluster: tuple[channel.Credentials, ...]) -> None:
    a, b = cluster

    async def client(address: str) -> object:
        reader, writer = await channel.connect(address, a, 5, 5)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        await channel.send(writer, {"op": "preflight", "n": 1})
        reply = await channel.receive(reader)
        writer.close()
        return reply

    reply = asyncio.run(_with_server(b, _echo, client))
    assert isinstance(reply, dict) and reply["echo"] == {"op": "preflight", "n": 1}
    assert "node-a" in str(reply["peer"])  # the receiver knows which node is calling


def test_a_client_of_another_cluster_is_refused(cluster: tuple[channel.Credentials, ...], tmp_path: Path) -> None:
    _, b = cluster
    other_ca = pki.create_ca(tmp_path / "other", "other cluster")
    stranger = _node(tmp_path / "s", other_ca, "stranger")
    # It trusts our CA (it read our ca.crt), but its own certificate is not ours.
    stranger = channel.Credentials(stranger.cert, stranger.key, b.ca)

    async def client(address: str) -> object:
        reader, writer = await channel.connect(address, stranger, 5, 5)
        await channel.send(writer, {"op": "preflight"})
        return await channel.receive(reader)

    with pytest.raises(Unavailable, match="closed the connection"):
        asyncio.run(_with_server(b, _echo, client))


def test_a_receiver_of_another_cluster_is_refused(cluster: tuple[channel.Credentials, ...], tmp_path: Path) -> None:
    a, _ = cluster
    impostor = _node(tmp_path / "i", pki.create_ca(tmp_path / "other", "other cluster"), "impostor")

    async def client(address: str) -> object:
        return await channel.connect(address, a, 5, 5)

    with pytest.raises(Unavailable, match="is not a node of this cluster"):
        asyncio.run(_with_server(impostor, _echo, client))


@pytest.mark.parametrize(("raw", "error"), [
    (struct.pack(">I", channel.MAX_MESSAGE + 1), "migration message of 65537 bytes"),
    (struct.pack(">I", 5) + b"nope!", "not JSON"),
    (struct.pack(">I", 2) + b"[]", "not a JSON object"),
])
def test_garbage_messages_are_refused(raw: bytes, error: str) -> None:
    async def read() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        await channel.receive(reader)

    with pytest.raises(InvalidArgument, match=error):
        asyncio.run(read())


def test_fields_are_type_checked() -> None:
    assert channel.field({"size": 3}, "size", int) == 3
    for bad in ({"size": "3"}, {"size": True}, {}):
        with pytest.raises(InvalidArgument, match="field 'size'"):
            channel.field(bad, "size", int)
    for address in ("nonsense", "host:", ":80", "h:0", "h:70000"):
        with pytest.raises(InvalidArgument, match="expected HOST:PORT"):
            channel.parse_address(address)
    assert channel.parse_address("[::1]:7543") == ("::1", 7543)


def _settings(tmp_path: Path) -> receiver.ReceiverSettings:
    creds = channel.Credentials(tmp_path / "c", tmp_path / "k", tmp_path / "ca")
    return receiver.ReceiverSettings("127.0.0.1:1", tmp_path / "cri.sock", tmp_path, creds, None, idle_timeout=0.5)


def test_an_archive_arrives_whole_and_private(tmp_path: Path) -> None:
    async def run() -> Path:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 3_000_000)
        return await receiver._receive_archive(_settings(tmp_path), reader, 3_000_000, "server")

    archive = asyncio.run(run())
    assert archive.read_bytes() == b"x" * 3_000_000 and archive.stat().st_mode & 0o777 == 0o600
    assert archive.name.startswith("migrate-server-") and [p.name for p in tmp_path.iterdir()] == [archive.name]


@pytest.mark.parametrize("eof", [True, False])
def test_a_cut_archive_leaves_nothing(tmp_path: Path, eof: bool) -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 1000)
        if eof:
            reader.feed_eof()  # the peer went away; else it fell silent (a cut link)
        await receiver._receive_archive(_settings(tmp_path), reader, 5000, "server")

    with pytest.raises(Unavailable, match="cut off after 1000 of 5000 bytes" if eof else "stopped arriving"):
        asyncio.run(run())
    assert not list(tmp_path.iterdir())


def test_an_archive_that_does_not_fit_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    async def run() -> None:
        await receiver._receive_archive(_settings(tmp_path), asyncio.StreamReader(), 1 << 62, "server")

    with pytest.raises(ShimError, match="does not fit"):
        asyncio.run(run())
    assert not list(tmp_path.iterdir())


def _pod(annotations: dict[str, str], ips: tuple[str, ...] = ("10.234.9.4",)) -> PodView:
    return PodView("id", "tests", "web", True, ips, annotations)


@pytest.mark.parametrize(("pod", "hook", "live", "error"), [
    (_pod({}), True, {}, "lacks annotation checkpoint.criu-shim.io/tcp-established"),
    (_pod({receiver.TCP_ANNOTATION: "true"}), False, {}, "cannot move to this node: it has no address hook"),
    (_pod({receiver.TCP_ANNOTATION: "true"}), True, {"10.234.1.7": "tests/other"},
     "pod IP 10.234.1.7 is held by live pod tests/other"),
    (_pod({receiver.TCP_ANNOTATION: "true"}, ("fd00::4",)), True, {}, "has no IPv4 address to route 10.234.1.7"),
])
def test_where_the_address_cannot_move_it_is_said_at_preflight(
        tmp_path: Path, pod: PodView, hook: bool, live: dict[str, str], error: str) -> None:
    settings = _settings(tmp_path)
    if hook:
        settings = receiver.ReceiverSettings(settings.listen, settings.runtime, tmp_path, settings.creds,
                                             tmp_path / "hook")
    with pytest.raises(ShimError, match=error):
        receiver._check_addresses_can_move(settings, pod, ["10.234.1.7"], live)


class _FakeRuntime:
    """The receiver's view of its node's CRI: one pod, restores recorded, removals recorded."""

    def __init__(self, pod: PodView | None, restore_error: ShimError | None = None,
                 lookup_error: ShimError | None = None) -> None:
        self._pod, self._error, self._lookup_error = pod, restore_error, lookup_error
        self.restored: list[Path] = []
        self.removed: list[str] = []

    async def pod_by_id(self, pod_id: str) -> PodView:
        if self._lookup_error is not None:
            raise self._lookup_error
        if self._pod is None:
            raise NotFound(f"pod {pod_id} not found")  # what CRI answers for a removed pod
        return self._pod

    async def create_restored(self, pod_id: str, archive: Path, name: str, timeout: float,
                              sandbox: object = None) -> str:
        return "ctr-1"

    async def start_restored(self, container_id: str, timeout: float) -> None:
        if self._error is not None:  # the real one removes what it created before raising
            raise self._error
        self.restored.append(Path(container_id))

    async def remove(self, container_id: str) -> None:
        self.removed.append(container_id)


def _restore_with(tmp_path: Path, runtime: _FakeRuntime, hook_exit: int) -> dict[str, object]:
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho \"hook $*\" >> {tmp_path}/hook.log\nexit {hook_exit}\n")
    hook.chmod(0o700)
    archives = tmp_path / "checkpoints"
    archives.mkdir()
    settings = receiver.ReceiverSettings("127.0.0.1:1", tmp_path / "cri.sock", archives, _settings(tmp_path).creds,
                                         hook, idle_timeout=0.5)
    migration = receiver._Migration(_pod({receiver.TCP_ANNOTATION: "true"}), "server", ["10.234.1.7"])

    async def run() -> dict[str, object]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"a" * 4096)
        return await receiver._restore(settings, runtime, migration, {"size": 4096}, reader, "10.0.0.1")  # type: ignore[arg-type]

    return asyncio.run(run())


def test_the_address_is_claimed_only_after_the_container_runs(tmp_path: Path) -> None:
    runtime = _FakeRuntime(_pod({receiver.TCP_ANNOTATION: "true"}))
    reply = _restore_with(tmp_path, runtime, 0)
    assert reply["container_id"] == "ctr-1" and len(runtime.restored) == 1
    assert (tmp_path / "hook.log").read_text() == "hook claim 10.234.1.7 10.234.9.4\n"


@pytest.mark.parametrize("case", ["hook fails", "restore fails", "pod deleted", "runtime down"])
def test_a_failed_restore_leaves_nothing_on_the_target(tmp_path: Path, case: str) -> None:
    pod = None if case == "pod deleted" else _pod({receiver.TCP_ANNOTATION: "true"})
    down = Unavailable("containerd at /run/x.sock is unavailable") if case == "runtime down" else None
    runtime = _FakeRuntime(pod, ShimError("CRIU said no") if case == "restore fails" else None, down)
    # a runtime that does not answer is said as such, never as a deleted pod
    with pytest.raises(ShimError, match={"hook fails": "address hook", "restore fails": "CRIU said no",
                                         "pod deleted": "was deleted during the migration",
                                         "runtime down": r"could not look up target pod tests/web \(containerd at "
                                                         "/run/x.sock is unavailable"}[case]):
        _restore_with(tmp_path, runtime, 1)
    assert runtime.removed == (["ctr-1"] if case == "hook fails" else [])  # a restored container is removed
    assert not list((tmp_path / "checkpoints").iterdir())  # and the archive that arrived


class _BrokenWriter:
    """A writer whose connection the kernel has given up on (what drain raises then)."""

    def __init__(self, error: OSError) -> None:
        self.error = error

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "said"), [
    (OSError(101, "Network is unreachable"), "the migration peer stopped answering (Network is unreachable)"),
    (TimeoutError(110, "Connection timed out"), "the migration peer stopped answering (Connection timed out)"),
    (ConnectionResetError(104, "Connection reset by peer"), "the migration peer closed the connection"),
])
def test_a_send_the_kernel_refuses_is_the_peer_gone(error: OSError, said: str) -> None:
    """Found with the link cut mid-fill: the route to the target gone, the source's last word to it
    raised ENETUNREACH and `migrate` ended with a bare errno instead of saying what became of both."""
    with pytest.raises(Unavailable, match=said.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(channel.send(_BrokenWriter(error), {"op": "finished"}))  # type: ignore[arg-type]
