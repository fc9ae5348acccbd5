"""`criu-shim migrate-receiver`: the target node's end of a migration (async server).

One connection is one migration, in two steps:

1. preflight: the source names the prepared pod, the container name and, when its TCP
   connections are to follow, the pod IPs that must move. The receiver checks the pod is
   ready, carries the TCP annotation the restore needs, that no live pod here holds those
   IPs and that an address hook can route them, all before the source stops anything.
2. restore: the archive arrives (exactly `size` bytes, written 0600 under a private name in
   the checkpoints directory, renamed into place only once complete), the container is
   created from it in the prepared pod and started through this node's criu-shim proxy,
   then the address hook claims the moved IPs (only now: a peer's packet reaching the pod
   before its sockets are back would be answered with a reset).
   With a hold (every mode, the default: hold.py), the source asks for the switch-over
   before it stops the container ("switch"): the peers' packets to the moving IPs are held
   here from then on, the IPs are claimed at once, and the held packets go on to the restored
   pod once it runs; on any other end they are dropped and the claim is released.

Any failure removes what this side made (the partial archive, a created container) and
answers with the reason; the source keeps its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import config, faults, node_tls
from shim.annotations import CHECKPOINT_PREFIX, IMAGES_FROM, TRUE
from shim.api.cri.v1 import api_pb2 as cri
from shim.config import PAGE_DAEMON_OURS
from shim.errors import Code, FailedPrecondition, InvalidArgument, ResourceExhausted, ShimError, Unavailable, Upstream
from shim.hosttools import Version
from shim.migrate import channel, claims, compat, hold, hook, registry_restore, tunnel
from shim.migrate.runtime import PodView, Runtime
from shim.restore.lazy import remote_pages_file as lazy_pages_file

log = logging.getLogger(__name__)

MAX_ARCHIVE = 64 << 30  # the restore's own limit on an archive's data
MAX_FIRST_PART = 16 << 20  # spec, config, status and facts: a few KiB
CHUNK = 1 << 20
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
TCP_ANNOTATION = f"{CHECKPOINT_PREFIX}tcp-established"
RELAY_GRACE = 5.0  # a lazy restore whose page stream broke: its relay's own kill comes first


@dataclass(frozen=True)
class ReceiverSettings:
    listen: str
    runtime: Path  # the node's criu-shim CRI socket
    checkpoints_dir: Path  # must be in the proxy's restore.allowed_dirs
    creds: channel.Credentials
    address_hook: Path | None
    idle_timeout: float = 30.0
    restore_timeout: float = 120.0
    criu: Version | None = None  # this node's CRIU (compat.installed), compared with the source's
    claims_interval: float = 10.0  # how often claimed pod IPs of removed containers are released (claims.py)
    criu_path: Path | None = None  # for lazy migrations: can it run a page daemon (userfaultfd)?
    allowed_registries: tuple[str, ...] | None = None  # its proxy's restore.allowed_registries (registry mode)
    claims_file: Path | None = None  # where the claimed pod IPs are kept across restarts (claims.py)
    page_daemon: str = PAGE_DAEMON_OURS  # its proxy's restore.page_daemon: ours reaches the source itself
    config_file: Path | None = None  # read again at each lazy preflight: the proxy may restart with another


@dataclass
class _Migration:
    pod: PodView
    name: str
    addresses: list[str]
    pages: _PageEnd | None = None  # a lazy migration's page tunnel, target end
    # The pod's config for CreateContainer, read at preflight: one CRI round trip less in the pause.
    sandbox: cri.PodSandboxConfig | None = None
    early: bool = False  # the source asked for the hold: claim at "switch", not after the restore
    packet_hold: hold.Hold | None = None  # from "switch" until the restore settles it
    claimed: bool = False  # claimed early, not yet restored: released again on any failure
    # A lazy migration's container, created from the checkpoint's first part before the source stopped
    # anything ("prepare", shim.restore.second_part), and where the second part goes; removed on any failure.
    prepared: str | None = None
    second_part: Path | None = None
    first_part: str | None = None  # that container's id until the session ends (the sweep leaves it alone)


@dataclass
class _Shared:
    """What the receiver's sessions share."""

    watcher: claims.ClaimWatcher
    one_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)  # restores queue (a source's dump does not)
    page_ends: dict[str, _PageEnd] = field(default_factory=dict)  # lazy migrations under way, by token
    # Containers created from a first part by migrations under way (the sweep leaves them alone).
    first_parts: set[str] = field(default_factory=set)


@dataclass
class _PageEnd:
    """Where a lazy migration's page daemon gets the memory. With criu-shim's page daemon, from the
    source's page end itself (`loopback` None): the daemon dials it with this node's certificate,
    pins the one the source showed here (`source_certificate`) and names the migration by its token.
    With CRIU's (plain TCP only), through the page tunnel: the daemon's loopback listener, joined to
    the source's second TLS connection, which names the migration by its token."""

    token: str
    loopback: tunnel.LoopbackEnd | None
    pumped: asyncio.Future[tunnel.Pumped]  # the tunnel's end (never set without a tunnel)
    source_certificate: str = ""
    container_id: str | None = None  # the restored container, once it runs
    # Set once CreateContainer + StartContainer returned (either way): until then a broken stream
    # waits, so that a task that has just started is ended before its daemon's stream closes.
    restore_over: asyncio.Event = field(default_factory=asyncio.Event)


def run(settings: ReceiverSettings) -> int:
    """Serve until SIGTERM/SIGINT."""
    return asyncio.run(_serve(settings))


async def _serve(settings: ReceiverSettings) -> int:
    host, port = channel.parse_address(settings.listen)
    context = channel.server_context(settings.creds)
    if not settings.checkpoints_dir.is_dir():
        raise FailedPrecondition(f"checkpoints directory {settings.checkpoints_dir} does not exist")
    watcher = claims.ClaimWatcher(settings.runtime, settings.address_hook, settings.claims_interval,
                                  settings.claims_file)
    shared = _Shared(watcher)
    await hold.sweep()  # a receiver that died holding left rules: they must not outlive it
    await watcher.settle_pending()  # ... and maybe early claims: released, or watched if their restore ran
    await _remove_prepared(settings.runtime)  # ... and maybe containers created from a first part, never started

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        who = dict(x[0] for x in peer.get("subject", ())).get("commonName", "?")
        channel.give_up_after(writer, settings.idle_timeout)
        # A channel of its own per migration: a shared one that saw the proxy or containerd restart stays in
        # gRPC's reconnect back-off for a while and fails the next migration's calls at once.
        runtime = Runtime(settings.runtime)
        try:
            await _session(settings, runtime, reader, writer, who, shared)
        except Exception:  # one bad session never takes the receiver down
            log.exception("migration session from %s failed", who)
        finally:
            await runtime.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handle, host, port, ssl=context, limit=channel.MAX_MESSAGE * 2)
    log.info("migration receiver listening on %s:%d", host, port)
    async with server, asyncio.TaskGroup() as tasks:
        tasks.create_task(watcher.run(stop))  # ends with the receiver
        tasks.create_task(_sweep_first_parts(settings, shared, stop))
        await stop.wait()
    return 0


async def _session(settings: ReceiverSettings, runtime: Runtime, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, who: str, shared: _Shared) -> None:
    migration: _Migration | None = None
    made: list[_Migration] = []
    try:
        while True:
            migration = await _step(settings, runtime, reader, writer, who, shared, migration)
            if migration is None:
                return
            if not made or made[-1] is not migration:  # "switch" goes on with the same one
                made.append(migration)
    finally:
        for ended in made:  # a lazy migration's tunnel listener goes with its session
            await _unhold(settings, ended)  # a session that ended before its restore: nothing held stays
            if ended.prepared is not None:  # created from the first part, never started: it goes
                if await runtime.remove(ended.prepared):
                    log.info("removed container %s, created for a migration that ended before its restore",
                             ended.prepared)
                else:  # this node's criu-shim down: the sweep removes it once it is back
                    log.warning("could not remove container %s, created for a migration that ended before its "
                                "restore; the receiver's sweep retries", ended.prepared)
            shared.watcher.end(ended.pod.id)  # its early claim settled either way
            shared.first_parts.discard(ended.first_part or "")  # over: if its removal failed, the sweep retries
            if ended.pages is not None and ended.pages.loopback is not None:
                ended.pages.loopback.close()
                shared.page_ends.pop(ended.pages.token, None)


async def _step(settings: ReceiverSettings, runtime: Runtime, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter, who: str, shared: _Shared,
                migration: _Migration | None) -> _Migration | None:
    """One message of a session; the migration it goes on with, or None when the session is over."""
    try:
        message = await asyncio.wait_for(channel.receive(reader), settings.idle_timeout * 20)
    except (Unavailable, TimeoutError):
        return None
    except ShimError as exc:
        await _answer_error(writer, exc)
        return None
    op = message.get("op")
    try:
        if op == "preflight":
            migration = await _preflight(settings, runtime, message)
            answer = {"ok": True, "pod": migration.pod.label, "pod_id": migration.pod.id,
                      "pod_ips": list(migration.pod.ips)}
            if message.get("mode") == "lazy":
                migration.pages = await _page_end(shared.page_ends, await _page_daemon(settings), writer)
                answer["pages_token"] = migration.pages.token
                answer["pages"] = "tunnel" if migration.pages.loopback is not None else "direct"
                # CRIU restores with the lock method the dump recorded: the source asks for nftables only
                # where this node's CRIU can restore with it too.
                answer["nftables"] = await asyncio.to_thread(_nftables_here, settings.criu_path)
                answer["prepare"] = True  # send the first part: the container is created before the pause
            if migration.early:
                answer["hold"] = True
            await channel.send(writer, answer)
            return migration
        if op == "prepare" and migration is not None and migration.pages is not None and migration.prepared is None:
            async with shared.one_at_a_time:
                await _prepare(settings, runtime, migration, message, reader, shared.first_parts)
            await channel.send(writer, {"ok": True})
            return migration
        if op == "switch" and migration is not None and migration.early:
            await _switch(settings, migration, shared.watcher)
            await channel.send(writer, {"ok": True})
            return migration
        if op == "pages":
            await _carry_pages(runtime, shared.page_ends, channel.field(message, "token", str), reader, writer)
            return None
        if op in ("restore", "restore_image") and migration is not None:
            async with shared.one_at_a_time:
                if op == "restore":
                    reply = await _restore(settings, runtime, migration, message, reader,
                                           writer.get_extra_info("peername")[0])
                else:  # registry mode: the checkpoint image is pulled, not sent
                    reply = await registry_restore.restore(
                        runtime, migration.pod, migration.name, message, settings.restore_timeout,
                        functools.partial(_claim_or_let_go, settings, migration),
                        settings.allowed_registries)
            shared.watcher.add(str(reply["container_id"]), migration.addresses)  # restored and claimed
            shared.watcher.end(migration.pod.id)
            faults.reached(faults.Point.MIGRATE_RESTORED)
            await channel.send(writer, {"ok": True, **reply})
            log.info("migration from %s restored container %s in pod %s", who, reply["container_id"],
                     migration.pod.label)
            if migration.pages is not None:
                await _follow_fill(settings, runtime, migration, migration.pages, reply["container_id"],
                                   reader, writer)
            return None
        if op == "abort":
            if migration is not None:
                await _unhold(settings, migration)
            return None
        raise InvalidArgument(f"unexpected migration message {op!r:.40}")
    except ShimError as exc:
        log.warning("migration from %s refused: %s", who, exc.message)
        if migration is not None:
            await _unhold(settings, migration)  # before the answer: the source then claims the IPs back
        await _answer_error(writer, exc)
        return None


async def _answer_error(writer: asyncio.StreamWriter, exc: ShimError) -> None:
    with contextlib.suppress(Exception):
        await channel.send(writer, {"ok": False, "code": exc.code.name, "error": exc.message})


async def _preflight(settings: ReceiverSettings, runtime: Runtime, message: dict[str, Any]) -> _Migration:
    if message.get("protocol") != channel.PROTOCOL:
        raise InvalidArgument(f"unknown migration protocol {message.get('protocol')!r:.40}; this node speaks "
                              f"{channel.PROTOCOL}")
    ref = channel.field(message, "pod", str)
    name = channel.field(message, "name", str)
    if not NAME_RE.match(name):
        raise InvalidArgument(f"container name {name!r:.80} is not a valid name")
    addresses = [_address(a) for a in channel.field(message, "addresses", list)]
    compat.check(compat.parse(message.get("criu_version")), settings.criu)
    mode = message.get("mode", "eager")
    if mode not in ("eager", "lazy", "registry"):
        raise InvalidArgument(f"unknown migration mode {mode!r:.40}; this node knows eager, lazy and registry")
    if mode == "lazy":
        await asyncio.to_thread(_check_lazy_here, settings.criu_path)
    if mode == "registry":
        registry_restore.check_preflight(message, settings.allowed_registries)
    pod = await runtime.pod(ref)
    if not pod.ready:
        raise FailedPrecondition(f"target pod {pod.label} is not ready")
    if addresses:
        _check_addresses_can_move(settings, pod, addresses, await runtime.live_pod_ips())
        assert settings.address_hook is not None  # checked just above
        await hook.run(settings.address_hook, "check")
    early = bool(addresses) and message.get("hold") is True
    if early:
        await hold.sweep()  # before this migration's rules: a dead receiver's for the same IPs
    return _Migration(pod, name, addresses, sandbox=await runtime.sandbox_config(pod.id), early=early)


def _address(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidArgument(f"{value!r:.80} is not an IP address") from None


def _check_addresses_can_move(settings: ReceiverSettings, pod: PodView, addresses: list[str],
                              live: dict[str, str]) -> None:
    if pod.annotations.get(TCP_ANNOTATION, "").strip().lower() != TRUE:
        raise FailedPrecondition(f'target pod {pod.label} lacks annotation {TCP_ANNOTATION}: "true": the '
                                 "restore would not bring the TCP connections back")
    if settings.address_hook is None:
        raise FailedPrecondition(f"the pod IPs {', '.join(addresses)} cannot move to this node: it has no "
                                 "address hook (migrate-receiver --address-hook) to route them here; connections "
                                 "would break")
    for ip in addresses:
        if ip in live:
            raise FailedPrecondition(f"pod IP {ip} is held by live pod {live[ip]} on the target node")
        if _via(pod, ip) is None:
            raise FailedPrecondition(f"target pod {pod.label} has no IPv{ipaddress.ip_address(ip).version} "
                                     f"address to route {ip} to")


def _via(pod: PodView, ip: str) -> str | None:
    family = ipaddress.ip_address(ip).version
    return next((p for p in pod.ips if ipaddress.ip_address(p).version == family), None)


async def _prepare(settings: ReceiverSettings, runtime: Runtime, migration: _Migration, message: dict[str, Any],
                   reader: asyncio.StreamReader, first_parts: set[str]) -> None:
    """A lazy migration's first part (shim.restore.second_part): the container is created from it now, while
    the source still runs, with the path its second part will have; the restore then only starts it."""
    size = channel.field(message, "size", int)
    if not 0 < size <= MAX_FIRST_PART:
        raise InvalidArgument(f"first part size {size} out of range (1 byte to {MAX_FIRST_PART >> 20} MiB)")
    first = await _receive_archive(settings, reader, size, migration.name)
    second = _archive_path(settings, migration.name)
    try:
        migration.prepared = await runtime.create_restored(
            migration.pod.id, first, migration.name, settings.restore_timeout, migration.sandbox,
            {IMAGES_FROM: str(second)})
        migration.first_part = migration.prepared
        first_parts.add(migration.prepared)
        migration.second_part = second
    finally:
        first.unlink(missing_ok=True)  # unpacked by the proxy: the container needs it no more
    faults.reached(faults.Point.MIGRATE_PREPARED)


async def _remove_prepared(socket: Path, shared: _Shared | None = None) -> None:
    """Containers created from a migration's first part and never started (marked by IMAGES_FROM) whose
    migration is over go: at start-up every such one (a receiver that died left it); from the sweep
    (`shared`) every one no migration under way made (its removal failed when its migration ended: the
    node's criu-shim was down then). The sweep lists under the restore lock, so a container just created
    from a first part is among its migration's already."""
    runtime = Runtime(socket)
    try:
        async with shared.one_at_a_time if shared is not None else contextlib.nullcontext():
            over = [c for c in await runtime.created_with(IMAGES_FROM)
                    if shared is None or c not in shared.first_parts]
        for container_id in over:
            if await runtime.remove(container_id):
                log.warning("removed container %s: created for a migration that ended before its restore",
                            container_id)
    except ShimError as exc:  # this node's criu-shim down: the next sweep tries again
        (log.debug if shared is not None else log.warning)(
            "could not look for containers left by migrations that ended: %s", exc.message)
    finally:
        await runtime.close()


async def _sweep_first_parts(settings: ReceiverSettings, shared: _Shared, stop: asyncio.Event) -> None:
    """Every claims interval until `stop`."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.claims_interval)
        await _remove_prepared(settings.runtime, shared)


async def _restore(settings: ReceiverSettings, runtime: Runtime, migration: _Migration, message: dict[str, Any],
                   reader: asyncio.StreamReader, source_ip: str) -> dict[str, Any]:
    size = channel.field(message, "size", int)
    if not 0 < size <= MAX_ARCHIVE:
        raise InvalidArgument(f"archive size {size} out of range (1 byte to {MAX_ARCHIVE >> 30} GiB)")
    named = _page_server_named(settings, migration.pages, message, source_ip)
    started = time.monotonic()
    archive = await _receive_archive(settings, reader, size, migration.name, migration.second_part)
    received = time.monotonic()
    try:
        pod = await runtime.pod_by_id(migration.pod.id)  # deleted or stopped meanwhile? say so, by name
    except ShimError as exc:
        if exc.code != Code.NOT_FOUND:  # the node's criu-shim or containerd down: not a deleted pod
            archive.unlink(missing_ok=True)
            raise Upstream(exc.code, f"this node's criu-shim could not look up target pod {migration.pod.label} "
                           f"({exc.message}); nothing was restored") from None
        pod = None
    if pod is None or not pod.ready:
        archive.unlink(missing_ok=True)
        raise FailedPrecondition(f"target pod {migration.pod.label} was " + ("deleted" if pod is None else "stopped")
                                 + " during the migration; nothing was restored")
    page_server = lazy_pages_file(archive)
    try:
        if named is not None:  # where the restore's page daemon asks for the lazy memory
            _write_private(page_server, json.dumps(named).encode())
        if migration.prepared is not None:  # created from the first part: StartContainer brings the images
            container_id, migration.prepared = migration.prepared, None  # removed by start_restored on failure
        else:
            container_id = await runtime.create_restored(pod.id, archive, migration.name, settings.restore_timeout,
                                                         migration.sandbox)
        created = time.monotonic()
        await runtime.start_restored(container_id, settings.restore_timeout)
        running = time.monotonic()
        if migration.pages is not None:
            migration.pages.container_id = container_id
    except ShimError:
        archive.unlink(missing_ok=True)  # the source keeps its copy
        raise
    finally:
        if migration.pages is not None:  # read at CreateContainer; without its memory the archive restores nowhere
            migration.pages.restore_over.set()
            page_server.unlink(missing_ok=True)
            archive.unlink(missing_ok=True)
    held = None
    if migration.packet_hold is not None:  # claimed at "switch": what waited goes on to the restored sockets
        held = await migration.packet_hold.settle(accept=True)
        migration.packet_hold, migration.claimed = None, False
    else:
        try:
            await _claim(settings, pod, migration.addresses)
        except ShimError:
            await runtime.remove(container_id)
            archive.unlink(missing_ok=True)  # the source keeps its copy
            raise
    claimed = time.monotonic()
    return {"container_id": container_id, "archive": str(archive),
            **({"held_packets": held.held + held.after} if held is not None else {}),
            "transfer_seconds": round(received - started, 3),
            "restore_seconds": round(claimed - received, 3),
            # where the target's part of the pause goes (the source prints it: `stages`)
            "stages": {"received": round(received - started, 3), "created": round(created - started, 3),
                       "started": round(running - started, 3),
                       # with the hold the IPs were claimed at "switch": this is when the held packets went on
                       "released" if held is not None else "claimed": round(claimed - started, 3)}}


async def _claim(settings: ReceiverSettings, pod: PodView, addresses: list[str]) -> None:
    if not addresses or settings.address_hook is None:
        return
    for ip in addresses:
        via = _via(pod, ip)
        assert via is not None  # checked at preflight; the pod's IPs do not change
        await hook.run(settings.address_hook, "claim", ip, via)


async def _claim_or_let_go(settings: ReceiverSettings, migration: _Migration, pod: PodView) -> None:
    """Registry mode's claim once the container runs: claimed at "switch", the held packets go on now."""
    if migration.packet_hold is None:
        await _claim(settings, pod, migration.addresses)
        return
    await migration.packet_hold.settle(accept=True)
    migration.packet_hold, migration.claimed = None, False


async def _switch(settings: ReceiverSettings, migration: _Migration, watcher: claims.ClaimWatcher) -> None:
    """The switch-over begins: hold the peers' packets here, then route the IPs here (the hold first:
    a packet routed here before it would reach a pod whose sockets are not back). A failure undoes both."""
    if migration.packet_hold is not None or migration.claimed:
        raise InvalidArgument("the switch-over of this migration has begun already")
    packet_hold = hold.Hold(migration.addresses)
    try:
        await packet_hold.start()
    except (ShimError, OSError) as exc:  # no NFQUEUE here, say: claimed after the restore, as without a hold
        log.warning("cannot hold packets for %s (%s): their route moves here after the restore",
                    ", ".join(migration.addresses), exc)
        return
    migration.packet_hold, migration.claimed = packet_hold, True  # a claim failing half-way is released too
    watcher.begin(migration.pod.id, migration.addresses)  # should we die before it settles: the next receiver
    try:
        await _claim(settings, migration.pod, migration.addresses)
    except ShimError:
        await _unhold(settings, migration)
        raise


async def _unhold(settings: ReceiverSettings, migration: _Migration) -> None:
    """Not restored: drop what is held, remove the rules, release an early claim (idempotent)."""
    if migration.packet_hold is not None:
        await migration.packet_hold.settle(accept=False)
        migration.packet_hold = None
    if migration.claimed:
        migration.claimed = False
        await _unclaim(settings, migration.addresses)


def _archive_path(settings: ReceiverSettings, name: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return settings.checkpoints_dir / f"migrate-{name}-{stamp}-{secrets.token_hex(4)}.tar"


async def _receive_archive(settings: ReceiverSettings, reader: asyncio.StreamReader, size: int, name: str,
                           final: Path | None = None) -> Path:
    """Exactly `size` bytes into a private file, renamed into place (`final`, else a new name) once complete."""
    free = os.statvfs(settings.checkpoints_dir)
    if free.f_bavail * free.f_frsize < size:
        raise ResourceExhausted(f"the archive of {size} bytes does not fit in {settings.checkpoints_dir}")
    final = final or _archive_path(settings, name)
    partial = final.with_name(f".{final.name}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            await _copy(reader, out.write, size, settings.idle_timeout)
        os.rename(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


async def _copy(reader: asyncio.StreamReader, write: Callable[[bytes], Any], size: int, idle: float) -> None:
    left = size
    while left:
        try:
            chunk = await asyncio.wait_for(reader.read(min(CHUNK, left)), idle)
        except TimeoutError:
            raise Unavailable(f"the archive stopped arriving ({size - left} of {size} bytes after {idle:.0f} s of "
                              "silence)") from None
        except (ConnectionError, OSError) as exc:
            raise Unavailable(f"the archive was cut off after {size - left} of {size} bytes: {exc}") from None
        if not chunk:
            raise Unavailable(f"the archive was cut off after {size - left} of {size} bytes")
        await asyncio.to_thread(write, chunk)  # a slow disk never stalls the event loop
        left -= len(chunk)



def _check_lazy_here(criu: Path | None) -> None:
    from shim.criu import probe_feature

    if criu is None:
        raise FailedPrecondition("this node has no CRIU configured: it cannot restore lazily; use --mode eager")
    probe = probe_feature(str(criu), "uffd-noncoop")
    if not probe.supported:
        raise FailedPrecondition(f"this node's CRIU cannot run a page daemon ({probe.detail}): it cannot restore "
                                 "lazily; use --mode eager")


def _nftables_here(criu: Path | None) -> bool:
    from shim.criu import probe_feature

    return criu is not None and probe_feature(str(criu), "nftables").supported


async def _page_end(page_ends: dict[str, _PageEnd], page_daemon: str, writer: asyncio.StreamWriter) -> _PageEnd:
    pumped: asyncio.Future[tunnel.Pumped] = asyncio.get_running_loop().create_future()
    if page_daemon == PAGE_DAEMON_OURS:  # it speaks TLS itself: no tunnel, no relay through this process
        return _PageEnd(secrets.token_hex(16), None, pumped, node_tls.digest(writer.get_extra_info("ssl_object")))
    loopback = tunnel.LoopbackEnd()
    await loopback.open()
    end = _PageEnd(secrets.token_hex(16), loopback, pumped)
    page_ends[end.token] = end
    return end


async def _page_daemon(settings: ReceiverSettings) -> str:
    """The proxy's page daemon as its config file says now (the proxy reads it when it starts)."""
    if settings.config_file is None:
        return settings.page_daemon
    try:
        return (await asyncio.to_thread(config.load, settings.config_file)).restore.page_daemon
    except ShimError as exc:
        log.warning("cannot read %s again (%s): its page daemon taken as %s", settings.config_file, exc.message,
                    settings.page_daemon)
        return settings.page_daemon


def _page_server_named(settings: ReceiverSettings, end: _PageEnd | None, message: dict[str, Any],
                       source_ip: str) -> dict[str, Any] | None:
    """What the page-server file beside the archive says (shim.restore.lazy reads it): the tunnel's
    loopback port, or the source's page end (the port it named, at the address it connected from)."""
    if end is None:
        return None
    if end.loopback is not None:
        return {"port": end.loopback.port}
    port = channel.field(message, "pages_port", int)
    if not 0 < port < 65536:
        raise InvalidArgument(f"pages_port {port} out of range")
    creds = settings.creds
    return {"address": source_ip, "port": port,
            "tls": {"cert": str(creds.cert.absolute()), "key": str(creds.key.absolute()), "ca": str(creds.ca.absolute()),
                    "certificate": end.source_certificate, "token": end.token, "idle": settings.idle_timeout}}


async def _carry_pages(runtime: Runtime, page_ends: dict[str, _PageEnd], token: str,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The source's page connection: joined to the page daemon's once it connects, until either ends.

    If the source's side ends first, the restored task is ended before the daemon's connection is
    closed: a page daemon that dies releases its userfaultfd, and the kernel then fills what was
    missing with zeros (seen: the test counter, which checks its pages, exited 70 before its relay
    could end it). While the daemon waits on us, the task's faults wait too."""
    end = page_ends.get(token)  # tunnel ends only
    if end is None or end.loopback is None or end.pumped.done():
        raise FailedPrecondition("no lazy migration under way here has that pages token")
    loopback = end.loopback

    async def end_task_first(pumped: tunnel.Pumped) -> None:
        if pumped.ended_by == "local":
            return
        with contextlib.suppress(TimeoutError):  # a restore under way: its task may be running already
            await asyncio.wait_for(end.restore_over.wait(), 300.0)
        if end.container_id is not None:
            with contextlib.suppress(ShimError):
                await runtime.stop(end.container_id)

    try:
        local = await loopback.accepted(15 * 60.0)
        pumped = await tunnel.pump(local, (reader, writer), before_close=end_task_first)
    except BaseException as exc:
        if not end.pumped.done():
            end.pumped.set_result(tunnel.Pumped(ended_by=f"error: {exc.__class__.__name__}"))
        raise
    log.info("lazy migration page stream ended by %s: %d bytes of pages in, %d bytes of requests out%s",
             pumped.ended_by, pumped.to_local, pumped.to_remote, f" ({pumped.errors})" if pumped.errors else "")
    if not end.pumped.done():
        end.pumped.set_result(pumped)


async def _follow_fill(settings: ReceiverSettings, runtime: Runtime, migration: _Migration, end: _PageEnd,
                       container_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Until the source says how the fill ended. Anything but "complete" (its word, a broken page stream,
    its silence) ends the restored task unless its memory is whole: never a process on missing pages."""
    receiving = asyncio.ensure_future(asyncio.wait_for(channel.receive(reader), settings.idle_timeout * 40))
    either: set[asyncio.Future[Any]] = {receiving, end.pumped} if end.loopback is not None else {receiving}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if end.pumped.done() and not receiving.done():
        # The source closes CRIU's end in order (CRIU then ends the source) only if this says complete.
        with contextlib.suppress(Exception):
            await channel.send(writer, {"op": "pages", "complete": end.pumped.result().ended_by == "local"})
    try:
        message = await receiving
        complete = message.get("op") == "finished" and message.get("ok") is True
    except (ShimError, TimeoutError):
        complete = False
    if complete:
        with contextlib.suppress(Exception):
            await channel.send(writer, {"ok": True, "target": "running with all its memory"})
        return
    if end.loopback is not None:  # the tunnel's word on how its stream ended
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(end.pumped), 10.0)
    pumped = end.pumped.result() if end.pumped.done() else None
    what = "left as it was (its memory was complete)"
    if pumped is None or pumped.ended_by != "local":
        # Its relay ends it first when the page daemon fails (and keeps the daemon's log); this is
        # the second line, for a daemon that hangs instead of failing.
        if not await _exits_within(runtime, container_id, RELAY_GRACE):
            with contextlib.suppress(ShimError):
                await runtime.stop(container_id)
        await _unclaim(settings, migration.addresses)
        what = "ended (its memory was not complete)"
    log.warning("lazy migration into %s did not complete: the restored container %s was %s", migration.pod.label,
                container_id, what)
    with contextlib.suppress(Exception):
        await channel.send(writer, {"ok": True, "target": what})


async def _exits_within(runtime: Runtime, container_id: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (await runtime.container(container_id)).state != "CONTAINER_RUNNING":
                return True
        except ShimError:
            return True
        await asyncio.sleep(0.1)
    return False


async def _unclaim(settings: ReceiverSettings, addresses: list[str]) -> None:
    if settings.address_hook is None:
        return
    for ip in addresses:
        with contextlib.suppress(ShimError):
            await hook.run(settings.address_hook, "release", ip)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
