"""A deadline for CRIU's restore at StartContainer: a CRIU that never finishes is ended.

CRIU can spin at 100% CPU on an inconsistent image (one the proxy could not
check before it ran), and the runc shim waits for it for as long as it runs:
StartContainer hangs past its caller's deadline and runc's `criu-root` mount of
the rootfs stays. The relay arms this watchdog when it sends the init process's
Start on; if CRIU still restores the container at the deadline, the watchdog
kills it, so runc fails the Start, unmounts what it mounted and containerd
cleans the task up (the relay then releases the devices and the unpacked
checkpoint as it does for any ended task).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

# Well past the kubelet's own StartContainer deadline (2 minutes by default) and any real
# restore here (gigabytes restore in seconds); only a CRIU that will not finish gets here.
RESTORE_DEADLINE = 300.0
log = logging.getLogger(__name__)


class CriuDeadline:
    """Kill the CRIU restoring container `container_id` if it still runs `seconds` from now."""

    def __init__(self, container_id: str, seconds: float = RESTORE_DEADLINE) -> None:
        self._container_id = container_id
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        for pid in criu_restoring(self._container_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            log.error("CRIU (pid %d) was still restoring container %s after %.0f s: ended it; the restore fails "
                      "and runc releases its mounts", pid, self._container_id, self._timer.interval)


def criu_restoring(container_id: str, proc: Path = Path("/proc")) -> list[int]:
    """CRIU processes whose parent is the `runc restore` of this container (runc runs `criu swrk`)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "criu":
                continue
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            argv = (proc / parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if b"restore" in argv and container_id.encode() in argv:
            found.append(int(entry.name))
    return found
