"""Frozen only while CRIU is: the rootfs diff taken while CRIU itself still holds the container.

A checkpoint must describe one instant: the memory image and the filesystem
changes (rootfs diff, the pod's /dev/shm). CRIU stops the container for the
dump anyway (it freezes the cgroup, seizes every task with ptrace and holds
them until the end), so the diff belongs inside CRIU's own hold, with no pause
of ours around runc's and CRIU's start-up.

The gate. CRIU writes `inventory.img` last: after every task's memory, files
and namespaces, and before it lets the tasks go (criu/cr-dump.c: cr_dump_tasks
ends with write_img_inventory, then cr_dump_finish runs the post-dump
notification and unseizes). We make `inventory.img` a FIFO in CRIU's private
image directory; CRIU's open of it for writing blocks until a reader opens it.
So: once every task of the container is traced by CRIU (`wait_held`), the
diff is taken, and only then is the gate opened (`open`); CRIU writes the
inventory into the pipe and goes on, and `finish` puts the inventory in place
as a plain file. CRIU cannot let the tasks go before the gate opens, except
when its dump fails (then there is no checkpoint to be consistent with).

Held full, so that every failure of ours fails the dump. Before the dump
starts, `make` opens the FIFO for reading and for writing (neither blocks:
each end finds the other) and fills the pipe with bytes of ours. CRIU's open
of the gate then never waits (there is a reader), and its write of the
inventory (a few hundred bytes, under PIPE_BUF, so all or nothing) blocks on
the full pipe. To open the gate we read exactly our filler back out (FIFO
order: it comes first) and close our write end; the reader stays, so there is
always a reader while CRIU's write is pending. Any other end (the diff failed,
a deadline, the request cancelled: `abort`; criu-shim killed: the kernel closes
our descriptors) leaves no reader behind a full pipe, so CRIU's write fails
with EPIPE: CRIU 4.2.1 logs "Error flushing image: Broken pipe", unlocks the
network, lets the tasks go alive and exits 1, with or without
--leave-running. A stop-after dump would otherwise end the container with no
archive ever written. Nothing here races CRIU: our reader exists before CRIU
can reach the gate, and the pipe is full before the dump is asked for. (The
older way, a reader opened only at the end, woke a CRIU asleep in its open,
which could then write before any filler landed.)

A criu-shim killed while CRIU was still on its pages leaves a CRIU that later
opens a FIFO with no reader at all and sleeps in the kernel's
`wait_for_partner`; recovery makes that CRIU fail too (`orphandump`), never
by a plain reader, which would let it finish.

Why not a CRIU action script (`post-dump` runs exactly there, before the
unseize). CRIU 4.2.1 does run one from runc's CRIU configuration beside runc's
own RPC notifications (checked with `criu swrk`, notify_scripts on, config
file naming the script: pre-dump and post-dump ran; older CRIU refused the mix,
add_script() BUG_ON in RPC mode). But runc passes only one node-wide file,
`/etc/criu/runc.conf` (and none for a container with an `org.criu.config`
annotation, as our restored ones have), so it would mean a shell started for
every action of every dump and restore of every runc container on the node
(a dozen per restore, containerd 2.x's own included), a node that fails every
checkpoint and restore if the script goes missing, and a handshake with
criu-shim in sh. The gate needs no node configuration, costs nothing to
anyone else, and works on a node where `criu-shim install` never ran.

Blocking calls: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shim import freezer

GATE = "inventory.img"  # CRIU's image written last before it releases the tasks (criu/image-desc.c)
FILE_MODE = 0o600
POLL_S = 0.002  # how often the hold is looked for: CRIU seizes in a few milliseconds
CRIU_COMM = "criu"
# The kernel's wait of a writer on a full pipe (fs/pipe.c), as /proc/PID/wchan names it: CRIU at the gate
# (pipe_write; anon_pipe_write in newer kernels, as 6.18 here).
WRITING = ("pipe_write", "anon_pipe_write")
ABORT_POLL_S = 0.005
PAGE = 4096


class GateError(Exception):
    """The gate could not be kept (the inventory did not arrive, or could not be written)."""


class Gate:
    """The FIFO `inventory.img` in CRIU's image directory, held full; make, wait_held, open, finish, close."""

    def __init__(self, images: Path) -> None:
        self.path = images / GATE
        self._reader: int | None = None
        self._filler: int | None = None  # our write end: the pipe is full of our bytes until `open`
        self._filled = 0
        self.opened_at: float | None = None  # time.monotonic() of `open`
        self.kept = False  # the inventory is a file in place of the FIFO (`finish`)
        self.kept_at: float | None = None  # time.monotonic() of that

    @classmethod
    def make(cls, images: Path) -> Gate | None:
        """The FIFO, held full, before the dump; None where that cannot be (the caller pauses instead)."""
        gate = cls(images)
        try:
            os.mkfifo(gate.path, FILE_MODE)
        except OSError:
            return None
        try:
            # Reader first: an O_NONBLOCK open for writing fails with ENXIO while there is none.
            gate._reader = os.open(gate.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            gate._filler = os.open(gate.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            gate._filled = fill(gate._filler)
        except (OSError, GateError):
            gate.close()
            with contextlib.suppress(OSError):
                gate.path.unlink()  # a FIFO left with no reader would stop CRIU at its open
            return None
        return gate

    @property
    def opened(self) -> bool:
        return self.opened_at is not None

    def open(self) -> None:
        """Let CRIU write the inventory (and so finish, and release or end the tasks). Idempotent, never blocks."""
        if self.opened:
            return
        if self._reader is None or self._filler is None:
            raise GateError("the gate was closed before it opened: CRIU's dump has failed")
        left = self._filled
        while left:  # our filler is first in the pipe and all there: these reads never wait
            try:
                chunk = os.read(self._reader, min(left, 1 << 16))
            except BlockingIOError:
                chunk = b""
            if not chunk:
                raise GateError(f"the filler of {GATE} went missing ({left} bytes short)")
            left -= len(chunk)
        os.close(self._filler)  # after the read-out: the reader stays, CRIU's write lands
        self._filler = None
        self.opened_at = time.monotonic()

    def abort(self, ended: Callable[[], bool], timeout: float = math.inf) -> None:
        """Fail the dump at the gate, so CRIU lets the tasks run on (a stop-after dump too). Blocking.

        Our descriptors go once CRIU has the FIFO open (its write then fails, blocked or not yet
        made), or once `ended()` says the dump is over: no deadline by default, since letting go
        earlier would leave a CRIU still on its pages (minutes for a big container) to sleep at
        its open of a FIFO nobody will read, holding the container. After `open`: nothing to do."""
        if self.opened or self._reader is None:
            self.close()
            return
        try:
            fifo = os.fstat(self._reader)
            deadline = time.monotonic() + timeout
            while not ended() and not criu_holds(fifo) and time.monotonic() < deadline:
                time.sleep(ABORT_POLL_S)
        finally:
            self.close()

    def fifo(self) -> os.stat_result | None:
        """The FIFO we hold (its device and inode), None once let go."""
        return os.fstat(self._reader) if self._reader is not None else None

    def finish(self, timeout: float = 30.0) -> None:
        """The inventory out of the pipe into a plain file of the same name (idempotent).

        Called right after `open` (CRIU writes the inventory at once and closes it): the
        inventory is then a file before CRIU ends, so a criu-shim dying while CRIU finishes
        leaves a dump recovery can complete (`rollforward`); and again after the dump."""
        if self.kept:
            return
        self.open()
        assert self._reader is not None
        data = bytearray()
        poller = select.poll()
        poller.register(self._reader, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            # CRIU did write and close (the dump succeeded), so POLLIN/POLLHUP come; the deadline
            # only guards against a stranger holding the FIFO open.
            if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise GateError(f"CRIU's {GATE} did not arrive within {timeout:.0f}s of the dump")
            chunk = _read(self._reader)
            if chunk is None:
                continue
            if not chunk:
                break
            data += chunk
        if not data:
            raise GateError(f"CRIU wrote an empty {GATE}")
        temporary = self.path.with_name(f".{GATE}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(temporary, self.path)  # the FIFO goes: only files reach the archive
        self.kept, self.kept_at = True, time.monotonic()
        self.close()

    def close(self) -> None:
        """Let go of the FIFO (idempotent). Unopened, that fails CRIU's write of the inventory."""
        for name in ("_filler", "_reader"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


def fill(fd: int) -> int:
    """Fill the pipe behind `fd` (non-blocking, for writing) to the brim; the bytes written.

    Page-sized writes take a whole slot each, so none is left part-full for a small write to be
    merged into; single bytes then take whatever room is left. A pipe not full afterwards is
    refused (GateError): CRIU's inventory would land in it."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PAGE)  # the smallest pipe: the least to fill and read back
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    filled = 0
    for block in (bytes(PAGE), b"\0"):
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(fd, block)
    if filled < size:
        raise GateError(f"the pipe of {GATE} took {filled} of {size} bytes")
    return filled


def criu_pids() -> list[int]:
    """The processes named criu (CRIU's own name for itself, whatever started it)."""
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit() and _comm(int(e.name)) == CRIU_COMM]


def criu_holds(fifo: os.stat_result) -> bool:
    """Whether a process named criu has this FIFO open."""
    return any(fifo_open_in(pid, [fifo]) for pid in criu_pids())


def fifo_open_in(pid: int, fifos: list[os.stat_result]) -> set[tuple[int, int]]:
    """Which of `fifos` (device, inode) process `pid` has open."""
    wanted = {(f.st_dev, f.st_ino) for f in fifos}
    found: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                held = os.stat(fd.path)
                if (held.st_dev, held.st_ino) in wanted:
                    found.add((held.st_dev, held.st_ino))
    return found


def held_open(pid: int, directory: Path) -> set[str]:
    """The names of the files in `directory` that process `pid` has open (CRIU at its gate: the
    images it still writes, buffered until it closes them after the inventory)."""
    inside = f"{directory}/"
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith(inside) and "/" not in target[len(inside):]:
                    names.add(target[len(inside):])
    return names


def wait_held(cgroup: Path, stop: threading.Event, timeout: float) -> int:
    """Block until CRIU holds every task of the container's cgroup; return CRIU's pid.

    Held: each task (thread) is traced by a process named criu, and is either
    in ptrace stop or in a frozen cgroup (CRIU seizes under the freezer, then
    thaws it with the tasks stopped). `stop` ends the wait (the dump ended
    without ever holding them: raises GateError), as does `timeout`.
    """
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        tracer = _holder(cgroup)
        if tracer is not None:
            return tracer
        if time.monotonic() > deadline:
            raise GateError(f"CRIU did not take hold of the container within {timeout:.0f}s")
        time.sleep(POLL_S)
    raise GateError("the dump ended before CRIU held the container")


def wait_at_gate(criu_pid: int, timeout: float) -> bool:
    """Block until CRIU waits at the gate (its write of the inventory sleeps on the full pipe in
    the kernel's `pipe_write`: every page is written), or has ended; whether it was seen waiting.

    Only the fault tests need this: their "dumped" point means memory on disk and CRIU waiting for
    us, not CRIU still streaming pages (the engine itself opens the gate as soon as its diff is taken).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wchan = wait_channel(criu_pid)
        if wchan is None:
            return False  # CRIU has ended
        if wchan in WRITING:
            return True
        time.sleep(POLL_S)
    return False


def wait_arrival(gate: Gate, criu_pid: int, stop: threading.Event, timeout: float) -> None:
    """Block until CRIU has the gate open (every page written: the gate is its last image).

    Raises GateError when the dump ends first (`stop`) or past `timeout`."""
    fifo = gate.fifo()
    if fifo is None:
        raise GateError("the gate was let go before CRIU reached it")
    deadline = time.monotonic() + timeout
    # CRIU at the gate sleeps in the kernel's pipe_write: one read of its wchan per poll, and the fd scan
    # (a stat per descriptor) only to confirm it is our pipe, not the page stream's, it waits on.
    while wait_channel(criu_pid) not in WRITING or not fifo_open_in(criu_pid, [fifo]):
        if stop.is_set():
            raise GateError("the dump ended before CRIU reached the gate")
        if time.monotonic() > deadline:
            raise GateError(f"CRIU did not reach the gate within {timeout:.0f}s")
        time.sleep(POLL_S)


def wait_channel(pid: int) -> str | None:
    """Where in the kernel `pid` sleeps (/proc/PID/wchan, "0" when running); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return None


def _holder(cgroup: Path) -> int | None:
    tasks = _tasks(cgroup)
    if not tasks:
        return None
    frozen: bool | None = None
    tracers: set[int] = set()
    for tid in tasks:
        fields = _status(tid)
        if fields is None:
            return None  # a task went away mid-look: look again
        state, tracer = fields
        if tracer == 0:
            return None
        if state != "t":
            if frozen is None:
                try:
                    frozen = freezer.state(cgroup) is freezer.State.FROZEN
                except freezer.FreezerError:
                    frozen = False
            if not frozen:
                return None
        tracers.add(tracer)
    if len(tracers) != 1:
        return None
    tracer = tracers.pop()
    return tracer if _comm(tracer) == CRIU_COMM else None


def _tasks(cgroup: Path) -> list[int]:
    for name in ("tasks", "cgroup.threads"):  # v1 freezer, v2
        try:
            return [int(t) for t in (cgroup / name).read_text().split()]
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return []
    return []


def _status(tid: int) -> tuple[str, int] | None:
    """(state letter, TracerPid) of a task."""
    try:
        text = Path(f"/proc/{tid}/status").read_text()
    except OSError:
        return None
    state, tracer = "", -1
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("TracerPid:"):
            tracer = int(line.split()[1])
            break
    return (state, tracer) if state and tracer >= 0 else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
