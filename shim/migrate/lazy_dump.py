"""The source of a lazy migration: runc dumps everything but the lazy memory, CRIU serves the rest.

containerd's task Checkpoint API carries no lazy-pages or page-server option, so the source runs
runc itself on the task's own state (`runc --root /run/containerd/runc/k8s.io checkpoint
--lazy-pages --page-server 127.0.0.1:PORT --status-fd FD`), exactly the runc the task's shim runs.
containerd's view stays true: CRIU ends the process once every page was served, the runc shim
reaps it and containerd records the exit (EXITED in CRI), as after its own stop-after checkpoint.

The order (criu/cr-dump.c): CRIU freezes and seizes the tasks, writes every image except the lazy
pages, says so on the status fd, then serves pages to one client on its page server, holding the
tasks all the while. Only when the client closes the session properly are the tasks killed; if the
session breaks first ("Lazy pages transfer FAILED"), CRIU lets the tasks run again (and runc does
not remove the container). So the source is ended after a complete transfer, and running again
after a broken one: `state` says which, from containerd.

While CRIU holds the tasks, the rootfs diff and the archive (without the lazy memory) are written
with the proxy's own members, so the target restores it through its proxy like any checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shim import archive_layout as layout
from shim import faults, freezer
from shim.checkpoint import devshm, netlock
from shim.checkpoint.archive import write_archive
from shim.checkpoint.checkpointer import Target, archive_members, head_members
from shim.checkpoint.options import CheckpointOptions
from shim.checkpoint.rootfs import write_rootfs_diff
from shim.cleanup import undo
from shim.containerd import NAMESPACE
from shim.errors import FailedPrecondition
from shim.migrate.predump_hook import PreDumpHook
from shim.migrate.tunnel import LOOPBACK, abort_on_close

log = logging.getLogger(__name__)

# Where containerd's runc shim keeps its containers' state (its default root, per namespace).
RUNC_ROOT = Path("/run/containerd/runc") / NAMESPACE
READY_TIMEOUT = 120.0
FREEZE_TIMEOUT = 10.0  # CRIU's own default for freezing (opts.timeout)
CRIU_WORK = "criu-work"  # not the proxy's "work": CRIU still writes its log there while serving pages
# CRIU's options for the dump that runc has no flag for, in a config file CRIU reads from its
# environment (CRIU_CONFIG_FILE, read in swrk mode too, before the options runc sends).
CRIU_DUMP_CONFIG = "criu-dump.conf"
_nftables: dict[str, bool] = {}  # CRIU binary -> can it lock with nftables (probed once per process)


@dataclass(frozen=True)
class Source:
    """What the dump needs to know about the container (from the proxy's CRI, verbose)."""

    target: Target  # status, pod, options, pod IPs, netns: as the proxy's checkpoint sees them
    spec: bytes  # the OCI spec, JSON
    pid: int
    runtime: str


class LazyDump:
    """One lazy dump, from runc's start to its end (page server done or broken)."""

    def __init__(self, source: Source, staging: Path, runc: Path, criu: Path | None,
                 target_nftables: bool = False) -> None:
        self.source = source
        self._target_nftables = target_nftables  # the target's CRIU can restore with an nftables lock
        self.staging = staging
        self._runc = runc
        self._criu = criu
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._ended: int | None = None
        self._client: asyncio.StreamWriter | None = None  # our connection to CRIU's page server
        self.stamps: dict[str, float] = {}  # monotonic times of the dump's steps (the pause's anatomy)
        self.started_wall = 0.0
        self._guard_in: asyncio.StreamWriter | None = None  # the guard's stdin (see _guard)

    @property
    def container_id(self) -> str:
        return str(self.source.target.status.id)

    async def start(self, stack: AsyncExitStack, switch: Callable[[], Awaitable[None]]) -> None:
        """runc dumping; returns once CRIU's page server listens (every other image written).

        runc and CRIU start first and wait in CRIU's pre-dump hook (shim.migrate.predump_hook): the
        switch-over (`switch`), our TCP lock and our freeze follow, and only then does CRIU go on, so
        their start-up is not part of the pause. `switch` failing fails the dump untouched."""
        state = RUNC_ROOT / self.container_id / "state.json"
        if not state.is_file():
            raise FailedPrecondition(f"runc has no state for container {self.container_id} under {RUNC_ROOT}: a "
                                     "lazy migration drives runc itself and needs containerd's runc shim there")
        _sweep(self.staging.parent)
        self.staging.mkdir(mode=0o700)
        stack.callback(shutil.rmtree, self.staging, ignore_errors=True)
        hook = PreDumpHook(self.staging)
        stack.callback(hook.close)
        env = await self._criu_environment(hook)  # CRIU probed in prepare(), before the switch-over
        netns = self.source.target.netns
        locking = self.source.target.options.tcp_established and netns is not None
        frozen = _freezer_of(self.source.spec)
        await self._guard(netns if locking else None, frozen, stack)
        self.port = _free_port()
        read_end, write_end = os.pipe()
        stack.callback(os.close, read_end)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv(write_end), pass_fds=(write_end,), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
        finally:
            os.close(write_end)
        self.stamps["runc"] = time.monotonic()
        if self._guard_in is not None:  # should we die, the guard waits for runc before it thaws
            with contextlib.suppress(OSError):
                self._guard_in.write(f"pid {self._proc.pid}\n".encode())
        stack.push_async_callback(self.end)
        stack.callback(hook.answer, False)  # any way out before our "go" fails the dump untouched
        waited = await asyncio.to_thread(hook.wait, read_end, READY_TIMEOUT)
        if waited == "timeout":
            raise FailedPrecondition(f"CRIU's lazy dump did not start in {READY_TIMEOUT:.0f} s")
        if waited == "hook":
            faults.reached(faults.Point.MIGRATE_PREDUMP)
        ready = b""
        if waited == "status":  # runc failed first, or a CRIU that ran no hook: it dumped before the switch
            ready = os.read(read_end, 1)  # readable: at once
            if not ready:
                await self._proc.wait()
                raise FailedPrecondition(f"the lazy dump failed before CRIU froze anything: {await self._why()}")
            log.warning("CRIU dumped container %s without waiting in its pre-dump hook: the switch-over "
                        "came after the dump", self.container_id)
        self.stamps["start"] = time.monotonic()
        self.started_wall = time.time()  # to line the stages up with a client's wall-clock log
        await switch()
        self.stamps["switched"] = time.monotonic()
        if waited == "hook":
            await self._lock_and_freeze(netns if locking else None, frozen, stack)
            faults.reached(faults.Point.MIGRATE_FROZEN)
            hook.answer(True)
            try:
                ready = await asyncio.wait_for(asyncio.to_thread(os.read, read_end, 1), READY_TIMEOUT)
            except TimeoutError:
                raise FailedPrecondition(f"CRIU's lazy dump did not get ready in {READY_TIMEOUT:.0f} s") from None
        self.stamps["dumped"] = time.monotonic()
        if ready:
            self.stamps["criu freezing"] = self.stamps["dumped"] - _frozen_for(self.staging / CRIU_WORK / DUMP_LOG)
        if not ready:
            await self._proc.wait()
            raise FailedPrecondition(f"the lazy dump failed: {await self._why()}")

    async def _lock_and_freeze(self, netns: Path | None, frozen: Path | None, stack: AsyncExitStack) -> None:
        """Our TCP lock on the pod and the container frozen, while CRIU waits in its hook."""
        if netns is not None:
            await netlock.run_nft(netns, netlock.lock_script())
            stack.push_async_exit(self._unlock_unless_moved)
            self.stamps["locked"] = time.monotonic()
        if frozen is not None:
            # Frozen here, in a few ms: CRIU, finding it frozen, does not freeze it itself, which on a
            # cgroup v1 freezer cost ~100 ms of the pause (it polls the state every 100 ms, criu/seize.c).
            # CRIU thaws it once it holds the tasks, and lets them run on a failed dump; `_thaw_unless_ended`
            # (and the guard, should we die) thaws it on the paths where CRIU never took it.
            stack.push_async_callback(self._thaw_unless_ended, frozen)
            try:
                await asyncio.to_thread(freezer.freeze, frozen, FREEZE_TIMEOUT)
            except freezer.FreezerError as exc:  # CRIU could not have frozen it either: nothing was dumped
                raise FailedPrecondition(f"cannot freeze the container for the dump: {exc}") from None
            self.stamps["frozen"] = time.monotonic()

    async def _guard(self, netns: Path | None, frozen: Path | None, stack: AsyncExitStack) -> None:
        """A process of its own that removes our TCP lock and thaws the container if this one dies
        holding them: CRIU then lets the source run again (a reset on its page server), and it must not
        find its connections locked nor stay frozen. It reads lines from a pipe of ours: `pid N` once runc
        runs, `keep` once we have dealt with both ourselves. Without `keep` it first waits for runc (and
        CRIU under it) to end: CRIU has the last word on the freezer (after a failed dump it puts the
        cgroup back as it found it, frozen by us), so the thaw must come after it."""
        if netns is None and frozen is None:
            return
        thaw = freezer.thaw_file(frozen) if frozen is not None else ("", "")
        script = ('pid=; while read -r word arg; do case $word in pid) pid=$arg;; keep) exit 0;; esac; done; '
                  'n=0; while [ -n "$pid" ] && [ $n -lt 1200 ] && read -r _ _ st _ 2>/dev/null '
                  '< "/proc/$pid/stat" && [ "$st" != Z ]; do sleep 0.1; n=$((n+1)); done; '
                  '[ -z "$2" ] || printf %s "$3" > "$2"; [ -z "$1" ] || printf %s "$1" | nft -f -')
        argv = ["sh", "-c", script, "migrate-guard", netlock.unlock_script() if netns is not None else "", *thaw]
        guard = await asyncio.create_subprocess_exec(
            *(["nsenter", f"--net={netns}", *argv] if netns is not None else argv), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        self._guard_in = guard.stdin

        async def release() -> None:
            assert guard.stdin is not None
            with contextlib.suppress(OSError):
                guard.stdin.write(b"keep\n")
                await guard.stdin.drain()
                guard.stdin.close()
            await guard.wait()

        stack.push_async_callback(release)  # runs after the lock's own exit (pushed later, unwound first)

    async def _thaw_unless_ended(self, frozen: Path) -> None:
        """After runc returned: unless CRIU ended the tasks (a complete dump), they must run (idempotent)."""
        if self._ended == 0:
            return
        try:
            await asyncio.to_thread(freezer.set_state, frozen, freezer.State.THAWED)
        except freezer.FreezerError as exc:
            if frozen.is_dir():  # gone with its container is fine; a frozen container is not
                raise FailedPrecondition(f"the source container {self.container_id} could not be thawed after "
                                         f"the lazy dump: {exc}; thaw it: echo THAWED > {frozen}/freezer.state "
                                         "(cgroup v1) or echo 0 > cgroup.freeze (v2)") from None

    async def prepare(self) -> None:
        """What can be learned before the switch-over: probed here, CRIU's answer costs the pause nothing
        (between the switch-over and our lock the peers' packets already wait at the target)."""
        if self.source.target.options.tcp_established and self._target_nftables:
            await _criu_has_nftables(self._criu)

    async def _criu_environment(self, hook: PreDumpHook) -> dict[str, str]:
        """runc's environment, with CRIU's dump config: the pre-dump hook, and the lock method.

        With established connections, CRIU locks the network for the dump. Its default method,
        iptables, starts iptables-restore runs inside the pause (a CRIU dump of one connection here:
        0.16 s with it, 0.09 s with nftables, CRIU's lock then in its own process). The method is
        recorded in the images, so the target's restore locks with nftables too: only when the
        target said at preflight that its CRIU can (CRIU restores with the dump's method; one built
        without libnftables would fail the restore). Our own TCP lock holds the pod whichever CRIU
        uses; `network-lock skip` would leave the restore unlocked.
        """
        nftables = self.source.target.options.tcp_established and self._target_nftables \
            and await _criu_has_nftables(self._criu)
        config = self.staging / CRIU_DUMP_CONFIG
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(hook.config_line() + ("network-lock nftables\n" if nftables else ""))
        return {**os.environ, "CRIU_CONFIG_FILE": str(config)}

    def _argv(self, status_fd: int) -> list[str]:
        opts: CheckpointOptions = self.source.target.options
        flags = [f for f, on in (("--tcp-established", opts.tcp_established), ("--file-locks", opts.file_locks),
                                 ("--ext-unix-sk", opts.ext_unix_sockets)) if on]
        criu = ["--criu", str(self._criu)] if self._criu else []
        return [str(self._runc), "--root", str(RUNC_ROOT), *criu, "checkpoint",
                "--image-path", str(self.staging / layout.IMAGES_DIR), "--work-path", str(self.staging / CRIU_WORK),
                "--lazy-pages", "--page-server", f"{LOOPBACK}:{self.port}", "--status-fd", str(status_fd),
                *flags, self.container_id]

    def write_first_part(self, location: Path) -> int:
        """What the target creates the container from before anything stops (blocking): spec, config,
        status and facts (shim.restore.second_part); the archive written after the dump is the second."""
        return write_archive(location, head_members(self.source.spec, self.source.target, self.source.runtime,
                                                    datetime.now(UTC)), durable=False)

    def write_archive(self, location: Path) -> int:
        """The archive without the lazy memory (blocking), while CRIU still holds the container."""
        upper = _upperdir(self.source.pid)
        deleted = write_rootfs_diff(upper, self.staging / layout.ROOTFS_DIFF).deleted if upper else None
        devshm.save(self.source.spec, self.staging / devshm.MEMBER)
        members = archive_members(self.staging, self.source.spec, self.source.target, self.source.runtime,
                                   datetime.now(UTC), deleted)
        return write_archive(location, members, durable=False)

    async def page_server(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to CRIU's page server (it serves one client: ours, taken the moment it listens).

        The socket resets when closed, also by our death: CRIU takes an orderly end for a complete
        transfer and would end the container (see shim.migrate.tunnel.abort_on_close)."""
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        abort_on_close(writer)
        self._client = writer
        return reader, writer

    async def wait(self, timeout: float | None = None) -> int:
        """runc's exit status: 0 once every page was served and CRIU ended the tasks."""
        assert self._proc is not None
        self._ended = await asyncio.wait_for(self._proc.wait(), timeout)
        return self._ended

    async def end(self) -> None:
        """Make sure the dump is over (idempotent): a page server nobody uses is given a client that
        closes at once, so CRIU ends its session as broken and lets the tasks run again."""
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(OSError, TimeoutError):
            if self._client is None:
                await asyncio.wait_for(self.page_server(), 5)
            assert self._client is not None
            abort_on_close(self._client)
            self._client.close()  # a reset: CRIU fails the transfer and lets the container run
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()

    async def _why(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        text = (await self._proc.stderr.read()).decode(errors="replace").strip()
        return text[-800:] or f"runc exited {self._proc.returncode}; see {self.staging / CRIU_WORK}"

    async def _unlock_unless_moved(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        """Our TCP lock: narrowed to the dumped connections once they live on the target (peers see
        silence, not resets from the ended source), removed if the source runs on."""
        netns = self.source.target.netns
        assert netns is not None
        if self._ended == 0:
            connections = await asyncio.to_thread(netlock.dumped_connections, self.staging / layout.IMAGES_DIR)
            await undo(netlock.run_nft(netns, netlock.narrow_script(connections)), exc, "narrow the TCP lock")
        else:
            await undo(netlock.run_nft(netns, netlock.unlock_script(), missing_ok=True), exc, "remove the TCP lock")
            await undo(netlock.remove_criu_lock(netns), exc, "remove CRIU's network lock")
        return False


async def _criu_has_nftables(criu: Path | None) -> bool:
    """`criu check --feature nftables` for the CRIU runc will run (its --criu, else criu on PATH)."""
    binary = str(criu) if criu is not None else (shutil.which("criu") or "criu")
    if binary not in _nftables:
        from shim.criu import probe_feature

        _nftables[binary] = (await asyncio.to_thread(probe_feature, binary, "nftables")).supported
    return _nftables[binary]


def _freezer_of(spec: bytes) -> Path | None:
    """The container's freezer cgroup directory (from its OCI spec), or None where there is none."""
    try:
        path = json.loads(spec).get("linux", {}).get("cgroupsPath")
    except (ValueError, AttributeError):
        return None
    if not isinstance(path, str) or not path:
        return None
    directory = freezer.cgroup_dir(path)
    return directory if directory.is_dir() else None


def source_from(status: Any, info: dict[str, Any], target: Target) -> Source:
    pid = info.get("pid")
    spec = info.get("runtimeSpec")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(spec, dict):
        raise FailedPrecondition(f"container {status.id}: its runtime reports no process or spec")
    return Source(target, json.dumps(spec).encode(), pid, str(info.get("runtimeType", "io.containerd.runc.v2")))


def _upperdir(pid: int) -> Path | None:
    """The overlayfs upper directory of the container's root (its mountinfo, seen from the host)."""
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) > 4 and fields[4] == "/" and rest and rest[0] == "overlay" and len(rest) > 2:
            for option in rest[2].split(","):
                if option.startswith("upperdir="):
                    return Path(option.removeprefix("upperdir="))
    return None


DUMP_LOG = "dump.log"  # runc's name for CRIU's log in the work path
_STAMP = re.compile(rb"^\((\d+\.\d+)\)", re.M)


def _frozen_for(log: Path) -> float:
    """How long CRIU had held the tasks when it said it was ready: from its log's first line about
    freezing them to its last line so far (CRIU stamps each line with its time since start)."""
    try:
        text = log.read_bytes()
    except OSError:
        return 0.0
    at = text.lower().find(b"freez")
    stamps = _STAMP.findall(text)
    frozen = _STAMP.findall(text[:at]) if at >= 0 else []
    if not stamps or not frozen:
        return 0.0
    return max(0.0, float(stamps[-1]) - float(frozen[-1]))


def _free_port() -> int:
    """A loopback port for CRIU's page server (CRIU binds it itself a moment later)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def runc_beside(criu: Path | None) -> Path:
    """The runc to run: on PATH, else next to the configured CRIU (the node's tools live together)."""
    found = shutil.which("runc")
    if found:
        return Path(found)
    if criu is not None and (criu.parent / "runc").is_file():
        return criu.parent / "runc"
    raise FailedPrecondition("no runc found on PATH or beside the configured CRIU: pass --runc")


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 3)


STAGING_SUFFIX = ".lazy"


def staging_name(container_id: str, stamp: str) -> str:
    """Private, and naming its owner: a migrate process killed mid-way leaves it for the next to sweep."""
    return f".migrate-{container_id[:12]}-{stamp}-{os.getpid()}{STAGING_SUFFIX}"


def _sweep(directory: Path) -> None:
    """Remove the staging dirs of lazy dumps whose migrate process is gone (their images are secrets)."""
    for entry in directory.glob(f".migrate-*{STAGING_SUFFIX}"):
        owner = entry.name.removesuffix(STAGING_SUFFIX).rpartition("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(entry, ignore_errors=True)
