"""`criu-shim serve`: wire configuration, handlers and signals to the proxy server."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from shim.proxy.dispatch import Dispatcher, Handler
from shim.proxy.server import ProxyServer

log = logging.getLogger(__name__)


def handlers(config: Path | None) -> dict[str, Handler]:
    """The CRI methods the proxy answers itself; everything else is relayed."""
    return {}


def serve(listen: Path, upstream: Path, config: Path | None, grace: float) -> int:
    server = ProxyServer(listen, upstream, Dispatcher(handlers(config)), grace=grace)
    try:
        import uvloop
    except ImportError:  # the relay works on the stock loop, only slower
        return asyncio.run(_serve(server))
    return int(uvloop.run(_serve(server)))


async def _serve(server: ProxyServer) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.serve()
    log.info("stopped")
    return 0
