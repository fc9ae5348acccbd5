"""Lazy restore, relay side: the page daemon that fills in a restored task's memory.

The proxy left `lazy-pages.json` in the unpacked checkpoint (shim.restore.lazy)
and `lazy-pages` in the task's CRIU config. As soon as the relay has its
restore it starts the page daemon the plan names: criu-shim's own
(shim.runtime.page_daemon, `[restore] page_daemon = "criu-shim"`, which maps
each large `pages-N.img` where it lies in the archive) or `criu lazy-pages`
(on a view of the images in which each such image is a loop device over the
archive), in a work dir of its own, so that its start-up overlaps containerd's work. CRIU's restore looks for
the daemon's socket in runc's work dir, known at task Create: the relay links
it there (`expose`), and at Start waits until the daemon listens. From then on
the daemon owns the memory: it answers the process's page faults and copies
the rest in the background, then exits.

Until it has exited the memory is not all there, so a checkpoint of the task
waits for it (`settled`). When it exits, a watcher thread releases the loop
devices and takes the `lazy-pages` line out of the CRIU config (runc passes
the same file to a later dump, where it would ask for a lazy dump).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shim import fillspool
from shim.archive_layout import IMAGES_DIR
from shim.config import PAGE_DAEMON_CRIU, PAGE_DAEMON_OURS
from shim.errors import FailedPrecondition
from shim.handoff import LAZY_CRIU_OPTION, LAZY_PLAN, LAZY_WORK, SPARE_PARENT_ENV, criu_config
from shim.restore import lazy, loopdev
from shim.runtime.page_daemon import STOP_FIRST, listen_at

PLAN_FILE = LAZY_PLAN
CRIU_OPTION = LAZY_CRIU_OPTION
SOCKET = "lazy-pages.socket"
LOG = "lazy-pages.log"
LISTEN_TIMEOUT = 10.0
log = logging.getLogger(__name__)
# A spare relay's page daemon, started ahead of need with its imports done (see `start_spare`).
_spare: subprocess.Popen[bytes] | None = None


def start_spare() -> None:
    """Start our page daemon ahead of need (a spare relay does, at its own idle priority, which the
    child inherits): its Python start-up then runs between restores, not beside CRIU's restore."""
    global _spare
    try:
        _spare = subprocess.Popen([sys.executable, "-m", "shim.runtime.page_daemon", "spare"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env={**os.environ, SPARE_PARENT_ENV: str(os.getpid())})
    except OSError as exc:  # not fatal: a daemon is started on demand instead
        log.warning("cannot start a spare page daemon: %s", exc)


def discard_spare() -> None:
    """End the spare page daemon if no restore took it; idempotent. Killed, not asked: it may still be
    importing at idle priority, and nobody should wait for that; reaped by a thread of its own."""
    global _spare
    spare, _spare = _spare, None
    if spare is not None:
        spare.kill()
        threading.Thread(target=_reap, args=(spare,), name="spare-page-daemon-reaper", daemon=True).start()


def _reap(daemon: subprocess.Popen[bytes]) -> None:
    daemon.wait()
    for pipe in (daemon.stdin, daemon.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class LazyPages:
    """One restore's page daemon, from start to release."""

    def __init__(self, restore_dir: Path, criu: Path, pages: dict[str, str],
                 page_server: tuple[str, int] | None = None, daemon: str = PAGE_DAEMON_CRIU) -> None:
        self._dir = restore_dir
        self._criu = criu
        self._pages = pages  # image name -> loop device (CRIU's daemon only)
        self.daemon = daemon  # ours (shim.runtime.page_daemon) maps the images in the archive itself
        # A lazy migration: the pages no image holds come from the source's page server, through
        # the migration receiver's tunnel on this address. If the source (or the link) dies before
        # memory is complete, the daemon fails and `on_failure` ends the task, as for a local fill.
        self._page_server = page_server
        self._released = False
        self._held: list[int] = []  # descriptors of the archives our daemon reads
        self._release_lock = threading.Lock()
        self._daemon: subprocess.Popen[bytes] | None = None
        self._watcher: threading.Thread | None = None
        self._started = 0.0
        self._closing = False
        # Called (from the watcher thread) with the exit status when the daemon fails
        # before it was asked to stop: memory it had not filled in yet would read as zeros.
        self.on_failure: Callable[[int], None] | None = None

    @classmethod
    def planned(cls, restore_dir: Path) -> LazyPages | None:
        """The daemon the proxy planned for this restore, or None for an eager restore."""
        try:
            plan = json.loads((restore_dir / PLAN_FILE).read_text())
            pages = {str(p["image"]): str(p["device"]) for p in plan["pages"] if "device" in p}
            server = plan.get("page_server")
            remote = (str(server["address"]), int(server["port"])) if server is not None else None
            return cls(restore_dir, Path(plan["criu"]), pages, remote, str(plan.get("daemon", PAGE_DAEMON_CRIU)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"the lazy restore plan {restore_dir / PLAN_FILE} is unreadable: {exc}") from None

    @property
    def criu_config(self) -> Path:
        """The task's CRIU config file: beside the restore dir (see shim.restore.restorer)."""
        return criu_config(self._dir)

    @property
    def work(self) -> Path:
        """The daemon's own work dir: its socket and log."""
        return self._dir / LAZY_WORK

    def start(self) -> None:
        """Start the daemon (idempotent)."""
        if self._daemon is not None:
            return
        self.work.mkdir(mode=0o700, exist_ok=True)
        self._started = time.monotonic()
        if self.daemon == PAGE_DAEMON_OURS:  # from the archive, or a lazy migration's source node (the plan says)
            self._hold_archives()
            self._daemon = self._start_ours()
            self._watcher = threading.Thread(target=self._watch, name="lazy-pages-watcher", daemon=True)
            self._watcher.start()
            return
        view = self._image_view()
        remote = ["--page-server", "--address", self._page_server[0], "--port", str(self._page_server[1])] \
            if self._page_server else []
        try:
            self._daemon = subprocess.Popen(
                [str(self._criu), "lazy-pages", "--images-dir", str(view), "--work-dir", str(self.work),
                 "--log-file", str(self.work / LOG), "-v2", *remote],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise FailedPrecondition(f"cannot start CRIU's lazy-pages daemon {self._criu}: {exc}") from None
        self._watcher = threading.Thread(target=self._watch, name="lazy-pages-watcher", daemon=True)
        self._watcher.start()

    def _hold_archives(self) -> None:
        """Keep the archives open until memory is complete: retention (shim.retention.inuse) sees a
        restore's archive as in use by its open descriptors, from here (before Start, before our daemon
        has opened it) to the end of the fill. CRIU's daemon has its loop devices for that."""
        plan = json.loads((self._dir / PLAN_FILE).read_text())
        for path in {str(p["archive"]) for p in plan["pages"] if "archive" in p}:
            with contextlib.suppress(FileNotFoundError):  # a second start: a private link already taken
                self._held.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))

    def _start_ours(self) -> subprocess.Popen[bytes]:
        """criu-shim's page daemon: a child process (the relay's event loop never waits on a copy).

        The relay makes its listening socket and hands it over: CRIU may connect at once, while the
        daemon is still starting (its interpreter and imports are off the restore's critical path).
        """
        daemon = self._hand_to_spare()
        if daemon is not None:
            return daemon
        try:
            listener = listen_at(self.work, SOCKET)
            try:
                with open(self.work / LOG, "ab") as errors:  # what dies before its own logging starts
                    daemon = subprocess.Popen(
                        [sys.executable, "-m", "shim.runtime.page_daemon", "lazy-pages", "--images-dir",
                         str(self._dir / IMAGES_DIR), "--work-dir", str(self.work), "--plan",
                         str(self._dir / PLAN_FILE), "--listen-fd", str(listener.fileno())],
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
                        pass_fds=(listener.fileno(),))
            finally:
                listener.close()  # the daemon has its own
            # Its start-up must not take CPU from the restore on a 2-core node: idle until CRIU
            # connects (it then takes normal priority itself).
            with contextlib.suppress(OSError):
                os.sched_setscheduler(daemon.pid, os.SCHED_IDLE, os.sched_param(0))
            return daemon
        except OSError as exc:
            raise FailedPrecondition(f"cannot start the page daemon: {exc}") from None

    def _hand_to_spare(self) -> subprocess.Popen[bytes] | None:
        """The spare page daemon with this restore, or None if there is none (or it died)."""
        global _spare
        spare, _spare = _spare, None
        if spare is None or spare.stdin is None:
            return None
        given = {"images": str(self._dir / IMAGES_DIR), "work": str(self.work), "plan": str(self._dir / PLAN_FILE)}
        try:
            spare.stdin.write(f"{json.dumps(given)}\n".encode())
            spare.stdin.close()
        except OSError as exc:
            log.warning("the spare page daemon is gone (%s): starting one", exc)
            spare.kill()
            _reap(spare)
            return None
        # Idle until now; its start-up is done, and binding the socket must not wait behind the restore.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(spare.pid, os.SCHED_OTHER, os.sched_param(0))
        return spare

    def expose(self, task_work: Path) -> None:
        """Link the daemon's socket into runc's work dir `task_work`, where CRIU's restore connects."""
        link = task_work / SOCKET
        link.unlink(missing_ok=True)
        link.symlink_to(self.work / SOCKET)

    async def listening(self) -> None:
        """Return once CRIU can connect to the daemon; FailedPrecondition if it died or hangs."""
        assert self._daemon is not None, "start() first"
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not (self.work / SOCKET).exists():
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                raise FailedPrecondition(f"the lazy-pages daemon for this restore did not start; see "
                                         f"{self.work / LOG}")
            await asyncio.sleep(0.002)
        log.info("lazy-pages daemon listening after %.3fs", time.monotonic() - self._started)

    async def settled(self) -> None:
        """Wait until every page is in place: the daemon has exited and the watcher tidied up."""
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join)

    def close(self) -> None:
        """Stop the daemon if it still runs and release the devices (idempotent)."""
        self._closing = True
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.kill()
        if self._watcher is not None:
            self._watcher.join()
        self._release_devices()

    def _watch(self) -> None:
        assert self._daemon is not None
        stopped = self._stop_when_asked()
        code = self._daemon.wait()
        log.info("lazy-pages daemon exited (%d) %.3fs after start", code, time.monotonic() - self._started)
        if code == 0:  # memory complete: the fill time, for the proxy's metrics
            fillspool.write(self._dir.parent / fillspool.SPOOL, self._dir.name, time.monotonic() - self._started)
        if code != 0 and not stopped and not self._closing and self.on_failure is not None:
            log.error("the lazy-pages daemon failed (exit status %d, see %s)", code, self.work / LOG)
            self.on_failure(code)
        self._strip_config()
        self._release_devices()

    def _stop_when_asked(self) -> bool:
        """Our daemon's stdout, until it ends: STOP_FIRST (it failed, still holding the task's
        userfaultfds) ends the task now, and closing the pipe then lets the daemon exit."""
        out = self._daemon.stdout if self._daemon is not None else None
        if out is None:
            return False
        with out:  # closed on the way out: the daemon may go
            for line in out:
                if line != STOP_FIRST:
                    continue
                if self._closing or self.on_failure is None:
                    return False  # nothing to end (yet): its exit is reported as any failure is
                log.error("the lazy-pages daemon failed (see %s): ending the task first", self.work / LOG)
                self.on_failure(1)
                return True
        return False

    def _release_devices(self) -> None:
        """Detach this restore's devices, once, and only a device still tagged with this restore.

        The watcher releases them when the fill is done and `close` again at the end: by then the
        kernel may have handed the same /dev/loopN to the next restore, and detaching it by name
        would pull that restore's memory image away from its page daemon (seen in back-to-back
        restores: "Can't read mapping page 0").
        """
        with self._release_lock:
            if self._released:
                return
            self._released = True
        for fd in self._held:
            os.close(fd)
        mine = lazy.tag(self._dir)
        for device in self._pages.values():
            if loopdev.tag_of(device) != mine:
                continue  # released already (by the kernel at its last close), maybe someone else's now
            with contextlib.suppress(OSError):
                loopdev.detach(device)

    def _image_view(self) -> Path:
        """The images as the daemon sees them: hard links, and the loop devices for the large pages."""
        images, view = self._dir / IMAGES_DIR, self._dir / "lazy-images"
        view.mkdir(mode=0o700, exist_ok=True)
        for entry in os.scandir(images):
            target = view / entry.name
            if os.path.lexists(target):  # a second attempt after a failed start
                continue
            if entry.name in self._pages:
                target.symlink_to(self._pages[entry.name])
            elif entry.is_file(follow_symlinks=False):
                os.link(entry.path, target, follow_symlinks=False)
        return view

    def _strip_config(self) -> None:
        path = self.criu_config
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return
        kept = [line for line in lines if line.strip() != CRIU_OPTION]
        if kept != lines:
            temp = path.with_name(path.name + ".tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write("".join(f"{line}\n" for line in kept))
            os.replace(temp, path)
