"""`criu-shim serve`: wire configuration, handlers and signals to the proxy server.

The proxy's composition root, at the top of the layers (README "Layout"): the one module that
knows the CRI adapters, the checkpoint and restore engines, the reconciler and the transport.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from shim.checkpoint.engine import Checkpointer
from shim.config import Config
from shim.config import load as load_config
from shim.containerd import Containerd
from shim.cri import checkpoint_container, create_container, runtime_config, start_container
from shim.journal import Journal
from shim.proxy.dispatch import Dispatcher, Handler
from shim.proxy.server import ProxyServer
from shim.recovery import Reconciler
from shim.restore.engine import Restorer

log = logging.getLogger(__name__)


def handlers(config: Config, containerd: Containerd, restorer: Restorer,
             journal: Journal | None = None) -> dict[str, Handler]:
    """The CRI methods the proxy answers itself; everything else is relayed."""
    return {
        checkpoint_container.METHOD: checkpoint_container.handler(Checkpointer(containerd, config, journal)),
        create_container.METHOD: create_container.handler(containerd, restorer),
        start_container.METHOD: start_container.handler(containerd, restorer),
        runtime_config.METHOD: runtime_config.handler(containerd),
    }


def serve(listen: Path, upstream: Path, config_file: Path | None, grace: float) -> int:
    config = load_config(config_file)
    try:
        import uvloop
    except ImportError:  # the relay works on the stock loop, only slower
        return asyncio.run(_serve(listen, upstream, config, grace))
    return int(uvloop.run(_serve(listen, upstream, config, grace)))


async def _serve(listen: Path, upstream: Path, config: Config, grace: float) -> int:
    containerd = Containerd(upstream)  # a grpc.aio channel: made inside the running loop
    journal = Journal.in_state_dir(config.state_dir)
    restorer = Restorer(containerd, config)
    reconciler = Reconciler(containerd, config, journal)
    server = ProxyServer(listen, upstream, Dispatcher(handlers(config, containerd, restorer, journal)), grace=grace)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        await _recover_at_start(reconciler)
        await restorer.open()
        async with asyncio.TaskGroup() as tasks:
            periodic = tasks.create_task(reconciler.run_forever())
            await server.serve()
            periodic.cancel()
    finally:
        await restorer.close()
        await containerd.close()
    log.info("stopped")
    return 0


async def _recover_at_start(reconciler: Reconciler) -> None:
    """Before serving: a crash of ours must not leave a container frozen (containerd may still be down)."""
    try:
        result = await reconciler.run_once()
    except Exception:  # containerd not up yet: the periodic pass will do it
        log.exception("recovery at start-up failed; retrying periodically")
        return
    if result.undone or result.busy or result.failed:
        log.warning("start-up recovery: %d undone, %d still busy, %d failed (retried periodically)",
                    result.undone, result.busy, result.failed)
