"""Our channel to containerd's socket across a restart of the server behind it.

A real grpc.aio server on a unix socket stands for containerd; it is stopped
and started again on the same path, as containerd is when it restarts.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from shim.local_channel import READY_WAIT, local_channel

ECHO = "/test.Echo/Echo"


async def _serve(socket: Path) -> grpc.aio.Server:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


def _run(body: Callable[[Path], Awaitable[None]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(body(Path(tmp) / "containerd.sock"))


async def _fail_while_down(channel: grpc.aio.Channel, attempts: int) -> None:
    """Calls made while the server is down: each fails after waiting, and gRPC's backoff grows meanwhile."""
    for _ in range(attempts):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(ECHO)(b"x", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_call_right_after_the_server_is_back_is_answered() -> None:
    async def body(socket: Path) -> None:
        server = await _serve(socket)
        channel = local_channel(socket)
        try:
            assert await channel.unary_unary(ECHO)(b"before", timeout=5) == b"before"
            await server.stop(None)
            await _fail_while_down(channel, 1)
            # The channel now backs off for up to a second; a bare gRPC channel fails a call at once
            # with the last connection error until then (the kubelet's CreateContainer did so).
            server = await _serve(socket)
            assert await channel.unary_unary(ECHO)(b"after", timeout=5) == b"after"
        finally:
            await channel.close()
            await server.stop(None)

    _run(body)


def test_a_server_that_stays_down_is_reported_within_the_wait() -> None:
    async def body(socket: Path) -> None:
        channel = local_channel(socket)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary(ECHO)(b"x", timeout=30)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "No such file or directory" in (failed.value.details() or "")
            assert time.monotonic() - started < READY_WAIT + 3  # not the call's 30 s deadline
        finally:
            await channel.close()

    _run(body)


def test_a_short_deadline_is_kept_while_waiting() -> None:
    async def body(socket: Path) -> None:
        channel = local_channel(socket)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary(ECHO)(b"x", timeout=0.3)
            assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - started < READY_WAIT
        finally:
            await channel.close()

    _run(body)
