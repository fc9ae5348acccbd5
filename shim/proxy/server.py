"""The asyncio side of the proxy: sockets in, splice engine in the middle.

One `Splice` per client connection, with its own upstream connection to
containerd. asyncio Protocols rather than streams: a relay wants callbacks,
not a task switch per read. Diverted calls run as tasks of the server's
TaskGroup; each is cancelled if its client resets it or goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import cast

from shim.errors import ShimError
from shim.peer import UNKNOWN, Peer, credentials
from shim.proxy.dispatch import Dispatcher
from shim.proxy.frames import FramingError
from shim.proxy.splice import CallCancelled, CallReceived, Splice

log = logging.getLogger(__name__)


class ProxyServer:
    """Serves CRI on `listen`, relaying to `upstream`; `stop()` drains and returns."""

    def __init__(self, listen: Path, upstream: Path, dispatcher: Dispatcher, grace: float = 10.0) -> None:
        self.listen = listen
        self.upstream = upstream
        self.dispatcher = dispatcher
        self.grace = grace
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._connections: set[_ClientSide] = set()

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.listen.parent.mkdir(parents=True, exist_ok=True)
        self.listen.unlink(missing_ok=True)
        async with asyncio.TaskGroup() as tasks:
            old_umask = os.umask(0o117)  # the socket is never world-accessible, not even briefly
            try:
                server = await loop.create_unix_server(lambda: _ClientSide(self, tasks), str(self.listen))
            finally:
                os.umask(old_umask)
            os.chmod(self.listen, 0o660)
            self._ready.set()
            log.info("serving CRI on %s, relaying to %s", self.listen, self.upstream)
            await self._stop.wait()
            server.close()
            await self._drain()
        self.listen.unlink(missing_ok=True)

    async def _drain(self) -> None:
        for conn in list(self._connections):
            conn.start_draining()
        try:
            async with asyncio.timeout(self.grace):
                while any(c.busy for c in self._connections):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            log.warning("grace period of %.1fs over; closing connections with calls in flight", self.grace)
        for conn in list(self._connections):
            conn.close()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:
        self.client.pause_reading()

    def resume_writing(self) -> None:
        self.client.resume_reading()


class _ClientSide(asyncio.Protocol):
    """One kubelet (or crictl) connection."""

    def __init__(self, server: ProxyServer, tasks: asyncio.TaskGroup) -> None:
        self.server = server
        self.tasks = tasks
        self.splice = Splice(server.dispatcher.intercepts)
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.peer = UNKNOWN
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.closed = False

    @property
    def busy(self) -> bool:
        return self.splice.busy

    # -- lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _peer_of(transport)
        # Until upstream is connected. uvloop may still deliver a first read, so
        # _flush also holds data for upstream until there is an upstream.
        self.transport.pause_reading()
        self.server._connections.add(self)
        self.tasks.create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_unix_connection(lambda: _UpstreamSide(self), str(self.server.upstream))
        except OSError as exc:
            # The client sees the connection close and reports UNAVAILABLE, as it
            # would if containerd itself were not listening.
            log.warning("containerd at %s is unavailable: %s", self.server.upstream, exc)
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        assert self.transport is not None
        self.transport.resume_reading()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def upstream_lost(self) -> None:
        self.close()

    def start_draining(self) -> None:
        self.splice.start_draining()
        self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server._connections.discard(self)
        for task in self.calls.values():
            task.cancel()
        for transport in (self.transport, self.upstream):
            if transport is not None:
                transport.close()

    # -- data -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self.splice.receive_from_client(data)
        except FramingError as exc:
            log.warning("closing client connection (pid %d): %s", self.peer.pid, exc)
            self.close()
            return
        self._flush()

    def from_upstream(self, data: bytes) -> None:
        try:
            self.splice.receive_from_upstream(data)
        except FramingError as exc:
            log.warning("closing connection: containerd sent bad HTTP/2: %s", exc)
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        if self.upstream is not None:  # until connected, the splice keeps what it has for upstream
            if up := self.splice.data_for_upstream():
                self.upstream.writelines(up)
        down = self.splice.data_for_client()
        if down and self.transport is not None:
            self.transport.writelines(down)
        while (event := self.splice.next_event()) is not None:
            if isinstance(event, CallReceived):
                self.calls[event.stream_id] = self.tasks.create_task(self._answer(event))
            elif isinstance(event, CallCancelled) and (task := self.calls.pop(event.stream_id, None)):
                task.cancel()

    async def _answer(self, event: CallReceived) -> None:
        try:
            reply = await self.server.dispatcher.call(
                event.method, event.body, event.metadata, event.timeout, self.peer)
        except ShimError as exc:
            self.splice.fail(event.stream_id, exc)
        else:
            self.splice.respond(event.stream_id, reply)
        finally:
            self.calls.pop(event.stream_id, None)
        self._flush()

    # -- back-pressure: a slow reader on one side pauses the other ------------

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


def _peer_of(transport: asyncio.BaseTransport) -> Peer:
    return credentials(transport.get_extra_info("socket")) or UNKNOWN
