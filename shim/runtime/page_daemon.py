"""criu-shim's page daemon: the lazy restore's memory, copied in large runs straight from the archive.

It stands where `criu lazy-pages` would, speaking the same protocol to the
restoring CRIU (criu/uffd.c): CRIU connects to `lazy-pages.socket` in its work
dir and, for each process it restores, sends the process's pid (an int) and
then its userfaultfd (SCM_RIGHTS; a zombie is sent as -pid, without a
descriptor); when the restore is done it sends RESTORE_FINISHED and closes.

From then on the daemon owns that memory (shim.restore.fillplan decides, this
module does the I/O): a page fault is answered first, with the run from the
faulting page on; between faults the rest is copied in runs of up to 4 MiB
from where the process last faulted, with UFFDIO_COPY straight out of an mmap
of the memory image inside the archive (shim.restore.page_source), read ahead
of the fill. Forks, remaps and removals move the plan along. It exits 0 once
every process's memory is in place (the relay then lets checkpoints through),
non-zero if it cannot finish (the relay then ends the restored task: a closed
userfaultfd would hand out zero pages). A daemon that fails while it holds
processes' userfaultfds says STOP_FIRST on its stdout and keeps them until the
relay has ended the task (it closes the pipe), so no process reads a page the
kernel made up meanwhile. The run's timings go to its log.
From the source node (a lazy migration) faults take smaller runs and the fill
keeps less on the way while the process faults (shim.restore.fillpace).

Usage (the relay starts it; it never enters another namespace):
    python -m shim.runtime.page_daemon lazy-pages --images-dir DIR --work-dir DIR --plan FILE
    python -m shim.runtime.page_daemon spare   (started ahead of need; its restore comes on stdin)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import json
import logging
import os
import re
import select
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.handoff import SPARE_PARENT_ENV
from shim.node_tls import Credentials
from shim.restore import fillpace, pagemap
from shim.restore.fillplan import BACKGROUND_RUN, FAULT_RUN, Copy, FillPlan, Zero
from shim.restore.page_source import MappedImage, PageSource
from shim.restore.remote_pages import Pinned, RemotePages
from shim.runtime import uffd

if TYPE_CHECKING:
    from shim.restore.sealed_pages import SealedImage

SOCKET = "lazy-pages.socket"
LOG = "lazy-pages.log"
RESTORE_FINISHED = 0x52535446  # "ReSTore Finished", after the last process (never a pid: above pid_max)
READ_AHEAD = 64 << 20  # of the image, ahead of the background fill
STOP_FIRST = b"stop\n"  # to the relay, on stdout: end the task now, its memory will not be complete
STOP_WAIT = 30.0  # a relay that does not close the pipe by then is gone (or hung): exit anyway
log = logging.getLogger("criu-shim.page-daemon")


@dataclass
class Stats:
    """Where the time goes, reported at the end."""

    started: float = field(default_factory=time.monotonic)
    connected: float = 0.0
    finished: float = 0.0
    copies: int = 0
    copied: int = 0
    copy_s: float = 0.0  # in UFFDIO_COPY
    read_s: float = 0.0  # making the image's bytes addressable (page cache, disk)
    faults: int = 0
    fault_copies: int = 0
    zero_pages: int = 0
    exists: int = 0
    again: int = 0
    forks: int = 0
    waited_s: float = 0.0  # with nothing to do but wait for the source node's bytes


class Task:
    """One process's userfaultfd, its plan and its image (None: the source node's, through `Daemon.remote`)."""

    def __init__(self, pid: int, fd: int, plan: FillPlan, source: PageSource | None) -> None:
        self.pid, self.fd, self.plan, self.source = pid, fd, plan, source
        self.gone = False
        self._ahead = (0, 0)

    def read_ahead(self, offset: int, length: int) -> None:
        """Keep the image READ_AHEAD ahead of the fill (posix_fadvise: the kernel reads it in the background)."""
        lo, hi = self._ahead
        if self.source is None or lo <= offset and offset + length + READ_AHEAD // 2 <= hi:
            return
        self.source.prefetch(offset, length + READ_AHEAD)
        self._ahead = (offset, offset + length + READ_AHEAD)


class Daemon:
    def __init__(self, images: Path, plan_file: Path, listener: socket.socket) -> None:
        self.images = images
        self.listener = listener
        self.stats = Stats()
        self.tasks: list[Task] = []
        self.sources: dict[int, PageSource] = {}
        self.sealed: dict[int, SealedImage] = {}  # those of `sources` in a sealed archive
        self.restore_finished = False
        self._deferred = _deferred_images(plan_file)
        self._conn: socket.socket | None = None
        self._next_bg = 0
        # A lazy migration: the memory comes from the source node's page server (connected now, before
        # the restore needs it), each copy asked for and copied once its bytes landed.
        server = _page_server(plan_file)
        self.remote: RemotePages[tuple[Task, Copy]] | None = RemotePages(*server) if server else None
        if server is not None:
            log.info("connected to the source node's page end at %s:%d (%s)", server[0], server[1],
                     "TLS, pinned" if server[2] is not None else "the tunnel's loopback end")
        self.pace = fillpace.FillPace()  # how much of the source's memory may be on the way (remote only)

    def run(self) -> int:
        self._open_sealed_ahead()
        self._conn, _ = self.listener.accept()
        # Started idle (its relay's doing: start-up must not slow the restore); the restore needs it now.
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        self.listener.close()
        self.stats.connected = time.monotonic()
        log.info("the restore connected")
        poller = select.poll()
        poller.register(self._conn, select.POLLIN)
        if self.remote is not None:
            poller.register(self.remote.fileno(), select.POLLIN)
        while True:
            if self.restore_finished:
                self.tasks = [t for t in self.tasks if not self._retire(poller, t)]
                if not self.tasks:
                    if self.remote is not None:  # in order: the source's CRIU may end the source now
                        self.remote.finish()
                    self._report()
                    return 0
            busy = any(t.plan.has_faults for t in self.tasks) or self.restore_finished and self._background_ready() \
                or self.remote is not None and self.remote.pending()
            waiting = time.monotonic()
            ready = poller.poll(0 if busy else None)
            if not busy and self.remote is not None and self.remote.in_flight:
                self.stats.waited_s += time.monotonic() - waiting
            for fd, _ in ready:
                if self._conn is not None and fd == self._conn.fileno():
                    self._from_restore(poller)
                elif self.remote is not None and fd == self.remote.fileno():
                    self.remote.receive(self._landed)
                else:
                    self._from_uffd(poller, fd)
            if self.remote is not None and self.remote.pending():  # decrypted already: poll() cannot tell
                self.remote.receive(self._landed)
            self._serve_faults()
            if self.restore_finished:
                self._background()

    # The restore's socket

    def _from_restore(self, poller: select.poll) -> None:
        assert self._conn is not None
        raw, fds = _recv(self._conn, 4)
        if not raw:
            if not self.restore_finished:
                raise RuntimeError("the restoring CRIU closed its connection before the restore finished")
            poller.unregister(self._conn)
            self._conn.close()
            self._conn = None
            return
        (value,) = struct.unpack("=i", raw)
        if value == RESTORE_FINISHED:
            self.restore_finished = True
            self.stats.finished = time.monotonic()
            self.pace.faulted(self.stats.finished)  # the processes resume now: their first faults follow
            log.info("restore finished %.3fs after the daemon started: filling in the rest",
                     self.stats.finished - self.stats.started)
            self._log_sealed("when the restore finished")
            return
        if value < 0:  # a zombie: no memory, no descriptor
            log.info("process %d is a zombie", -value)
            return
        if not fds:
            _, fds = _recv(self._conn, 1)
        if len(fds) != 1:
            raise RuntimeError(f"expected the userfaultfd of process {value}, got {len(fds)} descriptors")
        found = self._pagemap(value)
        vmas = _vmas(self.images / f"mm-{value}.img")
        if self.remote is not None:  # a run's image offset is its dump-time address, what the source is asked for
            task = Task(value, fds[0], FillPlan.from_runs(pagemap.remote_runs(found), vmas), None)
        else:
            task = Task(value, fds[0], FillPlan.from_runs(pagemap.lazy_runs(found), vmas),
                        self._source_of(found.pages_id))
        self.tasks.append(task)
        poller.register(task.fd, select.POLLIN)
        log.info("process %d: %d MiB to fill in", value, task.plan.missing_bytes >> 20)

    def _pagemap(self, pid: int) -> pagemap.Pagemap:
        name = f"pagemap-{pid}.img"
        return pagemap.parse((self.images / name).read_bytes(), f"checkpoint image {name}")

    def _source_of(self, pages_id: int) -> PageSource:
        if pages_id not in self.sources:
            name = f"pages-{pages_id}.img"
            where = self._deferred.get(name)
            if where is not None and "sealed" in where:  # in a sealed archive: opened chunk by chunk
                self.sources[pages_id] = self.sealed[pages_id] = _sealed_source(where)
            elif where is not None:  # in the archive
                self.sources[pages_id] = MappedImage(Path(where["archive"]), int(where["offset"]),
                                                     int(where["size"]), unlink=bool(where.get("unlink")))
            else:  # unpacked whole (a small image)
                path = self.images / name
                self.sources[pages_id] = MappedImage(path, 0, max(path.stat().st_size, 1))
        return self.sources[pages_id]

    # userfaultfd events

    def _from_uffd(self, poller: select.poll, fd: int) -> None:
        task = next((t for t in self.tasks if t.fd == fd), None)
        if task is None:
            return
        for event in uffd.read_events(fd):
            if event.kind == uffd.EVENT_PAGEFAULT:
                self.stats.faults += 1
                task.plan.fault(event.args[1])
                self.pace.faulted(time.monotonic())
            elif event.kind == uffd.EVENT_FORK:
                self.stats.forks += 1
                child = Task(task.pid, event.args[0] & 0xFFFFFFFF, task.plan.forked(), task.source)
                self.tasks.append(child)
                poller.register(child.fd, select.POLLIN)
                log.info("process %d forked: its child gets its own fill (%d MiB)", task.pid,
                         child.plan.missing_bytes >> 20)
            elif event.kind == uffd.EVENT_REMAP:
                task.plan.remapped(*event.args)
            elif event.kind in (uffd.EVENT_REMOVE, uffd.EVENT_UNMAP):
                start, end = event.args[0], event.args[1]
                # REMOVE leaves the VMA: stop handling its faults there (they are plain zero pages now).
                if event.kind == uffd.EVENT_REMOVE and uffd.unregister(fd, start, end - start) == errno.ENOMEM:
                    task.gone = True
                task.plan.removed(start, end)
            else:
                raise RuntimeError(f"process {task.pid}: unexpected userfaultfd event {event.kind:#x}")

    # Copies

    def _serve_faults(self) -> None:
        for task in self.tasks:
            while not task.gone and task.plan.has_faults:
                action = task.plan.next(background=False, fault_run=self._fault_run)
                if action is None:
                    break
                self._act(task, action)

    def _background_ready(self) -> bool:
        """Whether a background copy can start now: always from a local image; from the source node while
        the requests on the way leave room and something is still to be asked for."""
        if self.remote is None:
            return True
        return (self.remote.room(self.pace.window(time.monotonic()))
                and any(not t.gone and t.plan.has_missing for t in self.tasks))

    @property
    def _fault_run(self) -> int:
        return fillpace.FAULT_RUN if self.remote is not None else FAULT_RUN

    def _background(self) -> None:
        """One background copy, taking the processes in turn (from the source node: asked for until the
        requests on the way fill the window, so that the link, not the round trips, sets the rate)."""
        if self.remote is not None:
            while self._background_ready():
                pending = [t for t in self.tasks if not t.gone and t.plan.has_missing]
                task = pending[self._next_bg % len(pending)]
                self._next_bg += 1
                action = task.plan.next(run=self.pace.run(time.monotonic()), fault_run=self._fault_run)
                if action is None:
                    return
                self._act(task, action)
            return
        pending = [t for t in self.tasks if not t.gone and not t.plan.complete]
        if not pending:
            return
        task = pending[self._next_bg % len(pending)]
        self._next_bg += 1
        ahead = task.plan.peek_background(BACKGROUND_RUN)
        if ahead is not None:
            task.read_ahead(*ahead)
        action = task.plan.next()
        if action is not None:
            self._act(task, action)

    def _act(self, task: Task, action: Copy | Zero) -> None:
        if isinstance(action, Zero):
            outcome = uffd.zeropage(task.fd, action.start, action.length)
            self.stats.zero_pages += outcome.done // 4096
            if outcome.error == errno.EEXIST:  # landed meanwhile: make sure its waiter runs
                uffd.wake(task.fd, action.start, action.length)
            elif outcome.error in uffd.GONE:
                task.gone = True
            elif outcome.error not in (0, errno.EAGAIN, errno.ENOENT):
                raise OSError(outcome.error, f"process {task.pid}: UFFDIO_ZEROPAGE at {action.start:#x}")
            if outcome.error == errno.EAGAIN:
                task.plan.fault(action.start)  # after the events that changed the address space
            return
        if task.source is None:  # from the source node: copied once it has landed (_landed)
            assert self.remote is not None
            self.remote.request(task.pid, action.offset, action.length, (task, action))
            return
        began = time.monotonic()
        src = task.source.span(action.offset, action.length)
        copying = time.monotonic()
        self.stats.read_s += copying - began
        self._copy(task, action, src, action.length)

    def _landed(self, tag: tuple[Task, Copy], address: int, length: int) -> None:
        """A reply from the source node: `length` bytes (the copy's or fewer) at `address`, copied in now."""
        task, action = tag
        if not task.gone:  # else its process exited meanwhile: the bytes are dropped
            self._copy(task, action, address, length)

    def _copy(self, task: Task, action: Copy, src: int, length: int) -> None:
        copying = time.monotonic()
        outcome = uffd.copy(task.fd, action.start, src, length)
        self.stats.copy_s += time.monotonic() - copying
        self.stats.copies += 1
        self.stats.fault_copies += action.fault
        self.stats.copied += outcome.done
        error = outcome.error
        if error in uffd.GONE:
            task.gone = True
            return
        if error == errno.ENOENT:  # nothing registered there any more (an unmap raced us): not ours to fill
            if task.source is None:  # bytes that waited on the network: what the unmap left is in flight still
                task.plan.finished(action, outcome.done, exists=True)
            else:
                task.plan.finished(action, action.length)
            return
        if error not in (0, errno.EEXIST, errno.EAGAIN):
            raise OSError(error, f"process {task.pid}: UFFDIO_COPY of {length} bytes at {action.start:#x}")
        exists = error == errno.EEXIST and outcome.done < length
        if exists:
            self.stats.exists += 1
            uffd.wake(task.fd, action.start + outcome.done, 4096)
        self.stats.again += error == errno.EAGAIN
        task.plan.finished(action, outcome.done, exists=exists)  # a short reply: the rest is asked for again

    def _retire(self, poller: select.poll, task: Task) -> bool:
        """A task whose memory is complete (or whose process is gone) is done with: its descriptor closed."""
        if not (task.gone or task.plan.complete):
            return False
        poller.unregister(task.fd)
        os.close(task.fd)
        if task.gone:
            log.info("process %d exited before its memory was complete", task.pid)
        return True

    def _open_sealed_ahead(self) -> None:
        """Open the sealed images before the restore connects (still at idle priority): reading the chunk
        index and the key (a key command runs) is then not on the restore's critical path."""
        for name, where in self._deferred.items():
            match = re.fullmatch(r"pages-([0-9]+)\.img", name)
            if match and "sealed" in where:
                self._source_of(int(match.group(1)))

    def _log_sealed(self, when: str) -> None:
        """How much of each sealed image was decrypted (the fill's counters: a test reads them)."""
        for pages_id, source in sorted(self.sealed.items()):
            log.info("sealed pages-%d.img: %d of %d chunks decrypted %s (%d MiB)", pages_id,
                     source.chunks_opened, source.chunks_total, when, source.decrypted >> 20)

    def _report(self) -> None:
        s, now = self.stats, time.monotonic()
        fill = now - (s.finished or now)
        rate = s.copied / fill / (1 << 20) if fill > 0 else 0.0
        self._log_sealed("with memory in place")
        log.info("memory in place: %d MiB in %.3fs after the restore finished (%.0f MiB/s), %.3fs after start; "
                 "%d copies (%d for %d faults) taking %.3fs in UFFDIO_COPY and %.3fs reading the image; "
                 "%d zero pages, %d already there, %d interrupted, %d forks; connected after %.3fs",
                 s.copied >> 20, fill, rate, now - s.started, s.copies, s.fault_copies, s.faults, s.copy_s,
                 s.read_s, s.zero_pages, s.exists, s.again, s.forks, s.connected - s.started)
        if self.remote is not None:
            log.info("from the source node: %d requests, %d MiB received, %.3fs waiting for them with nothing else "
                     "to do", self.remote.requests, self.remote.received >> 20, s.waited_s)


def _sealed_source(where: dict[str, Any]) -> SealedImage:
    """A memory image in a sealed archive, opened with the node's key sources the plan names.

    Imported here: `cryptography` costs ~65 ms of start-up a daemon for a plain archive need not
    pay (a spare daemon imports it ahead of need)."""
    from shim.restore.sealed_pages import SealedImage
    from shim.sealed import Keyring

    keys = where["sealed"]
    keyring = Keyring({str(k): Path(v) for k, v in keys["key_files"].items()}, [str(c) for c in keys["key_command"]])
    path = Path(where["archive"])
    source = SealedImage(path, int(where["offset"]), int(where["size"]), keyring)
    if where.get("unlink"):  # our own link to a temporary archive: gone with our descriptor
        path.unlink(missing_ok=True)
    return source


def _recv(conn: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """Exactly `size` bytes (b"" at end of stream) and any descriptors that came with them."""
    data, fds = b"", []
    while len(data) < size:
        chunk, ancillary, _, _ = conn.recvmsg(size - len(data), socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"={len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
        if not chunk:
            if data:
                raise RuntimeError("the restoring CRIU sent a truncated message")
            return b"", fds
        data += chunk
    return data, fds


def _vmas(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each VMA in an mm-<pid>.img."""
    from pycriu.images import pb

    raw = path.read_bytes()
    magic = struct.unpack_from("=I", raw, 0)[0]
    pos = 8 if magic in (0x54564319, 0x55105940) else 4  # a common/service magic comes first
    (size,) = struct.unpack_from("=I", raw, pos)
    mm = pb.mm_entry()
    mm.ParseFromString(raw[pos + 4:pos + 4 + size])
    return [(int(v.start), int(v.end)) for v in mm.vmas]


def _page_server(plan_file: Path) -> tuple[str, int, Pinned | None] | None:
    """Where a lazy migration's memory is (shim.restore.lazy.plan_remote), or None: the page tunnel's
    loopback end, or the source's page end itself, pinned."""
    server = json.loads(plan_file.read_text()).get("page_server")
    if server is None:
        return None
    tls = server.get("tls")
    pinned = None if tls is None else Pinned(Credentials(Path(tls["cert"]), Path(tls["key"]), Path(tls["ca"])),
                                             str(tls["certificate"]), str(tls["token"]), float(tls["idle"]))
    return str(server["address"]), int(server["port"]), pinned


def _deferred_images(plan_file: Path) -> dict[str, dict[str, Any]]:
    """The memory images the plan left in the archive: name -> {archive, offset, size, unlink}."""
    plan = json.loads(plan_file.read_text())
    return {str(p["image"]): p for p in plan["pages"]}


def listen_at(directory: Path, name: str) -> socket.socket:
    """A socket listening at directory/name; the name appears only once it accepts (bound, then renamed).

    Bound through the directory's descriptor: a socket's path is limited to 107 bytes, a work dir's is not.
    """
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        temp = f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dirfd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/proc/self/fd/{dirfd}/{temp}")
            sock.listen(1)
            os.replace(temp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(dirfd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="criu-shim page daemon")
    parser.add_argument("mode", choices=["lazy-pages", "spare"])
    parser.add_argument("--images-dir", type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--plan", type=Path)
    parser.add_argument("--listen-fd", type=int, help="a socket already listening at WORK_DIR/lazy-pages.socket")
    args = parser.parse_args(argv)
    if args.mode == "spare":
        return _spare()
    if args.images_dir is None or args.work_dir is None or args.plan is None:
        parser.error("lazy-pages needs --images-dir, --work-dir and --plan")
    # First: the restore may connect while the rest is imported.
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd is not None else listen_at(args.work_dir, SOCKET)
    return _serve(args.images_dir.absolute(), args.work_dir, args.plan.absolute(), listener)


def _spare() -> int:
    """A daemon started ahead of need (by a spare relay, at idle priority): everything imported, it waits
    on stdin for one restore, `{"images", "work", "plan"}` as a JSON line; end of input ends it quietly.

    Measured: a daemon started only once the restore is unpacked spends its Python start-up (~0.15 s of
    CPU) while CRIU restores, and on 2 cores that made the restore until the process runs ~65 ms slower.
    """
    _die_with_parent(signal.SIGKILL)  # an unused spare goes with its relay, even a killed one
    if str(os.getppid()) != os.environ.get(SPARE_PARENT_ENV, str(os.getppid())):
        return 0  # its relay died before the line above (started at idle priority, it may be slow to get here)
    from pycriu.images import pb  # noqa: F401

    import shim.restore.sealed_pages  # noqa: F401  (a sealed archive's source: cryptography)

    line = sys.stdin.readline()
    if not line.strip():
        return 0
    _die_with_parent(0)  # from here it owns a restore's memory: it must outlive a relay that dies
    given = json.loads(line)
    work = Path(given["work"])
    errors = os.open(work / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(errors, 2)  # what dies before its own logging starts, as for a daemon started on demand
    os.close(errors)
    return _serve(Path(given["images"]), work, Path(given["plan"]), listen_at(work, SOCKET))


def _die_with_parent(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): 0 clears it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)


def _serve(images: Path, work: Path, plan: Path, listener: socket.socket) -> int:
    os.chdir(work)
    logging.basicConfig(filename=LOG, level=logging.INFO,
                        format="%(asctime)s %(levelname)s page-daemon: %(message)s")
    faulthandler.register(signal.SIGUSR1, file=sys.stderr)  # where it is, on demand (stderr: the log)
    from pycriu.images import pb  # noqa: F401  now, while containerd starts the task: not at the first fault
    log.info("ready for the restore (%.3fs of CPU so far)", time.process_time())
    daemon: Daemon | None = None
    try:
        daemon = Daemon(images, plan, listener)
        return daemon.run()
    except Exception as exc:
        log.error("Error: %s", exc, exc_info=not isinstance(exc, OSError | RuntimeError | ValueError))
        if daemon is not None and daemon.tasks:
            _stop_first()
        return 1


def _stop_first() -> None:
    """Ask the relay to end the task while we still hold its userfaultfds; wait until it has (it
    closes our stdout's pipe), at most STOP_WAIT. Without a pipe (not started by a relay): at once."""
    try:
        if not stat.S_ISFIFO(os.fstat(1).st_mode):
            return
        os.write(1, STOP_FIRST)
    except OSError:
        return  # the relay is gone already
    poller = select.poll()
    poller.register(1, select.POLLERR)
    started = time.monotonic()
    if poller.poll(STOP_WAIT * 1000):
        log.info("the relay ended the task %.3fs after it was asked", time.monotonic() - started)
    else:
        log.error("the relay did not say it ended the task within %.0f s", STOP_WAIT)


if __name__ == "__main__":
    sys.exit(main())
