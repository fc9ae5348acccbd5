"""gRPC channels to a local socket (containerd's) that ride out its restart.

gRPC backs off after a failed connection: 1 s growing to 120 s by default, and
while it backs off every call fails at once with UNAVAILABLE ("failed to
connect to all addresses"), even after the server is back. containerd's
socket is local and a restart of containerd takes a second or two, so:

- reconnection is tried again within 0.1 s, growing to 1 s at most;
- a call made while the channel is not connected first waits (at most
  `READY_WAIT`, and never past the call's own deadline) for the connection,
  then goes out as an ordinary fail-fast call. A kubelet call relayed through
  us right after containerd came back is then answered by containerd, not
  refused by our channel because a call of ours hit containerd while it was
  down; a containerd that stays down is still reported within `READY_WAIT`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
# The longest backoff (1 s, plus gRPC's 20 % jitter) and a connection, with room to spare.
READY_WAIT = 2.0


def local_channel(socket: Path) -> grpc.aio.Channel:
    waiting = _AwaitConnection()
    channel = grpc.aio.insecure_channel(f"unix://{socket}", options=RECONNECT, interceptors=[waiting])
    waiting.channel = channel
    return channel


async def connected(channel: grpc.aio.Channel, limit: float) -> bool:
    """Wait up to `limit` seconds for `channel` to be READY (asking it to connect); whether it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        remaining = deadline - loop.time()
        if state is grpc.ChannelConnectivity.SHUTDOWN or remaining <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


class _AwaitConnection(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    channel: grpc.aio.Channel | None = None

    async def intercept_unary_unary(self, continuation: Callable[[Any, Any], Any],
                                    client_call_details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        if self.channel is not None:
            timeout = client_call_details.timeout
            await connected(self.channel, READY_WAIT if timeout is None else min(READY_WAIT, timeout))
        return await continuation(client_call_details, request)
