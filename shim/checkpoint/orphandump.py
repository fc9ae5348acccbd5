"""A dump whose criu-shim died, made to fail where CRIU waits for a reader that will never come.

While criu-shim lives, CRIU never waits to open a FIFO of ours: the page
FIFOs (pagestream) and the gate (dumpgate) are opened before the dump. When
criu-shim dies, the kernel closes its descriptors: a CRIU writing pages, or
blocked on the gate's full pipe, gets EPIPE at once and its dump fails (the
tasks run on). A CRIU that had not yet reached its next FIFO opens it later
with no reader and sleeps in the kernel (`wait_for_partner`) holding the
container. A plain reader would wake it and let it finish: a stop-after dump
would then end the container although no archive will ever be written.

So, for such a CRIU: stop it (SIGSTOP: the sleeping open returns to be
restarted), open every FIFO of the image directory read-write and fill its
pipe, let CRIU go on (SIGCONT: its open restarts and returns at once, a
reader being there; its write blocks on the full pipe), wait until it has
one of those FIFOs open (or has ended), and close ours: no reader is left,
and its write fails with EPIPE. CRIU never sees an empty pipe. Blocking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

from shim.checkpoint import dumpgate

log = logging.getLogger(__name__)

WAITING_FOR_READER = "wait_for_partner"  # /proc/PID/wchan of an open of a FIFO with no reader (fs/pipe.c)
STEP_TIMEOUT = 10.0  # for CRIU to stop, and then to reach a FIFO; past it, the next pass tries again
POLL_S = 0.002


def fail_waiting(images: Path, timeout: float = STEP_TIMEOUT) -> list[int]:
    """Make every CRIU working in `images` that waits to open a FIFO there fail; their pids."""
    fifos = _fifos(images)
    if not fifos:
        return []
    failed = []
    for pid in dumpgate.criu_pids():
        if not _works_in(pid, images):
            continue
        if _state(pid) == "T":  # stopped by a recovery that died before it let it go on: next pass
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        elif dumpgate.wait_channel(pid) == WAITING_FOR_READER:
            _fail(pid, fifos, timeout)
            failed.append(pid)
    return failed


def _fail(pid: int, fifos: list[Path], timeout: float) -> None:
    stats = [os.lstat(p) for p in fifos]
    before = dumpgate.fifo_open_in(pid, stats)
    os.kill(pid, signal.SIGSTOP)
    held: list[int] = []
    try:
        if not _until(lambda: _state(pid) in ("T", None), timeout):
            log.warning("CRIU %d did not stop within %.0fs; trying again later", pid, timeout)
        else:
            held = _held_full(fifos)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        try:
            # Its open restarts and returns (a reader is there); once it holds a FIFO it did not hold
            # before, our close can only fail its write. Closing earlier is safe too, only slower: it
            # would sleep in its open again, and the next pass comes back for it.
            if held:
                _until(lambda: bool(dumpgate.fifo_open_in(pid, stats) - before) or _state(pid) is None, timeout)
        finally:
            for fd in held:
                os.close(fd)


def _held_full(fifos: list[Path]) -> list[int]:
    """Every FIFO opened read-write and its pipe filled; all or none (a pipe with room and a
    reader would let CRIU's write through)."""
    held: list[int] = []
    try:
        for path in fifos:
            held.append(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))  # never waits
            dumpgate.fill(held[-1])
    except (OSError, dumpgate.GateError) as exc:
        log.warning("could not hold the FIFOs of %s full (%s); trying again later", fifos[0].parent, exc)
        for fd in held:
            os.close(fd)
        return []
    return held


def _fifos(images: Path) -> list[Path]:
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(images):
            with contextlib.suppress(OSError):
                if stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode):
                    found.append(Path(entry.path))
    return sorted(found)


def _works_in(pid: int, images: Path) -> bool:
    """Whether `pid` has the image directory, or something in it, open (runc hands CRIU the directory)."""
    inside = f"{images}/"
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target == str(images) or target.startswith(inside):
                    return True
    return False


def _state(pid: int) -> str | None:
    """The state letter of `pid` (/proc/PID/stat), None once it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = text.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True
