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
import subprocess
import sys
import time
from pathlib import Path

from shim.errors import Unavailable

SHIM_DIR = Path("/run/criu-shim/shims")
READY_TIMEOUT = 10.0


async def spawn_relay(container_id: str, work: Path, directory: Path = SHIM_DIR) -> subprocess.Popen[bytes]:
    """Start the relay process for `container_id` and wait until it listens."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    listen = directory / f"{container_id}.sock"
    upstream_file = directory / f"{container_id}.upstream"
    with open(work.parent / f"{work.name}.relay.log", "ab") as out:
        relay = subprocess.Popen([sys.executable, "-m", "shim.runtime", "relay-for", str(listen),
                                  str(upstream_file), str(work)],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while not listen.exists():
        if time.monotonic() > deadline:
            relay.kill()
            raise Unavailable(f"the restore relay for {container_id} did not start; see {work}.relay.log")
        await asyncio.sleep(0.005)
    return relay
