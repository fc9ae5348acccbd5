"""The ttrpc relay over real unix sockets: a fake runc shim upstream, raw and `Client` peers downstream.

The fake upstream is a ttrpc server built on `Connection`; it records every
byte it reads, so pass-through is judged byte for byte. Each test body is a
coroutine run by `TtrpcRelayEnv.run`, which starts the upstream and the relay around it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import Code, FailedPrecondition, ShimError
from shim.ttrpc import (
    Client,
    Connection,
    RelayServer,
    RequestReceived,
    ResponseReceived,
    Role,
    Status,
    TTRPCError,
)
from shim.ttrpc.relay import INTERNAL_MESSAGE, upstream_listening

TASK = "containerd.task.v2.Task"
CREATE = (TASK, "Create")
SECRET = "secret internal detail 0xdeadbeef"
TEST_TIMEOUT = 10.0


# -- the fake runc shim -------------------------------------------------------------


class FakeTaskServer:
    """A ttrpc server: Echo-ish Task methods, plus `Slow` (waits for `release`) and `Die` (closes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received = bytearray()  # every byte read, all connections
        self.sent = bytearray()
        self.requests: list[RequestReceived] = []
        self.connections = 0
        self.closed_connections = 0
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = Connection(Role.SERVER)
        answers: set[asyncio.Task[None]] = set()
        async with asyncio.TaskGroup() as tasks:
            while data := await reader.read(65536):
                self.received += data
                conn.receive_data(data)
                self._write(writer, conn.data_to_send())
                while (event := conn.next_event()) is not None:
                    if isinstance(event, RequestReceived):
                        self.requests.append(event)
                        if event.method == "Die":
                            writer.close()
                        else:
                            answers.add(tasks.create_task(self._answer(conn, writer, event)))
            self.closed_connections += 1
            writer.close()
            for task in answers:
                task.cancel()

    async def _answer(self, conn: Connection, writer: asyncio.StreamWriter, event: RequestReceived) -> None:
        if event.method == "Slow":
            self.slow_started.set()
            await self.release.wait()
        if event.method == "State" and event.payload == shim_pb2.StateRequest(id="nope").SerializeToString():
            frame = conn.send_response(event.stream_id, status=Status(Code.NOT_FOUND, "container not created: not found"))
        else:
            frame = conn.send_response(event.stream_id, f"{event.method}:".encode() + event.payload)
        self._write(writer, frame)

    def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data and not writer.is_closing():
            self.sent += data
            writer.write(data)


# -- downstream peers ---------------------------------------------------------------


class Raw:
    """containerd's end, driven by hand: frames built by a client `Connection`, bytes kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Role.CLIENT)
        self.received = bytearray()

    async def send(self, method: str, payload: bytes = b"", **kwargs: object) -> bytes:
        frame = self.conn.send_request(TASK, method, payload, **kwargs)  # type: ignore[arg-type]
        self.writer.write(frame)
        await self.writer.drain()
        return frame

    async def responses(self, count: int) -> list[ResponseReceived]:
        out: list[ResponseReceived] = []
        while len(out) < count:
            data = await self.reader.read(65536)
            assert data, "relay closed the connection"
            self.received += data
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not None:
                assert isinstance(event, ResponseReceived), event
                out.append(event)
        return out

    async def eof(self) -> bool:
        try:
            return await self.reader.read(65536) == b""
        except ConnectionError:
            return True


# -- the relay's rewrite --------------------------------------------------------------


REWRITES: list[tuple[str, str, bytes]] = []


async def rewrite(service: str, method: str, payload: bytes) -> bytes:
    REWRITES.append((service, method, payload))
    request = shim_pb2.CreateTaskRequest.FromString(payload)
    if request.id == "refused":
        raise FailedPrecondition(f"no checkpoint for {request.id}: ü 100%")
    if request.id == "broken":
        raise RuntimeError(SECRET)
    if request.id == "slow":
        await asyncio.sleep(30)
    request.checkpoint = "/checkpoints/" + request.id
    return bytes(request.SerializeToString())


def create(id_: str) -> bytes:
    return bytes(shim_pb2.CreateTaskRequest(id=id_, bundle="/run/bundle/" + id_).SerializeToString())


# -- the fixture ------------------------------------------------------------------------


class TtrpcRelayEnv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.upstream_path = root / "runc.sock"
        self.listen = root / "criu.sock"
        self.upstream: FakeTaskServer | None = None
        self.relay: RelayServer | None = None
        self.serving: asyncio.Task[None] | None = None
        self.raws: list[Raw] = []

    def run(self, test: Callable[[TtrpcRelayEnv], Awaitable[None]], *, upstream: bool = True, exit_when_idle: bool = False,
            still_needed: Callable[[], Awaitable[bool]] | None = None) -> None:
        REWRITES.clear()
        asyncio.run(self._main(test, upstream, exit_when_idle, still_needed))

    async def _main(self, test: Callable[[TtrpcRelayEnv], Awaitable[None]], upstream: bool, exit_when_idle: bool,
                    still_needed: Callable[[], Awaitable[bool]] | None) -> None:
        self.upstream = FakeTaskServer(self.upstream_path)
        if upstream:
            await self.upstream.start()
        self.relay = RelayServer(self.listen, self.upstream_path, rewrite, methods={CREATE}, exit_when_idle=exit_when_idle,
                                 still_needed=still_needed)
        self.serving = asyncio.create_task(self.relay.serve())
        try:
            async with asyncio.timeout(TEST_TIMEOUT):
                await self.relay.wait_ready()
                await test(self)
        finally:
            for raw in self.raws:
                raw.writer.close()
            self.relay.stop()
            async with asyncio.timeout(5):
                await self.serving
            await self.upstream.stop()

    async def raw(self) -> Raw:
        raw = Raw(*await asyncio.open_unix_connection(str(self.listen)))
        self.raws.append(raw)
        return raw


@pytest.fixture
def env() -> Iterator[TtrpcRelayEnv]:
    root = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))  # unix socket paths must stay short
    try:
        yield TtrpcRelayEnv(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- pass-through -------------------------------------------------------------------------


def test_pass_through_is_byte_identical_both_ways(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        sent = b""
        for method, payload in [("State", shim_pb2.StateRequest(id="nope").SerializeToString()),
                                ("Pids", b"\x0a\x01x"), ("Stats", b"y" * 100_000)]:
            sent += await raw.send(method, payload, metadata=(("k", "v"),), timeout_nano=10**9)
        got = await raw.responses(3)
        assert bytes(env.upstream.received) == sent  # type: ignore[union-attr]
        assert bytes(raw.received) == bytes(env.upstream.sent)  # type: ignore[union-attr]
        assert got[0].status == Status(Code.NOT_FOUND, "container not created: not found")
        assert got[2].payload == b"Stats:" + b"y" * 100_000
        assert REWRITES == []

    env.run(body)


def test_socket_is_private_and_removed_on_stop(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        assert stat.S_IMODE(env.listen.stat().st_mode) == 0o600

    env.run(body)
    assert not env.listen.exists()


# -- rewriting Create ---------------------------------------------------------------------


def test_create_is_rewritten_under_the_same_stream_id(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        await raw.send("State")
        await raw.send("Create", create("c1"), metadata=(("k", "v"),))
        await raw.send("Start", b"after")
        got = await raw.responses(3)
        upstream = env.upstream
        assert upstream is not None
        assert [(r.stream_id, r.method) for r in upstream.requests] == [(1, "State"), (3, "Create"), (5, "Start")]
        rewritten = shim_pb2.CreateTaskRequest.FromString(upstream.requests[1].payload)
        assert (rewritten.id, rewritten.bundle, rewritten.checkpoint) == ("c1", "/run/bundle/c1", "/checkpoints/c1")
        assert upstream.requests[1].metadata == (("k", "v"),)
        assert REWRITES == [(TASK, "Create", create("c1"))]
        by_id = {r.stream_id: r for r in got}
        assert by_id[3].payload == b"Create:" + upstream.requests[1].payload

    env.run(body)


def test_rewrite_raising_shim_error_answers_with_its_code(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as client:
            with pytest.raises(TTRPCError) as failed:
                await client.call(TASK, "Create", create("refused"))
            assert failed.value.status == Status(Code.FAILED_PRECONDITION, "no checkpoint for refused: ü 100%")
            assert await client.call(TASK, "State", b"next") == b"State:next"  # the connection goes on
        assert [r.method for r in env.upstream.requests] == ["State"]  # type: ignore[union-attr]

    env.run(body)


def test_unexpected_rewrite_error_answers_internal_without_details(env: TtrpcRelayEnv, caplog: pytest.LogCaptureFixture) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as client:
            with pytest.raises(TTRPCError) as failed:
                await client.call(TASK, "Create", create("broken"))
            assert failed.value.status == Status(Code.INTERNAL, INTERNAL_MESSAGE)
            assert SECRET not in str(failed.value)

    with caplog.at_level(logging.ERROR, logger="shim.ttrpc.relay"):
        env.run(body)
    assert SECRET in caplog.text and "Traceback" in caplog.text


def test_rewrite_outliving_the_deadline_answers_deadline_exceeded(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        await raw.send("Create", create("slow"), timeout_nano=100_000_000)
        [answer] = await raw.responses(1)
        assert answer.status_code == Code.DEADLINE_EXCEEDED
        assert env.upstream.requests == []  # type: ignore[union-attr]

    env.run(body)


# -- concurrency and connections ----------------------------------------------------------


def test_concurrent_streams_and_connections(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        upstream = env.upstream
        assert upstream is not None
        async with Client.connect(env.listen) as first, Client.connect(env.listen) as second:
            slow = asyncio.create_task(first.call(TASK, "Slow", b"s"))
            await upstream.slow_started.wait()
            results = await asyncio.gather(*(c.call(TASK, "State", b"%d" % i)
                                             for i in range(20) for c in (first, second)))
            assert sorted(results) == sorted(b"State:%d" % i for i in range(20) for _ in (1, 2))
            assert (await first.call(TASK, "Create", create("c2"))).startswith(b"Create:")
            assert not slow.done()
            upstream.release.set()
            assert await slow == b"Slow:s"
        assert upstream.connections == 2

    env.run(body)


def test_upstream_closing_closes_the_client(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as client:
            pending = asyncio.create_task(client.call(TASK, "Slow"))
            await env.upstream.slow_started.wait()  # type: ignore[union-attr]
            with pytest.raises(TTRPCError) as died:
                await client.call(TASK, "Die")
            assert died.value.status.code == Code.UNAVAILABLE
            with pytest.raises(TTRPCError):
                await pending
            await client.wait_closed()

    env.run(body)


def test_client_closing_closes_upstream(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        await raw.send("State")
        await raw.responses(1)
        raw.writer.close()
        while env.upstream.closed_connections < 1:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)

    env.run(body)


def test_upstream_unavailable_closes_the_client(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        assert await raw.eof()

    env.run(body, upstream=False)


def test_stop_closes_relayed_connections(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        await raw.send("State")
        await raw.responses(1)
        assert env.relay is not None
        env.relay.stop()
        assert await raw.eof()

    env.run(body)


def test_exit_when_idle_returns_after_the_last_connection(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as a:
            async with Client.connect(env.listen) as b:
                await b.call(TASK, "State")
            await asyncio.sleep(0.05)
            assert env.serving is not None and not env.serving.done()
            await a.call(TASK, "State")
        assert env.serving is not None
        await asyncio.wait_for(asyncio.shield(env.serving), 5)

    env.run(body, exit_when_idle=True)


def test_exit_when_idle_waits_out_a_reconnect(env: TtrpcRelayEnv) -> None:
    """A client that closes its connection and opens the next at once still finds the relay."""
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as first:
            await first.call(TASK, "State")
        async with Client.connect(env.listen) as second:  # well inside the grace period
            await second.call(TASK, "State")
            assert env.serving is not None and not env.serving.done()
        assert env.serving is not None
        await asyncio.wait_for(asyncio.shield(env.serving), 5)  # and idle for good: it ends

    env.run(body, exit_when_idle=True)


def test_idle_relay_stays_while_its_upstream_listens(env: TtrpcRelayEnv) -> None:
    """Like a shim, the relay outlives its client (containerd restarting) while the server behind it lives."""
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as first:
            await first.call(TASK, "State")
        assert env.serving is not None and env.upstream is not None
        done, _ = await asyncio.wait({asyncio.shield(env.serving)}, timeout=1.5)  # three graces
        assert not done, "the relay left while its upstream still listened"
        async with Client.connect(env.listen) as again:  # the client comes back through the relay
            await again.call(TASK, "State")
        await env.upstream.stop()  # the task is gone: the shim behind exits
        await asyncio.wait_for(asyncio.shield(env.serving), 5)

    env.run(body, exit_when_idle=True, still_needed=lambda: upstream_listening(env.upstream_path))


def test_peer_of_another_uid_is_refused(env: TtrpcRelayEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 12345)

    async def body(env: TtrpcRelayEnv) -> None:
        raw = await env.raw()
        assert await raw.eof()
        assert env.upstream.connections == 0  # type: ignore[union-attr]

    env.run(body)


def test_rewrite_sees_only_chosen_methods(env: TtrpcRelayEnv) -> None:
    async def body(env: TtrpcRelayEnv) -> None:
        async with Client.connect(env.listen) as client:
            await client.call("containerd.task.v3.Task", "Create", b"other service")
            await client.call(TASK, "Update", b"other method")
        assert REWRITES == []

    env.run(body)


def test_shim_error_from_rewrite_type_is_used(env: TtrpcRelayEnv) -> None:
    # Only the category's code reaches the peer; a bare ShimError is UNKNOWN.
    assert Status.of(ShimError("x")).code == Code.UNKNOWN
