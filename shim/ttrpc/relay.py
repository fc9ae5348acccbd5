"""The asyncio side of the ttrpc relay: containerd's connections in, one upstream connection each.

containerd talks to the task through our socket; each connection it opens is
spliced (`shim.ttrpc.splice`) to a connection of its own to the upstream
ttrpc server (containerd-shim-runc-v2). Frames pass through unchanged, except
Requests the caller chose to rewrite: `rewrite(service, method, payload)`
returns the payload sent upstream in its place, under the same stream id, or
an `Answer`: the reply the relay sends containerd itself (upstream never sees
that request).

The error edge is here: a `ShimError` from `rewrite` answers that stream with
its code and message; anything else answers INTERNAL with a fixed message
(the traceback goes to the log only); a rewrite that outlives the request's
deadline answers DEADLINE_EXCEEDED. Every task belongs to a TaskGroup: the
server's owns the connections, each connection's owns its two pumps and its
rewrites. Either side closing closes both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Code, ShimError
from shim.peer import credentials
from shim.ttrpc.splice import RewriteRequested, Splice
from shim.ttrpc.status import Status


@dataclass(frozen=True, slots=True)
class Answer:
    """What a rewrite returns to answer a request itself: `payload` is the successful reply."""

    payload: bytes


Rewrite = Callable[[str, str, bytes], Awaitable[bytes | Answer]]

INTERNAL_MESSAGE = "criu-shim: internal error (details are in the criu-shim log)"
_READ_SIZE = 256 << 10
# How often an idle relay asks whether it is still needed (only while no client is connected).
IDLE_RECHECK = 1.0
log = logging.getLogger(__name__)


Upstream = Path | Callable[[], Path]


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Upstream, rewrite: Rewrite,
                methods: Collection[tuple[str, str]] | None = None) -> None:
    """Relay one accepted connection to a new connection to `upstream`, until either side closes.

    `upstream` may be a callable, asked at each connection (the address may not
    be known when the relay starts listening).
    `methods`: the (service, method) pairs whose Requests go through `rewrite`;
    None sends every Request through it.
    """
    try:
        try:
            target = upstream() if callable(upstream) else upstream
            up_reader, up_writer = await asyncio.open_unix_connection(str(target))
        except OSError as exc:
            # The client sees the connection close, as it would if upstream were not listening.
            log.warning("upstream ttrpc server at %s is unavailable: %s", upstream, exc)
            return
        wanted = _all if methods is None else (lambda service, method: (service, method) in methods)
        async with asyncio.TaskGroup() as tasks:
            link = _Link(Splice(wanted), writer, up_writer, rewrite, tasks)
            tasks.create_task(link.pump(reader, link.splice.receive_from_client, up_writer))
            tasks.create_task(link.pump(up_reader, link.splice.receive_from_upstream, writer))
    finally:
        writer.close()  # already closed by the link, unless it never started


def _all(service: str, method: str) -> bool:
    return True


class _Link:
    def __init__(self, splice: Splice, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter,
                 rewrite: Rewrite, tasks: asyncio.TaskGroup) -> None:
        self.splice = splice
        self.client = client
        self.upstream = upstream
        self.rewrite = rewrite
        self.tasks = tasks
        self.rewrites: dict[int, asyncio.Task[None]] = {}
        self.closed = False

    async def pump(self, reader: asyncio.StreamReader, feed: Callable[[bytes], None],
                   towards: asyncio.StreamWriter) -> None:
        """Feed what `reader` gets to the splice until EOF; then close everything."""
        try:
            while data := await reader.read(_READ_SIZE):
                feed(data)
                self.flush()
                await towards.drain()  # back-pressure: a slow reader there pauses this side
        except ConnectionError:
            pass
        finally:
            self.close()

    def flush(self) -> None:
        if self.closed:
            return
        if up := self.splice.data_for_upstream():
            self.upstream.writelines(up)
        if down := self.splice.data_for_client():
            self.client.writelines(down)
        while (event := self.splice.next_event()) is not None:
            self.rewrites[event.stream_id] = self.tasks.create_task(self._rewrite(event))

    async def _rewrite(self, event: RewriteRequested) -> None:
        request = event.request
        deadline = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        try:
            async with asyncio.timeout(deadline) as scope:
                payload = await self.rewrite(request.service, request.method, request.payload)
        except ShimError as exc:
            self.splice.fail(event.stream_id, Status.of(exc))
        except TimeoutError:
            if not scope.expired():
                self._unexpected(event)
            else:
                self.splice.fail(event.stream_id, Status(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))
        except Exception:
            self._unexpected(event)
        else:
            if isinstance(payload, Answer):
                self.splice.answer(event.stream_id, payload.payload)
            else:
                self.splice.forward(event.stream_id, payload)
        finally:
            self.rewrites.pop(event.stream_id, None)
        self.flush()

    def _unexpected(self, event: RewriteRequested) -> None:
        log.exception("rewriting %s/%s (stream %d) failed unexpectedly",
                      event.request.service, event.request.method, event.stream_id)
        self.splice.fail(event.stream_id, Status(Code.INTERNAL, INTERNAL_MESSAGE))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.rewrites.values():
            task.cancel()
        self.client.close()
        self.upstream.close()


class RelayServer:
    """Listens on `listen` and relays each connection to its own connection to `upstream`.

    `serve()` returns after `stop()` (closing every relayed connection), or,
    with `exit_when_idle`, once no connection has been open for `idle_grace`
    seconds (a client that closes one connection and opens the next at once
    finds the relay still there) and `still_needed()` (if given) says False;
    while it says True the relay stays, asking again every `IDLE_RECHECK`
    seconds (a shim's client, containerd, may be restarting).
    `listen` may be a path (a 0600 socket is made there and removed on return)
    or an already listening unix socket (such as one a shim manager passed on).
    Only peers with our effective uid are served (ttrpc's UnixSocketRequireSameUser).
    """

    def __init__(self, listen: Path | socket.socket, upstream: Upstream, rewrite: Rewrite, *,
                 methods: Collection[tuple[str, str]] | None = None, exit_when_idle: bool = False,
                 idle_grace: float = 0.5, still_needed: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.listen = listen
        self.upstream = upstream
        self.rewrite = rewrite
        self.methods = methods
        self.exit_when_idle = exit_when_idle
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._connections: set[asyncio.Task[None]] = set()
        self._idle_grace = idle_grace
        self._still_needed = still_needed
        self._idle: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def serve(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                server = await self._start(tasks)
                self._ready.set()
                log.info("relaying ttrpc from %s to %s", self.listen, self.upstream)
                try:
                    await self._stop.wait()
                finally:
                    server.close()
                    for task in self._connections:
                        task.cancel()
                    if self._idle is not None:
                        self._idle.cancel()
        finally:
            if isinstance(self.listen, Path):
                self.listen.unlink(missing_ok=True)

    async def _start(self, tasks: asyncio.TaskGroup) -> asyncio.Server:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._accept(reader, writer, tasks)

        if not isinstance(self.listen, Path):
            return await asyncio.start_unix_server(accept, sock=self.listen)
        self.listen.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is never accessible to others, not even briefly
        try:
            return await asyncio.start_unix_server(accept, path=str(self.listen))
        finally:
            os.umask(old_umask)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tasks: asyncio.TaskGroup) -> None:
        if self._stop.is_set():
            writer.close()
            return
        uid = _peer_uid(writer)
        if uid != os.geteuid():
            log.warning("refusing a ttrpc connection from uid %s (not ours)", uid)
            writer.close()
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        task = tasks.create_task(relay(reader, writer, self.upstream, self.rewrite, self.methods))
        self._connections.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if (self.exit_when_idle and not self._connections and self._idle is None and not self._stop.is_set()
                and self._tasks is not None):
            self._idle = self._tasks.create_task(self._while_idle())

    async def _while_idle(self) -> None:
        """Stop once idle for the grace period and no longer needed (cancelled by a new connection)."""
        await asyncio.sleep(self._idle_grace)
        while self._still_needed is not None and await self._still_needed():
            await asyncio.sleep(IDLE_RECHECK)  # a poll period, not a synchronisation
        self._stop.set()


async def serve_relay(listen: Path | socket.socket, upstream: Upstream, rewrite: Rewrite, *,
                      methods: Collection[tuple[str, str]] | None = None, exit_when_idle: bool = False,
                      still_needed: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Run a `RelayServer` until it stops (see there)."""
    await RelayServer(listen, upstream, rewrite, methods=methods, exit_when_idle=exit_when_idle,
                      still_needed=still_needed).serve()


async def upstream_listening(upstream: Upstream) -> bool:
    """Whether the upstream ttrpc server still accepts connections (a shim exits when its task is gone)."""
    try:
        target = upstream() if callable(upstream) else upstream
        _, writer = await asyncio.open_unix_connection(str(target))
    except OSError:
        return False
    writer.close()
    return True


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    peer = credentials(writer.get_extra_info("socket"))
    return None if peer is None else peer.uid
