"""The relay for a restored task, started by the proxy as soon as a restore begins.

A restore needs a ttrpc relay in front of the stock runc shim (see
`shim.runtime`). Starting it at StartContainer would put an interpreter
start-up on the restore's critical path, so the proxy starts it at the
beginning of CreateContainer, where its start-up overlaps the unpacking. It
listens at /run/criu-shim/shims/<key>.sock, the key being the name of the
restore's work dir (which the container's spec names, so the launcher script
finds it). At StartContainer the launcher starts the runc shim, writes its
address to <key>.upstream and gives containerd our socket.

The relay is its own process, not a task of the proxy: containerd treats a
lost shim connection as a dead shim and kills the container, so a restored
container must not depend on the proxy staying up (restarts, upgrades). It
exits when containerd closes the task's connection, or when the container is
never started, and removes the unpacked checkpoint then.

Even overlapped, an interpreter start-up (~0.1 s) outlasts the unpacking of a
lazy restore, so `SparePool` keeps one relay started ahead of need, its imports
done, waiting on a pipe for the work dir of the next restore. A spare whose
proxy goes away sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shim.errors import Unavailable
from shim.handoff import SHIM_DIR, RelayCommand, RelayFiles, relay_argv

READY_TIMEOUT = 10.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Relay:
    """Where the relay of one restore (work dir `work`) lives."""

    work: Path
    directory: Path = SHIM_DIR
    launcher: subprocess.Popen[bytes] | None = None

    @property
    def files(self) -> RelayFiles:
        return RelayFiles(self.work.name, self.directory)

    @property
    def socket(self) -> Path:
        return self.files.socket

    @property
    def upstream_file(self) -> Path:
        return self.files.upstream_file

    @property
    def pid_file(self) -> Path:
        return self.files.pid_file

    @property
    def log_file(self) -> Path:
        return self.files.log_file


def start_relay(work: Path, directory: Path = SHIM_DIR, journal: Path | None = None) -> Relay:
    """Launch the relay for the restore unpacked into `work` (returns at once; see wait_ready).

    `journal`: where the relay records what it holds (shim.restore.recovery).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    where = Relay(work, directory)
    with open(where.log_file, "ab") as out:
        launcher = subprocess.Popen(relay_argv(RelayCommand.HOSTED, str(where.socket), str(where.upstream_file),
                                               str(work), *_optional(journal)),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    return Relay(work, directory, launcher)


class SparePool:
    """One relay kept started ahead of need for the restores under `work_root`.

    Every method may run on the event loop or in a worker thread, two at once: every
    read and write of the spare is under `_lock` (held only for that, never across a
    fork or a pipe write), refills are serialised by `_refilling`, and a spare started
    by a refill that was under way when `close` ran is let go at once instead of kept
    (a refill begun after `close` starts a spare again: the pool can be reused).
    """

    def __init__(self, work_root: Path, directory: Path = SHIM_DIR, journal: Path | None = None) -> None:
        self._work_root = work_root
        self._directory = directory
        self._journal = journal
        self._spare: subprocess.Popen[bytes] | None = None
        self._closes = 0  # how many times close ran: a refill begun before one keeps nothing
        self._lock = threading.Lock()  # guards _spare and _closes
        self._refilling = threading.Lock()  # one refill at a time: never two spares

    def has_spare(self) -> bool:
        with self._lock:
            return self._spare is not None

    def start_unless_spare(self, work: Path) -> Relay | None:
        """None if a spare waits (`take` it later); else a new relay for `work`, starting now (blocking)."""
        return None if self.has_spare() else start_relay(work, self._directory, self._journal)

    def take(self, work: Path) -> Relay:
        """The relay for the restore unpacked into `work`: the spare if there is one, else a new one (blocking)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and _assign(spare, work):
            return Relay(work, self._directory, spare)
        return start_relay(work, self._directory, self._journal)

    async def wait_ready(self, relay: Relay) -> int:
        """Wait until `relay` listens; its pid (see `wait_ready`)."""
        return await wait_ready(relay)

    def stop(self, relay: Relay) -> None:
        """Ask `relay` to stop (see `stop_relay`)."""
        stop_relay(relay)

    def refill(self) -> None:
        """Start the next spare (blocking: a fork and exec; call it off the event loop)."""
        with self._refilling:
            with self._lock:
                if self._spare is not None:
                    return
                closes = self._closes
            spawned = self._spawn()
            with self._lock:
                if self._closes == closes:
                    self._spare, spawned = spawned, None
            if spawned is not None:  # closed meanwhile
                _let_go(spawned)

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            # Until it has a restore (and its own log), what it says goes to the proxy's log.
            # Working in the restores' root, it (and the page daemon it starts ahead of need, which
            # inherits that) is found by where it works, as the node's (`node down` finds a spare
            # daemon orphaned at idle priority, still starting up, that way). The root is made now:
            # on a node that never restored, a spare worked where the proxy did, and its page daemon
            # was found by nothing (CI: left by the critest node three runs in a row).
            self._work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            spare = subprocess.Popen(
                relay_argv(RelayCommand.SPARE, str(self._directory), str(self._work_root), *_optional(self._journal)),
                stdin=subprocess.PIPE, start_new_session=True, cwd=self._work_root)
        except OSError as exc:  # restores still work, one interpreter start-up slower
            log.warning("could not start a spare restore relay: %s", exc)
            return None
        # Idle priority from its first instruction, not only once its interpreter is up (the spare
        # sets it itself then): a refill runs beside the restore that took the last spare, and the
        # interpreter's start-up, 50-60 ms of CPU here, would compete with that restore for the cores.
        with contextlib.suppress(OSError):  # gone already: the pool finds out when it assigns it
            os.sched_setscheduler(spare.pid, os.SCHED_IDLE, os.sched_param(0))
        return spare

    def close(self) -> None:
        """Let the spare go (it exits when its pipe closes); reap its launcher."""
        with self._lock:
            self._closes += 1
            spare, self._spare = self._spare, None
        if spare is not None:
            _let_go(spare)


def _let_go(spare: subprocess.Popen[bytes]) -> None:
    assert spare.stdin is not None
    with contextlib.suppress(OSError):
        spare.stdin.close()
    spare.wait()


def _optional(journal: Path | None) -> list[str]:
    return [] if journal is None else [str(journal)]


def _assign(spare: subprocess.Popen[bytes], work: Path) -> bool:
    assert spare.stdin is not None
    try:
        spare.stdin.write(f"{work}\n".encode())
        spare.stdin.close()
        return True
    except OSError:  # BrokenPipeError: the spare died; a fresh relay takes its place
        with contextlib.suppress(OSError):
            spare.stdin.close()
        spare.wait()
        return False


async def wait_ready(relay: Relay) -> int:
    """Wait until the relay listens; return its pid."""
    if relay.launcher is not None:
        # `relay-for` forks the relay and exits at once: reaped here, so no zombie later.
        await asyncio.to_thread(relay.launcher.wait)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (relay.socket.exists() and relay.pid_file.exists()):
        if time.monotonic() > deadline:
            stop_relay(relay)
            raise Unavailable(f"the restore relay for {relay.work} did not start; see {relay.log_file}")
        await asyncio.sleep(0.005)
    return int(relay.pid_file.read_text())


def remove_files(keys: set[str], directory: Path = SHIM_DIR) -> list[str]:
    """Remove what relays that died without cleaning up left for the restores `keys`; the files removed."""
    removed = []
    for key in sorted(keys):
        for path in RelayFiles(key, directory).every_file:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
    return removed


def stop_relay(relay: Relay) -> None:
    """Ask a relay to stop (it cleans up after itself); nothing if it is gone."""
    try:
        os.kill(int(relay.pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
