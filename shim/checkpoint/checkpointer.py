"""CheckpointContainer on containerd 1.6/1.7: the domain operation.

Order matters. Everything that can be refused is checked before the container
is touched. CRIU dumps it through containerd's runc shim straight into our
staging dir (leave-running or stop-after); CRIU itself stops the container for
the dump, and the rootfs diff and the pod's /dev/shm are taken while CRIU still
holds it (`held`, `dumpgate`), so the memory image and the filesystem describe
one instant, the container is stopped no longer than CRIU needs, and any
failure of ours before CRIU's last image makes the dump fail with the
container running (a stop-after one too). (Where that cannot be done, no FIFOs
or no cgroup, the container is paused through containerd around the dump
instead.) Only then, with the container running again, is the archive written;
a stop-after one is written before CRIU's gate opens but for what CRIU writes
last, appended once CRIU has ended the container (`rollforward`: recovery
completes it should criu-shim die in between). Every step
that acquires something registers its undo on an AsyncExitStack, so a failure
or a deadline at any point leaves the container running and thawed and no
file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shim import archive_layout as layout
from shim import freezer, policy, signing
from shim.api.containerd.runtime.v2.runc.options import oci_pb2 as runc_options
from shim.api.cri.v1 import api_pb2 as cri
from shim.arch import go_arch
from shim.checkpoint import (
    addresses,
    audit,
    compression,
    criu,
    criulog,
    devshm,
    dumpgate,
    held,
    location,
    netlock,
    options,
    recovery,
    rollforward,
    sealing,
)
from shim.checkpoint.adopt import write_archive_in_place
from shim.checkpoint.archive import Member, directory_members
from shim.checkpoint.metadata import config_dump, spec_dump, status_dump
from shim.checkpoint.prefreeze import PreFreeze
from shim.checkpoint.rootfs import deleted_files_json, write_rootfs_diff
from shim.checkpoint.stream_archive import StreamedArchive
from shim.cleanup import undo
from shim.config import Config
from shim.containerd import Containerd
from shim.errors import FailedPrecondition, Internal, ResourceExhausted, ShimError
from shim.faults import Point, reached
from shim.journal import Journal, Operation, Record
from shim.metrics import record_checkpoint, record_failure
from shim.peer import Peer
from shim.signing import SigningKey

log = logging.getLogger(__name__)
THAW_TIMEOUT = 30.0
# How long a cancelled checkpoint still waits for runc's dump to end before it thaws.
DUMP_GRACE = 60.0
# After a stop-after dump, how long to wait for containerd to record the exit CRIU caused.
EXIT_SEEN_TIMEOUT = 10.0
# Ours: what a restore needs that no standard member records.
FACTS_MEMBER = layout.FACTS


@dataclass(frozen=True)
class Request:
    container_id: str
    location: str
    peer: Peer


@dataclass(frozen=True)
class Target:
    """What we learned about the container before touching it."""

    status: cri.ContainerStatus
    pod: str
    namespace: str
    options: options.CheckpointOptions
    pod_ips: tuple[str, ...] = ()
    netns: Path | None = None  # the pod's network namespace
    seal: sealing.SealKey | None = None  # encryption at rest: the archive is sealed with this key
    compression: compression.Compression | None = None  # zstd: the archive is a compressed tar


@dataclass
class Outcome:
    stopped: bool = False  # a stop-after dump succeeded: CRIU ended the container, nothing to thaw
    committed: bool = False  # a stop-after dump passed the gate: CRIU ends the container, only the archive is left
    size: int = 0
    freeze_s: float = 0.0  # the pause itself
    frozen_s: float = 0.0
    dump_s: float = 0.0
    archive_s: float = 0.0


class Checkpointer:
    def __init__(self, containerd: Containerd, config: Config, journal: Journal | None = None) -> None:
        self._containerd = containerd
        self._config = config
        self._journal = journal or Journal.in_state_dir(config.state_dir)
        # Weak: a lock lives only while a checkpoint of that container holds or awaits it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def checkpoint(self, request: Request) -> None:
        started, outcome, target = time.monotonic(), Outcome(), None
        try:
            target = await self._inspect(request)
            path = location.validate(request.location)
            # Runs `criu --version` on a change of the binary: off the event loop.
            await asyncio.to_thread(criu.require, self._config.criu, request.container_id)
            # A key that cannot sign refuses the checkpoint before the container is touched.
            key = await asyncio.to_thread(_signing_key, self._config)
            async with self._lock(request.container_id):
                await held.complete_once_committed(self._checkpoint(request.container_id, path, target, outcome, key),
                                                   lambda: outcome.committed)
                if outcome.stopped:
                    await self._until_exited(request.container_id)
        except ShimError as exc:
            self._audit(request, target, outcome, started, f"error: {exc.code.name}: {exc.message}")
            record_failure("checkpoint", exc)
            raise
        except BaseException as exc:
            self._audit(request, target, outcome, started, f"error: {type(exc).__name__}")
            record_failure("checkpoint", exc)
            raise
        self._audit(request, target, outcome, started, "ok")
        record_checkpoint(time.monotonic() - started, {"freeze": outcome.freeze_s, "dump": outcome.dump_s,
                                                       "archive": outcome.archive_s}, outcome.frozen_s, outcome.size)

    async def _inspect(self, request: Request) -> Target:
        status, info = await self._containerd.container_status(request.container_id)
        if status.state != cri.CONTAINER_RUNNING:
            raise FailedPrecondition(f'container "{request.container_id}" is in '  # containerd's %q
                                     f"{cri.ContainerState.Name(status.state)} state. only RUNNING containers "
                                     "can be checkpointed")
        sandbox = await self._containerd.sandbox_status(str(info.get("sandboxID", "")))
        policy.admit_checkpoint(self._config.admission, policy.PodFacts(
            sandbox.metadata.namespace, sandbox.metadata.name, sandbox.runtime_handler, dict(sandbox.annotations)),
            request.container_id)
        opts = options.resolve(self._config.checkpoint, sandbox.annotations, status.metadata.name)
        packing = compression.wanted(self._config.checkpoint, sandbox.annotations, status.metadata.name)
        ips = tuple(i for i in (sandbox.network.ip, *(i.ip for i in sandbox.network.additional_ips)) if i)
        netns = _network_namespace(info)
        if opts.tcp_established and netns is not None:
            ips = await addresses.pod_addresses(netns, ips)  # with those a restore carried into this pod
        seal = None
        # The key is loaded before the container is touched: a missing or unusable key refuses the checkpoint.
        if sealing.wanted(self._config.encryption, sandbox.annotations, status.metadata.name,
                          sandbox.metadata.namespace, sandbox.metadata.name, request.container_id):
            seal = await asyncio.to_thread(sealing.load_key, self._config.encryption)
        return Target(status, sandbox.metadata.name, sandbox.metadata.namespace, opts, ips, netns, seal, packing)

    async def _until_exited(self, container_id: str) -> None:
        """Answer a stop-after checkpoint only once ContainerStatus says EXITED.

        CRIU ends the process at the end of the dump, but containerd learns of it from the shim's
        exit event a moment later; a migration that removes the source pod right after the answer
        (or checks its state) must see the truth, not RUNNING.
        """
        deadline = time.monotonic() + EXIT_SEEN_TIMEOUT
        while time.monotonic() < deadline:
            status, _ = await self._containerd.container_status(container_id)
            if status.state == cri.CONTAINER_EXITED:
                return
            await asyncio.sleep(0.01)
        log.warning("container %s: containerd still reports it running %.0f s after a stop-after dump",
                    container_id, EXIT_SEEN_TIMEOUT)

    def _lock(self, container_id: str) -> asyncio.Lock:
        # A second checkpoint of the same container waits for the first (bounded
        # by its own deadline); two dumps of one process tree would corrupt both.
        lock = self._locks.get(container_id)
        if lock is None:
            lock = self._locks[container_id] = asyncio.Lock()
        return lock

    async def _checkpoint(self, container_id: str, path: Path, target: Target, outcome: Outcome,
                          key: SigningKey | None) -> None:
        # Journalled before anything is acquired: a crash of ours from here on is undone at our next start.
        journal = await asyncio.to_thread(self._journal.begin, Operation.CHECKPOINT,
                                          **{recovery.CONTAINER: container_id, recovery.LOCATION: str(path)})
        try:
            await self._checkpoint_journalled(container_id, path, target, outcome, journal, key)
        finally:
            journal.close()

    async def _checkpoint_journalled(self, container_id: str, path: Path, target: Target, outcome: Outcome,
                                     journal: Record, key: SigningKey | None) -> None:
        record = await self._containerd.container_record(container_id)
        upperdir = await self._containerd.upperdir(record)
        with location.staging_dir(path, container_id, lambda p: journal.note(**{recovery.STAGING: str(p)})) \
                as staging:
            locking = target.options.tcp_established and target.netns is not None
            # Before the freeze, so as not to lengthen it: what the pod's nftables held before us and CRIU.
            tables = sorted(await netlock.tables(target.netns)) if locking and target.netns else []
            async with AsyncExitStack() as streaming, AsyncExitStack() as frozen:
                streamed = await self._stream_pages(container_id, staging, streaming, target)
                if locking and target.netns is not None:
                    self._tidy_tables_at_exit(target.netns, set(tables), frozen)  # exits last: after the thaw
                cgroup = await recovery.freezer_dir(self._containerd, container_id)
                prefreeze: PreFreeze | None = None
                gate = await held.make_gate(staging, target.options, cgroup, streaming)
                if gate is None:  # paused by us around the dump
                    journal.note(**{recovery.PAUSED: True})
                    await self._freeze(container_id, frozen, outcome)
                else:
                    journal.note(**{recovery.DUMPING: True})
                    if target.options.stop_after and cgroup is not None:  # its guard goes after the thaw below
                        prefreeze = await PreFreeze.start(cgroup, staging / "work" / layout.DUMP_LOG, frozen)
                    held.keep_running_on_failure(self._containerd, container_id, frozen)
                if locking and target.netns is not None:
                    journal.note(**{recovery.NETNS: str(target.netns), recovery.NETNS_TABLES: tables})
                    await self._lock_network(target.netns, staging / layout.IMAGES_DIR, frozen, outcome)

                async def snapshot() -> list[str] | None:
                    """The filesystem side, while the container is stopped (a sibling may not be)."""
                    try:
                        deleted = await asyncio.to_thread(_rootfs_diff, upperdir, staging)
                        await asyncio.to_thread(devshm.save, record.spec.value, staging / devshm.MEMBER)
                    except OSError as exc:
                        raise _storage_error(path, exc) from None
                    return deleted

                written: set[str] = set()  # a stop-after archive's members written before its gate opened

                async def prepare(deleted: list[str] | None, criu_pid: int) -> None:
                    """Stop-after, every page kept: all of the archive but what CRIU writes last, and the marker."""
                    if streamed is not None:
                        written.update(await self._write_before_gate(
                            streamed, container_id, path, staging, target, (record.spec.value, record.runtime.name),
                            deleted, criu_pid))

                dump_started, dumped_at = time.monotonic(), math.nan
                dump = self._dump_streamed(container_id, staging, target.options, streamed, path)
                if gate is not None and cgroup is not None:
                    def committing() -> None:
                        outcome.committed = target.options.stop_after

                    async def settle() -> None:
                        """Stop-after, CRIU at the gate: every page kept (a full disk fails the dump there)."""
                        if streamed is not None:
                            try:
                                await asyncio.to_thread(streamed.dump_ended)
                            except OSError as exc:
                                raise _storage_error(path, exc) from None

                    stop_after = target.options.stop_after
                    diff = await held.dump_holding(gate, cgroup, dump, snapshot, committing,
                                                   settle if stop_after else None, prefreeze,
                                                   prepare if stop_after else None)
                    dumped_at = time.monotonic()
                    outcome.dump_s = dumped_at - dump_started
                    outcome.stopped = target.options.stop_after
                else:
                    reached(Point.CHECKPOINT_FROZEN)
                    await dump
                    outcome.dump_s = time.monotonic() - dump_started
                    outcome.stopped = target.options.stop_after
                    reached(Point.CHECKPOINT_DUMPED)
                    diff = await snapshot()
                # Thawed (and unlocked) before the archive is written; but a stop-after archive prepared before
                # its gate is completed first: its container is gone, and until the rename only recovery
                # could save it (the network lock's narrowing and CRIU's tables wait those few ms).
                if not written:
                    await frozen.aclose()
                if written:  # the rest of a stop-after archive: what CRIU wrote last
                    members = await asyncio.to_thread(rollforward.late_members, staging, written)
                else:
                    members = archive_members(staging, record.spec.value, target, record.runtime.name,
                                              datetime.now(UTC), diff)
                reached(Point.CHECKPOINT_ARCHIVE)
                archive_started = time.monotonic()
                try:
                    outcome.size = await asyncio.to_thread(self._write_archive, streamed, path, members, target)
                    if outcome.committed and gate is not None and gate.opened_at is not None:
                        # The window in which only recovery's roll-forward saves a stop-after container, and
                        # the part of it in which not even that could (the inventory still in the pipe):
                        # README "Checkpointing".
                        opened = gate.opened_at
                        log.info("container %s: stop-after archive complete %.3f s after CRIU's gate opened "
                                 "(inventory kept after %.4f s, CRIU and runc done after %.3f s)", container_id,
                                 time.monotonic() - opened, (gate.kept_at or math.nan) - opened,
                                 dumped_at - opened)
                    await asyncio.to_thread(_sign, path, key)
                except OSError as exc:
                    raise _storage_error(path, exc) from None
                outcome.archive_s = time.monotonic() - archive_started
                if gate is not None and cgroup is not None:  # after the archive: not in a stop-after's window
                    outcome.frozen_s = await asyncio.to_thread(held.criu_frozen_s, staging / "work")
                await frozen.aclose()  # (a no-op if done above)

    async def _write_before_gate(self, streamed: StreamedArchive, container_id: str, path: Path, staging: Path,
                                 target: Target, spec_runtime: tuple[bytes, str], deleted: list[str] | None,
                                 criu_pid: int) -> set[str]:
        """A stop-after archive before its gate opens: every member but what CRIU writes last (its
        inventory, the images it still holds open, its statistics and log), then the marker by which
        recovery completes it should criu-shim die once the gate is open. The names written."""
        images = staging / layout.IMAGES_DIR
        late = rollforward.late_names(await asyncio.to_thread(dumpgate.held_open, criu_pid, images))
        spec, runtime = spec_runtime
        members = archive_members(staging, spec, target, runtime, datetime.now(UTC), deleted, skip=late)
        durable = self._config.checkpoint.fsync
        level = target.compression.level if target.compression is not None and target.seal is None else None
        try:
            end, file_end = await asyncio.to_thread(streamed.append, members, durable)
            marker = rollforward.Marker(container_id, path, staging, end, file_end, level)
            await asyncio.to_thread(rollforward.write_marker, marker, durable)
        except OSError as exc:
            raise _storage_error(path, exc) from None
        return {m.name for m in members} | streamed.image_names

    async def _stream_pages(self, container_id: str, staging: Path, stack: AsyncExitStack,
                            target: Target) -> StreamedArchive | None:
        """Memory straight into the archive during the dump (pagestream); None: built afterwards."""
        directory = await recovery.freezer_dir(self._containerd, container_id)
        try:
            count = await asyncio.to_thread(freezer.processes, directory) if directory else 1
        except freezer.FreezerError:
            count = 1
        streamed = await asyncio.to_thread(StreamedArchive.open, staging, count, target.seal, target.compression)
        if streamed is not None:
            stack.push_async_callback(undo, asyncio.to_thread(streamed.close), None, "close the page stream")
        return streamed

    async def _dump_streamed(self, container_id: str, staging: Path, opts: options.CheckpointOptions,
                             streamed: StreamedArchive | None, path: Path) -> None:
        """The dump, then the end of the page stream whatever the dump's outcome (the pipes drained)."""
        try:
            await self._dump(container_id, staging, opts)
        except BaseException as exc:
            if streamed is not None:
                await undo(asyncio.to_thread(streamed.dump_ended), exc, "end the page stream")
            raise
        if streamed is not None:
            try:
                await asyncio.shield(asyncio.to_thread(streamed.dump_ended))
            except OSError as exc:
                raise _storage_error(path, exc) from None

    def _write_archive(self, streamed: StreamedArchive | None, path: Path, members: list[Member],
                       target: Target) -> int:
        if streamed is not None:
            return streamed.complete(path, members, self._config.checkpoint.fsync)
        if target.seal is not None or target.compression is not None:
            return sealing.write_sealed_archive(path, members, target.seal, self._config.checkpoint.fsync,
                                                target.compression)
        return write_archive_in_place(path, members, self._config.checkpoint.fsync)

    async def _freeze(self, container_id: str, stack: AsyncExitStack, outcome: Outcome) -> None:
        pausing = time.monotonic()
        await self._containerd.pause(container_id)
        frozen_at = time.monotonic()
        outcome.freeze_s = frozen_at - pausing

        async def thaw(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
            outcome.frozen_s = time.monotonic() - frozen_at
            if not outcome.stopped:
                await undo(asyncio.wait_for(recovery.resume(self._containerd, container_id), THAW_TIMEOUT),
                            exc, f"thaw container {container_id}")
            return False

        stack.push_async_exit(thaw)

    async def _lock_network(self, netns: Path, images: Path, stack: AsyncExitStack, outcome: Outcome) -> None:
        """Lock the pod's TCP around the dump; released on every path (see netlock)."""
        await netlock.run_nft(netns, netlock.lock_script())

        async def release(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
            await undo(self._release_network(netns, images, outcome.stopped), exc,
                        f"release the network lock in {netns}")
            return False

        stack.push_async_exit(release)

    def _tidy_tables_at_exit(self, netns: Path, before: set[str], stack: AsyncExitStack) -> None:
        """The tables CRIU's own connection lock leaves in the pod, removed once the container runs again."""
        async def tidy(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
            if netns.exists():
                await undo(_drop_tables(netns, before), exc, f"remove empty tables in {netns}")
            return False

        stack.push_async_exit(tidy)

    async def _release_network(self, netns: Path, images: Path, stopped: bool) -> None:
        if stopped:  # the source is gone: its peers must see silence, not resets
            try:
                connections = await asyncio.to_thread(netlock.dumped_connections, images)
                await netlock.run_nft(netns, netlock.narrow_script(connections))
                return
            except Exception:  # never leave the whole pod locked
                log.exception("could not narrow the network lock in %s; removing it", netns)
        await netlock.run_nft(netns, netlock.unlock_script(), missing_ok=True)

    async def _dump(self, container_id: str, staging: Path, opts: options.CheckpointOptions) -> None:
        request = runc_options.CheckpointOptions(
            # exit: runc lets CRIU end the container after a successful dump (stop-after).
            exit=opts.stop_after, open_tcp=opts.tcp_established, file_locks=opts.file_locks,
            external_unix_sockets=opts.ext_unix_sockets,
            image_path=str(staging / layout.IMAGES_DIR), work_path=str(staging / "work"))
        try:
            await _outlive_cancellation(self._containerd.checkpoint_task(container_id, request, timeout=None))
        except ShimError as exc:
            if await asyncio.to_thread(_out_of_space, staging / "work" / layout.DUMP_LOG, staging):
                raise ResourceExhausted(f"no space left on the filesystem of {staging.parent} for the checkpoint "
                                        f"images (CRIU: {exc.message})") from None
            raise _explain_dump_failure(exc, staging / "work" / layout.DUMP_LOG, self._config.state_dir / criulog.LOGS,
                                        container_id) from None

    def _audit(self, request: Request, target: Target | None, outcome: Outcome, started: float,
               result: str) -> None:
        audit.append(self._config.audit_log, audit.AuditRecord(
            action=audit.Action.CHECKPOINT, caller_uid=request.peer.uid, caller_pid=request.peer.pid,
            pod=target.pod if target else "", namespace=target.namespace if target else "",
            container=target.status.metadata.name if target else "", container_id=request.container_id,
            location=request.location, size=outcome.size, duration_s=round(time.monotonic() - started, 4),
            frozen_s=round(outcome.frozen_s, 4), dump_s=round(outcome.dump_s, 4),
            archive_s=round(outcome.archive_s, 4), result=result,
            encryption_key_id=target.seal.key_id if target and target.seal else "",
            compression="zstd" if target and target.compression else ""))


def _signing_key(config: Config) -> SigningKey | None:
    return signing.load_signing_key(config.signing.key_file) if config.signing.key_file else None


def _sign(archive: Path, key: SigningKey | None) -> None:
    """ARCHIVE.sig for the archive just written; a failure takes the archive away too (nothing half-done)."""
    sig = signing.signature_path(archive)
    try:
        if key is None:
            sig.unlink(missing_ok=True)  # a replaced archive's old signature would call the new one tampered
        else:
            signing.sign_archive(archive, key)
    except BaseException:
        archive.unlink(missing_ok=True)
        raise


async def _drop_tables(netns: Path, before: set[str]) -> None:
    dropped = await netlock.drop_new_empty_tables(netns, before)
    if dropped:
        log.debug("removed the empty tables %s CRIU left in %s", dropped, netns)


async def _outlive_cancellation(call: Coroutine[Any, Any, None], grace: float = DUMP_GRACE) -> None:
    """Run `call` to its end even if we are cancelled meanwhile (then re-raise the cancellation).

    A cancelled CheckpointContainer (deadline, client gone) must not thaw the
    container while runc is still dumping it: CRIU puts the freezer back the way
    it found it, frozen, when it finishes, and the container would stay paused.
    """
    task = asyncio.ensure_future(call)
    try:
        await asyncio.shield(task)
        return
    except asyncio.CancelledError:
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        while not task.done() and loop.time() < until:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), until - loop.time())
        if not task.done():
            log.warning("the dump outlived its cancellation by %.0fs; abandoning it", grace)
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:
            log.info("the cancelled dump ended with: %s", task.exception())
        raise


def _network_namespace(info: dict[str, Any]) -> Path | None:
    namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
    paths = [n.get("path") for n in namespaces if n.get("type") == "network" and n.get("path")]
    return Path(paths[0]) if paths else None


def _rootfs_diff(upperdir: Path | None, staging: Path) -> list[str] | None:
    if upperdir is None:
        return None
    return write_rootfs_diff(upperdir, staging / layout.ROOTFS_DIFF).deleted


def archive_members(staging: Path, spec: bytes, target: Target, runtime: str, checkpointed: datetime,
                    deleted: list[str] | None, skip: frozenset[str] = frozenset()) -> list[Member]:
    """The archive's members: checkpointctl's dump files, our facts, CRIU's image directory as staged,
    CRIU's log and statistics, the rootfs diff and /dev/shm (a lazy migration's small archive too).
    `skip`: names left for later (a stop-after archive before its gate: `rollforward.late_names`)."""
    status = target.status
    members = [*head_members(spec, target, runtime, checkpointed),
               *directory_members(layout.IMAGES_DIR, staging / layout.IMAGES_DIR, skip)]
    for name, source in ((layout.DUMP_LOG, staging / "work" / layout.DUMP_LOG),
                         (layout.STATS_DUMP, staging / "work" / layout.STATS_DUMP),  # CRIU writes it to its work dir
                         (layout.ROOTFS_DIFF, staging / layout.ROOTFS_DIFF),
                         (devshm.MEMBER, staging / devshm.MEMBER)):
        if source.is_file() and name not in skip:
            members.append(Member(name, source=source))
    if deleted:
        members.append(Member(layout.DELETED_FILES, data=deleted_files_json(deleted)))
    log_path = Path(status.log_path)
    if status.log_path and log_path.is_file() and not log_path.is_symlink():
        members.append(Member(layout.CONTAINER_LOG, source=log_path))
    return members


def head_members(spec: bytes, target: Target, runtime: str, checkpointed: datetime) -> list[Member]:
    """What is known of the container before anything is dumped: its spec, config and status, our facts
    (a lazy migration's first part, shim.restore.second_part, is just these)."""
    status = target.status
    created = datetime.fromtimestamp(status.created_at / 1e9, UTC)
    return [
        Member(layout.SPEC_DUMP, data=spec_dump(spec)),
        Member(layout.CONFIG_DUMP, data=config_dump(status.id, status.metadata.name, status.image.image,
                                                     status.image_ref, runtime, created, checkpointed)),
        Member(layout.STATUS_DUMP, data=status_dump(status)),
        # The pod's addresses (established TCP sockets are bound to them) and the machine
        # the memory image is for (a restore elsewhere must refuse it clearly).
        Member(FACTS_MEMBER, data=json.dumps({"pod_ips": list(target.pod_ips), "architecture": go_arch(),
                                             "tcp_established": target.options.tcp_established}).encode()),
    ]


def _storage_error(path: Path, exc: OSError) -> ShimError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left writing checkpoint {path}: {exc.strerror}")
    return Internal(f"writing checkpoint {path} failed: {exc.strerror or exc}")


# Below this much free space a failed dump is taken for a full disk: CRIU's own log may
# not have found room to say so (it is written on the same filesystem).
FULL_DISK_MARGIN = 1 << 20


def _out_of_space(dump_log: Path, staging: Path) -> bool:
    try:
        if "No space left on device" in dump_log.read_text(errors="replace"):
            return True
    except OSError:
        pass
    try:
        vfs = os.statvfs(staging)
    except OSError:
        return False
    return vfs.f_bavail * vfs.f_frsize < FULL_DISK_MARGIN


def _explain_dump_failure(error: ShimError, dump_log: Path, logs: Path, container_id: str) -> ShimError:
    """runc's error as it was, then CRIU's reason, the advice its error lines ask for, and the kept log."""
    kept = criulog.keep(dump_log, logs, container_id, "dump")  # the staging dir goes with the failure
    return criulog.reworded(error, criulog.explain(error.message, criulog.read_log(dump_log), kept))
