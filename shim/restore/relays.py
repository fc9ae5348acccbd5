"""The relay for a restored task, started by the proxy at CreateContainer.

A restore needs a ttrpc relay in front of the stock runc shim (see
`shim.runtime`). Starting it at StartContainer would put an interpreter
start-up on the restore's critical path, so the proxy starts it as soon as it
knows a restore is coming: right after CreateContainer, listening at
/run/criu-shim/shims/<container id>.sock. The launcher script then starts the
runc shim, writes its address to <id>.upstream and gives containerd our socket.

The relay is its own process, not a task of the proxy: containerd treats a
lost shim connection as a dead shim and kills the container, so a restored
container must not depend on the proxy staying up (restarts, upgrades). It
exits when containerd closes the task's connection, or when the container is
never started, and removes the unpacked checkpoint then.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shim.errors import Unavailable

SHIM_DIR = Path("/run/criu-shim/shims")
READY_TIMEOUT = 10.0


async def spawn_relay(container_id: str, work: Path, directory: Path = SHIM_DIR) -> int:
    """Start the relay process for `container_id`, wait until it listens; return its pid."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    listen = directory / f"{container_id}.sock"
    upstream_file = directory / f"{container_id}.upstream"
    with open(work.parent / f"{work.name}.relay.log", "ab") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "shim.runtime", "relay-for", str(listen),
                                     str(upstream_file), str(work)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    await asyncio.to_thread(launcher.wait)  # it forks the relay and exits at once
    pid_file = listen.with_suffix(".pid")
    deadline = time.monotonic() + READY_TIMEOUT
    while not (listen.exists() and pid_file.exists()):
        if time.monotonic() > deadline:
            stop_relay(pid_file)
            raise Unavailable(f"the restore relay for {container_id} did not start; see {work}.relay.log")
        await asyncio.sleep(0.005)
    return int(pid_file.read_text())


def stop_relay(pid_file: Path) -> None:
    """Ask a relay to stop (it cleans up after itself); nothing if it is gone."""
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass
