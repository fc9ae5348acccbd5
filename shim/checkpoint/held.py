"""The dump with the rootfs diff taken inside CRIU's own hold of the container (no pause of ours).

The engine's alternative to pausing the container around the whole dump
(runc's and CRIU's start-up included): the container is stopped only while
CRIU holds it, and the filesystem side of the checkpoint (rootfs diff, the
pod's /dev/shm) is taken in that window, kept open by the gate (see
`dumpgate`). The pause remains for what the gate cannot serve: a stop-after
dump (CRIU ends the container right after; nothing to shorten), a node where
the image directory takes no FIFO, or a container whose cgroup is not found.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

from shim.archive_layout import IMAGES_DIR
from shim.checkpoint import dumpgate, options, recovery
from shim.containerd import Containerd
from shim.errors import Internal
from shim.faults import Point, armed, reached

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long CRIU may take to seize the container after the dump was asked for (runc's and CRIU's
# start-up on a loaded node); past it the gate opens and the checkpoint fails, container running.
HOLD_TIMEOUT = 60.0
THAW_TIMEOUT = 30.0
STATS_DUMP = "stats-dump"  # CRIU's statistics, in its work directory


async def make_gate(staging: Path, opts: options.CheckpointOptions, cgroup: Path | None,
                    stack: AsyncExitStack) -> dumpgate.Gate | None:
    """The gate for this dump, released with `stack`; None where the engine must pause instead."""
    if opts.stop_after or cgroup is None:
        return None
    images = staging / IMAGES_DIR
    images.mkdir(mode=0o700, exist_ok=True)
    gate = await asyncio.to_thread(dumpgate.Gate.make, images)
    if gate is not None:
        stack.push_async_callback(asyncio.to_thread, gate.close)
    return gate


async def dump_holding(gate: dumpgate.Gate, cgroup: Path, dump: Coroutine[Any, Any, None],
                       snapshot: Callable[[], Awaitable[T]]) -> T:
    """Run `dump`; take `snapshot()` while CRIU holds the container; return the snapshot.

    The gate opens on every path (the holder's `finally`), so CRIU is never
    left holding the container for us. A snapshot that fails, or a hold never
    seen, fails the checkpoint after CRIU has let the container go.
    """
    stop = threading.Event()
    holder = asyncio.ensure_future(_while_held(gate, cgroup, stop, snapshot))
    try:
        await dump
    except BaseException:
        stop.set()
        await asyncio.wait([holder])  # it has opened the gate on its way out
        if not holder.cancelled() and holder.exception() is not None:
            log.info("the snapshot beside a failed dump ended with: %s", holder.exception())
        raise
    stop.set()
    result = await holder  # done, or about to be: CRIU could not finish before the gate opened
    try:
        await asyncio.to_thread(gate.finish)
    except (OSError, dumpgate.GateError) as exc:
        raise Internal(f"checkpoint failed: CRIU's inventory image could not be kept: {exc}") from None
    return result


async def _while_held(gate: dumpgate.Gate, cgroup: Path, stop: threading.Event,
                      snapshot: Callable[[], Awaitable[T]]) -> T:
    try:
        try:
            criu_pid = await asyncio.to_thread(dumpgate.wait_held, cgroup, stop, HOLD_TIMEOUT)
        except dumpgate.GateError as exc:
            raise Internal(f"checkpoint failed: {exc}") from None
        reached(Point.CHECKPOINT_FROZEN)
        result = await snapshot()
        if armed(Point.CHECKPOINT_DUMPED):  # the point means: every page written, CRIU waiting at the gate
            await asyncio.to_thread(dumpgate.wait_at_gate, criu_pid, HOLD_TIMEOUT)
        reached(Point.CHECKPOINT_DUMPED)
        return result
    finally:
        await asyncio.shield(asyncio.to_thread(gate.open))


def keep_running_on_failure(containerd: Containerd, container_id: str, stack: AsyncExitStack) -> None:
    """A dump that failed may have left the cgroup frozen (CRIU killed between its freeze and its thaw)."""
    async def check(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None:
            try:
                done = await asyncio.shield(asyncio.wait_for(recovery.ensure_running(containerd, container_id),
                                                             THAW_TIMEOUT))
                log.info("container %s after a failed dump: %s", container_id, done)
            except Exception:
                log.exception("could not make sure container %s runs after: %s", container_id, exc)
        return False

    stack.push_async_exit(check)


def criu_frozen_s(work: Path) -> float:
    """How long CRIU held the container (its own `frozen_time`, which includes any wait at the gate)."""
    import pycriu.images  # Debian's pycriu, in the venv; imported here only, as the other readers do

    try:
        with open(work / STATS_DUMP, "rb") as f:
            entry = pycriu.images.load(f)["entries"][0]["dump"]
        return float(entry["frozen_time"]) / 1e6
    except Exception:  # a statistics file we cannot read costs the figure, never the checkpoint
        return 0.0
