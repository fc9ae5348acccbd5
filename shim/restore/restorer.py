"""Restore at CreateContainer: a checkpoint archive becomes a container of the new pod.

The proxy unpacks the archive (hostile input: `shim.restore.checkpoint_unpack`) into a
private directory, resolves the original image, and sends containerd an
ordinary CreateContainerRequest built from the checkpoint and the new request
(`shim.restore.create_request`). The container is marked so that our runtime
shim restores it with CRIU at StartContainer instead of starting it afresh.

Like the checkpoint (shim.checkpoint.checkpointer), every step that acquires something
registers its release on an AsyncExitStack as it acquires it: the journal record,
the work dir, the relay, the exported layer, the spare started alongside. Releases
run shielded (shim.cleanup), so a failure, a deadline or a client gone at any
point leaves nothing behind; once containerd has the container, the relay owns the
work dir and the undo is dropped (`pop_all`). Work in a worker thread is waited for
before any undo runs, so an undo never races a thread still writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

from shim import faults
from shim.annotations import IMAGES_FROM
from shim.api.cri.v1 import api_pb2 as cri
from shim.checkpoint import options
from shim.checkpoint.criulog import LOGS
from shim.cleanup import release_at_exit, to_thread_to_end
from shim.config import NETWORK_LOCK_NFTABLES, PAGE_DAEMON_OURS, Config
from shim.containerd import Containerd
from shim.containerd_images import ContainerdImages
from shim.errors import FailedPrecondition, InvalidArgument, ShimError
from shim.handoff import CRIU_CONFIG_ANNOTATION, CRIU_CONFIG_SUFFIX, SHIM_DIR, criu_config
from shim.journal import Journal, Operation
from shim.metrics import record_failure, record_restore, record_restore_stage
from shim.oci import SEALED_CHECKPOINT
from shim.peer import Peer
from shim.restore import lazy, network_lock, recovery, second_part, unseal, unseal_lazy
from shim.restore.admission import RestoreAdmission
from shim.restore.audit_trail import RestoreAudits
from shim.restore.base_image import resolve_base_image
from shim.restore.checkpoint_unpack import CheckpointArchive, open_checkpoint
from shim.restore.create_request import (
    LAZY_ANNOTATION,
    add_criu_option,
    check_architecture,
    check_hostile_spec,
    copy_log,
    lazy_wanted,
    restore_request,
    source_name,
    write_criu_config,
)
from shim.restore.criulogs import LOGS_ANNOTATION
from shim.restore.image import CheckpointImage, ImageStore, checkpoint_image, export_layer, layer_path, read_head
from shim.restore.network import TcpRestore, addresses_to_keep, recorded_ips, taken, write_plan
from shim.restore.pending import PendingRestores
from shim.restore.relay_processes import Relay, SparePool
from shim.restore.selinux import selinux_enforcing
from shim.restore.signature import UNCHECKED, check_unchanged, verify_signature
from shim.sealed import is_encrypted
from shim.signing import Verdict

log = logging.getLogger(__name__)
METHOD = "/runtime.v1.RuntimeService/CreateContainer"
__all__ = ["LAZY_ANNOTATION", "METHOD", "Restorer"]
# The archive reader: open_checkpoint's signature (tests give an in-memory twin).
Unpack = Callable[..., CheckpointArchive]


class Restorer:
    def __init__(self, containerd: Containerd, config: Config, *, relays: SparePool | None = None,
                 unpack: Unpack = open_checkpoint, pending: PendingRestores | None = None,
                 images: ImageStore | None = None) -> None:
        self._containerd = containerd
        self._image_store = images
        self._config = config
        self._unpack_archive = unpack
        # Created for restore, not yet started: their relays and the relays' pids (bounded).
        self._pending = pending if pending is not None else PendingRestores()
        self._uffd: bool | None = None  # whether CRIU can restore lazily here (probed once)
        self._nftables: bool | None = None  # whether CRIU can lock restored connections with nftables (probed once)
        self._creating: set[str] = set()  # work dir names of restores inside CreateContainer
        self._reading: dict[Path, int] = {}  # archives CreateContainer reads now, and by how many calls
        self._after = asyncio.Event()  # a restore started or failed: work for after its answer (after_restores)
        self._journal = Journal.in_state_dir(config.state_dir)
        self._audits = RestoreAudits(config.audit_log)
        self._admission = RestoreAdmission(containerd, config)
        self._relays = relays if relays is not None else SparePool(config.restore.work_dir, journal=self._journal.directory)

    async def open(self) -> None:
        """Get ready before the first restore: a spare relay, the CRIU feature probes, CRIU's image readers
        imported, old configs gone."""
        if self._config.restore.enabled:
            await asyncio.to_thread(self._relays.refill)
            await asyncio.gather(self._lazy_possible(), self._nftables_lock(), asyncio.to_thread(_import_image_readers))
            await self.collect_configs()

    async def collect_configs(self) -> list[Path]:
        """Remove the CRIU configs of restored containers that no longer exist; the files removed.

        A restored container keeps its `<key>.criu.conf` for as long as it exists
        (runc reads it again at a re-checkpoint), so it outlives the relay. At
        start-up, and after each restore, the ones no container names go.
        """
        root = self._config.restore.work_dir
        if not root.is_dir():
            return []
        try:
            used = await self._containerd.container_annotation_values(CRIU_CONFIG_ANNOTATION)
        except ShimError as exc:
            log.warning("could not list containers to collect old CRIU configs: %s", exc.message)
            return []
        # A restore inside CreateContainer has its config before containerd has the container.
        keep = used | {str(criu_config(root / name)) for name in self._creating}
        return await asyncio.to_thread(_remove_configs, root, keep)

    async def after_restores(self) -> None:
        """What a restore leaves for after its answer, run soon after each start (or failed create): the next
        spare relay and old CRIU configs collected. A restore's CreateContainer and StartContainer are
        inside a migration's pause, where a spare's interpreter start-up (two of them: it starts a spare
        page daemon too) competed with the dump and the restore for the cores. Owned by the app's TaskGroup."""
        while True:
            await self._after.wait()
            self._after.clear()
            try:
                await asyncio.to_thread(self._relays.refill)
                await self.collect_configs()
            except Exception:  # a bad pass must not end this, nor the proxy
                log.exception("the work after a restore failed; trying again after the next one")

    async def close(self) -> None:
        self._audits.close()
        await asyncio.to_thread(self._relays.close)

    async def after_start(self, container_id: str) -> None:
        """Refuse a restore that containerd started fresh (its runtime handler is not ours)."""
        pending = self._pending.pop(container_id)
        if pending is None:
            return
        if pending.relay.upstream_file.exists():  # the launcher handed the task to our relay
            pending.relay.upstream_file.unlink(missing_ok=True)
            self._after.set()  # after the answer: a restore's StartContainer is inside a migration's pause
            return
        with contextlib.suppress(OSError):
            os.kill(pending.pid, signal.SIGTERM)  # never used: it would wait for containerd in vain
        await self._containerd.stop_container(container_id)
        raise FailedPrecondition(
            f"container {container_id} was started afresh instead of restored: containerd did not run it "
            "through criu-shim's runtime handler (make \"criu\" the default handler, see "
            "node-config/containerd-cri.toml)")

    async def source(self, request: cri.CreateContainerRequest) -> Path | CheckpointImage | None:
        """What to restore from: an archive (the image names a file) or a checkpoint image; else None."""
        image = request.config.image.image
        if image.startswith("/") and os.path.lexists(image):
            return Path(image)
        if not image:
            return None
        return await checkpoint_image(self._images(), image)

    async def create(self, request: cri.CreateContainerRequest, source: Path | CheckpointImage, peer: Peer,
                     metadata: tuple[tuple[str, str], ...], timeout: float | None) -> cri.CreateContainerResponse:
        started, result, container_id = time.monotonic(), "ok", ""
        notes: dict[str, str] = {}  # what the audit line says about the archive
        try:
            self._admission.require_enabled(request.config.image.image)
            self._collect_pending()
            self._pending.admit(len(self._creating))
            await self._admission.pod(request)
            archive = self._admission.source(source)
            # Before anything is created: a refused signature leaves nothing behind.
            verdict = await asyncio.to_thread(verify_signature, self._config.signing, archive,
                                              request.config.image.image)
            with self._holding(archive):
                container_id = await self._create(request, archive, metadata, timeout, verdict, notes)
        except ShimError as exc:
            result = f"error: {exc.code.name}: {exc.message}"
            record_failure("restore", exc)
            raise
        except BaseException as exc:
            result = f"error: {type(exc).__name__}"
            record_failure("restore", exc)
            raise
        finally:
            self._audits.create_ended(request, peer, container_id, started, result, notes.get("compression", ""))
        record_restore(time.monotonic() - started)
        return cri.CreateContainerResponse(container_id=container_id)

    def archives_in_use(self) -> set[Path]:
        """Archives a CreateContainer reads now (retention keeps them; a lazy restore's loop devices it sees itself)."""
        return set(self._reading)

    def is_pending(self, container_id: str) -> bool:
        """Created for restore and not started yet."""
        return container_id in self._pending

    async def complete(self, container_id: str) -> None:
        """At StartContainer: the second part of a restore created from its first (shim.restore.second_part)
        unpacked into place; nothing to do for any other container."""
        pending = self._pending.get(container_id)
        if pending is None or pending.later is None:
            return
        later = pending.later
        if not later.path.is_file():
            raise FailedPrecondition(f"the second part of the checkpoint of container {container_id} is not at "
                                     f"{later.path} (annotation {IMAGES_FROM}): nothing to restore yet")
        faults.reached(faults.Point.RESTORE_SECOND_PART)
        started = time.monotonic()
        path = self._admission.source(later.path)
        assert isinstance(path, Path)
        verdict = await asyncio.to_thread(verify_signature, self._config.signing, path, str(path))
        with self._holding(path):
            remote = await to_thread_to_end(second_part.complete, later, path, pending.relay.work,
                                            self._unpack_archive, self._config.criu, self._config.restore.page_daemon)
            await asyncio.to_thread(check_unchanged, verdict, path, str(path))
        if remote:
            await asyncio.to_thread(add_criu_option, pending.relay.work, lazy.CRIU_OPTION)
        self._pending.completed(container_id)
        log.info("the second part of restored container %s is in place (%.1f ms; memory %s)", container_id,
                 (time.monotonic() - started) * 1000, "from its source node" if remote else "in the images")

    def sandbox_of(self, container_id: str) -> str | None:
        """The pod of a restore created and not started yet, as CreateContainer named it."""
        pending = self._pending.get(container_id)
        return pending.sandbox or None if pending is not None else None

    def handed_over(self, container_id: str) -> bool:
        """Our launcher handed the pending restore's task to its relay (it wrote the upstream file)."""
        pending = self._pending.get(container_id)
        return pending is not None and pending.relay.upstream_file.exists()

    def _images(self) -> ImageStore:
        """containerd's image store, over the proxy's connection (made at first use: most restores read a file)."""
        if self._image_store is None:
            self._image_store = ContainerdImages(self._containerd.channel)
        return self._image_store

    def start_ended(self, container_id: str, error: BaseException | None) -> None:
        """The StartContainer of a restore ended: its one audit line, with the Create and the Start outcome."""
        self._audits.start_ended(container_id, error)

    def _collect_pending(self) -> None:
        """Forget restores created and never started within the relay's wait (shim.restore.pending)."""
        for container_id in self._pending.collect():
            log.warning("restored container %s was created and never started; forgotten", container_id)
            self._audits.given_up(container_id, self._pending.ttl)

    @contextlib.contextmanager
    def _holding(self, archive: Path | CheckpointImage) -> Iterator[None]:
        """Retention keeps an archive file while a CreateContainer reads it."""
        if not isinstance(archive, Path):
            yield
            return
        self._reading[archive] = self._reading.get(archive, 0) + 1
        try:
            yield
        finally:
            count = self._reading.pop(archive) - 1
            if count > 0:
                self._reading[archive] = count

    async def _create(self, request: cri.CreateContainerRequest, source: Path | CheckpointImage,
                      metadata: tuple[tuple[str, str], ...], timeout: float | None,
                      verdict: Verdict = UNCHECKED, notes: dict[str, str] | None = None) -> str:
        work = self._config.restore.work_dir / uuid.uuid4().hex
        layer = layer_path(work)
        async with AsyncExitStack() as always:
            self._journal_create(request, work, always)
            self._creating.add(work.name)
            always.callback(self._creating.discard, work.name)
            # A lazy restore's loop device keeps the data it needs.
            release_at_exit(always, f"remove {layer}", lambda: asyncio.to_thread(layer.unlink, missing_ok=True))
            async with AsyncExitStack() as undo_unless_created:
                later = second_part.requested(request, self._config.restore.allowed_dirs)
                relay = self._work_dir_and_relay(work, undo_unless_created)
                unpack_started = time.monotonic()
                archive_path = await self._archive_file(source, layer)
                archive = await self._unpack(archive_path, work, lazy_wanted(request), later is not None)
                if notes is not None and archive.compression != "none":
                    notes["compression"] = f"{archive.compression} (eager: lazy pages need an uncompressed archive)"
                await asyncio.to_thread(check_unchanged, verdict, archive_path, source_name(source))
                await asyncio.to_thread(check_architecture, work)
                await self._admission.origin(request, archive.spec, source_name(source))
                unpacked = time.monotonic() - unpack_started
                # Handed over now: a lazy restore's page daemon starts up while the rest is prepared.
                relay = relay or self._take_relay(work, undo_unless_created)
                faults.reached(faults.Point.RESTORE_UNPACKED)
                undo_unless_created.callback(self._after.set)  # a failed create refills at once; a start does too
                container_id = await self._create_in_containerd(request, source, archive, archive_path, work,
                                                                metadata, timeout, unpacked, later)
                faults.reached(faults.Point.RESTORE_CREATED)
                self._pending.add(container_id, relay, await self._relays.wait_ready(relay), request.pod_sandbox_id,
                                  later)
                undo_unless_created.pop_all()  # from here the relay owns `work` (it removes it when the task is gone)
                return container_id
        raise AssertionError("unreachable: the stack re-raises what ended the block")

    def _journal_create(self, request: cri.CreateContainerRequest, work: Path, always: AsyncExitStack) -> None:
        """Until containerd has the container and its relay listens, a crash of ours is undone by the
        reconciler (shim.restore.recovery); from then on the relay's own record covers it.

        Begun on the loop (one small file): a cancellation cannot fall between the record and its release.
        """
        sandbox = request.sandbox_config.metadata
        record = self._journal.begin(Operation.RESTORE, **recovery.create_facts(
            work, SHIM_DIR, sandbox.name, sandbox.namespace, request.config.metadata.name,
            request.config.image.image))
        # Registered first, so closed last: released above, or handed to the relay.
        release_at_exit(always, "close the restore's journal record", lambda: asyncio.to_thread(record.close))

    def _work_dir_and_relay(self, work: Path, undo_stack: AsyncExitStack) -> Relay | None:
        """The private work dir, and the relay unless a spare waits; each released on failure.

        A spare relay is handed the restore once it is unpacked (it starts the page daemon
        at once); without one, a new relay starts now, its start-up overlapping the unpacking.
        Both on the loop (a mkdir, a fork): a cancellation cannot fall between them and their undo.
        """
        work.mkdir(mode=0o700, parents=True)
        release_at_exit(undo_stack, f"remove {work}", lambda: asyncio.to_thread(_remove_work, work))
        relay = self._relays.start_unless_spare(work)
        if relay is not None:
            self._abandon_at_exit(relay, undo_stack)
            self._after.set()  # no spare was waiting (one restore was never started): make one now
        return relay

    def _take_relay(self, work: Path, undo_stack: AsyncExitStack) -> Relay:
        relay = self._relays.take(work)
        self._abandon_at_exit(relay, undo_stack)
        return relay

    def _abandon_at_exit(self, relay: Relay, undo_stack: AsyncExitStack) -> None:
        """Stop the relay of a restore that failed before containerd got it (once it listens: it has a pid)."""
        async def abandon() -> None:
            with contextlib.suppress(ShimError):
                await self._relays.wait_ready(relay)
            self._relays.stop(relay)

        release_at_exit(undo_stack, f"stop the relay of {relay.work}", abandon)

    async def _archive_file(self, source: Path | CheckpointImage, layer: Path) -> Path:
        """The archive to unpack: the file itself, or a checkpoint image's layer exported to `layer`."""
        if isinstance(source, CheckpointImage):
            if source.layer.media_type == SEALED_CHECKPOINT:  # the key first: never copy a blob we cannot open
                head = await read_head(self._images(), source.layer, unseal.HEADER_BYTES)
                await asyncio.to_thread(unseal.check_key_opens, head, f"checkpoint image {source.name}",
                                        self._config.encryption)
            return await export_layer(self._images(), source.layer, layer)
        return source

    async def _create_in_containerd(self, request: cri.CreateContainerRequest, source: Path | CheckpointImage,
                                    archive: CheckpointArchive, archive_path: Path, work: Path,
                                    metadata: tuple[tuple[str, str], ...], timeout: float | None,
                                    unpacked: float, later: second_part.Later | None = None) -> str:
        """containerd's CreateContainer of the rewritten request; the new container's id.
        `later`: CRIU's images come at StartContainer (then so do the lazy option and the log)."""
        image = await resolve_base_image(self._containerd, archive.config, self._config.restore.allowed_registries)
        check_hostile_spec(archive.spec, request)
        tcp = await self._plan_network(request, work)
        if tcp is TcpRestore.ESTABLISHED and await self._nftables_lock():
            await asyncio.to_thread(network_lock.plan, work)
        label = await self._sandbox_label(request.pod_sandbox_id)
        new = restore_request(request, archive, image, work, source_name(source))
        # Where the relay keeps CRIU's logs should the restore fail (the task takes its own along).
        new.config.annotations[LOGS_ANNOTATION] = str(self._config.state_dir / LOGS)
        write_criu_config(work, self._config, request, label, tcp, bool(archive.deferred) or lazy.remote(work))
        if later is None:
            await to_thread_to_end(copy_log, archive.log, request)
        create_started = time.monotonic()
        reply = await self._containerd.forward(METHOD, new.SerializeToString(), metadata, timeout)
        log.info("restore of %s: unpacked in %.3fs, containerd created it in %.3fs", archive_path,
                 unpacked, time.monotonic() - create_started)
        record_restore_stage("unpack", unpacked)
        record_restore_stage("create", time.monotonic() - create_started)
        return str(cri.CreateContainerResponse.FromString(reply).container_id)

    async def _unpack(self, archive_path: Path, work: Path, lazy_wanted: bool, images_follow: bool = False,
                      sealed: unseal_lazy.PartlyDecrypted | None = None) -> CheckpointArchive:
        """Unpack the archive; under a lazy restore its large page images stay in it (shim.restore.lazy).
        `images_follow`: a first part (shim.restore.second_part), CRIU's images come at StartContainer."""
        if images_follow:
            if await asyncio.to_thread(is_encrypted, archive_path):
                raise InvalidArgument(f"checkpoint {archive_path} is sealed: a first part (annotation {IMAGES_FROM}) "
                                      "must be plain")
            first = await to_thread_to_end(self._unpack_archive, archive_path, work, images_follow=True)
            second_part.check_first_part(first)
            return first
        if await asyncio.to_thread(is_encrypted, archive_path):  # sealed: unpacked from its decrypted copy
            if await self._sealed_lazily(archive_path, lazy_wanted):  # its memory decrypted by the page daemon
                async with unseal_lazy.decrypted_partly(archive_path, work, self._config.encryption,
                                                        lazy.deferrable) as partial:
                    return await self._unpack(partial.plain, work, lazy_wanted, sealed=partial)
            async with unseal.decrypted(archive_path, work, self._config.encryption) as plain:
                return await self._unpack(plain, work, lazy_wanted)
        defer = lazy.deferrable if lazy_wanted and await self._lazy_possible() else None
        archive = await to_thread_to_end(self._unpack_archive, archive_path, work, defer=defer)
        if sealed is not None:  # what the unpacker copied out lies outside every hole (it read no zeros)
            sealed.check_holes((m.name, m.offset, m.size) for m in archive.deferred)
        if archive.compression != "none":
            # Lazy restore serves pages from the archive in place (a loop device over the member):
            # a compressed member has no such place, so its memory is unpacked before CRIU runs.
            log.info("restore of %s: the archive is %s-compressed: restored eagerly%s", archive_path,
                     archive.compression, " (lazy pages need an uncompressed archive)" if defer else "")
        await to_thread_to_end(lazy.check_memory_images, work, archive.deferred)  # before CRIU ever reads them
        if archive.deferred:
            assert self._config.criu is not None  # _lazy_possible() checked it
            await to_thread_to_end(lazy.prepare, archive_path, work, archive.deferred, self._config.criu,
                                   self._config.restore.page_daemon, sealed)
        else:  # a lazy migration's dump: the memory it lacks comes from the source node
            await to_thread_to_end(lazy.plan_remote, archive_path, work, self._config.criu,
                                   self._config.restore.page_daemon)
        return archive

    async def _sealed_lazily(self, archive_path: Path, lazy_wanted: bool) -> bool:
        """A sealed archive whose memory our page daemon can serve chunk by chunk (shim.restore.unseal_lazy)."""
        return (lazy_wanted and self._config.restore.page_daemon == PAGE_DAEMON_OURS and await self._lazy_possible()
                and await asyncio.to_thread(unseal_lazy.servable, archive_path))

    async def _lazy_possible(self) -> bool:
        """Lazy restore is on in the config and CRIU can do it here (userfaultfd, fork events)."""
        criu = self._config.criu
        if not self._config.restore.lazy_pages or criu is None:
            return False
        if self._uffd is None:
            from shim.criu import probe_feature

            probe = await asyncio.to_thread(probe_feature, str(criu), "uffd-noncoop")
            self._uffd = probe.supported
            if not probe.supported:
                log.warning("restores are not lazy: CRIU at %s lacks userfaultfd support (%s)", criu, probe.detail)
        return self._uffd

    async def _nftables_lock(self) -> bool:
        """Restored connections are locked with nftables (shim.restore.network_lock): configured, and CRIU can."""
        criu = self._config.criu
        if self._config.restore.network_lock != NETWORK_LOCK_NFTABLES or criu is None:
            return False
        if self._nftables is None:
            from shim.criu import probe_feature

            probe = await asyncio.to_thread(probe_feature, str(criu), "nftables")
            self._nftables = probe.supported
            if not probe.supported:
                log.info("restored TCP connections are locked with iptables: CRIU at %s lacks nftables (%s)",
                         criu, probe.detail)
        return self._nftables

    async def _plan_network(self, request: cri.CreateContainerRequest, work: Path) -> TcpRestore | None:
        """How TCP comes back (see restore.network), or None."""
        opts = options.resolve(self._config.checkpoint, request.sandbox_config.annotations,
                               request.config.metadata.name)
        if not opts.tcp_established and not opts.tcp_close:
            return None
        live = await self._containerd.live_pod_ips()
        if opts.tcp_close and (not opts.tcp_established or taken(recorded_ips(work), live)):
            return TcpRestore.CLOSE
        write_plan(work, addresses_to_keep(work, True, live))
        return TcpRestore.ESTABLISHED

    async def _sandbox_label(self, sandbox_id: str) -> str | None:
        """The new pod's SELinux process label, needed only where SELinux enforces."""
        if not selinux_enforcing():
            return None
        return await self._containerd.sandbox_process_label(sandbox_id)


def _remove_work(work: Path) -> None:
    """What a restore that failed before containerd got it leaves: idempotent, whatever was reached."""
    lazy.release(work)
    shutil.rmtree(work, ignore_errors=True)
    criu_config(work).unlink(missing_ok=True)


def _remove_configs(root: Path, keep: set[str]) -> list[Path]:
    removed = []
    for conf in root.glob(f"*{CRIU_CONFIG_SUFFIX}"):
        if str(conf) not in keep:
            conf.unlink(missing_ok=True)
            removed.append(conf)
    return removed


def _import_image_readers() -> None:
    """pycriu's image modules (protobuf), which every restore reads CRIU's images with: 40 ms of the first
    restore after start-up otherwise (a lazy migration's CreateContainer, 64 MiB: unpacked in 0.047 s,
    the next ones 0.006 s). Without pycriu the restores that need it say so themselves."""
    with contextlib.suppress(ImportError):
        import pycriu.images  # noqa: F401
