"""Which files a restore still reads, seen from outside any process: loop devices and open descriptors.

A lazy restore reads its archive until memory is complete: criu-shim's page
daemon and its relay hold it open (below); CRIU's reads it through read-only
loop devices (shim.restore.loopdev), and the kernel names each device's backing
file in /sys/block/loopN/loop/backing_file (its current path, " (deleted)"
once unlinked). An unpack in progress holds the archive open: any process's
/proc/PID/fd links to it. The proxy's own Restorer adds the archives it has
admitted but not yet opened (passed in by the composition root); a `criu-shim
gc` run in its own process sees only what the kernel shows.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_DELETED = " (deleted)"


def loop_backing_files(sys_block: Path = Path("/sys/block")) -> set[Path]:
    found = set()
    for entry in sys_block.glob("loop*"):
        with contextlib.suppress(OSError):
            backing = (entry / "loop" / "backing_file").read_text().rstrip("\n")
            if backing and not backing.endswith(_DELETED):
                found.add(Path(backing))
    return found


def open_files(candidates: set[Path], proc: Path = Path("/proc")) -> set[Path]:
    """Those of `candidates` (absolute, real paths) that some process holds open."""
    if not candidates:
        return set()
    wanted = {str(p) for p in candidates}
    held: set[Path] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):  # the process went away, or is not ours to look at
            fd_dir = proc / pid / "fd"
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd_dir / fd)
                    if target in wanted:
                        held.add(Path(target))
    return held


def in_use(candidates: set[Path]) -> set[Path]:
    """Those of `candidates` a loop device is backed by or a process has open."""
    real = {p: Path(os.path.realpath(p)) for p in candidates}
    busy = loop_backing_files() | open_files(set(real.values()))
    return {p for p, r in real.items() if r in busy or p in busy}
