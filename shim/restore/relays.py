"""Relays for restored tasks, hosted by the proxy: no interpreter start per restore.

At CreateContainer the proxy knows a restore is coming, so it starts the ttrpc
relay for that container then, inside its own process, listening at
/run/criu-shim/shims/<container id>.sock. At StartContainer the launcher
script (`containerd-shim-criu-v2`, plain sh) starts the stock runc shim, writes
its address to <id>.upstream and hands containerd our socket instead. When the
proxy is not serving a restore's socket (it restarted in between), the launcher
falls back to a relay process of its own (`shim.runtime.main`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from shim.runtime.bundle import RestorePlan
from shim.runtime.relay_daemon import TASK_SERVICE, RestoreRewriter
from shim.ttrpc.relay import RelayServer

SHIM_DIR = Path("/run/criu-shim/shims")
# A restored container whose StartContainer never comes is given up after this.
START_WAIT = 15 * 60.0
log = logging.getLogger(__name__)


class RelayHost:
    """Owns the relay of every pending or running restore; `run()` is their TaskGroup."""

    def __init__(self, directory: Path = SHIM_DIR) -> None:
        self.directory = directory
        self._tasks: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._servers: set[RelayServer] = set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self._ready.set()
            await self._stop.wait()
            for server in list(self._servers):
                server.stop()

    def stop(self) -> None:
        self._stop.set()

    async def start(self, container_id: str, work: Path) -> None:
        """Listen for containerd on behalf of `container_id`; cleans `work` when done."""
        await self._ready.wait()
        assert self._tasks is not None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        listen = self.directory / f"{container_id}.sock"
        upstream_file = self.directory / f"{container_id}.upstream"
        server = RelayServer(listen, lambda: Path(upstream_file.read_text().strip()),
                             RestoreRewriter(RestorePlan(work)), exit_when_idle=True,
                             methods={(TASK_SERVICE, "Create"), (TASK_SERVICE, "Start")})
        self._servers.add(server)
        self._tasks.create_task(self._serve(server, upstream_file, work))
        await server.wait_ready()

    async def _serve(self, server: RelayServer, upstream_file: Path, work: Path) -> None:
        async def give_up_unless_started() -> None:
            await asyncio.sleep(START_WAIT)
            if not upstream_file.exists():
                log.warning("restored container never started; dropping its relay %s", server.listen)
                server.stop()

        try:
            async with asyncio.TaskGroup() as tasks:
                watchdog = tasks.create_task(give_up_unless_started())
                try:
                    await server.serve()
                finally:
                    watchdog.cancel()
        finally:
            self._servers.discard(server)
            upstream_file.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
