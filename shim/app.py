"""`criu-shim serve`: wire configuration, handlers and signals to the proxy server.

The proxy's composition root, at the top of the layers (README "Layout"): the one module that
knows the CRI adapters, the checkpoint and restore engines, the reconciler and the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from shim import fillspool, metrics, signing
from shim.api.cri.v1 import api_pb2 as cri_v1
from shim.checkpoint.checkpointer import Checkpointer
from shim.checkpoint.criulog import LOGS
from shim.config import Config
from shim.config import load as load_config
from shim.containerd import Containerd
from shim.cri import checkpoint_container, create_container, runtime_config, start_container
from shim.errors import ShimError
from shim.export import Exporter
from shim.journal import Journal
from shim.proxy.dispatch import Call, Dispatcher, Handler
from shim.proxy.server import ProxyServer
from shim.recovery import Reconciler
from shim.restore import unseal
from shim.restore.restorer import Restorer
from shim.retention.collector import ArchiveCollector

log = logging.getLogger(__name__)


def handlers(config: Config, containerd: Containerd, restorer: Restorer,
             journal: Journal | None = None, after_checkpoint: Callable[[], None] | None = None) -> dict[str, Handler]:
    """The CRI methods the proxy answers itself; everything else is relayed."""
    checkpoint = checkpoint_container.handler(Checkpointer(containerd, config, journal), _publisher(config))
    return {
        checkpoint_container.METHOD: _then(checkpoint, after_checkpoint) if after_checkpoint else checkpoint,
        create_container.METHOD: create_container.handler(containerd, restorer),
        start_container.METHOD: start_container.handler(containerd, restorer, config.state_dir / LOGS),
        runtime_config.METHOD: runtime_config.handler(containerd),
    }


def _publisher(config: Config) -> Callable[[Path, float | None], Awaitable[None]] | None:
    """[export]: push each kubelet checkpoint to the registry before the kubelet gets its answer, so the
    image exists once `kubectl checkpoint` sees the archive's name. A failed push is logged and the
    checkpoint still succeeds: the archive is written and the workload was never at stake. A push
    still running when the call's deadline nears goes on in its thread; the answer does not wait."""
    if config.export.registry is None:
        return None
    exporter = Exporter(config.export.registry, config.export.repository, signing_key=config.signing.key_file,
                        keyring=unseal.keyring(config.encryption))
    running: set[asyncio.Future[object]] = set()  # pushes that outlived their call: kept until they end

    def report(archive: Path, push: asyncio.Future[object]) -> None:
        running.discard(push)
        exc = None if push.cancelled() else push.exception()
        if isinstance(exc, ShimError):
            log.error("checkpoint %s not published to %s: %s", archive, exporter.registry, exc.message)
        elif exc is not None:
            log.error("checkpoint %s not published to %s", archive, exporter.registry, exc_info=exc)

    async def publish(archive: Path, seconds_left: float | None) -> None:
        if not exporter.wants(archive):
            return
        push: asyncio.Future[object] = asyncio.ensure_future(asyncio.to_thread(exporter.publish, archive))
        running.add(push)
        push.add_done_callback(lambda done: report(archive, done))
        await asyncio.wait({push}, timeout=None if seconds_left is None else max(seconds_left, 0.0))
        if not push.done():
            log.warning("checkpoint %s: still publishing to %s at the call's deadline; answering now, the push "
                        "goes on", archive, exporter.registry)

    return publish


def serve(listen: Path, upstream: Path, config_file: Path | None, grace: float) -> int:
    config = load_config(config_file)
    _warn_about_keys(config)
    try:
        import uvloop
    except ImportError:  # the relay works on the stock loop, only slower
        return asyncio.run(_serve(listen, upstream, config, grace))
    return int(uvloop.run(_serve(listen, upstream, config, grace)))


def _warn_about_keys(config: Config) -> None:
    """Say at start-up what a bad [signing] key will refuse later. The proxy serves anyway: the
    kubelet needs CRI more than checkpoints, and each checkpoint or restore checks its keys again."""
    try:
        if config.signing.key_file is not None:
            signing.load_signing_key(config.signing.key_file)
        signing.load_trusted_keys(config.signing.trusted_keys)
    except ShimError as exc:
        log.error("%s: checkpoints or restores will be refused until it is fixed", exc.message)


async def _serve(listen: Path, upstream: Path, config: Config, grace: float) -> int:
    containerd = Containerd(upstream)  # a grpc.aio channel: made inside the running loop
    journal = Journal.in_state_dir(config.state_dir)
    restorer = Restorer(containerd, config)
    reconciler = Reconciler(containerd, config, journal)
    collector = ArchiveCollector(config.retention, config.audit_log, restorer.archives_in_use) \
        if config.retention.enabled else None
    answered = handlers(config, containerd, restorer, journal, collector.poke if collector else None)
    counter = metrics.CallCounter(cri_methods(), answered) if config.metrics.listen else None
    server = ProxyServer(listen, upstream, Dispatcher(answered, counter), grace=grace)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    try:
        await _recover_at_start(reconciler)
        await restorer.open()
        with _metrics_endpoint(config):
            async with asyncio.TaskGroup() as tasks:
                periodic = [tasks.create_task(reconciler.run_forever()), tasks.create_task(restorer.after_restores())]
                if collector is not None:
                    periodic.append(tasks.create_task(collector.run_forever()))
                await server.serve()
                for task in periodic:
                    task.cancel()
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


def _then(handler: Handler, after: Callable[[], None]) -> Handler:
    """`handler`, then `after()` once it has succeeded (a new checkpoint: retention looks again)."""
    async def call(request: Call) -> bytes:
        reply = await handler(request)
        after()
        return reply

    return call


def cri_methods() -> list[str]:
    """Every CRI v1 method path ("/runtime.v1.RuntimeService/Version"...): the labels of the call counter."""
    return [f"/{service.full_name}/{method.name}"
            for service in cri_v1.DESCRIPTOR.services_by_name.values() for method in service.methods]


@contextlib.contextmanager
def _metrics_endpoint(config: Config) -> Iterator[None]:
    """Prometheus /metrics while the proxy serves, if configured (its own thread, never the event loop)."""
    if config.metrics.listen is None:
        yield
        return
    spool = config.restore.work_dir / fillspool.SPOOL if config.restore.enabled else None
    try:
        endpoint = metrics.Endpoint(config.metrics.listen, spool)
    except OSError as exc:  # CRI must not go down with it: the kubelet needs the proxy to reach containerd
        log.error("not serving metrics on %s:%d: %s", *config.metrics.listen, exc)
        yield
        return
    try:
        yield
    finally:
        endpoint.close()
