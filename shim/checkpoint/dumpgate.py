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

Every path opens the gate: the engine's clean-up (`open` is idempotent), and
recovery for a dead criu-shim (`held_open` around draining the page FIFOs), so
CRIU is never left holding a container for a reader that is gone. Blocking
calls: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from shim import freezer

GATE = "inventory.img"  # CRIU's image written last before it releases the tasks (criu/image-desc.c)
FILE_MODE = 0o600
POLL_S = 0.002  # how often the hold is looked for: CRIU seizes in a few milliseconds
CRIU_COMM = "criu"


class GateError(Exception):
    """The gate could not be kept (the inventory did not arrive, or could not be written)."""


class Gate:
    """The FIFO `inventory.img` in CRIU's image directory; make, wait_held, open, finish, close."""

    def __init__(self, images: Path) -> None:
        self.path = images / GATE
        self._fd: int | None = None
        self.opened_at: float | None = None  # time.monotonic() of `open`

    @classmethod
    def make(cls, images: Path) -> Gate | None:
        """Make the FIFO before the dump; None where FIFOs cannot be made (the caller pauses instead)."""
        gate = cls(images)
        try:
            os.mkfifo(gate.path, FILE_MODE)
        except OSError:
            return None
        return gate

    def open(self) -> None:
        """Let CRIU write the inventory (and so finish and release the tasks). Idempotent, never blocks."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self.opened_at = time.monotonic()

    def finish(self, timeout: float = 30.0) -> None:
        """After a successful dump: the inventory out of the pipe into a plain file of the same name."""
        self.open()
        assert self._fd is not None
        data = bytearray()
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            # Linux reports nothing on a FIFO no writer ever opened: CRIU did open it (the dump
            # succeeded), so POLLIN/POLLHUP come; the deadline only guards against a stranger.
            if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise GateError(f"CRIU's {GATE} did not arrive within {timeout:.0f}s of the dump")
            chunk = _read(self._fd)
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
        self.close()

    def close(self) -> None:
        """Release the reader (idempotent). An unfinished gate leaves its FIFO to the staging dir's removal."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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
    """Block until CRIU waits for the gate's reader (its open of the FIFO sleeps in the kernel's
    `wait_for_partner`: every page is written), or has ended; whether it was seen waiting.

    Only the fault tests need this: their "dumped" point means memory on disk and CRIU waiting for
    us, not CRIU still streaming pages (the engine itself opens the gate as soon as its diff is taken).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{criu_pid}/wchan").read_text().strip() == "wait_for_partner":
                return True
        except OSError:
            return False  # CRIU has ended
        time.sleep(POLL_S)
    return False


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


@contextlib.contextmanager
def held_open(images: Path) -> Iterator[None]:
    """Recovery of a dead criu-shim's dump: keep the gate open (discarding) while the rest is drained."""
    path = images / GATE
    fd: int | None = None
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
