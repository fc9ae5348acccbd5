"""`criu-shim migrate --mode lazy`: the target runs the container at once, its memory follows.

After the same preflight as an eager migration (and the target's own check that its CRIU can run
a page daemon), in this order:

1. the lazy dump (shim.migrate.lazy_dump): CRIU holds the container and writes everything but the
   lazy memory; our TCP lock is on the pod as for a stop-after checkpoint;
2. the source takes CRIU's page server (one client) and opens its page end for the target's page
   daemon (criu-shim's dials it with TLS itself), or, for CRIU's daemon, the page tunnel, a second
   mutual-TLS connection to the receiver (shim.migrate.tunnel);
3. the small archive goes to the target, which restores it (its page daemon asks for pages from
   the source), starts it and claims the pod IPs (with the hold, the default, it claimed them before
   1 and lets the peers' packets it held since go on now); the source releases them;
4. the fill: pages the process touches first, the rest in the background; when the daemon has them
   all, CRIU ends the source container and runc returns;
5. the source tells the target how it ended; the target ends the restored task if its memory is
   not complete (its relay does too, when the page daemon fails).

A failure before 3 ends the dump: CRIU lets the container run again, nothing moved. A failure from
3 on: the target's task is ended (never left running on missing pages) and the error says what
state the source is in, read from containerd after runc returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim import node_tls
from shim.checkpoint.checkpointer import Target
from shim.checkpoint.options import CheckpointOptions
from shim.errors import FailedPrecondition, InvalidArgument, ShimError
from shim.migrate import channel, source, tunnel
from shim.migrate.lazy_dump import LazyDump, runc_beside, source_from, staging_name
from shim.migrate.runtime import ContainerView, PodView, Runtime
from shim.restore.pageserver import CloseWatch

EXIT_SEEN_TIMEOUT = 15.0


@dataclass(frozen=True)
class Session:
    request: source.MigrateRequest
    runtime: Runtime
    container: ContainerView
    pod: PodView
    options: CheckpointOptions
    addresses: list[str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ready: dict[str, Any]  # the target's preflight answer (its pages token)


def check_source(criu: Path | None, checkpoint: Path | None) -> None:
    """Refused before anything stops: a kept archive to resend, or a CRIU that cannot serve lazy pages."""
    if checkpoint is not None:
        raise InvalidArgument("--checkpoint resends a kept archive, and a lazy migration keeps none (its memory "
                              "stays with the source until the target has it): use --mode eager")
    from shim.criu import probe_feature

    probe = probe_feature(str(criu or "criu"), "uffd-noncoop")
    if not probe.supported:
        raise FailedPrecondition(f"this node's CRIU cannot serve lazy pages ({probe.detail}); use --mode eager")
    check_pipe_size()


# CRIU's page server reads pages through a pipe of PIPE_MAX_SIZE pages (criu/include/page-pipe.h:
# 8 pages of pipe_buffer structs, 819 pages on x86_64). Over fs.pipe-max-size that needs
# CAP_SYS_RESOURCE; without it CRIU ignores the failure and its first page read fails (EBADF on
# fd 0), the transfer breaks, the target's task is ended. Refused up front instead.
PAGE_SERVER_PIPE = 819 * 4096
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
CAP_SYS_RESOURCE = 24


def check_pipe_size() -> None:
    status = Path("/proc/self/status").read_text()
    effective = int(next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0"), 16)
    if effective >> CAP_SYS_RESOURCE & 1:
        return
    limit = int(PIPE_MAX_SIZE.read_text())
    if limit < PAGE_SERVER_PIPE:
        raise FailedPrecondition(
            f"CRIU's lazy page server needs pipes of {PAGE_SERVER_PIPE} bytes, over fs.pipe-max-size ({limit}), and "
            f"this node lacks CAP_SYS_RESOURCE: raise it (sysctl -w fs.pipe-max-size=4194304) or use --mode eager")


async def migrate(s: Session) -> source.Migrated:
    request, cid = s.request, s.container.id
    token = channel.field(s.ready, "pages_token", str)
    status, info = await s.runtime.verbose(cid)
    netns = await s.runtime.pod_netns(s.pod.id)
    ips = tuple(s.addresses) if s.options.tcp_established else s.pod.ips
    dumped = source_from(status, info, Target(status, s.pod.name, s.pod.namespace, s.options, ips, netns))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    location = request.checkpoints_dir / f"migrate-{cid[:12]}-{stamp}.tar"
    dump = LazyDump(dumped, request.checkpoints_dir / staging_name(cid, stamp),
                    request.runc or runc_beside(request.criu), request.criu,
                    target_nftables=s.ready.get("nftables") is True)
    await dump.prepare()
    pages = await _page_end(s, token)
    refused: list[ShimError] = []
    first = request.first_part and s.ready.get("prepare") is True  # the target creates it before anything stops

    async def switch() -> None:
        try:
            if first:  # created there (before anything stops here), or refused: then nothing stops
                await source.ask(s.reader, s.writer, None, request.timeout,
                                 "the target node could not create the container from the checkpoint's first part")
            await source.switch(request, s.pod, s.addresses, s.ready, s.reader, s.writer)
        except ShimError as exc:  # refused: it routed the IPs here again; the dump fails untouched
            refused.append(exc)
            raise

    started = time.monotonic()
    async with AsyncExitStack() as stack:
        stack.callback(pages.close)  # idempotent: the pump closes the connection too
        try:
            if first:  # created there from it while runc and CRIU start here: out of the pause
                await _send_first_part(s, dump, location)
            # runc and CRIU start now; the switch-over comes once CRIU waits in its pre-dump hook
            await dump.start(stack, switch)
            criu_end = await dump.page_server()  # at once: CRIU serves the first client that connects
            stack.callback(location.unlink, missing_ok=True)  # without its memory it restores nowhere: not kept
            size = await asyncio.to_thread(dump.write_archive, location)
            dump.stamps["archive"] = time.monotonic()
        except (ShimError, OSError) as exc:
            if refused:
                await dump.end()
                raise refused[0] from None
            with contextlib.suppress(Exception):
                await channel.send(s.writer, {"op": "abort"})
            await dump.end()
            await source.claim_back(request, s.pod, s.addresses, s.ready)
            raise FailedPrecondition(f"the lazy dump failed: {_message(exc)}; the source container {cid} is "
                                     f"{await source.state(s.runtime, cid)}; nothing was sent") from None
        checkpointed = time.monotonic()
        pumping = asyncio.ensure_future(pages.pump(criu_end, s, request.timeout))
        stack.push_async_callback(_settle, pumping)
        try:
            await channel.send(s.writer, {"op": "restore", "size": size, **pages.named})
            await source.stream(location, s.writer, size, request.idle_timeout)
            dump.stamps["sent"] = time.monotonic()
            done = await source.ask(s.reader, s.writer, None, request.timeout, "the target node could not restore it")
        except ShimError as exc:
            await _settle(pumping)  # our end of CRIU's page server resets: CRIU lets the container go
            await dump.end()
            await source.claim_back(request, s.pod, s.addresses, s.ready)
            raise source.MigrationFailed(f"{exc.message}; nothing moved: the source container {cid} is "
                                         f"{await _source_state(s.runtime, cid)}") from None
        restored = time.monotonic()
        await source.release(request, s.addresses)
        code = await _fill(dump, request.timeout)
        pumped = await pumping
        filled = time.monotonic()
        target = await _tell_target(s, code == 0)
        if code != 0:
            await source.claim_back(request, s.pod, s.addresses, None)  # the target released them
            raise source.MigrationFailed(
                f"the memory did not reach the target ({_broken(pumped)}, after {pumped.to_remote} bytes); the "
                f"restored container there was {target}; the source container {cid} is "
                f"{await _source_state(s.runtime, cid)}")
        await _until_exited(s.runtime, cid)
    return source.Migrated(str(done.get("container_id")), str(s.ready.get("pod")), tuple(s.addresses), size,
                           checkpointed - started, float(done.get("transfer_seconds", 0.0)),
                           float(done.get("restore_seconds", 0.0)), restored - started,
                           pumped.to_remote, filled - restored, _stages(dump.stamps, done, restored),
                           dump.started_wall, int(done.get("held_packets", -1)))


async def _send_first_part(s: Session, dump: LazyDump, location: Path) -> None:
    """The checkpoint's first part to the target (shim.restore.second_part); its answer is read at the switch."""
    first = location.with_name(f".{location.name}.first")
    try:
        size = await asyncio.to_thread(dump.write_first_part, first)
        await channel.send(s.writer, {"op": "prepare", "size": size})
        await source.stream(first, s.writer, size, s.request.idle_timeout)
    finally:
        first.unlink(missing_ok=True)


class _Tunnel:
    """The page stream through the page tunnel (the target's CRIU page daemon speaks plain TCP only):
    a second mutual-TLS connection to the receiver, opened before anything stops (its handshake is
    not part of the pause), which joins it to its daemon's loopback listener."""

    def __init__(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self._connection = connection
        self.named: dict[str, Any] = {}  # the receiver knows the tunnel by its token

    def close(self) -> None:
        self._connection[1].close()

    async def pump(self, criu_end: tuple[asyncio.StreamReader, asyncio.StreamWriter], s: Session,
                   timeout: float) -> tunnel.Pumped:
        return await tunnel.pump(criu_end, self._connection, lambda: _target_has_it_all(s))


class _Direct:
    """The page stream straight to the target's page daemon (criu-shim's, the default): it dials our
    page end with TLS itself (tunnel.SourceEnd). CRIU's end is closed in order once the daemon has
    asked CRIU to end the session (PS_IOV_CLOSE), which it does only with its memory complete."""

    def __init__(self, end: tunnel.SourceEnd) -> None:
        self._end = end
        self.named: dict[str, Any] = {"pages_port": end.port}  # the receiver knows our address

    def close(self) -> None:
        self._end.close()

    async def pump(self, criu_end: tuple[asyncio.StreamReader, asyncio.StreamWriter], s: Session,
                   timeout: float) -> tunnel.Pumped:
        try:
            daemon = await self._end.accepted(timeout)
        except ShimError as exc:
            return tunnel.Pumped(ended_by=f"error: {exc.message}")
        watch = CloseWatch()

        async def asked_to_close() -> bool:
            return watch.closed

        return await tunnel.pump(criu_end, daemon, asked_to_close, watch=watch.feed)


async def _page_end(s: Session, token: str) -> _Tunnel | _Direct:
    """Where the target's page daemon gets the memory from, as the receiver said at preflight."""
    request = s.request
    if s.ready.get("pages") == "direct":
        end = tunnel.SourceEnd(node_tls.digest(s.writer.get_extra_info("ssl_object")), token, request.idle_timeout)
        await end.open(s.writer.get_extra_info("sockname")[0], request.creds, request.page_port)
        return _Direct(end)
    connection = await channel.connect(request.to, request.creds, source.CONNECT_TIMEOUT, request.idle_timeout)
    await channel.send(connection[1], {"protocol": channel.PROTOCOL, "op": "pages", "token": token})
    return _Tunnel(connection)


async def _target_has_it_all(s: Session) -> bool:
    """The page stream ended from the target's side: did its page daemon finish (then CRIU may end the
    source), or did the stream break? Only the receiver knows: it says so on the control connection."""
    try:
        message = await asyncio.wait_for(channel.receive(s.reader), 30.0)
    except (ShimError, TimeoutError):
        return False
    return message.get("op") == "pages" and message.get("complete") is True


async def _fill(dump: LazyDump, timeout: float) -> int:
    try:
        return await dump.wait(timeout)
    except TimeoutError:
        await dump.end()
        return -1


async def _settle(pumping: asyncio.Future[tunnel.Pumped]) -> None:
    if not pumping.done():
        pumping.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await pumping


async def _tell_target(s: Session, complete: bool) -> str:
    """Tell the receiver how the fill ended; its answer says what became of the restored task."""
    try:
        await channel.send(s.writer, {"op": "finished", "ok": complete})
        while (reply := await asyncio.wait_for(channel.receive(s.reader), 60.0)).get("op") == "pages":
            pass  # the target's word on the page stream, unread when CRIU ended it first
        return str(reply.get("target", "in an unknown state"))
    except TimeoutError:
        return "in an unknown state (the target did not answer); its page daemon ends it once the page stream is gone"
    except ShimError as exc:
        return f"in an unknown state (the target did not say: {exc.message}); its page daemon ends it once the " \
               "page stream is gone"


async def _source_state(runtime: Runtime, cid: str) -> str:
    state = await source.state(runtime, cid)
    if state == "running":
        return ("running again (CRIU let it go when the page stream broke; what the copy did meanwhile is lost, "
                "and TCP peers it answered may reset)")
    if state == "exited":
        return "ended"
    return state


def _broken(pumped: tunnel.Pumped) -> str:
    if pumped.ended_by.startswith("error"):
        return f"the page stream broke: {pumped.ended_by.removeprefix('error: ')}"
    return f"the page stream was closed by the {'target' if pumped.ended_by == 'remote' else 'source'}"


async def _until_exited(runtime: Runtime, cid: str) -> None:
    """CRIU ended the source: wait until containerd says so (as a stop-after checkpoint does)."""
    deadline = time.monotonic() + EXIT_SEEN_TIMEOUT
    while time.monotonic() < deadline and await source.state(runtime, cid) == "running":
        await asyncio.sleep(0.02)


def _stages(stamps: dict[str, float], done: dict[str, Any], restored: float) -> tuple[tuple[str, float], ...]:
    """The pause's anatomy: this node's steps, then the target's (its durations from when the archive
    began to go, which is when it began to receive it), from the switch-over's start (runc's start
    comes before it: CRIU waits in its pre-dump hook); "switched": the target holds and has claimed the
    pod IPs (at once without a hold)."""
    origin = stamps.get("start", restored)
    ours = [(k, v - origin) for k, v in stamps.items() if k != "start"]
    theirs = done.get("stages")
    sent = stamps.get("archive", restored)
    if isinstance(theirs, dict):
        ours += [(f"target {k}", sent - origin + float(v)) for k, v in theirs.items() if isinstance(v, int | float)]
    ours.append(("answered", restored - origin))
    return tuple(sorted(ours, key=lambda kv: kv[1]))


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ShimError) else f"{exc.__class__.__name__}: {exc}"

