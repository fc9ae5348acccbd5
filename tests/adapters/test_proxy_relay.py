"""The proxy over real sockets: a grpc.aio server as containerd, grpc.aio clients as the kubelet.

No containerd here: the fake upstream speaks generic gRPC over raw bytes, so
the proxy's relaying is judged by comparing each call made directly to the
upstream with the same call made through the proxy. One method is intercepted
by the proxy's dispatcher and answered by the proxy itself.

Each test body is a coroutine run by `ProxyEnv.run` (plain `asyncio.run`), which
starts the upstream and the proxy around it and stops them afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from shim.errors import NotFound, Unknown
from shim.proxy import dispatch
from shim.proxy.dispatch import Call, Dispatcher
from shim.proxy.frames import PREFACE
from shim.proxy.server import ProxyServer

SERVICE = "test.Echo"
ECHO = f"/{SERVICE}/Echo"
FAIL = f"/{SERVICE}/Fail"
STREAM = f"/{SERVICE}/Stream"
SLEEP = f"/{SERVICE}/Sleep"
METADATA = f"/{SERVICE}/Metadata"
INTERCEPTED = f"/{SERVICE}/Intercepted"
UNKNOWN_METHOD = f"/{SERVICE}/NoSuchMethod"

MAX_MESSAGE = 16 << 20
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
CHANNEL_OPTIONS = SERVER_OPTIONS + [
    # Reconnect quickly, so recovery after the upstream comes back is fast.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
    # Room for the long status message test.
    ("grpc.max_metadata_size", 1 << 20),
    ("grpc.absolute_max_metadata_size", 1 << 20),
]
TEST_TIMEOUT = 10.0

FAIL_MESSAGE = "not now: ü 100% sure\ttab"
SHIM_ERROR_MESSAGE = "no checkpoint for ctr-1: ü 100%"
SECRET = "secret internal detail 0xdeadbeef"
LONG_MESSAGE = "criu dump failed:\n" + "log line\n" * 3000


# -- the fake containerd --------------------------------------------------------


class FakeCriServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.hits: Counter[str] = Counter()
        self.sleeping = asyncio.Event()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "Metadata": grpc.unary_unary_rpc_method_handler(self.metadata),
            "Intercepted": grpc.unary_unary_rpc_method_handler(self.intercepted),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hits["Echo"] += 1
        return request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hits["Fail"] += 1
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, FAIL_MESSAGE,
                            trailing_metadata=(("x-detail", "d-" + request.decode()),))
        raise AssertionError("unreachable")

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        self.hits["Stream"] += 1
        for i in range(int(request)):
            yield f"item-{i}:".encode() + b"s" * (i * 1000)

    async def sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hits["Sleep"] += 1
        self.sleeping.set()
        await asyncio.sleep(float(request))
        return b"slept"

    async def metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hits["Metadata"] += 1
        return json.dumps(sorted([k, v] for k, v in context.invocation_metadata() if k.startswith("x-"))).encode()

    async def intercepted(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hits["Intercepted"] += 1  # must never happen through the proxy
        return b"upstream answered"


# -- the intercepted method -------------------------------------------------------


ENTERED: list[bytes] = []  # requests the intercepted handler has started on


async def intercepted(call: Call) -> bytes:
    req = call.request
    ENTERED.append(req)
    if req == b"slow":
        await asyncio.sleep(0.3)
    if req == b"shim-error":
        raise NotFound(SHIM_ERROR_MESSAGE)
    if req == b"plain-error":
        raise RuntimeError(SECRET)
    if req == b"long-error":
        raise Unknown(LONG_MESSAGE)
    if req == b"sleep":
        await asyncio.sleep(30)
    if req == b"whoami":
        return json.dumps({
            "pid": call.peer.pid,
            "uid": call.peer.uid,
            "metadata": sorted([k, v] for k, v in call.metadata if k.startswith("x-")),
            "timeout": call.timeout,
        }).encode()
    if req.startswith(b"big:"):
        return b"len=%d" % len(req)
    return b"intercepted:" + req


# -- the fixture ----------------------------------------------------------------


class ProxyEnv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.upstream_path = root / "containerd.sock"
        self.listen = root / "run" / "criu-shim.sock"
        self.upstream: FakeCriServer | None = None
        self.proxy: ProxyServer | None = None
        self.serving: asyncio.Task[None] | None = None

    def run(self, test: Callable[[ProxyEnv], Awaitable[None]], *, upstream: bool = True) -> None:
        asyncio.run(self._main(test, upstream))

    async def _main(self, test: Callable[[ProxyEnv], Awaitable[None]], upstream: bool) -> None:
        self.upstream = FakeCriServer(self.upstream_path)
        if upstream:
            await self.upstream.start()
        try:
            await self.start_proxy()
            async with asyncio.timeout(TEST_TIMEOUT):
                await test(self)
        finally:
            await self.stop_proxy()
            await self.upstream.stop()

    async def start_proxy(self) -> None:
        self.proxy = ProxyServer(self.listen, self.upstream_path, Dispatcher({INTERCEPTED: intercepted}), grace=5.0)
        self.serving = asyncio.create_task(self.proxy.serve())
        ready = asyncio.create_task(self.proxy.wait_ready())
        await asyncio.wait([ready, self.serving], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        if self.serving.done():
            self.serving.result()  # raises what serve() died of
        assert ready.done(), "proxy did not become ready"

    async def stop_proxy(self) -> None:
        if self.proxy is not None and self.serving is not None and not self.serving.done():
            self.proxy.stop()
            async with asyncio.timeout(5):
                await self.serving

    def channel(self, via_proxy: bool = True) -> grpc.aio.Channel:
        path = self.listen if via_proxy else self.upstream_path
        return grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)


@pytest.fixture
def env() -> Iterator[ProxyEnv]:
    # Not tmp_path: a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="criu-shim-relay-", dir="/tmp"))
    try:
        yield ProxyEnv(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- helpers --------------------------------------------------------------------


Outcome = tuple


async def unary(channel: grpc.aio.Channel, method: str, request: bytes, **kwargs) -> Outcome:  # type: ignore[no-untyped-def]
    """The observable result of a unary call: the response, or code, details and x- trailers."""
    try:
        return ("OK", await channel.unary_unary(method)(request, **kwargs))
    except grpc.aio.AioRpcError as exc:
        trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k.startswith("x-"))
        return (exc.code(), exc.details(), trailers)


async def both(env: ProxyEnv, method: str, request: bytes, **kwargs) -> tuple[Outcome, Outcome]:  # type: ignore[no-untyped-def]
    async with env.channel(via_proxy=False) as direct, env.channel() as proxied:
        return await unary(direct, method, request, **kwargs), await unary(proxied, method, request, **kwargs)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 4.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- relaying -------------------------------------------------------------------


def test_unary_results_identical(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        for request in (b"", b"hello", bytes(range(256)) * 10):
            direct, proxied = await both(env, ECHO, request, timeout=3)
            assert direct == proxied == ("OK", request)
        assert env.upstream is not None and env.upstream.hits["Echo"] == 6

    env.run(body)


def test_error_status_message_and_trailers_identical(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        direct, proxied = await both(env, FAIL, b"abc", timeout=3)
        assert direct == proxied
        assert proxied == (grpc.StatusCode.FAILED_PRECONDITION, FAIL_MESSAGE, (("x-detail", "d-abc"),))

    env.run(body)


def test_unknown_method_gives_upstreams_unimplemented(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        direct, proxied = await both(env, UNKNOWN_METHOD, b"x", timeout=3)
        assert direct == proxied
        assert proxied[0] == grpc.StatusCode.UNIMPLEMENTED

    env.run(body)


def test_metadata_reaches_upstream(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        md = (("x-token", "abc"), ("x-trace-id", "t-1"), ("x-unicode", "plain"))
        direct, proxied = await both(env, METADATA, b"", metadata=md, timeout=3)
        assert direct == proxied
        assert json.loads(proxied[1]) == sorted([k, v] for k, v in md)

    env.run(body)


def test_deadline_exceeded_on_slow_upstream(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        direct, proxied = await both(env, SLEEP, b"2", timeout=0.2)
        assert direct[0] == proxied[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        async with env.channel() as ch:  # the proxy is fine afterwards
            assert await unary(ch, SLEEP, b"0", timeout=3) == ("OK", b"slept")

    env.run(body)


def test_server_streaming_yields_same_items(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        results = []
        async with env.channel(via_proxy=False) as direct, env.channel() as proxied:
            for ch in (direct, proxied):
                results.append([item async for item in ch.unary_stream(STREAM)(b"40", timeout=3)])
        assert results[0] == results[1]
        assert len(results[1]) == 40 and results[1][39].startswith(b"item-39:")

    env.run(body)


def test_four_mib_message_passes(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        payload = os.urandom(4 << 20)
        async with env.channel() as ch:
            assert await unary(ch, ECHO, payload, timeout=4) == ("OK", payload)
            # And a large request to the intercepted method: its DATA never reaches containerd.
            assert await unary(ch, INTERCEPTED, b"big:" + payload, timeout=4) == ("OK", b"len=%d" % (len(payload) + 4))
            assert await unary(ch, ECHO, b"after", timeout=3) == ("OK", b"after")

    env.run(body)


def test_two_hundred_concurrent_mixed_calls_on_one_channel(env: ProxyEnv) -> None:
    async def one(ch: grpc.aio.Channel, i: int) -> None:
        md = (("x-call", str(i)), ("x-shared", "s" * (i % 7)))
        kind = i % 6
        if kind == 0:
            req = f"echo-{i}".encode() * (1 + i % 50)
            assert await unary(ch, ECHO, req, metadata=md, timeout=5) == ("OK", req)
        elif kind == 1:
            req = f"icpt-{i}".encode() * (1 + (i * 97) % 3000)  # up to ~30 KiB answers
            assert await unary(ch, INTERCEPTED, req, metadata=md, timeout=5) == ("OK", b"intercepted:" + req)
        elif kind == 2:
            _, answer = await unary(ch, METADATA, b"", metadata=md, timeout=5)
            assert dict(json.loads(answer))["x-call"] == str(i)
        elif kind == 3:
            items = [x async for x in ch.unary_stream(STREAM)(str(i % 9).encode(), metadata=md, timeout=5)]
            assert [x.split(b":")[0] for x in items] == [f"item-{n}".encode() for n in range(i % 9)]
        elif kind == 4:
            outcome = await unary(ch, FAIL, str(i).encode(), metadata=md, timeout=5)
            assert outcome == (grpc.StatusCode.FAILED_PRECONDITION, FAIL_MESSAGE, (("x-detail", f"d-{i}"),))
        else:
            _, answer = await unary(ch, INTERCEPTED, b"whoami", metadata=md, timeout=5)
            assert ["x-call", str(i)] in json.loads(answer)["metadata"]

    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            await asyncio.gather(*(one(ch, i) for i in range(200)))
            # Still in step afterwards (HPACK state and windows on the one connection).
            await asyncio.gather(*(one(ch, i) for i in range(200, 260)))
        assert env.upstream is not None
        assert env.upstream.hits["Intercepted"] == 0
        assert env.upstream.hits["Echo"] == 44 and env.upstream.hits["Fail"] == 43

    env.run(body)


# -- the intercepted method -----------------------------------------------------------


def test_intercepted_call_answered_by_the_proxy(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            assert await unary(ch, INTERCEPTED, b"ping", timeout=3) == ("OK", b"intercepted:ping")
            _, answer = await unary(ch, INTERCEPTED, b"whoami", metadata=(("x-token", "tk"),), timeout=30)
        who = json.loads(answer)
        assert who["pid"] == os.getpid() and who["uid"] == os.getuid()  # SO_PEERCRED
        assert who["metadata"] == [["x-token", "tk"]]
        assert 25 < who["timeout"] <= 31  # grpc-timeout is rounded up on the wire
        assert env.upstream is not None and env.upstream.hits["Intercepted"] == 0

    env.run(body)


def test_intercepted_shim_error_gives_its_code_and_message(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            assert await unary(ch, INTERCEPTED, b"shim-error", timeout=3) == (
                grpc.StatusCode.NOT_FOUND, SHIM_ERROR_MESSAGE, ())

    env.run(body)


def test_intercepted_plain_exception_gives_fixed_internal_message(env: ProxyEnv, caplog: pytest.LogCaptureFixture) -> None:
    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            code, details, trailers = await unary(ch, INTERCEPTED, b"plain-error", timeout=3)
            assert (code, details) == (grpc.StatusCode.INTERNAL, dispatch.INTERNAL_MESSAGE)
            assert SECRET not in repr(trailers)
            assert await unary(ch, INTERCEPTED, b"ok", timeout=3) == ("OK", b"intercepted:ok")

    with caplog.at_level(logging.ERROR, logger="shim.proxy.dispatch"):
        env.run(body)
    assert SECRET in caplog.text  # the details went to the log instead


def test_intercepted_long_error_message_does_not_break_the_proxy(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            assert await unary(ch, INTERCEPTED, b"long-error", timeout=3) == (grpc.StatusCode.UNKNOWN, LONG_MESSAGE, ())
            assert await unary(ch, ECHO, b"still here", timeout=3) == ("OK", b"still here")

    env.run(body)


def test_intercepted_handler_exceeding_deadline(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        async with env.channel() as ch:
            start = time.monotonic()
            code, *_ = await unary(ch, INTERCEPTED, b"sleep", timeout=0.3)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 2
            assert await unary(ch, INTERCEPTED, b"next", timeout=3) == ("OK", b"intercepted:next")

    env.run(body)


# -- upstream availability ------------------------------------------------------------


def test_upstream_not_listening_then_started(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        assert env.upstream is not None
        async with env.channel() as ch:
            code, *_ = await unary(ch, ECHO, b"x", timeout=2)
            assert code == grpc.StatusCode.UNAVAILABLE
            await env.upstream.start()

            async def works() -> bool:
                return await unary(ch, ECHO, b"x", timeout=2) == ("OK", b"x")

            await eventually(works)

    env.run(body, upstream=False)


def test_upstream_stopped_mid_run_then_restarted(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        assert env.upstream is not None
        async with env.channel() as ch:
            assert await unary(ch, ECHO, b"1", timeout=3) == ("OK", b"1")
            await env.upstream.stop()

            async def unavailable() -> bool:
                outcome = await unary(ch, ECHO, b"2", timeout=2)
                assert outcome[0] in (grpc.StatusCode.UNAVAILABLE, "OK")
                return outcome[0] == grpc.StatusCode.UNAVAILABLE

            await eventually(unavailable)
            await env.upstream.start()

            async def works() -> bool:
                return await unary(ch, ECHO, b"3", timeout=2) == ("OK", b"3")

            await eventually(works)
            assert env.proxy is not None and env.serving is not None and not env.serving.done()

    env.run(body)


# -- the listening socket and shutdown ------------------------------------------------


def test_listen_socket_mode(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        mode = os.stat(env.listen).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660

    env.run(body)


def test_stop_lets_a_relayed_call_in_flight_finish(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        assert env.upstream is not None and env.proxy is not None and env.serving is not None
        async with env.channel() as ch:
            call = asyncio.create_task(unary(ch, SLEEP, b"0.5", timeout=4))
            await asyncio.wait_for(env.upstream.sleeping.wait(), 3)
            env.proxy.stop()
            assert await call == ("OK", b"slept")
            await asyncio.wait_for(env.serving, 3)  # serve() returns once drained
        assert not env.listen.exists()

    env.run(body)


def test_stop_lets_an_intercepted_call_in_flight_finish(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        assert env.proxy is not None and env.serving is not None
        ENTERED.clear()
        async with env.channel() as ch:
            call = asyncio.create_task(unary(ch, INTERCEPTED, b"slow", timeout=4))

            async def entered() -> bool:
                return b"slow" in ENTERED

            await eventually(entered)
            env.proxy.stop()
            assert await call == ("OK", b"intercepted:slow")
            await asyncio.wait_for(env.serving, 3)

    env.run(body)


# -- not HTTP/2 -----------------------------------------------------------------------


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(3):
        return await reader.read()


def test_garbage_is_relayed_raw(env: ProxyEnv) -> None:
    """With a raw upstream, the exact bytes go through both ways."""
    received = bytearray()

    async def raw_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readexactly(len(request)))
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    request = b"GET / HTTP/1.1\r\nHost: criu-shim\r\n\r\n\x00\xff"

    async def body(env: ProxyEnv) -> None:
        server = await asyncio.start_unix_server(raw_upstream, str(env.upstream_path))
        try:
            reader, writer = await asyncio.open_unix_connection(str(env.listen))
            writer.write(request)
            await writer.drain()
            assert await _read_to_eof(reader) == b"HTTP/1.1 400 Bad Request\r\n\r\n"
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        assert bytes(received) == request

    env.run(body, upstream=False)


def test_garbage_to_grpc_upstream_closes_connection_and_proxy_survives(env: ProxyEnv) -> None:
    async def body(env: ProxyEnv) -> None:
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3,  # not HTTP/2: relayed, containerd hangs up
            PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01",  # HTTP/2, then a 16 MiB frame header
            PREFACE + b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xfe",  # undecodable HPACK
        ):
            reader, writer = await asyncio.open_unix_connection(str(env.listen))
            writer.write(garbage)
            await writer.drain()
            await _read_to_eof(reader)  # closed, and promptly
            writer.close()
        assert env.serving is not None and not env.serving.done()
        async with env.channel() as ch:
            assert await unary(ch, ECHO, b"fine", timeout=3) == ("OK", b"fine")
            assert await unary(ch, INTERCEPTED, b"fine", timeout=3) == ("OK", b"intercepted:fine")

    env.run(body)
