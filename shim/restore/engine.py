"""Restore at CreateContainer: a checkpoint archive becomes a container of the new pod.

The proxy unpacks the archive (hostile input: `shim.restore.checkpoint_unpack`) into a
private directory, resolves the original image, and sends containerd an
ordinary CreateContainerRequest built from the checkpoint and the new request:
the new pod's mounts, devices, resources, security context and log path win;
command, environment and working directory come from the checkpoint. The
container is marked (annotation `restore.criu-shim.io/dir`) so that our runtime
shim restores it with CRIU at StartContainer instead of starting it afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from shim import faults, policy
from shim.annotations import LAZY_PAGES, boolean
from shim.api.cri.v1 import api_pb2 as cri
from shim.arch import go_arch
from shim.checkpoint import audit, options
from shim.checkpoint.criulog import LOGS
from shim.config import Config
from shim.containerd import Containerd
from shim.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
)
from shim.handoff import CRIU_CONFIG_ANNOTATION, CRIU_CONFIG_SUFFIX, RESTORE_DIR, SHIM_DIR, criu_config
from shim.journal import Journal, Operation
from shim.metrics import record_failure, record_restore, record_restore_stage
from shim.peer import Peer
from shim.restore import lazy, recovery, unseal
from shim.restore.criulogs import LOGS_ANNOTATION
from shim.restore.image import CheckpointImage, checkpoint_image, export_layer
from shim.restore.network import (
    ARCHIVE_MEMBER,
    TcpRestore,
    addresses_to_keep,
    recorded_ips,
    taken,
    write_plan,
)
from shim.restore.relays import Relay, SparePool, stop_relay, wait_ready
from shim.restore.selinux import restore_lsm_options, selinux_enforcing
from shim.restore.signature import verify_signature
from shim.sealed import is_encrypted

log = logging.getLogger(__name__)
METHOD = "/runtime.v1.RuntimeService/CreateContainer"
LAZY_ANNOTATION = LAZY_PAGES


class Restorer:
    def __init__(self, containerd: Containerd, config: Config) -> None:
        self._containerd = containerd
        self._config = config
        # Created for restore, not yet started: their relays and the relays' pids.
        self._pending: dict[str, tuple[Relay, int]] = {}
        self._uffd: bool | None = None  # whether CRIU can restore lazily here (probed once)
        self._creating: set[str] = set()  # work dir names of restores inside CreateContainer
        self._reading: dict[Path, int] = {}  # archives CreateContainer reads now, and by how many calls
        self._journal = Journal.in_state_dir(config.state_dir)
        # Created restores whose StartContainer has not ended: their audit line, written then.
        self._unaudited: dict[str, tuple[audit.AuditRecord, float]] = {}
        self._relays = SparePool(config.restore.work_dir, journal=self._journal.directory)

    async def open(self) -> None:
        """Get ready before the first restore: a spare relay, the CRIU feature probe, old configs gone."""
        if self._config.restore.enabled:
            await asyncio.to_thread(self._relays.refill)
            await self._lazy_possible()
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
        removed = []
        for conf in root.glob(f"*{CRIU_CONFIG_SUFFIX}"):
            # A restore inside CreateContainer has its config before containerd has the container.
            in_progress = conf.name.removesuffix(CRIU_CONFIG_SUFFIX) in self._creating
            if str(conf) not in used and not in_progress:
                conf.unlink(missing_ok=True)
                removed.append(conf)
        return removed

    async def close(self) -> None:
        self._audit_unstarted()
        await asyncio.to_thread(self._relays.close)

    async def after_start(self, container_id: str) -> None:
        """Refuse a restore that containerd started fresh (its runtime handler is not ours)."""
        pending = self._pending.pop(container_id, None)
        if pending is None:
            return
        relay, pid = pending
        if relay.upstream_file.exists():  # the launcher handed the task to our relay
            relay.upstream_file.unlink(missing_ok=True)
            await self.collect_configs()
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)  # never used: it would wait for containerd in vain
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
        return await checkpoint_image(self._containerd.channel, image)

    async def create(self, request: cri.CreateContainerRequest, source: Path | CheckpointImage, peer: Peer,
                     metadata: tuple[tuple[str, str], ...], timeout: float | None) -> cri.CreateContainerResponse:
        started, result, container_id = time.monotonic(), "ok", ""
        try:
            self._require_enabled(request.config.image.image)
            await self._admit_pod(request)
            archive = self._admit(source) if isinstance(source, Path) else self._admit_image(source)
            # Before anything is created: a refused signature leaves nothing behind.
            await asyncio.to_thread(verify_signature, self._config.signing, archive, request.config.image.image)
            self._hold(archive, 1)
            try:
                container_id = await self._create(request, archive, metadata, timeout)
            finally:
                self._hold(archive, -1)
        except ShimError as exc:
            result = f"error: {exc.code.name}: {exc.message}"
            record_failure("restore", exc)
            raise
        except BaseException as exc:
            result = f"error: {type(exc).__name__}"
            record_failure("restore", exc)
            raise
        finally:
            self._audit(request, peer, container_id, started, result)
        record_restore(time.monotonic() - started)
        return cri.CreateContainerResponse(container_id=container_id)

    def archives_in_use(self) -> set[Path]:
        """Archives a CreateContainer reads now (retention keeps them; a lazy restore's loop devices it sees itself)."""
        return set(self._reading)

    def is_pending(self, container_id: str) -> bool:
        """Created for restore and not started yet."""
        return container_id in self._pending

    def handed_over(self, container_id: str) -> bool:
        """Our launcher handed the pending restore's task to its relay (it wrote the upstream file)."""
        pending = self._pending.get(container_id)
        return pending is not None and pending[0].upstream_file.exists()

    def _hold(self, archive: Path | CheckpointImage, change: int) -> None:
        if isinstance(archive, Path):
            count = self._reading.get(archive, 0) + change
            if count > 0:
                self._reading[archive] = count
            else:
                self._reading.pop(archive, None)

    def _require_enabled(self, image: str) -> None:
        policy.require_restore_enabled(self._config.restore.enabled, image)

    async def _admit_pod(self, request: cri.CreateContainerRequest) -> None:
        """The new pod may receive a restore (shim.policy); its facts come from containerd, not the request."""
        sandbox = await self._containerd.sandbox_status(request.pod_sandbox_id)
        facts = policy.PodFacts(sandbox.metadata.namespace, sandbox.metadata.name, sandbox.runtime_handler,
                                dict(sandbox.annotations))
        policy.admit_restore_into(self._config.admission, facts, request.config.image.image)

    async def _admit_origin(self, request: cri.CreateContainerRequest, spec: Any, image: str) -> None:
        """The checkpoint's own namespace against the new pod's (shim.policy), once the archive is read."""
        sandbox = await self._containerd.sandbox_status(request.pod_sandbox_id)
        facts = policy.PodFacts(sandbox.metadata.namespace, sandbox.metadata.name, sandbox.runtime_handler)
        policy.admit_origin(self._config.admission, facts, policy.origin_namespace(spec), image)

    def _admit_image(self, image: CheckpointImage) -> CheckpointImage:
        policy.admit_registry(image.name, self._config.restore.allowed_registries)
        return image

    def _admit(self, image: Path) -> Path:
        """The archive's real path, if it lies in an allowed directory."""
        real = image.resolve()
        allowed = [d.resolve() for d in self._config.restore.allowed_dirs]
        return policy.admit_archive(image, real, real.is_file(), allowed)

    async def _create(self, request: cri.CreateContainerRequest, source: Path | CheckpointImage,
                      metadata: tuple[tuple[str, str], ...], timeout: float | None) -> str:
        work = self._config.restore.work_dir / uuid.uuid4().hex
        sandbox = request.sandbox_config.metadata
        # Until containerd has the container and its relay listens, a crash of ours is undone
        # by the reconciler (shim.restore.recovery); from then on the relay's own record covers it.
        record = self._journal.begin(Operation.RESTORE, **recovery.create_facts(
            work, SHIM_DIR, sandbox.name, sandbox.namespace, request.config.metadata.name,
            request.config.image.image))
        work.mkdir(mode=0o700, parents=True)
        self._creating.add(work.name)
        layer = work.parent / f"{work.name}.layer"
        # A spare relay is handed the restore once it is unpacked (it starts the page daemon
        # at once); without one, a new relay starts now, its start-up overlapping the unpacking.
        relay = self._relays.start_unless_spare(work)
        refill: asyncio.Task[None] | None = None
        try:
            unpack_started = time.monotonic()
            if isinstance(source, CheckpointImage):
                archive_path = await export_layer(self._containerd.channel, source.layer, layer)
            else:
                archive_path = source
            archive = await self._unpack(archive_path, work, _lazy_wanted(request))
            _check_architecture(work)
            await self._admit_origin(request, archive.spec, _source_name(source))
            unpacked = time.monotonic() - unpack_started
            # Handed over now: a lazy restore's page daemon starts up while the rest is prepared.
            relay = relay or self._relays.take(work)
            faults.reached(faults.Point.RESTORE_UNPACKED)
            # The next restore's spare starts alongside (awaited below, whatever happens).
            refill = asyncio.create_task(asyncio.to_thread(self._relays.refill))
            image = await self._resolve_image(archive.config)
            _check_hostile_spec(archive.spec, request)
            tcp = await self._plan_network(request, work)
            label = await self._sandbox_label(request.pod_sandbox_id)
            new = _restore_request(request, archive, image, work, _source_name(source))
            # Where the relay keeps CRIU's logs should the restore fail (the task takes its own along).
            new.config.annotations[LOGS_ANNOTATION] = str(self._config.state_dir / LOGS)
            _write_criu_config(work, self._config, request, label, tcp, bool(archive.deferred))
            await asyncio.to_thread(_copy_log, archive.log, request)
            create_started = time.monotonic()
            reply = await self._containerd.forward(METHOD, new.SerializeToString(), metadata, timeout)
            log.info("restore of %s: unpacked in %.3fs, containerd created it in %.3fs", archive_path,
                     unpacked, time.monotonic() - create_started)
            record_restore_stage("unpack", unpacked)
            record_restore_stage("create", time.monotonic() - create_started)
            container_id = str(cri.CreateContainerResponse.FromString(reply).container_id)
            faults.reached(faults.Point.RESTORE_CREATED)
            # From here the relay owns `work` (it removes it when the task is gone).
            self._pending[container_id] = (relay, await wait_ready(relay))
            return container_id
        except BaseException:
            if relay is not None:
                await _abandon(relay)
            lazy.release(work)
            shutil.rmtree(work, ignore_errors=True)
            criu_config(work).unlink(missing_ok=True)
            raise
        finally:
            self._creating.discard(work.name)
            layer.unlink(missing_ok=True)  # a lazy restore's loop device keeps the data it needs
            record.close()  # released above, or handed to the relay
            if refill is not None:
                await refill

    async def _unpack(self, archive_path: Path, work: Path, lazy_wanted: bool) -> Any:
        """Unpack the archive; under a lazy restore its large page images stay in it (shim.restore.lazy)."""
        if await asyncio.to_thread(is_encrypted, archive_path):  # sealed: unpacked from its decrypted copy
            async with unseal.decrypted(archive_path, work, self._config.encryption) as plain:
                return await self._unpack(plain, work, lazy_wanted)
        from shim.restore.checkpoint_unpack import open_checkpoint

        defer = lazy.deferrable if lazy_wanted and await self._lazy_possible() else None
        archive = await asyncio.to_thread(open_checkpoint, archive_path, work, defer=defer)
        await asyncio.to_thread(lazy.check_memory_images, work, archive.deferred)  # before CRIU ever reads them
        if archive.deferred:
            assert self._config.criu is not None  # _lazy_possible() checked it
            await asyncio.to_thread(lazy.prepare, archive_path, work, archive.deferred, self._config.criu)
        return archive

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

    async def _resolve_image(self, config: dict[str, Any]) -> str:
        """The original image by digest or ID first, then by name; never re-tagged."""
        candidates = [config.get(k) for k in ("rootfsImageRef", "rootfsImageName", "rootfsImage")]
        refs = [c for c in candidates if isinstance(c, str) and c]
        for ref in refs:
            image = await self._containerd.image_status(ref)
            if image is not None:
                return str(image.id)
        pullable = next((r for r in refs if not r.startswith("sha256:")), None)
        if pullable is not None:
            # Missing here (another node checkpointed it): pull by digest, else by name; only
            # from a registry the restore policy allows (the name is the archive's word).
            policy.admit_base_image_pull(pullable, self._config.restore.allowed_registries)
            await self._containerd.pull_image(pullable)
            image = await self._containerd.image_status(pullable)
            if image is not None:
                return str(image.id)
        raise NotFound(f"the checkpoint's original image ({', '.join(refs)}) is not on this node "
                       "and could not be pulled")

    def _audit(self, request: cri.CreateContainerRequest, peer: Peer, container_id: str, started: float,
               result: str) -> None:
        """A failed Create ends the attempt; a created restore is audited when its Start ends (`start_ended`)."""
        sandbox = request.sandbox_config.metadata
        record = audit.AuditRecord(
            action=audit.Action.RESTORE, caller_uid=peer.uid, caller_pid=peer.pid, pod=sandbox.name,
            namespace=sandbox.namespace, container=request.config.metadata.name, container_id=container_id,
            location=request.config.image.image, size=0, duration_s=round(time.monotonic() - started, 4),
            frozen_s=0.0, dump_s=0.0, archive_s=0.0, result=result)
        if result == "ok" and container_id:
            self._unaudited[container_id] = (record, started)
        else:
            audit.append(self._config.audit_log, record)

    def start_ended(self, container_id: str, error: BaseException | None) -> None:
        """The StartContainer of a restore ended: its one audit line, with the Create and the Start outcome."""
        entry = self._unaudited.pop(container_id, None)
        if entry is None:
            return
        record, started = entry
        if error is None:
            result = "ok"
        elif isinstance(error, ShimError):
            result = f"error: StartContainer: {error.code.name}: {error.message}"
        else:
            result = f"error: StartContainer: {type(error).__name__}"
        audit.append(self._config.audit_log, dataclasses.replace(
            record, duration_s=round(time.monotonic() - started, 4), result=result))

    def _audit_unstarted(self) -> None:
        """Restores created but not started when the proxy stops: their line says so."""
        for container_id in list(self._unaudited):
            record, started = self._unaudited.pop(container_id)
            audit.append(self._config.audit_log, dataclasses.replace(
                record, duration_s=round(time.monotonic() - started, 4),
                result="ok: created; not started before criu-shim stopped"))


async def _abandon(relay: Relay) -> None:
    """Stop the relay of a restore that failed before containerd got it."""
    with contextlib.suppress(ShimError):
        await wait_ready(relay)
    stop_relay(relay)


def _check_architecture(work: Path) -> None:
    """A memory image only restores on the machine type it was dumped on."""
    facts = work / ARCHIVE_MEMBER
    if not facts.is_file():
        return  # other engines record no architecture
    try:
        arch = json.loads(facts.read_text()).get("architecture")
    except (ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{ARCHIVE_MEMBER} in the checkpoint is malformed: {exc}") from None
    here = go_arch()
    if arch and arch != here:
        raise InvalidArgument(f"the checkpoint was made on {arch}; this node is {here}: it cannot be restored here")


def _lazy_wanted(request: cri.CreateContainerRequest) -> bool:
    """The container's, else the pod's, `restore.criu-shim.io/lazy-pages` ("true" when absent); both checked."""
    wanted = True
    for source in (request.sandbox_config.annotations, request.config.annotations):
        value = source.get(LAZY_ANNOTATION)
        if value is None:
            continue
        wanted = boolean(LAZY_ANNOTATION, value)
    return wanted


def _check_hostile_spec(spec: dict[str, Any], request: cri.CreateContainerRequest) -> None:
    from shim.restore.checkpoint_spec import check_declared_mounts, check_devices

    check_devices(spec)
    check_declared_mounts(spec, {m.container_path for m in request.config.mounts})


def _source_name(source: Path | CheckpointImage) -> str:
    return str(source) if isinstance(source, Path) else source.name


def _restore_request(request: cri.CreateContainerRequest, archive: Any, image: str, work: Path,
                     source_name: str) -> cri.CreateContainerRequest:
    new = cri.CreateContainerRequest()
    new.CopyFrom(request)
    config = new.config
    process = archive.spec.get("process", {})
    config.image.image = image
    del config.command[:]
    del config.args[:]
    config.command.extend(str(a) for a in process.get("args", []))
    del config.envs[:]
    for entry in process.get("env", []):
        key, _, value = str(entry).partition("=")
        config.envs.add(key=key, value=value)
    config.working_dir = str(process.get("cwd", config.working_dir))
    config.annotations[RESTORE_DIR] = str(work)
    config.annotations[CRIU_CONFIG_ANNOTATION] = str(criu_config(work))
    config.annotations["restored"] = "true"
    config.annotations["checkpointedAt"] = str(archive.config.get("checkpointedTime", ""))
    config.annotations["checkpointImage"] = source_name
    return new


def _write_criu_config(work: Path, config: Config, request: cri.CreateContainerRequest,
                       sandbox_label: str | None, tcp: TcpRestore | None, lazy_pages: bool = False) -> None:
    """CRIU options for the restore (runc passes none itself): the new pod's annotations and labels."""
    opts = options.resolve(config.checkpoint, request.sandbox_config.annotations, request.config.metadata.name)
    lines = [name for name, on in (("tcp-established", tcp is TcpRestore.ESTABLISHED),
                                   ("tcp-close", tcp is TcpRestore.CLOSE),
                                   ("file-locks", opts.file_locks), ("ext-unix-sk", opts.ext_unix_sockets),
                                   (lazy.CRIU_OPTION, lazy_pages)) if on]
    linux = request.config.linux
    context = linux.security_context if linux.HasField("security_context") else None
    lines += restore_lsm_options(selinux_enforcing(), context, sandbox_label)
    # Beside the work dir, not in it: it must outlive the unpacked images, since
    # runc reads it again when the restored container is checkpointed.
    path = criu_config(work)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))


def _copy_log(log_file: Path | None, request: cri.CreateContainerRequest) -> None:
    """The checkpointed container's log first; the restored one appends to it."""
    directory, name = request.sandbox_config.log_directory, request.config.log_path
    if log_file is None or not directory or not name:
        return
    target = Path(directory) / name
    src = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(src).st_size
            while size > 0:
                copied = os.copy_file_range(src, dst, size)
                if copied == 0:
                    break
                size -= copied
        finally:
            os.close(dst)
    finally:
        os.close(src)
