"""A small asyncio ttrpc client over the engine: unary calls on one unix socket connection.

    async with Client.connect(path) as client:
        reply = await client.call("containerd.task.v2.Task", "Connect", request_bytes)

Calls run concurrently; each waits for the Response on its own stream id. An
error status raises `TTRPCError` carrying it; a closed connection fails the
calls in flight with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from shim.errors import Code
from shim.ttrpc.connection import Connection, Role
from shim.ttrpc.events import ConnectionClosed, ResponseReceived, StreamRejected
from shim.ttrpc.status import Status

_READ_SIZE = 256 << 10


class TTRPCError(Exception):
    """A call ended with an error status (from the server, or for the connection's end)."""

    def __init__(self, status: Status) -> None:
        super().__init__(f"{status.code.name}: {status.message}")
        self.status = status


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = Connection(Role.CLIENT)
        self._calls: dict[int, asyncio.Future[bytes]] = {}
        self._closed = asyncio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: Path | str) -> AsyncIterator[Client]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = cls(reader, writer)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(client._receive())
            try:
                yield client
            finally:
                client.close()

    async def call(self, service: str, method: str, payload: bytes = b"", *, timeout: float | None = None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
        """The response payload; raises `TTRPCError` for an error status."""
        if self._closed.is_set():
            raise TTRPCError(Status(Code.UNAVAILABLE, "ttrpc: closed"))
        stream_id = self._conn.next_stream_id
        frame = self._conn.send_request(service, method, payload, metadata=metadata,
                                        timeout_nano=int(timeout * 1e9) if timeout else 0)
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._calls[stream_id] = reply
        try:
            self._writer.write(frame)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                return await reply
        except TimeoutError:
            raise TTRPCError(Status(Code.DEADLINE_EXCEEDED, "context deadline exceeded")) from None
        except ConnectionError as exc:
            raise TTRPCError(Status(Code.UNAVAILABLE, f"ttrpc: closed: {exc}")) from None
        finally:
            self._calls.pop(stream_id, None)

    async def wait_closed(self) -> None:
        """Until the server has closed the connection (or `close` was called)."""
        await self._closed.wait()

    def close(self) -> None:
        self._writer.close()
        self._fail_all()

    async def _receive(self) -> None:
        try:
            while data := await self._reader.read(_READ_SIZE):
                self._conn.receive_data(data)
                self._dispatch()
        except ConnectionError:
            pass
        finally:
            self._fail_all()

    def _dispatch(self) -> None:
        while (event := self._conn.next_event()) is not None:
            if isinstance(event, ResponseReceived | StreamRejected) and (reply := self._calls.get(event.stream_id)):
                if reply.done():
                    continue
                if isinstance(event, StreamRejected):
                    reply.set_exception(TTRPCError(Status(event.code, event.message)))
                elif event.status_code == Code.OK:
                    reply.set_result(event.payload)
                else:
                    reply.set_exception(TTRPCError(event.status))
            elif isinstance(event, ConnectionClosed):
                self._fail_all()

    def _fail_all(self) -> None:
        self._closed.set()
        for reply in self._calls.values():
            if not reply.done():
                reply.set_exception(TTRPCError(Status(Code.UNAVAILABLE, "ttrpc: closed")))
