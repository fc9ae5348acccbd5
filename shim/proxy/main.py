"""`criu-shim serve`: wire configuration, handlers and signals to the proxy server."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from shim.checkpoint.engine import Checkpointer
from shim.config import Config
from shim.config import load as load_config
from shim.containerd import Containerd
from shim.cri import checkpoint_container, create_container, start_container
from shim.proxy.dispatch import Dispatcher, Handler
from shim.proxy.server import ProxyServer
from shim.restore.engine import Restorer

log = logging.getLogger(__name__)


def handlers(config: Config, containerd: Containerd, restorer: Restorer) -> dict[str, Handler]:
    """The CRI methods the proxy answers itself; everything else is relayed."""
    return {
        checkpoint_container.METHOD: checkpoint_container.handler(Checkpointer(containerd, config)),
        create_container.METHOD: create_container.handler(containerd, restorer),
        start_container.METHOD: start_container.handler(containerd, restorer),
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
    restorer = Restorer(containerd, config)
    server = ProxyServer(listen, upstream, Dispatcher(handlers(config, containerd, restorer)), grace=grace)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        await restorer.open()
        await server.serve()
    finally:
        await restorer.close()
        await containerd.close()
    log.info("stopped")
    return 0
