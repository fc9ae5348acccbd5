"""CRIU's pre-dump action script for a lazy migration's dump: runc and CRIU start before the pause.

Why. From runc's start to CRIU's freeze, runc loads the container, asks CRIU for its version and its
lazy-pages support (a CRIU process each) and starts the CRIU that dumps: 20-30 ms on this project's
VMs with CRIU's kernel probes cached (more without), all of it inside the pause when the switch-over,
our TCP lock and our freeze come first. CRIU runs its action scripts' "pre-dump" first thing in a
dump, before it looks at the freezer or seizes anything (criu/cr-dump.c cr_dump_tasks). So the dump
starts before the switch-over; CRIU, in our script, says it is there and waits; we switch over,
lock and freeze; then we tell it to go on.

How. Two FIFOs and a script in the dump's private staging directory, the script named in CRIU's
config file (`action-script`, read in runc's swrk mode too). The script writes a line to `ready` and
reads one from `go`; anything but "go" (our "no", or the end of the FIFO when we die: we hold its
only writing end) makes it exit non-zero, and CRIU fails the dump before it has touched the
container ("Pre dump script failed"). Other actions pass through at once. Its open of either FIFO
would wait forever for an end of ours that died before it came (a FIFO opens only once both ends
are there), so the handshake runs under `timeout`: WAIT_LIMIT at most, far above the milliseconds
of a switch-over, then the dump fails the same way.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import time
from pathlib import Path

SCRIPT = "pre-dump.sh"
READY = "pre-dump.ready"
GO = "pre-dump.go"
WAIT_LIMIT = 60  # seconds CRIU waits in the hook at most


class PreDumpHook:
    """The FIFOs, open on our side (read-write: never an end-of-file, never a blocking open), and the script."""

    def __init__(self, directory: Path, limit: int = WAIT_LIMIT) -> None:
        self.script = directory / SCRIPT
        ready, go = directory / READY, directory / GO
        os.mkfifo(ready, 0o600)
        os.mkfifo(go, 0o600)
        self._ready = os.open(ready, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._go = os.open(go, os.O_RDWR | os.O_CLOEXEC)
        body = ('[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] || exit 0\n'
                f"exec timeout {int(limit)} sh -c "
                + shlex.quote('echo ready > "$1" && read -r answer < "$2" && [ "$answer" = go ]')
                + f" pre-dump {shlex.quote(str(ready))} {shlex.quote(str(go))}\n")
        fd = os.open(self.script, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o700)
        with os.fdopen(fd, "w") as out:
            out.write("#!/bin/sh\n" + body)
        self.waiting = False  # CRIU waits in the script for our answer

    def config_line(self) -> str:
        return f"action-script {self.script}\n"

    def wait(self, status_fd: int, timeout: float) -> str:
        """Until CRIU waits in the script ("hook"), or the status fd has something to say first ("status":
        CRIU ready without running the script, or runc gone), or `timeout` ("timeout"). Blocking."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._ready, status_fd], [], [], left)
            if self._ready in readable:
                with contextlib.suppress(BlockingIOError):
                    if os.read(self._ready, 64):
                        self.waiting = True
                        return "hook"
            if status_fd in readable:
                return "status"
        return "timeout"

    def answer(self, go: bool) -> None:
        """Let CRIU go on, or make it fail the dump before it touches the container (idempotent)."""
        if self.waiting:
            self.waiting = False
            os.write(self._go, b"go\n" if go else b"no\n")

    def close(self) -> None:
        """Our ends of the FIFOs: a script still waiting reads the end and fails the dump (idempotent)."""
        for fd in (self._ready, self._go):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ready = self._go = -1
