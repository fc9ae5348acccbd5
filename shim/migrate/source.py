"""`criu-shim migrate`: move a running container into a prepared pod on another node (direct, eager).

Order, so that nothing is stopped before everything that can be checked was checked:

1. here: the container runs, its pod asks for stop-after (and tcp-established when its
   connections are to follow, then its pod IPs must move);
2. the target's receiver (mutual TLS) checks the prepared pod, the TCP annotation there and
   that its address hook can route the pod IPs (preflight);
3. the checkpoint, through this node's criu-shim (stop-after: the source ends right after a
   good dump, its TCP connections locked so peers see silence, not resets);
4. the archive streams to the target, which restores it into the prepared pod, starts it and
   claims the pod IPs (their route moves there; with the hold, the default, the target claimed
   them right before 3 and lets the peers' packets it held since go on now: `switch`);
5. here: the address hook releases the pod IPs, the checkpoint is deleted.

A failure before 3 changes nothing. A failed checkpoint leaves the container running (the
proxy's rule). A failure after 3 leaves the source container stopped and its checkpoint kept,
and says how to retry (`--checkpoint`) or restore it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.checkpoint.addresses import pod_addresses
from shim.checkpoint.options import CheckpointOptions, annotation, resolve
from shim.config import CheckpointDefaults
from shim.errors import FailedPrecondition, InvalidArgument, ShimError, Unavailable, Upstream
from shim.hosttools import show
from shim.migrate import channel, compat, hook, lazy
from shim.migrate.runtime import ContainerView, PodView, Runtime

if TYPE_CHECKING:
    from shim.migrate.registry_mode import ImageTarget

CHUNK = 1 << 20
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class MigrateRequest:
    container: str
    to: str  # the target's migration receiver, HOST:PORT
    to_pod: str  # the prepared pod there: id, id prefix or NAMESPACE/NAME
    runtime: Path  # this node's criu-shim CRI socket
    checkpoints_dir: Path  # where this node's checkpoint is written (and kept on failure)
    creds: channel.Credentials
    address_hook: Path | None = None
    name: str | None = None  # the container's name in the target pod (default: its name here)
    checkpoint: Path | None = None  # retry: send this archive instead of checkpointing again
    keep_checkpoint: bool = False
    timeout: float = 300.0
    idle_timeout: float = 30.0  # a transfer moving no byte this long (a cut link) is abandoned
    criu: Path | None = None  # this node's CRIU, whose version the target compares with its own
    defaults: CheckpointDefaults = CheckpointDefaults()
    mode: str = "eager"  # or "lazy": memory follows from the source after the restore (shim.migrate.lazy)
    runc: Path | None = None  # lazy: the runc of containerd's runc shim (default: PATH, else beside CRIU)
    image: ImageTarget | None = None  # mode "registry": where the checkpoint image goes (registry_mode.py)
    hold: bool = True  # with connections, any mode: the target holds the peers' packets from the switch-over (receiver.py, hold.py)
    first_part: bool = True  # lazy: the target creates the container before anything stops (restore.second_part)
    page_port: int = 0  # lazy: where our page end listens for the target's page daemon (0: the kernel picks)


@dataclass(frozen=True)
class Migrated:
    container_id: str
    pod: str
    addresses: tuple[str, ...]
    archive_bytes: int
    checkpoint_seconds: float
    transfer_seconds: float
    restore_seconds: float
    pause_seconds: float  # checkpoint start to the restored container running (and routed)
    pages_bytes: int = -1  # lazy: memory served after the restore (-1: an eager migration)
    fill_seconds: float = 0.0  # lazy: the restored container running to its memory complete
    stages: tuple[tuple[str, float], ...] = ()  # lazy: the pause's steps, seconds from its start
    started_wall: float = 0.0  # lazy: the dump's start, wall clock
    held_packets: int = -1  # packets the target held during the pause and delivered after it (-1: no hold)

    def lines(self) -> str:
        moved = f"; pod IPs {', '.join(self.addresses)} now routed to the target" if self.addresses else ""
        text = (f"migrated to container {self.container_id} in pod {self.pod}{moved}\n"
                f"archive {self.archive_bytes / (1 << 20):.1f} MiB; checkpoint {self.checkpoint_seconds:.2f} s, "
                f"transfer and restore {self.transfer_seconds + self.restore_seconds:.2f} s "
                f"(restore {self.restore_seconds:.2f} s); pause {self.pause_seconds:.2f} s")
        if self.held_packets >= 0:
            text += (f"\n{self.held_packets} packets to the pod IPs held at the target during the pause, delivered "
                     "to the restored container")
        if self.pages_bytes >= 0:
            rate = self.pages_bytes / max(self.fill_seconds, 1e-3) / 1e6
            text += (f"\nmemory {self.pages_bytes / (1 << 20):.1f} MiB served lazily in {self.fill_seconds:.2f} s "
                     f"after the restore ({rate:.0f} MB/s); the source was ended by CRIU")
        if self.stages:
            steps = ", ".join(f"{k} {v:.3f}" for k, v in self.stages)
            text += f"\nstages (s from the dump's start, {self.started_wall:.3f}): {steps}"
        return text


class MigrationFailed(ShimError):
    """A failure after the source was stopped: the message says what state it is in."""


class OutcomeUnknown(MigrationFailed):
    """The target had all it needed to restore and its answer never came (no answer in time, the
    connection gone): it may run the container. The addresses stay with it (not claimed back: that
    would take the route from a running copy to the stopped source); a target whose restore failed
    releases them itself."""


UNKNOWN = "whether the target restored it is unknown: the pod IPs stay with the target node (it releases them " \
          "if its restore failed)"


def run(request: MigrateRequest) -> Migrated:
    return asyncio.run(migrate(request))


async def migrate(request: MigrateRequest) -> Migrated:
    runtime = Runtime(request.runtime)
    try:
        return await _migrate(request, runtime)
    finally:
        await runtime.close()


async def _migrate(request: MigrateRequest, runtime: Runtime) -> Migrated:
    container = await runtime.container(request.container)
    pod = await runtime.pod_by_id(container.pod_id)
    options = resolve(request.defaults, pod.annotations, container.name)
    _check_source(container, pod, options, retry=request.checkpoint is not None)
    addresses = await _addresses(runtime, pod) if options.tcp_established else []
    criu = await asyncio.to_thread(compat.installed, request.criu)
    if request.mode == "lazy":
        await asyncio.to_thread(lazy.check_source, request.criu, request.checkpoint)
    from shim.migrate import registry_mode  # it builds on this module

    if request.image is not None:  # the registry answers and takes a push from us, or nothing stops
        await asyncio.to_thread(registry_mode.check, request.image)
    reader, writer = await channel.connect(request.to, request.creds, CONNECT_TIMEOUT, request.idle_timeout)
    try:
        name = request.name or container.name
        ready = await ask(reader, writer, {"protocol": channel.PROTOCOL, "op": "preflight", "pod": request.to_pod,
                                            "name": name, "addresses": addresses, "mode": request.mode,
                                            "criu_version": show(criu) if criu else None, "hold": request.hold,
                                            **registry_mode.preflight_fields(request.image)}, CONNECT_TIMEOUT * 3,
                          _refused(request))
        if request.mode == "lazy":
            return await lazy.migrate(lazy.Session(request, runtime, container, pod, options, addresses, reader,
                                                   writer, ready))
        if request.image is not None:
            return await registry_mode.migrate(request, request.image, runtime, container, addresses, reader,
                                               writer, ready, pod)
        await switch(request, pod, addresses, ready, reader, writer)
        started = time.monotonic()
        try:
            archive = request.checkpoint or await _checkpoint(request, runtime, container, writer)
        except ShimError:
            await claim_back(request, pod, addresses, ready)
            raise
        checkpointed = time.monotonic()
        size = archive.stat().st_size
        sent = False
        try:
            await channel.send(writer, {"op": "restore", "size": size})
            await stream(archive, writer, size, request.idle_timeout)
            sent = True
            done = await ask(reader, writer, None, request.timeout, "the target node could not restore it")
        except (ShimError, ConnectionError, OSError) as exc:  # the receiver gone mid-way: a broken connection
            why = exc.message if isinstance(exc, ShimError) else f"the connection to the target node broke ({exc})"
            if sent and not isinstance(exc, FailedPrecondition):  # the whole archive there, no answer
                raise OutcomeUnknown(f"{why}; {UNKNOWN}; {_stopped(container, archive, request)}") from None
            await claim_back(request, pod, addresses, ready)
            raise MigrationFailed(f"{why}; {_stopped(container, archive, request)}") from None
        finished = time.monotonic()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    await release(request, addresses)
    if not request.keep_checkpoint:
        archive.unlink(missing_ok=True)
    return Migrated(str(done.get("container_id")), str(ready.get("pod")), tuple(addresses), size,
                    checkpointed - started, float(done.get("transfer_seconds", 0.0)),
                    float(done.get("restore_seconds", 0.0)), finished - started,
                    held_packets=int(done.get("held_packets", -1)))


async def switch(request: MigrateRequest, pod: PodView, addresses: list[str], ready: dict[str, Any],
                 reader: Any, writer: Any) -> None:
    """Right before the container stops: the target holds the peers' packets to the pod IPs and claims
    them, so they wait there during the pause (not for their retransmission timer) and reach the
    restored sockets at once. Refused: nothing was stopped, the IPs are routed here again."""
    if ready.get("hold") is not True:
        return
    try:
        await ask(reader, writer, {"op": "switch"}, CONNECT_TIMEOUT * 3, _refused(request))
    except ShimError:
        await claim_back(request, pod, addresses, ready)
        raise


async def claim_back(request: MigrateRequest, pod: PodView, addresses: list[str], ready: dict[str, Any] | None,
                     ) -> None:
    """The migration failed after the target claimed the pod IPs (at the switch-over, when `ready` says it
    holds; None: always, a lazy restore that ended): it released them, route them here again (a failure
    is a warning)."""
    if request.address_hook is None or (ready is not None and ready.get("hold") is not True):
        return
    for ip in addresses:
        family = ipaddress.ip_address(ip).version
        via = next((p for p in pod.ips if ipaddress.ip_address(p).version == family), None)
        if via is None:
            continue
        try:
            await hook.run(request.address_hook, "claim", ip, via)
        except ShimError as exc:
            print(f"criu-shim: warning: {exc.message}")


async def _addresses(runtime: Runtime, pod: PodView) -> list[str]:
    """The addresses the container's sockets may be bound to, all of which must follow it: the pod's
    own IPs and those earlier restores carried onto its eth0 (the checkpoint records the same)."""
    netns = await runtime.pod_netns(pod.id)
    return list(await pod_addresses(netns, pod.ips) if netns is not None else pod.ips)


def _check_source(container: ContainerView, pod: PodView, options: CheckpointOptions, retry: bool) -> None:
    if not retry and container.state != "CONTAINER_RUNNING":
        raise FailedPrecondition(f"container {container.id} is in {container.state.removeprefix('CONTAINER_')} "
                                 "state; only a running container can be migrated")
    if not options.stop_after:
        raise FailedPrecondition(
            f'pod {pod.label} lacks annotation {annotation("stop-after")}: "true": a migration stops the source '
            "right after its checkpoint (so it cannot go on writing or answering what the copy now owns); set it "
            f"on the pod (or {annotation('stop-after', container.name)} for this container)")
    if options.tcp_established and not pod.ips:
        raise FailedPrecondition(f"pod {pod.label} has no IP to move with its TCP connections")


async def _checkpoint(request: MigrateRequest, runtime: Runtime, container: ContainerView,
                      writer: Any) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    location = request.checkpoints_dir / f"migrate-{container.id[:12]}-{stamp}.tar"
    try:
        await runtime.checkpoint(container.id, location, request.timeout)
    except ShimError as exc:
        with contextlib.suppress(Exception):
            await channel.send(writer, {"op": "abort"})
        now = await state(runtime, container.id)
        raise Upstream(exc.code, f"checkpoint failed: {exc.message}; the source container {container.id} is "
                       f"{now}; nothing was sent") from None
    return location


def _refused(request: MigrateRequest) -> str:
    if request.checkpoint is None:
        return "the target node refused the migration (nothing was stopped)"
    # a retry: the source was stopped by the first attempt, and it must not read as if it ran
    return (f"the target node refused the migration (the source container stays stopped; its checkpoint is kept at "
            f"{request.checkpoint})")


async def state(runtime: Runtime, container_id: str) -> str:
    try:
        return (await runtime.container(container_id)).state.removeprefix("CONTAINER_").lower()
    except ShimError as exc:  # e.g. this node's criu-shim died mid-checkpoint: say so, not just "unknown"
        return f"in an unknown state (this node's criu-shim at {runtime.socket} does not answer: {exc.message})"


def _stopped(container: ContainerView, archive: Path, request: MigrateRequest) -> str:
    return (f"the source container {container.id} is stopped and its checkpoint is kept at {archive}: retry with "
            f"`criu-shim migrate {container.id} --checkpoint {archive} --to {request.to} --to-pod {request.to_pod} "
            "...`, or restore it on this node by creating a container whose image is that path")


async def stream(archive: Path, writer: Any, size: int, idle: float) -> None:
    sent = 0
    with archive.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, CHUNK):
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), idle)
            except TimeoutError:
                raise Unavailable(f"the transfer stalled: the target took no data for {idle:.0f} s after "
                                  f"{sent} of {size} bytes (a cut link?)") from None
            except (ConnectionError, OSError) as exc:
                raise Unavailable(f"the transfer broke after {sent} of {size} bytes: {exc}") from None
            sent += len(chunk)
    if sent != size:
        raise InvalidArgument(f"{archive} changed while it was sent ({sent} of {size} bytes)")


async def ask(reader: Any, writer: Any, message: dict[str, Any] | None, timeout: float,
               what: str) -> dict[str, Any]:
    if message is not None:
        await channel.send(writer, message)
    try:
        reply = await asyncio.wait_for(channel.receive(reader), timeout)
    except TimeoutError:
        raise Unavailable(f"{what}: no answer within {timeout:.0f} s") from None
    if reply.get("ok") is True:
        return reply
    error = str(reply.get("error", "no reason given"))[:2000]
    raise FailedPrecondition(f"{what}: {reply.get('code', 'UNKNOWN')}: {error}")


async def release(request: MigrateRequest, addresses: list[str]) -> None:
    """The addresses are the target's now: this node routes them no more, and its IPAM keeps them
    from other pods (the source pod, once deleted, would otherwise hand them back to it)."""
    if request.address_hook is None:
        return
    for ip in addresses:
        try:
            await hook.run(request.address_hook, "release", ip)
        except ShimError as exc:  # the target routes it already; a stale local route only misleads this node
            print(f"criu-shim: warning: {exc.message}")
        try:
            await hook.run(request.address_hook, "reserve", ip)
        except ShimError as exc:
            print(f"criu-shim: warning: {exc.message}; this node's IPAM may give {ip} to a new pod once the "
                  "source pod is deleted, while the migrated container still uses it")
