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
never wrong, as long as our freeze does not land after CRIU's. CRIU freezes,
seizes every task and thaws at once (criu/seize.c freeze_processes: the tasks
stay stopped under ptrace); a FROZEN of ours after that thaw would keep the
seized tasks in the refrigerator and CRIU would wait for them forever, the
container frozen. With CRIU's kernel probes cached (as on any node with a tmpfs
/run) CRIU goes from its log's first line to that thaw in about 2 ms, so this
did happen (a 512 MiB container, two times in four). Two checks close it. Before
our write: CRIU's log does not yet say it is at its freezer ("freezing cgroup").
After our freeze: CRIU's first look at the freezer, logged before it acts, did
not find it THAWED; if it did, CRIU froze it itself and thaws it once it has
seized every task, and so do we, once every task is CRIU's (`_undo_after_criu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
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
SEIZE_TIMEOUT = 10.0  # CRIU freezes (up to its own 10 s) before it seizes
AFTER_SEIZE_S = 0.002
# CRIU's log (criu/seize.c): the line before its first look at the freezer, and what it found (v1, v2).
_FREEZING = "freezing cgroup "
_STATE = re.compile(r"(?:freezer\.state|cgroup\.freeze)=(\w+)")
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
            if freezer.state(self.cgroup) is not freezer.State.THAWED or criu_at_freezer(self._log_text()):
                return False  # CRIU got there first: its freeze, not ours
            freezer.freeze(self.cgroup, FREEZE_TIMEOUT)
        except (OSError, freezer.FreezerError) as exc:
            log.info("no freeze before CRIU's (CRIU freezes itself): %s", exc)
            self._undo_after_criu(pid, stop)
            return False
        if criu_found_thawed(self._log_text()):
            self._undo_after_criu(pid, stop)
            return False
        self.frozen_at = time.monotonic()
        log.info("cgroup %s frozen for CRIU (pid %d) %.1f ms after its log appeared", self.cgroup.name, pid,
                 (self.frozen_at - seen) * 1000)
        return True

    def _undo_after_criu(self, criu_pid: int, stop: threading.Event) -> None:
        """CRIU looked at the freezer before our write landed: it froze the cgroup itself and thaws it once
        it has seized every task. Thaw it then too, whichever of us wrote last (never earlier: CRIU
        lists the tasks to seize only once they are frozen)."""
        if not criu_found_thawed(self._log_text()):
            return  # our write came first after all (CRIU found it FREEZING or FROZEN): CRIU thaws it
        deadline = time.monotonic() + SEIZE_TIMEOUT
        while not stop.is_set() and time.monotonic() < deadline and not seized_by(self.cgroup, criu_pid):
            time.sleep(LOG_POLL_S)
        time.sleep(AFTER_SEIZE_S)  # CRIU's thaw follows its last PTRACE_SEIZE within microseconds
        try:
            freezer.set_state(self.cgroup, freezer.State.THAWED, FREEZE_TIMEOUT)
        except freezer.FreezerError as exc:
            log.error("CRIU froze cgroup %s itself before our freeze landed, and it could not be thawed "
                      "after CRIU's seize: %s", self.cgroup.name, exc)
            return
        log.info("CRIU froze cgroup %s itself before our freeze landed: thawed again once CRIU held its tasks",
                 self.cgroup.name)

    def _log_text(self) -> str:
        try:
            return self.dump_log.read_text(errors="replace")
        except OSError:
            return ""

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


def criu_at_freezer(dump_log: str) -> bool:
    """CRIU's log says it has begun its freeze (the line it writes before it first reads the freezer)."""
    return _FREEZING in dump_log


def criu_found_thawed(dump_log: str) -> bool:
    """CRIU's first look at the freezer (logged before it acts on it) found it THAWED: CRIU froze it itself."""
    at = dump_log.find(_FREEZING)
    first = _STATE.search(dump_log, at) if at >= 0 else None
    return first is not None and first.group(1) in ("THAWED", "0")


def seized_by(cgroup: Path, tracer: int) -> bool:
    """Every task of the cgroup is traced by `tracer` (CRIU's PTRACE_SEIZE, before it thaws)."""
    listing = cgroup / ("tasks" if (cgroup / "freezer.state").exists() else "cgroup.threads")
    try:
        tids = listing.read_text().split()
    except OSError:
        return False
    for tid in tids:
        try:
            status = Path(f"/proc/{tid}/status").read_text()
        except OSError:
            continue  # gone meanwhile
        traced = next((line.split()[1] for line in status.splitlines() if line.startswith("TracerPid:")), "0")
        if traced != str(tracer):
            return False
    return bool(tids)


def _release(guard: subprocess.Popen[bytes]) -> None:
    """Our paths dealt with the freezer themselves: the guard goes without thawing (blocking)."""
    if guard.stdin is not None:
        with contextlib.suppress(OSError):
            guard.stdin.write(b"keep\n")
            guard.stdin.close()
    guard.wait()
