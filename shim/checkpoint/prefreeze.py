"""A stop-after dump's cgroup frozen by us the moment CRIU starts, so that CRIU need not freeze it.

Why. On a cgroup v1 freezer CRIU writes FROZEN, finds the cgroup still
FREEZING at its first look and then polls the state in steps of 100 ms
(criu/seize.c freeze_processes): ~0.1 s of the pause spent asleep. Frozen by
us (a few ms, polled finely) before CRIU looks, CRIU finds it FROZEN, skips its
own freeze and seizes at once. Not earlier than CRIU's start (its log file
appearing): freezing before the dump is asked for would add runc's and CRIU's
start-up to the pause.

Crash safety. CRIU has the last word on the freezer: after a failed dump it
puts the cgroup back as it found it, here frozen by us. Every failure of ours
fails CRIU's dump at the gate (`dumpgate`), so the container would stay frozen
if we died. A guard (a shell of its own session, started before the dump) is
told CRIU's pid before we freeze; should criu-shim die (the guard's stdin
reaches EOF without `keep`), it waits for that CRIU to end and then thaws the
cgroup, whatever CRIU left. Thawing after a complete stop-after dump is
harmless (CRIU ended the tasks). On our own paths the caller thaws after a
failed dump (`held.keep_running_on_failure`) and then tells the guard `keep`.

Only a cgroup found THAWED is frozen (a container paused by its user stays
as it is). Should CRIU look at the freezer first, it freezes it itself: slower,
never wrong. What is not covered: a freeze of ours landing after CRIU had
frozen, seized and thawed the cgroup, between our read of THAWED and our write
of FROZEN; CRIU's freeze finds the cgroup FREEZING at its first look and then
sleeps 100 ms, so that needs a stall of ours of that order in two lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

from shim import freezer
from shim.checkpoint import dumpgate

log = logging.getLogger(__name__)
LOG_POLL_S = 0.001  # one stat() of CRIU's log file: cheap, and CRIU's start-up to its freezer is tens of ms
FREEZE_TIMEOUT = 10.0  # CRIU's own default for freezing (opts.timeout)
# The guard: reads `pid N` then `keep`; at EOF with a pid and no keep, waits for that pid to end, then thaws.
GUARD_SCRIPT = ('pid=; while read -r word arg; do case $word in pid) pid=$arg;; keep) exit 0;; esac; done; '
                '[ -n "$pid" ] || exit 0; '
                'while read -r _ _ st _ 2>/dev/null < "/proc/$pid/stat" && [ "$st" != Z ]; do sleep 0.1; done; '
                'printf %s "$2" > "$1"')


class PreFreeze:
    """The guard, and the freeze at CRIU's start (`freeze_at_start`, blocking)."""

    def __init__(self, cgroup: Path, dump_log: Path, guard: subprocess.Popen[bytes]) -> None:
        self.cgroup = cgroup
        self.dump_log = dump_log
        self._guard = guard
        self.frozen_at: float | None = None

    @classmethod
    async def start(cls, cgroup: Path, dump_log: Path, stack: AsyncExitStack) -> PreFreeze | None:
        """The guard, released (`keep`) with `stack`; None where we must not freeze (not THAWED)."""
        try:
            if await asyncio.to_thread(freezer.state, cgroup) is not freezer.State.THAWED:
                return None
        except freezer.FreezerError:
            return None
        thaw = freezer.thaw_file(cgroup)
        guard = await asyncio.to_thread(
            subprocess.Popen, ["sh", "-c", GUARD_SCRIPT, "checkpoint-guard", *thaw], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        stack.push_async_callback(asyncio.to_thread, _release, guard)
        return cls(cgroup, dump_log, guard)

    def freeze_at_start(self, stop: threading.Event, timeout: float) -> bool:
        """Wait for CRIU's log file, tell the guard CRIU's pid, freeze; whether we froze. Never raises:
        any miss leaves the freeze to CRIU."""
        deadline = time.monotonic() + timeout
        while not self.dump_log.exists():
            if stop.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(LOG_POLL_S)
        seen = time.monotonic()
        pid = self._criu_pid()
        if pid is None or self._guard.stdin is None:
            return False
        try:
            self._guard.stdin.write(f"pid {pid}\n".encode())
            self._guard.stdin.flush()  # before the freeze: from here on a death of ours is the guard's
            if freezer.state(self.cgroup) is not freezer.State.THAWED:
                return False  # CRIU got there first: its freeze, not ours
            freezer.freeze(self.cgroup, FREEZE_TIMEOUT)
        except (OSError, freezer.FreezerError) as exc:
            log.info("no freeze before CRIU's (CRIU freezes itself): %s", exc)
            return False
        self.frozen_at = time.monotonic()
        log.info("cgroup %s frozen for CRIU (pid %d) %.1f ms after its log appeared", self.cgroup.name, pid,
                 (self.frozen_at - seen) * 1000)
        return True

    def _criu_pid(self) -> int | None:
        """The criu process that has our log file open."""
        try:
            logfile = os.stat(self.dump_log)
        except OSError:
            return None
        for pid in dumpgate.criu_pids():
            if dumpgate.fifo_open_in(pid, [logfile]):
                return pid
        return None


def _release(guard: subprocess.Popen[bytes]) -> None:
    """Our paths dealt with the freezer themselves: the guard goes without thawing (blocking)."""
    if guard.stdin is not None:
        with contextlib.suppress(OSError):
            guard.stdin.write(b"keep\n")
            guard.stdin.close()
    guard.wait()
