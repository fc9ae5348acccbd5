"""The relay daemon for one restored task: rewrite Create, prepare the rootfs before Start.

Stats is answered from the task's cgroup where the runc shim has none
(`shim.runtime.task_stats`). Everything else containerd says to the task
passes through to the runc shim unchanged. Like a shim, the relay outlives containerd: when containerd's
connections close it stays as long as the runc shim behind it does (a
restarted containerd reconnects to the address it was handed, kept in the
bundle's `address` file by the launcher), so the page daemon of a lazy restore
goes on filling memory through a containerd restart. Once the runc shim is gone
(containerd deleted the task and shut it down) the relay exits and removes the
unpacked checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import FailedPrecondition
from shim.handoff import RELAY_START_WAIT, RelayFiles, RestorePlan
from shim.journal import Journal, Operation
from shim.restore import recovery
from shim.runtime.bundle import restore_plan
from shim.runtime.criu_deadline import CriuDeadline
from shim.runtime.lazy_daemon import LOG as LAZY_LOG
from shim.runtime.lazy_daemon import LazyPages, discard_spare, start_spare
from shim.runtime.task_stats import restored_task_stats
from shim.ttrpc.relay import Answer

# containerd 1.x speak task API v2 to a shim; 2.x speak v3 to a shim whose bootstrap says version 3
# (the stock runc shim of 2.x serves v3 only). v3's messages are v2's, field for field
# (containerd/api runtime/task/v3/shim.proto), so one rewriter decodes both.
TASK_SERVICES = frozenset({"containerd.task.v2.Task", "containerd.task.v3.Task"})
# A restored container whose StartContainer never comes is given up after this.
START_WAIT = RELAY_START_WAIT
# The requests the relay decodes; every other frame is relayed as it came.
METHODS = frozenset({(service, m) for service in TASK_SERVICES
                     for m in ("Create", "Start", "Pause", "Checkpoint", "Delete", "Stats")})
log = logging.getLogger(__name__)


class RestoreRewriter:
    """Create names the checkpoint; Start of the init process first gets the rootfs ready.

    `bundle` may be unknown when the relay starts (the proxy hosts it before the
    task exists): Create tells it. A lazy restore's page daemon starts as soon as
    the relay has its restore (else at Create), overlapping containerd's own work;
    it must listen before Start goes on, and be done before a Pause or Checkpoint
    of the task goes on. If it fails in between, the restored process is ended.
    """

    def __init__(self, plan: RestorePlan, bundle: Path | None = None,
                 note: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.plan = plan
        self.bundle = bundle
        self.upstream: Callable[[], Path] | None = None  # the runc shim's address, once the relay knows it
        self._note = note  # records what the task is, for the reconciler should the relay die
        self.started = False  # the init process's Start went upstream
        self.lazy: LazyPages | None = None
        self._deadline: CriuDeadline | None = None  # armed at Start: a CRIU that never finishes is ended
        self._addresses: asyncio.Future[None] | None = None  # the pod IPs kept, added from Create on
        # Planned already when a spare relay is handed an unpacked restore: start at once.
        try:
            self.lazy = LazyPages.planned(plan.dir)
            if self.lazy is not None:
                self.lazy.start()
        except FailedPrecondition as exc:  # tried again at Create, whose caller sees the error
            log.warning("%s", exc.message)

    async def __call__(self, service: str, method: str, payload: bytes) -> bytes | Answer:
        if service not in TASK_SERVICES:
            return payload
        if method == "Stats" and self.upstream is not None:  # 2.x's runc shim has no cgroup for it
            return await restored_task_stats(service, payload, self.upstream(), self.bundle)
        if method == "Create":
            return self._create(payload)
        if method == "Start":
            await self._before_start(payload)
        if method == "Delete":  # a failed restore's CRIU logs go with the task: keep them first
            await asyncio.to_thread(self._keep_logs, payload)
        if method in ("Pause", "Checkpoint") and self.lazy is not None:
            # A dump must not meet memory still being filled in (CRIU would hang on it), and
            # a freeze before a dump should not last the whole fill: both wait for the daemon.
            await self.lazy.settled()
        return payload

    def _keep_logs(self, payload: bytes) -> None:
        from shim.restore.criulogs import keep_failed_restore_logs

        request = shim_pb2.DeleteRequest.FromString(payload)
        if self.bundle is not None and not request.exec_id:
            lazy_log = self.lazy.work / LAZY_LOG if self.lazy is not None else None
            for kept in keep_failed_restore_logs(self.bundle, lazy_log, request.id):
                log.warning("the restore failed; CRIU's log is kept at %s", kept)

    def close(self) -> None:
        """Stop what the restore started (idempotent): the page daemon and its devices."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self.lazy is not None:
            self.lazy.close()

    def _stop_task(self, status: int) -> None:
        """The page daemon died mid-fill: end the restored process rather than let it run on zeros."""
        assert self.bundle is not None
        try:
            pid = int((self.bundle / "init.pid").read_text())
            # The pid must still be this container's (the bundle is named after it), not a reused one.
            if self.bundle.name not in Path(f"/proc/{pid}/cgroup").read_text():
                return
        except (OSError, ValueError):
            return  # not restored (yet; Start fails on its own), or already gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        log.error("killed the restored process %d: its memory was not complete (page daemon status %d)",
                  pid, status)
        if self.lazy is not None:  # the restore dir, and the daemon's log in it, go when the task does
            from shim.restore.criulogs import keep_lazy_pages_log

            kept = keep_lazy_pages_log(self.bundle, self.lazy.work / LAZY_LOG)
            if kept is not None:
                log.error("the page daemon's CRIU log is kept at %s", kept)

    def _create(self, payload: bytes) -> bytes:
        request = shim_pb2.CreateTaskRequest.FromString(payload)
        if not self.plan.images.joinpath("inventory.img").is_file():
            raise FailedPrecondition(f"checkpoint images for {request.id} are missing in {self.plan.images}")
        # The runc shim restores instead of creating when Create names a checkpoint.
        request.checkpoint = str(self.plan.images)
        from shim.restore.network_lock import apply as apply_network_lock

        if apply_network_lock(self.plan.dir, self.plan.images):  # before runc hands the images to CRIU
            log.info("the restore locks its TCP connections with nftables")
        self.bundle = Path(request.bundle)
        if self._addresses is None:
            # A child in the pod's netns (10-15 ms) overlapping the runc shim's own Create; Start waits for it.
            self._addresses = asyncio.ensure_future(asyncio.to_thread(self._add_addresses, self.bundle))
            self._addresses.add_done_callback(_retrieved)  # a Start that never comes must not leave it unread
        if self._note is not None:
            self._note(recovery.task_facts(request.id, self.bundle))
        if self.lazy is None:  # a relay started before the unpacking, or a restore whose images came at Start
            self.lazy = LazyPages.planned(self.plan.dir)
            if self.lazy is None:
                discard_spare()  # eager after all: a spare page daemon kept for it is not needed
        if self.lazy is not None:
            self.lazy.start()
            self.lazy.expose(self.bundle / "work")  # runc's work dir for the restore
            self.lazy.on_failure = self._stop_task
        return bytes(request.SerializeToString())

    async def _before_start(self, payload: bytes) -> None:
        request = shim_pb2.StartRequest.FromString(payload)
        if request.exec_id:
            return
        if self._addresses is not None:
            await self._addresses
        await asyncio.to_thread(self._prepare_rootfs)
        if self.lazy is not None:
            await self.lazy.listening()
        if self.bundle is not None and self._deadline is None:
            self._deadline = CriuDeadline(self.bundle.name)  # the bundle is named after the container
            self._deadline.start()
        self.started = True

    def _prepare_rootfs(self) -> None:
        """The files the container changed, on the new rootfs, before its processes come back."""
        from shim.restore.checkpoint_unpack import parse_deleted_files
        from shim.restore.devshm import restore_devshm
        from shim.restore.rootfs_diff import apply_deleted_files, apply_rootfs_diff

        if self.bundle is None:
            raise FailedPrecondition("Start arrived before Create: no bundle to restore into")
        rootfs = self.bundle / "rootfs"
        if self.plan.rootfs_diff.is_file():
            apply_rootfs_diff(self.plan.rootfs_diff, rootfs)
        if self.plan.deleted_files.is_file():
            apply_deleted_files(parse_deleted_files(self.plan.deleted_files.read_bytes()), rootfs)
        restore_devshm(self.plan.dir, self.bundle)  # before CRIU reopens the files its processes mapped


    def _add_addresses(self, bundle: Path) -> None:
        """The checkpointed pod's addresses that stay (restore.network's plan), on the new pod's eth0."""
        from shim.restore.network import add_planned_addresses, netns_of

        netns = netns_of(bundle)
        if netns is not None:
            added = add_planned_addresses(self.plan.dir, netns)
            if added:
                log.info("kept the checkpointed pod's addresses %s in %s", added, netns)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def run(listen: Path, bundle: Path) -> int:
    """Serve until containerd is done with the task; the runc shim's address comes on stdin."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    upstream = Path(sys.stdin.readline().strip())
    plan = restore_plan(bundle)
    if plan is None:
        log.error("bundle %s is not marked for restore", bundle)
        return 1
    rewriter = RestoreRewriter(plan, bundle)
    try:
        asyncio.run(_serve(listen, upstream, rewriter))
    finally:
        rewriter.close()
        shutil.rmtree(plan.dir, ignore_errors=True)
        listen.unlink(missing_ok=True)
    return 0


def _keep_relay_log(log_file: Path, state_dir: Path, container_id: str) -> None:
    from shim.checkpoint import criulog

    kept = criulog.keep(log_file, state_dir / criulog.LOGS, container_id, "relay")
    if kept is not None:
        log.info("the relay's log is kept at %s", kept)


class _Trouble(logging.Handler):
    """Notes whether anything at WARNING or above was logged: then the log is kept."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = True


def run_hosted(listen: Path, upstream_file: Path, work: Path, journal: Path | None = None) -> int:
    """The relay the proxy starts at CreateContainer; the launcher writes the upstream address later.

    With a `journal` directory the relay records what it holds (shim.restore.recovery),
    before it holds it, so that the reconciler can undo it should the relay be killed.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trouble = _Trouble()
    logging.getLogger().addHandler(trouble)
    record = (Journal(journal).begin(Operation.RESTORE, **recovery.relay_facts(work, listen.parent, journal))
              if journal is not None else None)
    note = (lambda facts: record.note(**facts)) if record is not None else None
    pid_file = listen.with_suffix(".pid")
    pid_file.write_text(f"{os.getpid()}\n")
    plan = RestorePlan(work)
    rewriter = RestoreRewriter(plan, note=note)
    # A spare relay's page daemon this restore did not take (eager, CRIU's daemon) goes; one whose CRIU
    # images come at Start (shim.restore.second_part, a lazy migration) may still need it at Create.
    if plan.images.joinpath("inventory.img").is_file():
        discard_spare()
    try:
        asyncio.run(_serve_hosted(listen, upstream_file, rewriter, note))
        if rewriter.bundle is not None and not rewriter.started:
            log.warning("containerd closed its connections to the task before starting it")
    except BaseException:
        log.exception("the relay for %s failed", work)
        raise
    finally:
        rewriter.close()
        pid_file.unlink(missing_ok=True)
        if trouble.seen and journal is not None:  # kept where the operator finds CRIU's logs, with their retention
            _keep_relay_log(listen.with_suffix(".log"), journal.parent,
                            rewriter.bundle.name if rewriter.bundle is not None else listen.stem)
        if not trouble.seen or journal is not None:
            listen.with_suffix(".log").unlink(missing_ok=True)  # a clean end: nothing to read
        # The proxy's StartContainer has long read the .upstream mark by now (the task is
        # gone only after RemoveContainer); whoever comes last removes it.
        upstream_file.unlink(missing_ok=True)
        listen.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        if record is not None:
            record.close()  # everything is released
    return 0


def run_spare(directory: Path, work_root: Path, journal: Path | None = None) -> int:
    """A relay started ahead of need: it imports everything, then waits on stdin for its restore.

    The proxy writes the restore's work dir (inside `work_root`) as one line; the
    relay then serves it as `relay-for` would, listening at <directory>/<key>.sock.
    End of input without a line (the proxy stopped, or needs no more relays)
    ends it quietly.
    """
    # Imported now, not on a restore's critical path: the point of a spare. pyroute2 (the pod IPs'
    # addition at Start) takes 0.1 s to import on the 2-core VM, pycriu (the network lock at Create) 66 ms.
    import pycriu.images.pb  # noqa: F401
    import pyroute2  # noqa: F401

    import shim.restore.checkpoint_unpack
    import shim.restore.devshm
    import shim.restore.network
    import shim.restore.network_lock
    import shim.restore.rootfs_diff
    import shim.ttrpc.relay  # noqa: F401

    start_spare()  # our page daemon's start-up too, now, at this relay's idle priority
    line = sys.stdin.readline().strip()
    if not line:
        discard_spare()
        return 0
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # on a restore's critical path now
    work = Path(line)
    if work.parent != work_root or not work.is_dir():
        print(f"criu-shim relay: {work} is not a restore directory under {work_root}", file=sys.stderr)
        return 1
    files = RelayFiles(work.name, directory)
    fd = os.open(files.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    for stream in (1, 2):
        os.dup2(fd, stream)
    os.close(fd)
    return run_hosted(files.socket, files.upstream_file, work, journal)


class _UpstreamAddress:
    """The runc shim's address, read from the launcher's file at the first connection, then kept.

    The file is the proxy's sign that the restore went through us, and it removes
    it after StartContainer: connections containerd opens later must not need it.
    """

    def __init__(self, upstream_file: Path, note: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._file = upstream_file
        self._address: Path | None = None
        self._note = note

    @property
    def known(self) -> bool:
        """Whether containerd has connected (the address was read)."""
        return self._address is not None

    def __call__(self) -> Path:
        if self._address is None:
            self._address = Path(self._file.read_text().strip())
            if self._note is not None:
                self._note(recovery.upstream_facts(self._address))
        return self._address


async def _serve_hosted(listen: Path, upstream_file: Path, rewriter: RestoreRewriter,
                        note: Callable[[dict[str, Any]], None] | None = None) -> None:
    from shim.ttrpc.relay import RelayServer, upstream_listening

    upstream = _UpstreamAddress(upstream_file, note)
    rewriter.upstream = upstream
    server = RelayServer(listen, upstream, rewriter, exit_when_idle=True, methods=METHODS,
                         still_needed=lambda: upstream_listening(upstream))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stopped on purpose: clean up, do not just die
        loop.add_signal_handler(sig, server.stop)

    async def give_up_unless_started() -> None:
        await asyncio.sleep(START_WAIT)
        # The upstream file is the launcher's and the proxy removes it after StartContainer:
        # "never started" is a relay containerd never connected to.
        if not upstream.known:
            log.warning("the restored container was never started; giving up its relay %s", listen)
            server.stop()

    async with asyncio.TaskGroup() as tasks:
        watchdog = tasks.create_task(give_up_unless_started())
        try:
            await server.serve()
        finally:
            watchdog.cancel()


async def _serve(listen: Path, upstream: Path, rewriter: RestoreRewriter) -> None:
    from shim.ttrpc.relay import serve_relay, upstream_listening

    rewriter.upstream = lambda: upstream
    await serve_relay(listen, upstream, rewriter, exit_when_idle=True, methods=METHODS,
                      still_needed=lambda: upstream_listening(upstream))
